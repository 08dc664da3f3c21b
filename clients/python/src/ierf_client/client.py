"""Blocking client for ``ierf.v1.ExplainService``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

from ierf_client import _core
from ierf_client._core import (
    Explanation,
    IERFResult,
    ImageInput,
    ModelInfo,
    Prediction,
    RetryPolicy,
)

R = TypeVar("R")


class Client:
    """``Client("host:9000", timeout=60, token=None)``; one HTTP/2 channel, thread-safe.

    ``timeout`` is the whole-call budget in seconds, retries included (per call: ``timeout=``).
    The budget also travels to the server (metadata ``ierf-timeout-ms``), which drops work whose
    caller has given up. ``application`` names the Ray Serve application to route to: needed only when
    the Serve cluster runs more than one (sent as ``application`` metadata, Serve's routing key).
    ``remembered_images``: images this client remembers as held by the service (0: always send the pixels);
    a repeat of one (the same bytes, the same model), whatever it asks, travels by its content hash alone
    (the service keeps the model's view of the image); if the service no longer holds it, the pixels follow.
    """

    def __init__(
        self,
        address: str,
        timeout: float = 60.0,
        token: str | None = None,
        *,
        max_message_bytes: int = _core.DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        application: str | None = None,
        remembered_images: int = _core.DEFAULT_REMEMBERED_IMAGES,
    ) -> None:
        self.address = _core.check_address(address, secure=credentials is not None)
        self._references = _core.ImageReferences(_core.check_remembered_images(remembered_images))
        self.timeout = _core.check_timeout(timeout)
        self.token = _core.check_token(token, self.address, secure=credentials is not None)
        self.application = None if application is None else _core.check_application(application)
        self.retry = _core.check_retry(retry)
        all_options = _core.channel_options_with(_core.check_max_message_bytes(max_message_bytes), options)
        if credentials is not None:
            self._channel = grpc.secure_channel(address, credentials, options=all_options)
        else:
            self._channel = grpc.insecure_channel(address, options=all_options)
        self._closed = False
        self._stub = pb_grpc.ExplainServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            _core.HEALTH_CHECK,
            request_serializer=_core.encode_health_request,
            response_deserializer=_core.decode_health_response,
        )

    # ------------------------------------------------------------------------------ plumbing
    def _call(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        if self._closed:
            raise RuntimeError("this Client is closed")
        budget = self.timeout if timeout is None else _core.check_timeout(timeout)
        deadline = time.monotonic() + budget
        attempts = _core.Attempts()
        while True:
            if self._closed:  # closed while this call waited to retry
                raise RuntimeError("this Client is closed")
            remaining = deadline - time.monotonic()
            try:
                return method(
                    request,
                    timeout=_core.attempt_timeout(remaining),
                    metadata=_core.call_metadata(self.token, remaining, self.application),
                )
            except ValueError:  # grpc's "Cannot invoke RPC on closed channel!": not a bad argument
                if self._closed:
                    raise RuntimeError("this Client is closed") from None
                raise
            except grpc.RpcError as exc:
                if self._closed:  # the channel closed under the call (grpc says CANCELLED)
                    raise RuntimeError("this Client was closed during the call") from None
                attempts.failed(exc)
                pause = _core.retry_pause_after(self.retry, exc, attempts, deadline)
                if pause is None:
                    raise attempts.error(exc) from None
                time.sleep(pause)

    def _call_referring(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        """:meth:`_call` for a request with an image: by the image's content hash when this client sent the
        same image for the same model lately and the service kept it (:class:`_core.ImageReferences`), the
        pixels again if the service refuses the reference; the answer is remembered for the next repeat."""
        budget = self.timeout if timeout is None else _core.check_timeout(timeout)
        deadline = time.monotonic() + budget
        references = self._references
        key = references.key(request)
        referring = references.referring(key, request)
        if referring is not None:
            try:
                return references.answered(key, self._call(method, referring, budget))
            except _core.IerfError as exc:
                if not references.refused(key, exc):
                    raise
            budget = max(deadline - time.monotonic(), _core.MIN_ATTEMPT_TIMEOUT_S)
        return references.answered(key, self._call(method, request, budget))

    # ---------------------------------------------------------------------------------- API
    def explain(
        self,
        image: ImageInput,
        target: int | None = None,
        *,
        model: str = "",
        method: str = "srd",
        contrast: str | int = "identity",
        map_dtype: str = "float32",
        overlay: bool = True,
        return_input: bool = False,
        timeout: float | None = None,
    ) -> Explanation:
        """Signed class saliency; ``target=None`` explains the predicted top-1 class."""
        request = _core.explain_request(image, target, model, method, contrast, map_dtype, overlay, return_input)
        return _core.parse_explanation(self._call_referring(self._stub.Explain, request, timeout))

    def ierf(
        self,
        image: ImageInput,
        layer: str,
        positions: Iterable[Sequence[int]],
        *,
        model: str = "",
        map_dtype: str = "float32",
        overlay: bool = False,
        return_input: bool = False,
        timeout: float | None = None,
    ) -> IERFResult:
        """iERFs of the PFVs at ``positions`` [(row, col), …] of ``layer``."""
        request = _core.ierf_request(image, layer, positions, model, map_dtype, overlay, return_input)
        return _core.parse_ierf(self._call_referring(self._stub.ComputeIERF, request, timeout))

    def predict(
        self, image: ImageInput, top_k: int = 5, *, model: str = "", timeout: float | None = None
    ) -> Prediction:
        request = _core.predict_request(image, top_k, model)
        return _core.parse_prediction(self._call_referring(self._stub.Predict, request, timeout))

    def models(self, *, timeout: float | None = None) -> _core.ModelList:
        """Every model served (a list), with ``.default_model_id``: the one a call naming no model gets."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return _core.ModelList((_core.parse_model(m) for m in response.models), response.default_model_id)

    def model(self, model_id: str = "", *, timeout: float | None = None) -> ModelInfo:
        """One model's input spec, classes and layers (``""``: the server's default model)."""
        request = pb.GetModelRequest(model_id=_core.check_name(model_id, "model_id"))
        return _core.parse_model(self._call(self._stub.GetModel, request, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", …"""
        return self._call(self._health, _core.check_name(service, "service"), timeout)

    def wait_until_serving(self, timeout: float = 120.0, interval_s: float = 0.5) -> None:
        """Poll health until SERVING (e.g. right after start-up); TimeoutError past ``timeout``."""
        deadline = time.monotonic() + _core.check_timeout(timeout)
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except _core.IerfError as exc:
                last = str(exc)
            time.sleep(interval_s)
        raise TimeoutError(f"{self.address} not SERVING after {timeout} s (last: {last})")

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

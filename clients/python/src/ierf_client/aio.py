"""asyncio client: the same API as :class:`ierf_client.Client`, as coroutines (``grpc.aio``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

from ierf_client import _core
from ierf_client._core import Explanation, IERFResult, ImageInput, ModelInfo, Prediction, RetryPolicy


class AsyncClient:
    """``async with AsyncClient("host:9000") as client: await client.explain(...)``; the arguments as
    :class:`ierf_client.Client`'s (``remembered_images`` too: repeats travel by content hash)."""

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
        self._options = _core.channel_options_with(_core.check_max_message_bytes(max_message_bytes), options)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _connect(self) -> tuple[pb_grpc.ExplainServiceStub, Any]:
        """The channel opens on first use, in the running loop: a grpc.aio channel belongs to the loop
        that made it, so one made at import time or before ``asyncio.run`` would fail on every call."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._loop = loop
            self._stub = pb_grpc.ExplainServiceStub(self._channel)
            self._health = self._channel.unary_unary(
                _core.HEALTH_CHECK,
                request_serializer=_core.encode_health_request,
                response_deserializer=_core.decode_health_response,
            )
        elif loop is not self._loop:
            raise RuntimeError(
                "this AsyncClient's channel belongs to the event loop of its first call; "
                "use one AsyncClient per event loop"
            )
        return self._stub, self._health

    async def _call(self, rpc: str, request: Any, timeout: float | None) -> Any:
        """``rpc``: an ExplainService method name, or "health" for grpc.health.v1 Check."""
        stub, health = self._connect()
        method = health if rpc == "health" else getattr(stub, rpc)
        budget = self.timeout if timeout is None else _core.check_timeout(timeout)
        deadline = time.monotonic() + budget
        attempts = _core.Attempts()
        while True:
            if self._closed:  # closed while this call waited to retry
                raise RuntimeError("this AsyncClient is closed")
            remaining = deadline - time.monotonic()
            try:
                return await method(
                    request,
                    timeout=_core.attempt_timeout(remaining),
                    metadata=_core.call_metadata(self.token, remaining, self.application),
                )
            except asyncio.CancelledError:
                # Closing the channel cancels its calls, which grpc.aio raises as CancelledError in the
                # caller's task: a cancellation nobody asked for (gather and TaskGroup take it for theirs).
                # Python 3.10 cannot tell it from a real one (no Task.cancelling): it stays a cancel there.
                cancelling = getattr(asyncio.current_task(), "cancelling", None)
                if self._closed and cancelling is not None and not cancelling():
                    raise RuntimeError("this AsyncClient was closed during the call") from None
                raise
            except grpc.aio.UsageError:  # a call on a closed channel
                if self._closed:
                    raise RuntimeError("this AsyncClient is closed") from None
                raise
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    raise RuntimeError("this AsyncClient was closed during the call") from None
                attempts.failed(exc)
                pause = _core.retry_pause_after(self.retry, exc, attempts, deadline)
                if pause is None:
                    raise attempts.error(exc) from None
                await asyncio.sleep(pause)

    async def _call_referring(self, rpc: str, request: Any, timeout: float | None) -> Any:
        """:meth:`_call`, by the image's content hash for a repeat the service holds (see
        :meth:`ierf_client.Client._call_referring`)."""
        budget = self.timeout if timeout is None else _core.check_timeout(timeout)
        deadline = time.monotonic() + budget
        references = self._references
        if request.image.ByteSize() > _core.INLINE_ARRAY_BYTES:  # hashing megabytes would stall the loop
            key = await asyncio.to_thread(references.key, request)
        else:
            key = references.key(request)
        referring = references.referring(key, request)
        if referring is not None:
            try:
                return references.answered(key, await self._call(rpc, referring, budget))
            except _core.IerfError as exc:
                if not references.refused(key, exc):
                    raise
            budget = max(deadline - time.monotonic(), _core.MIN_ATTEMPT_TIMEOUT_S)
        return references.answered(key, await self._call(rpc, request, budget))

    async def explain(
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
        request = await _built(
            _core.explain_request, image, target, model, method, contrast, map_dtype, overlay, return_input
        )
        return _core.parse_explanation(await self._call_referring("Explain", request, timeout))

    async def ierf(
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
        request = await _built(_core.ierf_request, image, layer, positions, model, map_dtype, overlay, return_input)
        return _core.parse_ierf(await self._call_referring("ComputeIERF", request, timeout))

    async def predict(
        self, image: ImageInput, top_k: int = 5, *, model: str = "", timeout: float | None = None
    ) -> Prediction:
        request = await _built(_core.predict_request, image, top_k, model)
        return _core.parse_prediction(await self._call_referring("Predict", request, timeout))

    async def models(self, *, timeout: float | None = None) -> _core.ModelList:
        response = await self._call("ListModels", pb.ListModelsRequest(), timeout)
        return _core.ModelList((_core.parse_model(m) for m in response.models), response.default_model_id)

    async def model(self, model_id: str = "", *, timeout: float | None = None) -> ModelInfo:
        request = pb.GetModelRequest(model_id=_core.check_name(model_id, "model_id"))
        return _core.parse_model(await self._call("GetModel", request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return await self._call("health", _core.check_name(service, "service"), timeout)

    async def wait_until_serving(self, timeout: float = 120.0, interval_s: float = 0.5) -> None:
        """Poll health until SERVING (e.g. right after start-up); TimeoutError past ``timeout``."""
        deadline = time.monotonic() + _core.check_timeout(timeout)
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except _core.IerfError as exc:
                last = str(exc)
            await asyncio.sleep(interval_s)
        raise TimeoutError(f"{self.address} not SERVING after {timeout} s (last: {last})")

    async def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _built(build: Callable[..., Any], image: ImageInput, *args: Any) -> Any:
    """``build(image, *args)``, off the event loop when it may take long (reading a file, encoding a PNG,
    copying a large array): the caller's other tasks keep running meanwhile."""
    if _core.building_may_block(image):
        return await asyncio.to_thread(build, image, *args)
    return build(image, *args)

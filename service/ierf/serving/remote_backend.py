"""The CLI's ``--server ADDRESS`` backend: the same commands, computed by the gRPC service via the SDK.

Lives in ierf.serving (not next to the CLI) because it imports grpc through the SDK; the CLI loads it
only when ``--server`` is given, so the in-process CLI never needs grpc.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ierf.cli import (
    SERVER_WEIGHTS,
    BackendFailure,
    ClassProbability,
    ExplainRequest,
    Explanation,
    LayerRow,
    UsageError,
)

F = TypeVar("F", bound=Callable[..., Any])


class ServerRefusal(ValueError):
    """The server refused the request as the caller's mistake (INVALID_ARGUMENT, NOT_FOUND, a cap's
    RESOURCE_EXHAUSTED, a token refused): exit status 2."""


_REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "OUT_OF_RANGE"}


class ServerFailure(BackendFailure):
    """The server could not answer (UNAVAILABLE, DEADLINE_EXCEEDED, an overload's RESOURCE_EXHAUSTED,
    INTERNAL, …): exit status 1."""


def _server_errors(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: RemoteBackend, *args: Any, **kwargs: Any) -> Any:
        import grpc
        from ierf_client import IerfError

        try:
            return method(self, *args, **kwargs)
        except IerfError as exc:
            # the request itself is the problem (a retry gets the same answer): a cap's RESOURCE_EXHAUSTED
            # too, which an overload's (marked with a pause to wait) is not
            refused = exc.code.name in _REFUSALS or (
                exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.retry_after_s is None
            )
            error = ServerRefusal if refused else ServerFailure
            raise error(f"server {self.address}: {exc.code.name}: {exc.details}") from None

    return wrapper  # type: ignore[return-value]


def _upload(request: ExplainRequest) -> Any:
    """The file's own bytes when the server decodes its format (a 12 MP JPEG travels as ~2 MB instead of
    being re-encoded as a ~15 MB PNG for every call), else the decoded pixels."""
    from ierf_client._core import server_reads

    if request.path is not None:
        # told from the magic bytes, as the SDK does: Image.open here raised DecompressionBombError (a
        # traceback) for a file whose header declares more pixels than Pillow opens, which is the server's
        # to refuse by its own caps
        with open(request.path, "rb") as f:
            data = f.read()
        if server_reads(data[:12]):
            return data
        if request.image is None:  # a format the server does not read: decoded here, sent as pixels
            from ierf.images import load_image

            return load_image(request.path)
    return request.image


class RemoteBackend:
    """Implements the CLI's Backend protocol with :class:`ierf_client.Client`."""

    sends_files = True  # the CLI leaves the image undecoded: the file goes as it is, the server decodes it

    def __init__(self, address: str, timeout: float = 600.0) -> None:
        from ierf_client import Client, RetryPolicy

        self.address = address
        # A few quick retries (~1.5 s): the SDK's default retries UNAVAILABLE for the whole 600 s
        # budget, far too long for a person at a terminal who mistyped the address.
        self.client = Client(address, timeout=timeout, retry=RetryPolicy(max_attempts=5))

    def close(self) -> None:
        self.client.close()

    @_server_errors
    def model_names(self) -> list[str]:
        return [model.id for model in self.client.models()]

    @_server_errors
    def model_rows(self) -> list[tuple[str, str, str]]:
        """(id, preprocessing version, weights) per served model, for ``ierf models``; the server's default
        model (what a call naming none gets) is marked."""
        models = self.client.models()
        return [
            (
                f"{m.id} (default)" if m.id == models.default_model_id else m.id,
                m.input.preprocess_version,
                f"served by {self.address} (sha256 {m.weights_digest})",
            )
            for m in models
        ]

    @_server_errors
    def layers(self, model: str, weights: str | None = None) -> list[LayerRow]:
        if weights is not None:
            raise UsageError("--weights does not apply with --server: the server decides its weights")
        return [LayerRow(x.name, x.channels, x.height, x.width) for x in self.client.model(model).layers]

    @_server_errors
    def explain(self, request: ExplainRequest) -> Explanation:
        from ierf.models.classes import class_index

        if request.weights is not None or request.random_init:
            raise UsageError(SERVER_WEIGHTS)
        info = self.client.model(request.model)
        image = _upload(request)
        top = [
            ClassProbability(s.index, s.name, s.probability)
            for s in self.client.predict(image, top_k=5, model=info.id).top_classes
        ]
        weights = f"served by {self.address} (sha256 {info.weights_digest})"
        if request.layer is not None:
            if request.position is None:
                raise UsageError("--layer needs --position ROW,COL")
            result = self.client.ierf(image, request.layer, [request.position], model=info.id, return_input=True)
            return Explanation(
                kind="ierf",
                model=info.id,
                weights=weights,
                pixels=result.model_input,
                map=result.maps[0],
                top=top,
                layer=result.layer.name,  # the canonical name the server answered for an alias ("layer4")
                position=request.position,
                feature_hw=(result.layer.height, result.layer.width),
            )
        target = None if request.target == "auto" else class_index(request.target, info.class_names)
        contrast: str | int = request.contrast.lower()
        if contrast not in ("identity", "mean"):
            contrast = class_index(request.contrast, info.class_names)
        result = self.client.explain(image, target, model=info.id, contrast=contrast, overlay=False, return_input=True)
        return Explanation(
            kind="saliency",
            model=info.id,
            weights=weights,
            pixels=result.model_input,
            map=result.map,
            top=top,
            target=ClassProbability(result.target.index, result.target.name, result.target.probability),
            target_logit=result.target.logit,
            contrast=contrast if isinstance(contrast, str) else f"minus {info.class_names[contrast]!r}",
        )

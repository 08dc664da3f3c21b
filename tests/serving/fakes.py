"""Stand-ins for the Serve pieces the ingress talks to, for tests of the ingress alone (no Ray runtime)."""

from __future__ import annotations

from typing import Any


class Response:
    """Stands in for a Serve DeploymentResponse: awaitable, cancellable."""

    def __init__(self, coroutine: Any) -> None:
        self._coroutine = coroutine
        self.cancelled = False

    def __await__(self):
        return self._coroutine.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class Method:
    """A handle's method: ``remote(...)`` runs ``fn`` and counts the calls."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self.calls = 0

    def remote(self, *args: Any) -> Response:
        self.calls += 1
        return Response(self._fn(*args))


class BackPressureError(Exception):
    """Named like ray.serve.exceptions.BackPressureError: what a handle call raises when the deployment's
    ``max_queued_requests`` is reached (the ingress matches Ray's errors by name)."""


class GrpcContext:
    """What the ingress uses of Serve's gRPC context."""

    def __init__(self) -> None:
        self.code = self.details = None
        self.trailers: list[tuple[str, str]] = []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return []

    def request_id(self) -> str:
        return "r"

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailers: list[tuple[str, str]]) -> None:
        self.trailers = trailers

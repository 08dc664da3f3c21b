"""Service errors and their gRPC status codes.

Everything a caller can get wrong is raised as a :class:`ServiceError` subclass carrying the status
code and a readable message; the ingress turns it into the gRPC status. Errors cross the Ray hop
between worker and ingress, so they stay plain picklable exceptions (one positional message).
"""

from __future__ import annotations

import grpc

from ierf.errors import BrokenModelError

# A caller's string is echoed in an error message up to this many characters. The message travels in the
# gRPC trailers, which clients cap at 8 KB by default: a 10 KB model id echoed whole turned NOT_FOUND
# into a RESOURCE_EXHAUSTED from the caller's own transport ("metadata size exceeds soft limit").
ECHO_CHARS = 64
# Any message is cut to this length (Serve's proxy cuts its own at 4096).
MAX_MESSAGE_CHARS = 2000


def echo(value: str) -> str:
    """``repr(value)``, cut to :data:`ECHO_CHARS` characters with the full length said."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}… ({len(value)} characters)"


def clip(message: str) -> str:
    """A status message short enough for any client's trailer limits."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 20] + f"… [{len(message)} chars]"


class ServiceError(Exception):
    """An error the caller can act on; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    """Over a size cap (the same request will always be refused), or, as :class:`Overloaded`, a full queue."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(ResourceExhausted):
    """A bounded queue is full: the same request may pass after a pause. The ingress says so in the
    trailing metadata :data:`RETRY_AFTER_KEY`, which RESOURCE_EXHAUSTED alone cannot (it also means "too
    big, never retry")."""


class StaleView(ServiceError):
    """The ingress resized an image by a description the worker no longer matches (another preprocessing
    after a redeploy): the ingress forgets the description and sends the decoded image instead. Never
    reaches a caller."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PixelsNeeded(ServiceError):
    """A job sent by content hash alone (a repeat of an image the ingress sent recently) that the worker cannot
    answer from its caches (evicted, another replica without Redis, a bad cached value): the ingress sends it
    again with the pixels. Never reaches a caller."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ImageNeeded(ServiceError):
    """A request that named its image by content hash (Image.content_hash) for an image the model's workers no
    longer hold, or never held: the caller sends the pixels (the SDK does so by itself)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


#: Trailing metadata on an overload refusal: milliseconds to wait before retrying (the SDK honours it).
RETRY_AFTER_KEY = "ierf-retry-after-ms"
RETRY_AFTER_MS = 250


#: gRPC's own retry pushback (gRFC A6), read by the built-in retry policies of grpc-core (C++, Python,
#: C#, Ruby, PHP), grpc-java, grpc-go and grpc-js: milliseconds before the next attempt, or negative for
#: "do not retry". A policy that retries RESOURCE_EXHAUSTED then retries overloads only, after the pause.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Refusals of the request itself: the same request fails the same way, whatever a retry policy lists.
_NEVER_RETRY = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def retry_after_ms(exc: BaseException) -> int | None:
    """The pause to suggest for ``exc`` (an overload: ours, or Ray's back-pressure), else None."""
    exc = unwrap(exc)
    if isinstance(exc, Overloaded) or type(exc).__name__ == "BackPressureError":
        return RETRY_AFTER_MS
    return None


def retry_trailers(exc: BaseException, status: grpc.StatusCode) -> list[tuple[str, str]]:
    """Trailing metadata for a refusal: an overload's pause (ours and gRPC's standard key), or gRPC's "do not
    retry" for a refusal of the request itself (a cap is RESOURCE_EXHAUSTED too)."""
    pause = retry_after_ms(exc)
    if pause is not None:
        return [(RETRY_AFTER_KEY, str(pause)), (PUSHBACK_KEY, str(pause))]
    if status in _NEVER_RETRY:
        return [(PUSHBACK_KEY, "-1")]
    return []


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    """Transient: the caller may retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


def error_for(code: grpc.StatusCode, message: str) -> ServiceError:
    """The ServiceError subclass for ``code`` (INTERNAL and others: the base class)."""
    for cls in (InvalidArgument, NotFound, ResourceExhausted, DeadlineExceeded, Unavailable):
        if cls.code == code:
            return cls(message)
    return ServiceError(message)


def unwrap(exc: BaseException) -> BaseException:
    """Ray wraps worker exceptions (RayTaskError); the original is its ``cause``."""
    seen = 0
    while seen < 8:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            exc = cause
            seen += 1
            continue
        break
    return exc


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception raised while serving a request to (code, readable message).

    ServiceError keeps its code. Ray's back-pressure means a full queue -> RESOURCE_EXHAUSTED.
    Engine ValueError/TypeError are bad calls -> INVALID_ARGUMENT, except a model whose own weights are not
    finite (BrokenModelError): INTERNAL, which the server-error alert counts. Anything else is a server bug:
    INTERNAL with a short message (the traceback goes to the log, not to the caller).
    """
    exc = unwrap(exc)
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    name = type(exc).__name__
    if name == "BackPressureError":  # ray.serve.exceptions, matched by name to keep this import-light
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"service overloaded, retry later: {exc}"
    if name in {"DeploymentUnavailableError", "ActorDiedError", "RayActorError", "ActorUnavailableError"}:
        return grpc.StatusCode.UNAVAILABLE, f"worker unavailable, retry later: {type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, BrokenModelError):  # the served model's fault, whatever the caller sent
        return grpc.StatusCode.INTERNAL, f"the served model is broken: {exc}"
    if isinstance(exc, ValueError | TypeError | IndexError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs"

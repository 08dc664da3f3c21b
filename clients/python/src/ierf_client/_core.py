"""Request building, response parsing, errors and retry policy shared by the sync and async clients."""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from ierf_proto.v1 import explainer_pb2 as pb
from PIL import Image

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC's default is 4 MiB, too small for maps and photos
RAW_TENSOR_LIMIT_BYTES = 16 * 1024 * 1024  # larger arrays are sent as lossless PNG instead
TIMEOUT_METADATA_KEY = "ierf-timeout-ms"  # the server-side deadline (Serve does not forward grpc-timeout)
RETRY_AFTER_KEY = "ierf-retry-after-ms"  # trailer of an overload refusal: the server's suggested pause
SERVICE = "ierf.v1.ExplainService"
MAX_RECONNECT_BACKOFF_MS = 2000  # longest wait of the channel between connection attempts
MIN_ATTEMPT_S = 0.05  # an attempt with less budget than this left is not made

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray


# ----------------------------------------------------------------------------------------- errors
class IerfError(Exception):
    """A failed call: ``code`` is the gRPC status, ``details`` the server's readable message, and
    ``retry_after_s`` the pause an overload refusal suggested (None for anything else, caps included)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[grpc.StatusCode, str, float | None]]:
        # rebuilt from its fields, not from the message: a process pool sends errors back pickled
        return type(self), (self.code, self.details, self.retry_after_s)


class InvalidArgumentError(IerfError, ValueError):
    pass


class NotFoundError(IerfError, LookupError):
    pass


class ResourceExhaustedError(IerfError):
    pass


class DeadlineExceededError(IerfError, TimeoutError):
    pass


class UnavailableError(IerfError, ConnectionError):
    pass


class UnauthenticatedError(IerfError, PermissionError):
    pass


class PermissionDeniedError(IerfError, PermissionError):
    """A gateway in front of the service refused this caller's rights (the token is valid, the call is not
    allowed)."""


class UnimplementedError(IerfError, NotImplementedError):
    """The server has no such RPC: an older server, or not ierf at that address."""


class DataLossError(IerfError):
    """A response that does not hold what the protocol says (bytes that do not fill a map's shape, an
    overlay that is not a PNG of about the map's size): the server is broken or not ierf, and the call is
    not the caller's mistake, so this is no ValueError. Also the class of a server's own DATA_LOSS."""


def _data_loss(details: str) -> DataLossError:
    """The SDK's own refusal of a response, with the status a server would give it."""
    return DataLossError(grpc.StatusCode.DATA_LOSS, details)


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


# Serve's proxy answers NOT_FOUND with this while no application is routed through it: for a moment during
# a restart (its port opens before the application is deployed), or for good on a cluster serving several
# applications when the call names none (ray/serve/_private/proxy.py).
_SERVE_NO_ROUTES = "Application metadata not set"
# Attempts (of one call) that may meet it before it is taken as the lasting kind: ~6 s of backoff on average.
SERVE_NO_ROUTES_ATTEMPTS = 12


def _serve_has_no_routes(code: grpc.StatusCode, details: str) -> bool:
    return code == grpc.StatusCode.NOT_FOUND and _SERVE_NO_ROUTES in details


def error_from_rpc(exc: grpc.RpcError) -> IerfError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if _serve_has_no_routes(code, details):
        details += (
            " (ierf: Serve routes no application here: the service is still deploying, or the cluster runs "
            "several applications and the client must name one with application=)"
        )
    return _ERRORS.get(code, IerfError)(code, details, server_pause_s(exc))


class Attempts:
    """What a call's attempts met: the last overload refusal, so that a call whose retries ran into its
    deadline says it was refused for overload (a capacity problem), not only "Deadline Exceeded"."""

    def __init__(self) -> None:
        self.count = 0
        self.no_routes = 0  # Serve's "no application here" answers (a restart's last phase, or for good)
        self.overloads = 0
        self.last_overload: grpc.RpcError | None = None

    def failed(self, exc: grpc.RpcError) -> None:
        self.count += 1
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        if _serve_has_no_routes(code, (exc.details() if hasattr(exc, "details") else "") or ""):
            self.no_routes += 1
        if server_pause_s(exc) is not None:
            self.overloads += 1
            self.last_overload = exc

    def error(self, exc: grpc.RpcError) -> IerfError:
        """The error to raise for the final failed attempt ``exc``."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        if self.last_overload is None:
            return error_from_rpc(exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = "retried until the call's deadline ran out"
        elif exc is self.last_overload and self.count > 1:  # retried, and the next pause no longer fitted
            why = "retried until no further attempt fitted the call's deadline or retry policy"
        else:
            return error_from_rpc(exc)
        overload = error_from_rpc(self.last_overload)
        details = f"{overload.details} (refused as overloaded on {self.overloads} of {self.count} attempts, {why})"
        return type(overload)(overload.code, details, overload.retry_after_s)


# ------------------------------------------------------------------------------------------ retry
@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE (the request never reached a worker, or the server is restarting) and, with
    ``retry_overload``, a RESOURCE_EXHAUSTED the server marks as an overload (full queues: trailing
    metadata ``ierf-retry-after-ms``, whose pause is then waited at least; a RESOURCE_EXHAUSTED without
    it is a cap, refused again whatever the wait).

    Anything else is either the caller's mistake or would repeat work the server may have done.
    Backoff: exponential with full jitter, capped, and never past the call's own deadline.
    ``max_attempts=None`` (the default) keeps retrying until that deadline: a server restart takes
    seconds, and the channel reconnects on its own schedule (every 0.25 s growing to 2 s here, see
    :func:`channel_options`), so a fixed handful of quick attempts gives up while the server is still
    coming back. Pass a number to fail faster.
    """

    max_attempts: int | None = None
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retry_overload: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1
        ):
            raise ValueError(f"max_attempts must be None or an integer >= 1, got {self.max_attempts!r}")
        for name in ("initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.multiplier, int | float) or not math.isfinite(self.multiplier) or self.multiplier < 1:
            raise ValueError(f"multiplier must be a finite number >= 1, got {self.multiplier!r}")
        if not isinstance(self.retry_overload, bool):
            raise ValueError(f"retry_overload must be True or False, got {self.retry_overload!r}")

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** min(attempt, 64))
        return random.uniform(0, ceiling)

    def gives_up(self, attempts: int) -> bool:
        """True once ``attempts`` calls have been made and no further one is allowed."""
        return self.max_attempts is not None and attempts >= self.max_attempts

    def retryable(self, code: grpc.StatusCode, server_pause_s: float | None = None) -> bool:
        """``server_pause_s``: the pause an overload refusal suggested (None: not an overload)."""
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        return self.retry_overload and code == grpc.StatusCode.RESOURCE_EXHAUSTED and server_pause_s is not None


def _no_port(address: str, form: str) -> ValueError:
    return ValueError(
        f"address {address!r} has no port: grpc would dial 443 (TLS) without credentials; give "
        f"'{form}' (the service listens on 9000 by default)"
    )


def check_address(address: object, secure: bool = False) -> str:
    """A gRPC target as grpc reads it: ``host:port``, ``[v6]:port`` or a ``scheme:`` target (``dns:///…``,
    ``unix:…``, ``ipv4:…``). Refused here: what can never connect, which grpc would otherwise retry as
    an unreachable server until the call's whole budget is spent, and a plaintext address without a port
    (grpc dials 443, the TLS port: the service's plaintext port is 9000)."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be 'host:port' (e.g. '127.0.0.1:9000'), got {address!r}")
    if address != address.strip() or any(c.isspace() for c in address):
        raise ValueError(f"address {address!r} contains white space")
    if address.lower().startswith(("http://", "https://", "grpc://", "grpcs://")):
        scheme = address.split(":", 1)[0]
        raise ValueError(f"address {address!r} has a URL scheme ({scheme}://): give 'host:port' as grpc reads it")
    if address.startswith("dns:") and not secure:
        # dns:[//authority/]host[:port]: the same default port as a bare host
        name = address[len("dns:") :].lstrip("/")
        name = name.split("/", 1)[1] if address.startswith("dns://") and "/" in name else name
        if ("]:" not in name) if name.startswith("[") else (":" not in name):
            raise _no_port(address, "dns:///host:port")
    if not address.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")):
        host, colon, port = address.rpartition(":")
        bare_ipv6 = colon and host and not host.endswith("]") and ":" in host
        if not secure and (bare_ipv6 or not colon):
            raise _no_port(address, "host:port")
        if bare_ipv6:
            return address
        if colon and not host:  # grpc resolves an empty host to nothing and retries until the budget is spent
            raise ValueError(f"address {address!r} has no host: give 'host:port' (e.g. '127.0.0.1:9000')")
        if colon and not (port.isascii() and port.isdigit()):
            raise ValueError(f"address {address!r} has no numeric port: give 'host:port' (e.g. '127.0.0.1:9000')")
        if colon and not 1 <= int(port) <= 65535:  # grpc would dial the port modulo 65536
            raise ValueError(f"address {address!r} has port {port}, outside 1..65535")
    return address


def check_index(value: object, what: str) -> int:
    """An integer argument (Python or numpy int); floats and bools are refused, not truncated (3.7 would
    explain class 3, True class 1)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


INT32_MAX = 2**31 - 1


def check_int32(value: object, what: str) -> int:
    """An integer argument that travels as a protobuf int32: out-of-range values are named here, not by
    protobuf's "Value out of range"."""
    number = check_index(value, what)
    if not -INT32_MAX - 1 <= number <= INT32_MAX:
        raise ValueError(f"{what} {number} is out of range")
    return number


def check_flag(value: object, what: str) -> bool:
    """A yes/no option: True or False (numpy's too), not a string ("no" is truthy) or None."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"{what} must be True or False, got {value!r} ({type(value).__name__})")


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {value!r} ({type(value).__name__})")
    return value


def check_application(value: object) -> str:
    """The Serve application a call names: it travels as gRPC metadata, so printable ASCII only (gRPC
    would refuse anything else on every call, as INTERNAL "Invalid metadata")."""
    name = check_name(value, "application")
    if not all(" " <= c <= "~" for c in name):
        raise ValueError(f"application must be printable ASCII (it travels as gRPC metadata), got {name!r}")
    return name


def check_contrast(contrast: object) -> str | int:
    """ "identity" or "mean" (any case), or a class index as an integer."""
    if isinstance(contrast, int | np.integer) and not isinstance(contrast, bool | np.bool_):
        return check_int32(contrast, "contrast class")
    if isinstance(contrast, str):
        if contrast.strip().lower() in ("identity", "mean"):
            return contrast.strip().lower()
        if contrast.strip().lstrip("-").isdigit():
            raise TypeError(f"contrast {contrast!r}: give a contrast class as an integer, not a string")
    raise ValueError(f"contrast must be 'identity', 'mean' or a class index (an integer), got {contrast!r}")


def check_retry(retry: object) -> RetryPolicy:
    """None (the default policy) or a RetryPolicy; a number would fail only at the first outage."""
    if retry is None:
        return RetryPolicy()
    if not isinstance(retry, RetryPolicy):
        raise TypeError(
            f"retry must be a RetryPolicy (e.g. RetryPolicy(max_attempts=3)) or None, got {retry!r} "
            f"({type(retry).__name__})"
        )
    return retry


class PlaintextTokenWarning(UserWarning):
    """A bearer token set on a client without TLS to a host other than this machine."""


def check_token(token: object, address: str = "", secure: bool = True) -> str | None:
    """A bearer token travels as gRPC metadata: printable ASCII only. Without ``credentials`` it travels
    in clear text (the SDK writes the metadata itself, so gRPC's own refusal of call credentials on an
    insecure channel does not apply): to anything but this machine that is said, once per client."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a string, got {type(token).__name__}")
    if not all(" " <= c <= "~" for c in token):
        raise ValueError("token must be printable ASCII (it travels as gRPC metadata)")
    if not secure and not _is_this_machine(address):
        warnings.warn(
            f"token= will travel in clear text to {address}: pass credentials=grpc.ssl_channel_credentials() "
            "for TLS (where a service mesh encrypts the hop, filter ierf_client.PlaintextTokenWarning)",
            PlaintextTokenWarning,
            stacklevel=3,
        )
    return token


def _is_this_machine(address: str) -> bool:
    """A loopback or local-socket target, where clear text never leaves the machine. An ``ipv4:``/``ipv6:``
    target may list several addresses (``ipv4:127.0.0.1:9000,10.0.0.7:9000``): grpc dials any of them, so
    every one must be local."""
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return True
    target = address.removeprefix("ipv4:").removeprefix("ipv6:")
    if target.startswith("dns:"):
        # dns:[//resolver/]host[:port]: the resolver named in the authority is not where the call goes
        target = target.removeprefix("dns:")
        if target.startswith("//"):
            target = target[2:].partition("/")[2]
    return all(_is_loopback(part) for part in target.lstrip("/").split(","))


def _is_loopback(target: str) -> bool:
    if target.startswith("["):
        host = target[1 : target.find("]")]
    elif target.count(":") == 1:
        host = target.partition(":")[0]
    else:  # no port (grpc's default 443 then), or a bare IPv6 address
        host = target
    return host == "localhost" or host == "::1" or host.startswith("127.")


def check_timeout(timeout: object, what: str = "timeout") -> float:
    """The call budget in seconds: a positive finite number (there is no unbounded call)."""
    if isinstance(timeout, np.integer | np.floating):  # a budget computed with numpy
        timeout = timeout.item()
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


# grpc takes its message limits as C ints: past 2**31 - 1 bytes it raises OverflowError, and a float or a
# string is dropped without a word (its 4 MiB default stays).
_GRPC_MAX_INT = 2**31 - 1


def check_max_message_bytes(value: object) -> int:
    """The channel's message limit both ways: a whole number of bytes, 1 MiB to 2 GiB - 1."""
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_message_bytes must be an int (bytes), got {value!r} ({type(value).__name__})")
    if not 2**20 <= value <= _GRPC_MAX_INT:
        raise ValueError(f"max_message_bytes must be between {2**20} (1 MiB) and {_GRPC_MAX_INT}, got {value}")
    return value


# Serve's proxy answers for a full ingress queue itself, before any of the service's code runs, so without
# the trailer; its message is the mark (ray/serve/_private/grpc_util.py).
_PROXY_BACKPRESSURE = "dropped due to backpressure"


def server_pause_s(exc: object) -> float | None:
    """The pause an overload refusal suggests (its ``ierf-retry-after-ms`` trailer; 0 for the back-pressure
    Serve's proxy answers itself), else None: not an overload."""
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # an error that never reached a server has none
        return None
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                millis = float(value)
            except (TypeError, ValueError):
                return None
            return millis / 1000 if math.isfinite(millis) and millis >= 0 else None
    try:
        code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    except Exception:
        return None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _PROXY_BACKPRESSURE in details:
        return 0.0
    return None


def retry_pause_after(policy: RetryPolicy, exc: grpc.RpcError, attempts: Attempts, deadline: float) -> float | None:
    """:func:`retry_pause` for a failed attempt (``attempts`` has counted it): Serve's proxy saying it routes
    no application yet (a restart between its port opening and the deployment) is retried like UNAVAILABLE
    for a while, since the service is coming back; past ``SERVE_NO_ROUTES_ATTEMPTS`` such answers (the
    UNAVAILABLE attempts of the outage before do not count) it is taken as final (no application named)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if _serve_has_no_routes(code, details):
        if attempts.no_routes >= SERVE_NO_ROUTES_ATTEMPTS:
            return None
        code = grpc.StatusCode.UNAVAILABLE
    elif _serve_replica_died(code, details):
        code = grpc.StatusCode.UNAVAILABLE
    return retry_pause(policy, code, attempts.count, deadline, server_pause_s(exc))


def _serve_replica_died(code: grpc.StatusCode, details: str) -> bool:
    """Serve's proxy answering for a replica killed under the call (a redeploy or downscale past its graceful
    timeout, an OOM kill): INTERNAL, but nothing was answered, every RPC is a read, and the next attempt
    reaches a live replica; the service's own INTERNAL replies never read like this."""
    return (
        code == grpc.StatusCode.INTERNAL
        and details.startswith("The actor died unexpectedly")
        and "ServeReplica:" in details
    )


def retry_pause(
    policy: RetryPolicy, code: grpc.StatusCode, attempts: int, deadline: float, server_pause: float | None = None
) -> float | None:
    """Seconds to wait before the next attempt after ``attempts`` failed ones, or None to give up.

    The last pause is cut short so that one more attempt still fits in the budget, rather than giving up
    with time left (a server back a second before the deadline should still be reached). An overload's
    suggested pause is waited at least, and it must fit.
    """
    if not policy.retryable(code, server_pause) or policy.gives_up(attempts):
        return None
    left = deadline - time.monotonic() - MIN_ATTEMPT_S
    wait = max(policy.backoff(attempts - 1), server_pause or 0.0)
    if left <= 0 or (server_pause is not None and server_pause > left):
        return None
    return min(wait, left)


# grpc's deadline arithmetic overflows from about 1e10 s (every call then failed at once with
# DEADLINE_EXCEEDED): a longer budget is kept by the SDK's own clock, each attempt waits at most this long.
MAX_ATTEMPT_TIMEOUT_S = 1e8


# The shortest timeout an attempt is given: one made with (almost) no time left still goes out, and meets its
# deadline. Not MIN_ATTEMPT_S (the budget retry_pause keeps for a retry worth making).
MIN_ATTEMPT_TIMEOUT_S = 0.001


def attempt_timeout(remaining_s: float) -> float:
    return min(max(remaining_s, MIN_ATTEMPT_TIMEOUT_S), MAX_ATTEMPT_TIMEOUT_S)


def channel_options_with(max_message_bytes: int, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel options, then the SDK's defaults for keys the caller did not set (grpc keeps
    the first value of a key: the defaults first silently overrode the caller's)."""
    given = {key for key, _ in options}
    return [*options, *((key, value) for key, value in channel_options(max_message_bytes) if key not in given)]


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC's reconnect backoff grows to 120 s, and while it waits every call fails at once, whatever
        # the SDK's retries do: cap it so a restarted server is found again within ~2 s.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        # 5 min: the gRPC server default minimum ping interval, so servers never answer "too_many_pings".
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def call_metadata(token: str | None, remaining_s: float, application: str | None = None) -> list[tuple[str, str]]:
    metadata = [(TIMEOUT_METADATA_KEY, str(max(1, int(remaining_s * 1000))))]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if application:  # Ray Serve's proxy routes by it when the cluster runs several applications
        metadata.append(("application", application))
    return metadata


# ------------------------------------------------------------------------------------------ images
# EXIF Orientation (tag 0x0112) -> the transpose that shows the image upright: the server's table
# (ierf.images), applied to PIL images here because their PNG re-encoding carries no EXIF.
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B")  # sent as they are; the server converts
_SIXTEEN_BIT_MODES = ("I;16L", "I;16N")  # 16-bit greys PNG cannot name: re-labelled I;16, losslessly


# An array up to this size is written into a request on the caller's thread; see building_may_block.
INLINE_ARRAY_BYTES = 1024 * 1024


def building_may_block(image: object) -> bool:
    """Whether writing ``image`` into a request can take long enough to stall an event loop: a file to read,
    a PNG to encode (a PIL image, a file in a format the server does not read, an array over
    RAW_TENSOR_LIMIT_BYTES: a 12 Mpx photo took 2.2 s on two cores) or a large array to copy."""
    if isinstance(image, np.ndarray):
        return image.nbytes > INLINE_ARRAY_BYTES
    if isinstance(image, bytes | bytearray | memoryview):
        return not server_reads(bytes(image[:12]))
    return True  # a path (read from disk) or a PIL image (encoded), or a type refused at once anyway


def image_message(image: ImageInput) -> pb.Image:
    """The image as a message of its own (see :func:`fill_image`)."""
    message = pb.Image()
    fill_image(message, image)
    return message


def fill_image(message: pb.Image, image: ImageInput) -> None:
    """Write ``image`` into ``message`` (a request's ``image`` field), in place.

    Paths and bytes travel as the file's encoded bytes; PIL images as PNG, upright as the server
    would turn their file; arrays as raw tensors (large float ones rounded to uint8 first, large uint8
    ones as lossless PNG), so the server sees the same canonical pixels however the image travels.
    In place because protobuf (upb) deep-copies a message handed to a constructor: with glibc's default
    malloc, each copy of a 720 KB image mapped fresh pages, and building a request as
    ``ExplainRequest(image=Image(tensor=Tensor(data=...)))`` cost 3.4 ms against 0.07 ms."""
    if isinstance(image, str | os.PathLike):
        _fill_encoded(message, Path(image).read_bytes())
        return
    if isinstance(image, bytes | bytearray | memoryview):
        _fill_encoded(message, bytes(image))
        return
    if isinstance(image, Image.Image):
        message.encoded = _png(_png_ready(image))
        return
    if isinstance(image, np.ndarray):
        # The server takes (H, W, 3), (H, W, 1) or (H, W): checked here so that a wrong shape fails
        # the same way whatever the array's size (large ones travel as PNG), before any upload. An alpha
        # channel is dropped, as the server drops an RGBA file's.
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(f"image array shape {image.shape} is not (H, W, 3), (H, W, 4), (H, W, 1) or (H, W)")
        native = image.dtype.newbyteorder("=") if image.dtype.byteorder in "<>" else image.dtype
        if native == np.float64:  # what skimage's img_as_float gives; the server reads float32 pixels
            image, native = image.astype(np.float32), np.dtype(np.float32)
        if native == np.uint8:
            dtype = pb.DATA_TYPE_UINT8
        elif native == np.float32:
            dtype = pb.DATA_TYPE_FLOAT32
        elif native == np.float16:
            dtype = pb.DATA_TYPE_FLOAT16
        else:
            raise TypeError(
                f"image array dtype {image.dtype} is not sent as is: use uint8 (0..255) or float16/32/64 in [0, 1]"
            )
        if dtype != pb.DATA_TYPE_UINT8 and image.nbytes > RAW_TENSOR_LIMIT_BYTES:
            # The server rounds float pixels to uint8 anyway: doing it here first lets a large float
            # image travel at a quarter (or half) of the size, and as PNG if still too large.
            image, dtype = _float_to_uint8(image), pb.DATA_TYPE_UINT8
        if dtype == pb.DATA_TYPE_UINT8 and image.nbytes > RAW_TENSOR_LIMIT_BYTES:
            grey_or_rgb = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
            message.encoded = _png(Image.fromarray(np.ascontiguousarray(grey_or_rgb)))  # lossless
            return
        data = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
        message.tensor.data = data.tobytes()
        message.tensor.dtype = dtype
        message.tensor.shape.extend(image.shape)
        return
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, bytes, PIL image or numpy array")


# Formats the server decodes itself (ierf.serving.images.ACCEPTED_FORMATS), by their leading bytes.
def server_reads(data: bytes) -> bool:
    """Whether the server decodes this file's format (PNG, JPEG, WebP), told from its first 12 bytes."""
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _fill_encoded(message: pb.Image, data: bytes) -> None:
    """A file's bytes as they are when the server reads the format (PNG, JPEG, WebP); another format
    Pillow reads here (GIF, BMP, TIFF, …: the in-process CLI takes them too) travels as a lossless PNG of
    its first frame, upright by its EXIF orientation. Bytes nobody reads go as they are: the server then
    says what is wrong with them."""
    if server_reads(data):
        message.encoded = data
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's complaints about a damaged file: the outcome says it
            picture = Image.open(io.BytesIO(data))
            picture.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:  # readable, but too large to convert here (or to explain there)
        raise ValueError(f"image file is too large to convert to PNG for the server: {exc}") from None
    except Exception:  # Pillow cannot read them (OSError, SyntaxError, EOFError, struct.error, …)
        message.encoded = data
        return
    message.encoded = _png(_png_ready(picture))


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8, checked and rounded exactly as the server's ``decode_tensor``.

    Same float32 arithmetic, same round-half-to-even, so the server's canonical pixels (and the
    content hash every cache key hangs off) are those of the float tensor it would have decoded.
    Values it would refuse with INVALID_ARGUMENT are refused here, with its words.
    """
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError("float image array contains NaN or infinity")
    outside = (values < 0.0) | (values > 1.0)
    if outside.any():
        first = np.unravel_index(int(np.argmax(outside)), values.shape)
        where = ", ".join(str(int(i)) for i in first)
        raise ValueError(
            f"float image array values must lie in [0, 1]; got values from {values.min()!s} to {values.max()!s} "
            f"(first outside at [{where}]: {values[first]!s})"
        )
    return np.rint(values * 255.0).astype(np.uint8)


def _exif_orientation(picture: Image.Image) -> int:
    """EXIF orientation 1..8 as the server reads it; 1 when absent, unknown or unreadable."""
    try:
        value = picture.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if type(value) is int and value in _ORIENTATION_TRANSPOSE else 1


def _png_ready(picture: Image.Image) -> Image.Image:
    """``picture`` as the server would see it from its file, in a mode PNG can store.

    The PNG carries no EXIF, so the orientation the server would apply to the original file is
    applied here (by the server's rule, not ImageOps.exif_transpose, which may raise on bad tags).
    Modes PNG cannot store are converted the way the server's ``to_rgb_array`` would: 16-bit greys
    kept 16-bit (the server scales them), colour modes to RGB; 32-bit I/F are refused as it refuses them.
    """
    try:
        # Loaded before its orientation is read: Pillow turns a TIFF upright itself as it loads it (and
        # drops the tag), so the orientation of an image still lazy from Image.open turned it twice.
        picture.load()
    except (OSError, ValueError) as exc:  # truncated or corrupt pixel data
        raise ValueError(f"image cannot be read: {exc}") from None
    method = _ORIENTATION_TRANSPOSE.get(_exif_orientation(picture))
    if method is not None:
        picture = picture.transpose(method)
    if picture.mode in _PNG_MODES:
        return picture
    if picture.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(np.asarray(picture).astype(np.uint16))
    if picture.mode in ("I", "F"):
        raise ValueError(
            f"image cannot be converted to 8-bit RGB: image mode {picture.mode!r} (32-bit integer/float pixels) "
            "has no defined 8-bit scale; convert it to 8-bit RGB or greyscale first"
        )
    try:
        return picture.convert("RGB")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"image cannot be converted to 8-bit RGB: {exc}") from None


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


_ARRAY_DTYPES = {pb.DATA_TYPE_UINT8: np.uint8, pb.DATA_TYPE_FLOAT16: np.float16, pb.DATA_TYPE_FLOAT32: np.float32}
MAP_DTYPES = (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_FLOAT32)


def tensor_array(
    tensor: pb.Tensor, field: str, dtypes: tuple[int, ...], ndim: int, channels: int | None = None
) -> np.ndarray:
    """The response's tensor ``field`` as an array, checked against what the protocol says it holds:
    nothing a server sends is trusted, and a broken one must not pass as a result or as the caller's error."""
    dtype = _ARRAY_DTYPES.get(tensor.dtype) if tensor.dtype in dtypes else None
    if dtype is None:
        raise _data_loss(f"response field {field} has dtype {tensor.dtype}; the protocol sends {_dtype_names(dtypes)}")
    shape = tuple(tensor.shape)
    if len(shape) != ndim or any(d <= 0 for d in shape) or (channels is not None and shape[-1] != channels):
        raise _data_loss(f"response field {field} has shape {list(shape)}; the protocol sends {ndim} positive sizes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(tensor.data) != expected:
        raise _data_loss(
            f"response field {field} holds {len(tensor.data)} bytes, not the {expected} its shape {list(shape)} needs"
        )
    return np.frombuffer(tensor.data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


def _dtype_names(dtypes: tuple[int, ...]) -> str:
    return " or ".join(np.dtype(_ARRAY_DTYPES[d]).name for d in dtypes)


# ----------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ClassScore:
    index: int
    name: str
    probability: float
    logit: float


@dataclass(frozen=True)
class Provenance:
    model_id: str
    weights_digest: str
    method: str
    method_version: str
    preprocess_version: str
    content_hash: str
    cache: dict[str, str]  # artifact -> "miss" | "l1" | "l2" | "disabled"
    timings: dict[str, float]  # stage -> seconds (summed when a stage occurs more than once)
    server_version: str
    request_id: str


@dataclass(frozen=True)
class LayerInfo:
    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    channels: int
    color_space: str
    preprocess_version: str
    encodings: list[str]
    tensor_dtypes: list[str]  # raw tensor dtypes the server accepts: "uint8", "float16", "float32"
    max_image_bytes: int
    max_pixels: int
    max_side: int = 0  # pixels per side; 0: a server that does not say
    max_positions: int = 0  # ierf positions per call
    max_top_k: int = 0
    max_message_bytes: int = 0  # the server's gRPC message cap
    max_deadline_s: float = 0.0  # the longest budget a call gets there


@dataclass(frozen=True)
class ModelInfo:
    id: str
    weights_digest: str
    input: InputSpec
    num_classes: int
    class_names: list[str] = field(repr=False)  # 1000 names: num_classes says how many
    layers: list[LayerInfo]
    methods: list[str]
    default_method: str

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"model {self.id} has no layer {name!r}")


class ModelList(list[ModelInfo]):
    """``ListModels``'s models, in the server's order, with the id a call naming no model is served by."""

    def __init__(self, models: Iterable[ModelInfo], default_model_id: str) -> None:
        super().__init__(models)
        self.default_model_id = default_model_id


# An overlay is the map's picture plus a caption and colour bar: its sides stay within twice the map's plus
# this margin. The header is read first, so a small PNG declaring a huge canvas is refused undecoded.
OVERLAY_MARGIN_PX = 512


def _overlay_image(png: bytes, map_size: tuple[int, int]) -> Image.Image:
    """The server's overlay, decoded as PNG only (``Image.open`` would also run EPS through Ghostscript,
    or any other format Pillow knows, on bytes the server chose) and only at about the map's size."""
    if not png:
        raise ValueError("no overlay in this result: call with overlay=True")
    try:
        picture = Image.open(io.BytesIO(png), formats=["PNG"])
    except (OSError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise _data_loss(f"the server's overlay is not a PNG this SDK reads ({exc})") from None
    height, width = map_size
    if picture.width > 2 * width + OVERLAY_MARGIN_PX or picture.height > 2 * height + OVERLAY_MARGIN_PX:
        raise _data_loss(
            f"the server's overlay is {picture.width}x{picture.height} pixels for a {width}x{height} map: "
            "refused undecoded"
        )
    try:
        picture.load()
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt PNG data
        raise _data_loss(f"the server's overlay PNG does not decode ({type(exc).__name__}: {exc})") from None
    return picture


@dataclass(frozen=True, eq=False)  # holds arrays: == would raise; compare .map yourself
class Explanation:
    map: np.ndarray  # (H, W) signed saliency at the model's input resolution
    target: ClassScore
    provenance: Provenance
    overlay_png: bytes = field(default=b"", repr=False)  # a repr printed in a notebook must not spell out a PNG
    model_input: np.ndarray | None = None  # uint8 (H, W, 3) with return_input=True

    def overlay(self) -> Image.Image:
        """The server-rendered overlay (request it with ``overlay=True``)."""
        return _overlay_image(self.overlay_png, self.map.shape[-2:])


@dataclass(frozen=True, eq=False)  # holds arrays, as Explanation
class IERFResult:
    maps: np.ndarray  # (P, H, W); each sums to 1
    layer: LayerInfo
    provenance: Provenance
    overlay_pngs: list[bytes] = field(default_factory=list, repr=False)  # as Explanation.overlay_png
    model_input: np.ndarray | None = None

    def overlay(self, index: int = 0) -> Image.Image:
        """The server-rendered overlay of position ``index`` (request them with ``overlay=True``)."""
        if self.overlay_pngs and not -len(self.overlay_pngs) <= index < len(self.overlay_pngs):
            raise IndexError(f"overlay index {index} is out of range: {len(self.overlay_pngs)} overlays")
        return _overlay_image(self.overlay_pngs[index] if self.overlay_pngs else b"", self.maps.shape[-2:])


@dataclass(frozen=True)
class Prediction:
    top_classes: list[ClassScore]
    provenance: Provenance


_TIERS = {
    pb.CACHE_TIER_MISS: "miss",
    pb.CACHE_TIER_L1: "l1",
    pb.CACHE_TIER_L2: "l2",
    pb.CACHE_TIER_DISABLED: "disabled",
}


def parse_provenance(p: pb.Provenance) -> Provenance:
    timings: dict[str, float] = {}
    for t in p.timings:
        timings[t.stage] = timings.get(t.stage, 0.0) + t.seconds
    return Provenance(
        model_id=p.model_id,
        weights_digest=p.weights_digest,
        method=p.method,
        method_version=p.method_version,
        preprocess_version=p.preprocess_version,
        content_hash=p.content_hash,
        cache={c.artifact: _TIERS.get(c.tier, "unknown") for c in p.cache},
        timings=timings,
        server_version=p.server_version,
        request_id=p.request_id,
    )


def parse_score(s: pb.ClassScore) -> ClassScore:
    return ClassScore(index=s.index, name=s.name, probability=s.probability, logit=s.logit)


def parse_layer(layer: pb.LayerInfo) -> LayerInfo:
    return LayerInfo(name=layer.name, channels=layer.channels, height=layer.height, width=layer.width)


def _dtype_name(value: int) -> str:
    """``float32`` for DATA_TYPE_FLOAT32; a value this SDK's stubs lack (proto3 enums are open: a newer
    server may accept another dtype) reads ``unknown(N)`` rather than failing the whole description."""
    try:
        return pb.DataType.Name(value).removeprefix("DATA_TYPE_").lower()
    except ValueError:
        return f"unknown({value})"


def parse_model(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        id=m.id,
        weights_digest=m.weights_digest,
        input=InputSpec(
            height=m.input.height,
            width=m.input.width,
            channels=m.input.channels,
            color_space=m.input.color_space,
            preprocess_version=m.input.preprocess_version,
            encodings=list(m.input.encodings),
            tensor_dtypes=[_dtype_name(d) for d in m.input.tensor_dtypes],
            max_image_bytes=m.input.max_image_bytes,
            max_pixels=m.input.max_pixels,
            max_side=m.input.max_side,
            max_positions=m.input.max_positions,
            max_top_k=m.input.max_top_k,
            max_message_bytes=m.input.max_message_bytes,
            max_deadline_s=m.input.max_deadline_s,
        ),
        num_classes=m.num_classes,
        class_names=list(m.class_names),
        layers=[parse_layer(layer) for layer in m.layers],
        methods=list(m.methods),
        default_method=m.default_method,
    )


def parse_explanation(r: pb.ExplainResponse) -> Explanation:
    return Explanation(
        map=tensor_array(r.map, "map", MAP_DTYPES, 2),
        target=parse_score(r.target),
        provenance=parse_provenance(r.provenance),
        overlay_png=r.overlay_png,
        model_input=_model_input(r),
    )


def parse_ierf(r: pb.ComputeIERFResponse) -> IERFResult:
    return IERFResult(
        maps=tensor_array(r.maps, "maps", MAP_DTYPES, 3),
        layer=parse_layer(r.layer),
        provenance=parse_provenance(r.provenance),
        overlay_pngs=list(r.overlay_png),
        model_input=_model_input(r),
    )


def _model_input(r: pb.ExplainResponse | pb.ComputeIERFResponse) -> np.ndarray | None:
    if not r.HasField("model_input"):
        return None
    return tensor_array(r.model_input, "model_input", (pb.DATA_TYPE_UINT8,), 3, channels=3)


def parse_prediction(r: pb.PredictResponse) -> Prediction:
    return Prediction(top_classes=[parse_score(s) for s in r.top_classes], provenance=parse_provenance(r.provenance))


# ---------------------------------------------------------------------------------------- requests
_MAP_DTYPES = {"float32": pb.DATA_TYPE_FLOAT32, "float16": pb.DATA_TYPE_FLOAT16}


def _map_dtype(name: str) -> int:
    try:
        return _MAP_DTYPES[name]
    except KeyError:
        raise ValueError(f"map_dtype must be 'float32' or 'float16', got {name!r}") from None


def explain_request(
    image: ImageInput,
    target: int | None,
    model: str,
    method: str,
    contrast: str | int,
    map_dtype: str,
    overlay: bool,
    return_input: bool,
) -> pb.ExplainRequest:
    # the arguments first: encoding a large image is the expensive part
    fields: dict[str, Any] = {
        "model_id": check_name(model, "model"),
        "method": check_name(method, "method"),
        "map_dtype": _map_dtype(map_dtype),
        "overlay": check_flag(overlay, "overlay"),
        "return_input": check_flag(return_input, "return_input"),
    }
    if target is not None:
        fields["target"] = check_int32(target, "target")
    checked = check_contrast(contrast)
    fields["contrast_class" if isinstance(checked, int) else "contrast"] = checked
    request = pb.ExplainRequest(**fields)
    fill_image(request.image, image)
    return request


def ierf_request(
    image: ImageInput,
    layer: str,
    positions: Iterable[Sequence[int]],
    model: str,
    map_dtype: str,
    overlay: bool,
    return_input: bool,
) -> pb.ComputeIERFRequest:
    fields = {
        "model_id": check_name(model, "model"),
        "layer": check_name(layer, "layer"),
        "positions": [pb.Position(row=r, col=c) for r, c in _position_pairs(positions)],
        "map_dtype": _map_dtype(map_dtype),
        "overlay": check_flag(overlay, "overlay"),
        "return_input": check_flag(return_input, "return_input"),
    }
    request = pb.ComputeIERFRequest(**fields)
    fill_image(request.image, image)
    return request


def _position_pairs(positions: object) -> list[tuple[int, int]]:
    """A list of (row, col) integer pairs (also an (N, 2) integer array); one pair alone, a string or
    floats are refused with what was expected."""
    expected = "positions must be a list of (row, col) integer pairs, e.g. [(3, 4)]"
    if isinstance(positions, str | bytes) or not isinstance(positions, Iterable):
        raise TypeError(f"{expected}; got {positions!r}")
    pairs = []
    for pair in positions:
        if isinstance(pair, str | bytes) or not isinstance(pair, Iterable):
            raise TypeError(f"{expected}; got an element {pair!r} (one pair alone? wrap it in a list)")
        values = list(pair)
        if len(values) != 2:
            raise ValueError(f"{expected}; got an element {pair!r} of length {len(values)}")
        pairs.append((check_int32(values[0], "a position's row"), check_int32(values[1], "a position's col")))
    return pairs


def predict_request(image: ImageInput, top_k: int, model: str) -> pb.PredictRequest:
    top_k = check_int32(top_k, "top_k")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model = check_name(model, "model")
    request = pb.PredictRequest(model_id=model, top_k=top_k)
    fill_image(request.image, image)
    return request


# ------------------------------------------------------------------------------------- references
# Images a client remembers as held by the service (see ImageReferences); ~0.2 KB each.
DEFAULT_REMEMBERED_IMAGES = 1024
_REFERENCE_REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
AnyRequest = pb.ExplainRequest | pb.ComputeIERFRequest | pb.PredictRequest


def check_remembered_images(value: object) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"remembered_images must be an int (0: always send the pixels), got {value!r}")
    if not 0 <= value <= 1_000_000:
        raise ValueError(f"remembered_images must be between 0 and 1000000, got {value}")
    return value


class ImageReferences:
    """The content hashes of images this client sent lately and the service kept (no cache tier said
    "disabled"), by the bytes sent and the model asked. A repeat (any method, overlays and the returned input
    too: the service keeps the model's view of the image) then travels as ``Image(content_hash=...)``: no
    upload, no decoding on the server. A service that no
    longer holds the image (or an older one that takes no references) refuses, and the client sends the
    pixels as before: one more round trip, the same answer. Thread-safe; bounded, least recently used out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._hashes: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, request: AnyRequest) -> bytes | None:
        """What identifies the request's image for its model; None when the request cannot go by reference."""
        source = request.image.WhichOneof("source")
        if self.capacity <= 0 or source not in ("encoded", "tensor"):
            return None
        model = request.model_id.encode()
        digest = hashlib.sha256(b"%d:%s|" % (len(model), model))
        # The fields themselves, not the serialised message: serialising copied a 20 MB image (76-130 ms here,
        # against 19 ms for its sha256).
        if source == "encoded":
            digest.update(b"encoded|")
            digest.update(request.image.encoded)
        else:
            tensor = request.image.tensor
            digest.update(b"tensor:%d:%s|" % (tensor.dtype, ",".join(map(str, tensor.shape)).encode()))
            digest.update(tensor.data)
        return digest.digest()

    def lookup(self, key: bytes | None) -> str | None:
        """The content hash remembered for ``key`` (renewed as the most recently used), else None."""
        if key is None:
            return None
        with self._lock:
            content_hash = self._hashes.get(key)
            if content_hash is not None:
                self._hashes.move_to_end(key)
            return content_hash

    def note(self, key: bytes | None, provenance: pb.Provenance) -> None:
        """Remember the image of an answer whose artefacts some cache tier kept."""
        if key is None or not provenance.content_hash:
            return
        if any(c.tier == pb.CACHE_TIER_DISABLED for c in provenance.cache):
            self.forget(key)
            return
        with self._lock:
            self._hashes[key] = provenance.content_hash
            self._hashes.move_to_end(key)
            while len(self._hashes) > self.capacity:
                self._hashes.popitem(last=False)

    def forget(self, key: bytes) -> None:
        with self._lock:
            self._hashes.pop(key, None)

    def referring(self, key: bytes | None, request: AnyRequest) -> AnyRequest | None:
        """``request`` with its image named by content hash, when this client knows the service holds it."""
        content_hash = self.lookup(key)
        return None if content_hash is None else by_reference(request, content_hash)

    def answered(self, key: bytes | None, response: Any) -> Any:
        """``response``, its image noted for the next repeat."""
        self.note(key, response.provenance)
        return response

    def refused(self, key: bytes | None, error: IerfError) -> bool:
        """Whether ``error`` refused a request sent by reference (:func:`refused_reference`): then the
        reference is forgotten and the pixels should follow."""
        if not refused_reference(error):
            return False
        if key is not None:
            self.forget(key)
        return True

    def __len__(self) -> int:
        return len(self._hashes)


def refused_reference(error: IerfError) -> bool:
    """Whether a request sent by reference was refused for that (the service no longer holds the image, or
    takes no references), so that the pixels should be sent."""
    return error.code in _REFERENCE_REFUSALS


def by_reference(request: AnyRequest, content_hash: str) -> AnyRequest:
    """``request`` with its image named by content hash; the other fields copied (not the image's bytes)."""
    referring = type(request)()
    for descriptor, value in request.ListFields():
        name = descriptor.name
        if name == "image":
            continue
        if descriptor.is_repeated:
            getattr(referring, name).extend(value)
        elif descriptor.message_type is not None:
            getattr(referring, name).CopyFrom(value)
        else:
            setattr(referring, name, value)
    referring.image.content_hash = content_hash
    return referring


# ------------------------------------------------------------------------------------------ health
# grpc.health.v1 messages are two tiny protos; encoded by hand so the SDK needs no second stub package
# (and cannot collide with grpcio-health-checking's registration of the same names).
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def encode_health_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    return b"\x0a" + _varint(len(data)) + data


# Bytes a field of a fixed-size wire type takes: 1 is fixed64, 5 fixed32.
_FIXED_WIRE_BYTES = {1: 8, 5: 4}


def decode_health_response(data: bytes) -> str:
    """The status; fields of a newer schema are skipped, whatever their wire type, as protobuf skips them."""
    status, i = 0, 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        if tag == 0x08:
            status, i = _read_varint(data, i)
        elif tag & 7 == 0:
            _, i = _read_varint(data, i)
        elif tag & 7 == 2:
            length, i = _read_varint(data, i)
            i += length
        elif tag & 7 in _FIXED_WIRE_BYTES:
            i += _FIXED_WIRE_BYTES[tag & 7]
        else:
            raise ValueError("unexpected wire type in HealthCheckResponse")
        if i > len(data):  # a field cut short: protobuf refuses the message, so does this
            raise ValueError("truncated field in HealthCheckResponse")
    return HEALTH_STATUSES.get(status, f"UNKNOWN({status})")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint in HealthCheckResponse")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7

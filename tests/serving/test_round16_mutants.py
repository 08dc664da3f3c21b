"""Mutation round 16 (serving, SDK): tests killing mutants that survived in c54c7e4^..49d3ae4."""

from __future__ import annotations

import grpc
import pytest


class _Failure:
    def __init__(self, code: object, details: str, pause_ms: str | None = None) -> None:
        self._code, self._details = code, details
        self._metadata = (("ierf-retry-after-ms", pause_ms),) if pause_ms is not None else ()

    def code(self) -> object:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._metadata


def test_one_overload_refusal_not_retried_is_raised_as_it_came() -> None:
    """Attempts.error names the refused attempts only when the call was retried: a single refusal (its
    pause did not fit at all) is the server's own message, not "retried until no further attempt fitted"."""
    from ierf_client import ResourceExhaustedError, _core

    attempts = _core.Attempts()
    refusal = _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "service overloaded", "250")
    attempts.failed(refusal)
    error = attempts.error(refusal)
    assert isinstance(error, ResourceExhaustedError)
    assert error.details == "service overloaded", error.details


def test_a_last_attempt_failing_otherwise_after_overloads_is_raised_as_itself() -> None:
    """Overload refusals, then a final UNAVAILABLE: the call raises the UNAVAILABLE, not the old refusal."""
    from ierf_client import UnavailableError, _core

    attempts = _core.Attempts()
    for _ in range(2):
        attempts.failed(_Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "service overloaded", "250"))
    final = _Failure(grpc.StatusCode.UNAVAILABLE, "connection reset")
    attempts.failed(final)
    error = attempts.error(final)
    assert isinstance(error, UnavailableError) and error.details == "connection reset", error.details


def test_a_retried_overload_that_ran_out_of_pauses_names_the_attempts() -> None:
    from ierf_client import ResourceExhaustedError, _core

    attempts = _core.Attempts()
    refusals = [_Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "service overloaded", "250") for _ in range(3)]
    for refusal in refusals:
        attempts.failed(refusal)
    error = attempts.error(refusals[-1])
    assert isinstance(error, ResourceExhaustedError)
    assert "refused as overloaded on 3 of 3 attempts, retried until no further attempt fitted" in error.details


def test_max_pixels_may_reach_exactly_twice_pillows_limit() -> None:
    """The deploy-time cap: twice Image.MAX_IMAGE_PIXELS is accepted, one pixel more is refused."""
    from ierf.serving.settings import IngressConfig
    from PIL import Image

    limit = 2 * int(Image.MAX_IMAGE_PIXELS)
    assert IngressConfig(max_pixels=limit).max_pixels == limit
    with pytest.raises(ValueError, match="max_pixels must be at most"):
        IngressConfig(max_pixels=limit + 1)


def _start(tmp_path, proxy_s: float, ingress_s: float) -> Exception:
    from ierf.serving.local import free_port, load_serve_config, start_service

    config = load_serve_config()
    config["grpc_options"]["request_timeout_s"] = proxy_s
    app = config["applications"][0]
    app["deployments"] = []
    app["args"]["models"] = [{"id": "r18", "name": "resnet18", "weights": str(tmp_path / "missing.pth")}]
    app["args"]["default_model"] = "r18"
    app["args"]["ingress"]["request_timeout_s"] = ingress_s
    with pytest.raises((ValueError, FileNotFoundError)) as refused:  # the missing weights stop it before Ray
        start_service(
            config, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), redis_url="", num_cpus=4
        )
    return refused.value


def test_a_proxy_cap_equal_to_the_ingress_cap_is_accepted(tmp_path) -> None:
    refused = _start(tmp_path, 60, 60)
    assert "grpc_options.request_timeout_s" not in str(refused), refused


def test_a_proxy_cap_just_below_the_ingress_cap_is_refused(tmp_path) -> None:
    refused = _start(tmp_path, 59, 60)
    assert "grpc_options.request_timeout_s (59 s) is below ingress.request_timeout_s (60 s)" in str(refused)

"""Round 14 mutation testing of the session's serving changes (7634b69..HEAD): each test pins a behaviour that
a mutant of the new code broke while every existing test still passed. Fast; no Ray runtime, no model."""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from typing import Any

import pytest

from serving.test_load_findings import _request, _Worker


# ------------------------------------------------------------------------------------------- IerfServerErrors
def test_server_error_alert_does_not_count_the_proxys_replies_to_health_probes() -> None:
    """The proxy's INTERNAL/UNAVAILABLE replies are added to the numerator, whose denominator leaves out Check
    and List (probes every few seconds per load balancer): probes answered INTERNAL by the proxy must not be
    counted either, or the ratio compares calls of one kind against another and can pass 100 %."""
    from serving.test_alert_coverage import _alert, _selected

    expr = _alert("IerfServerErrors")
    for rpc in ("/grpc.health.v1.Health/Check", "/ierf.v1.ExplainService/List"):
        probe = {"method": rpc, "route": "ierf", "status_code": "INTERNAL"}
        assert not _selected(expr, "ray_serve_num_grpc_requests_total", probe), (
            f"the proxy's INTERNAL reply to {rpc} is counted by IerfServerErrors: {expr}"
        )
    explain = {"method": "/ierf.v1.ExplainService/Explain", "route": "ierf", "status_code": "UNAVAILABLE"}
    assert _selected(expr, "ray_serve_num_grpc_requests_total", explain)


# ------------------------------------------------------------------------------ Redis values past the cap
def test_a_redis_value_of_exactly_the_cap_is_a_hit_and_one_byte_more_is_too_big(redis_flushed) -> None:
    """``cache.max_value_bytes`` is the largest value a replica reads: exactly that many bytes is a hit; one
    byte more is ``too_big`` (a miss here, not a Redis error)."""
    import redis
    from ierf.serving.cache import RedisSettings, RedisTier

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    tier = RedisTier(RedisSettings(url=redis_flushed.url, max_value_bytes=1000))
    try:
        raw.set("ierf:round14:exact", b"v" * 1000)
        raw.set("ierf:round14:over", b"v" * 1001)
        assert tier.get("ierf:round14:exact") == ("hit", b"v" * 1000)
        assert tier.get("ierf:round14:over") == ("too_big", None)
        assert tier.breaker.state == "closed"
    finally:
        tier.close()
        raw.close()


# ----------------------------------------------------------------------- shedding after a worker's refusal
def test_requests_are_shed_only_within_the_pause_a_refusal_asked_for() -> None:
    """A worker's back-pressure refusal sheds that model's requests before decoding for RETRY_AFTER_MS (the
    pause the refusal asked for), not longer: a refusal 0.3 s ago no longer turns a caller away."""
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import RETRY_AFTER_MS, ResourceExhausted
    from ierf.serving.settings import ServiceConfig

    assert RETRY_AFTER_MS / 1000 < 0.3
    ingress = Ingress.func_or_class({"m": _Worker()}, ServiceConfig.from_args({"models": ["m"]}))

    async def scenario() -> None:
        ingress._refused_at["m"] = time.monotonic()
        with pytest.raises(ResourceExhausted, match="refused a job"):
            await ingress.Explain(_request(32))
        ingress._refused_at["m"] = time.monotonic() - 0.3
        reply = await ingress.Explain(_request(32))
        assert list(reply.map.shape) == [8, 8]

    asyncio.run(scenario())


def test_a_job_that_goes_through_ends_the_shedding_at_once() -> None:
    """A job the worker accepted after a refusal (one already past the shed check) shows its queue has room:
    the next request is served, not shed for the rest of the pause."""
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    worker = _Worker()
    ingress = Ingress.func_or_class({"m": worker}, ServiceConfig.from_args({"models": ["m"]}))

    async def scenario() -> None:
        ingress._refused_at["m"] = time.monotonic()  # a refusal just now
        await ingress._call("m", worker.explain, object(), time.time() + 5, [])  # then a job went through
        reply = await ingress.Explain(_request(32))
        assert list(reply.map.shape) == [8, 8]

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------- the decode headroom
def test_the_small_image_headroom_is_exactly_small_pixels_and_only_for_small_images() -> None:
    """A full budget still admits a small image (at most ``small_pixels``) in a headroom of ``small_pixels``;
    not a larger image, and not past the headroom."""
    from ierf.serving.admission import DecodeGate

    gate = DecodeGate(active_pixels=1000, queued_pixels=0, small_pixels=100)
    gate.active = 1000  # budget full
    assert gate._fits(100)  # a small image of exactly small_pixels
    assert not gate._fits(101)
    gate.active = 1001
    assert not gate._fits(100)  # headroom is small_pixels, not more
    gate.active = 1100
    assert not gate._fits(1)
    gate.active = 999  # room for 1 pixel in the budget: a 101 px image is not small, so it waits
    assert not gate._fits(101)


# -------------------------------------------------------------------------------------- PNG row counting
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_a_tiny_whole_interlaced_png_is_not_refused_as_truncated(size: tuple[int, int]) -> None:
    """Adam7 passes that hold no pixel of a tiny image (a 1x1's passes 2-7) have no scanlines at all, not
    even filter bytes: a whole interlaced icon must decode, not be refused as truncated."""
    import io

    from ierf.serving.images import _check_png_rows, decode_encoded
    from ierf.serving.settings import ImageLimits
    from PIL import Image

    width, height = size
    pixels = bytes(range(width * height))
    buffer = io.BytesIO()
    Image.frombytes("L", size, pixels).save(buffer, "PNG")
    plain = Image.open(io.BytesIO(buffer.getvalue()))
    assert plain.size == size
    # the same image, Adam7-interlaced (Pillow writes none): each pass's sub-image, a filter byte per row
    raw = b""
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        rows = [bytes(pixels[y * width + x] for x in range(x0, width, dx)) for y in range(y0, height, dy)]
        raw += b"".join(b"\x00" + row for row in rows if row)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    _check_png_rows(data)
    assert decode_encoded(data, ImageLimits()).pixels.shape == (height, width, 3)


def test_a_one_bit_png_missing_its_last_row_is_refused() -> None:
    """Rows of 1-bit pixels are packed to whole bytes (13 pixels: 2 bytes, with a filter byte 3 a row): a
    bilevel scan (a fax, a document) that lost its last row must be refused, not filled with black."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import _check_png_rows

    width, height = 13, 7
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)

    def png(rows: int) -> bytes:
        raw = (b"\x00" + b"\xaa\xa8") * rows
        return (
            b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
        )

    _check_png_rows(png(height))
    with pytest.raises(InvalidArgument, match=r"pixel data ends after 18 of the 21 bytes"):
        _check_png_rows(png(height - 1))


# ------------------------------------------------------------------------------- a call that is abandoned
class _NeverAnswered:
    """A Serve response that never answers and whose cancel() raises the router's refusal again (Ray 2.60's
    _DeploymentResponseBase.cancel on a call its router refused while it was still being assigned)."""

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self) -> None:
        from serving.fakes import BackPressureError

        raise BackPressureError("Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4).")


def test_a_deadline_passed_while_waiting_is_deadline_exceeded_even_if_cancel_raises() -> None:
    """A caller whose deadline passed waiting for the worker gets DEADLINE_EXCEEDED: the cancel of the
    abandoned Serve call must not replace it with the refusal cancel() raises (RESOURCE_EXHAUSTED, which
    invites a retry of a call whose deadline is gone)."""
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig

    class _Handle:
        def remote(self, job: Any) -> Any:
            return _NeverAnswered()

    ingress = Ingress.func_or_class({"m": _Worker()}, ServiceConfig.from_args({"models": ["m"]}))

    async def scenario() -> None:
        with pytest.raises(DeadlineExceeded):
            await ingress._call("m", _Handle(), object(), time.time() + 0.2, [])

    asyncio.run(scenario())


# ----------------------------------------------------------------------- the worker's stages: building
def test_building_an_explainer_is_booked_as_the_explain_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method's first call on a replica builds its explainer (seconds for a baseline's imports): that is the
    worker's ``explain`` stage, not ``dispatch`` (which reads as Serve's routing and queueing)."""
    import ierf
    import numpy as np
    from ierf.serving.images import canonicalise
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": None}}
    )
    host = ModelHost(config.models[0], config.cache)
    real = ierf.create_explainer

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(ierf, "create_explainer", slow)
    image = canonicalise(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    outcome = host.explain(ExplainJob(image.pixels, image.content_hash, method="gradient", target=1))
    stages: dict[str, float] = {}
    for name, seconds in outcome.provenance.timings:
        stages[name] = stages.get(name, 0.0) + seconds
    assert stages.get("explain", 0.0) >= 0.5 and "dispatch" not in stages, stages

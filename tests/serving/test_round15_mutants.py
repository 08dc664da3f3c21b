"""Round 15 mutation testing of 7634b69..HEAD (serving and SDK): each test pins a behaviour that a mutant of the
new code broke while every existing test still passed. Fast; no Ray runtime, no model."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest


# -------------------------------------------------------------------------------------- PNG row counting
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(
    width: int, height: int, depth: int, colour: int, rows: int, interlace: int = 0, raw: bytes | None = None
) -> bytes:
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = b"\x00" + bytes((7 * i) % 251 for i in range((width * channels * depth + 7) // 8))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    body = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
    if colour == 3:
        body += _chunk(b"PLTE", bytes(range(256)) * 3)
    return body + _chunk(b"IDAT", zlib.compress(row * rows if raw is None else raw)) + _chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("depth", "colour"),
    [(8, 0), (16, 0), (8, 2), (16, 2), (8, 3), (4, 3), (8, 4), (16, 4), (8, 6), (16, 6)],
)
def test_a_png_of_every_colour_type_missing_its_last_row_is_refused(depth: int, colour: int) -> None:
    """The row length depends on the colour type's channel count (grey 1, RGB 3, palette 1, grey+alpha 2,
    RGBA 4) and the bit depth: a 16-row photo of any type that lost only its last row must be refused, and
    the whole one accepted (a wrong count either passes the truncated file or refuses the good one)."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import _check_png_rows

    width, height = 24, 16
    _check_png_rows(_png(width, height, depth, colour, height))
    with pytest.raises(InvalidArgument, match="rows missing"):
        _check_png_rows(_png(width, height, depth, colour, height - 1))


def _adam7(width: int, height: int, depth: int, passes: int, last_rows: int | None = None) -> bytes:
    """Filtered scanlines of a grey Adam7 image: the first ``passes`` of its seven passes, the last of them
    cut to ``last_rows`` rows when given."""
    raw = b""
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    )[:passes]:
        cols, rows = len(range(x0, width, dx)), len(range(y0, height, dy))
        if cols and rows:
            raw += (b"\x00" + bytes((cols * depth + 7) // 8)) * rows
    if last_rows is not None:
        raw = raw[: len(raw) - (rows - last_rows) * (1 + (cols * depth + 7) // 8)]
    return raw


@pytest.mark.parametrize("depth", [8, 1])
def test_an_interlaced_png_missing_its_last_pass_or_row_is_refused(depth: int) -> None:
    """Adam7's seventh pass holds every odd row (half the pixels): an interlaced PNG whose data ends after pass
    6 is missing half its image, which Pillow fills with black. A bilevel one (13 pixels a row: each pass's
    rows rounded up to whole bytes) that lost only its last row is refused as well."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import _check_png_rows

    width, height = 13, 16
    _check_png_rows(_png(width, height, depth, 0, 0, interlace=1, raw=_adam7(width, height, depth, 7)))
    with pytest.raises(InvalidArgument, match="rows missing"):
        _check_png_rows(_png(width, height, depth, 0, 0, interlace=1, raw=_adam7(width, height, depth, 6)))
    with pytest.raises(InvalidArgument, match="rows missing"):
        _check_png_rows(_png(width, height, depth, 0, 0, interlace=1, raw=_adam7(width, height, depth, 7, 7)))


def test_pixel_data_after_iend_does_not_count_and_corrupt_data_is_left_to_pillow() -> None:
    """The count stops at IEND, where Pillow's decoder stops: an IDAT chunk appended after IEND (which Pillow
    never reads) must not make a truncated PNG pass. Data that does not inflate at all is not counted either:
    Pillow's decoder refuses it in its own words."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import _check_png_rows

    width, height = 24, 16
    row = b"\x00" + bytes(range(width * 3))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    squeeze = zlib.compressobj()
    head = squeeze.compress(row * (height - 4)) + squeeze.flush(zlib.Z_FULL_FLUSH)
    tail = squeeze.compress(row * 4) + squeeze.flush()
    start = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
    whole = start + _chunk(b"IDAT", head) + _chunk(b"IDAT", tail) + _chunk(b"IEND", b"")
    _check_png_rows(whole)
    smuggled = start + _chunk(b"IDAT", head) + _chunk(b"IEND", b"") + _chunk(b"IDAT", tail)
    with pytest.raises(InvalidArgument, match="rows missing"):
        _check_png_rows(smuggled)
    corrupt = start + _chunk(b"IDAT", b"\x78\x9c" + bytes(range(7, 200))) + _chunk(b"IEND", b"")
    _check_png_rows(corrupt)  # not "truncated": Pillow says what is wrong with it


# ---------------------------------------------------------------------------------- SDK: a replica died
class _Failure:
    def __init__(self, code: object, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> object:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return ()


@pytest.mark.parametrize(
    ("details", "retried"),
    [
        ("The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:ierf:Ingress", True),
        # another actor than a Serve replica (an actor of the service's own): not known to be a redeploy
        ("The actor died unexpectedly before finishing this task.\n\tclass_name: ModelLoader", False),
        # the service's own INTERNAL reply that happens to name a replica: a server fault, not retried
        ("internal error (RayTaskError); see server logs: ServeReplica:ierf:ExplainerWorker_r18", False),
        ("the served model is broken: The actor died unexpectedly ... ServeReplica:x", False),
    ],
)
def test_only_serves_answer_for_a_killed_replica_is_retried_as_unavailable(details: str, retried: bool) -> None:
    """The SDK retries INTERNAL only for Serve's proxy answering for a replica killed under the call ("The actor
    died unexpectedly" ... "ServeReplica:"); every other INTERNAL is the server's own fault and is raised at once
    (retrying it would only repeat the work)."""
    import time

    import grpc
    from ierf_client import _core

    attempts = _core.Attempts()
    failure = _Failure(grpc.StatusCode.INTERNAL, details)
    attempts.failed(failure)
    pause = _core.retry_pause_after(_core.RetryPolicy(), failure, attempts, time.monotonic() + 60)
    assert (pause is not None) is retried, (details, pause)


# ------------------------------------------------------------------------------ ingress: pipeline version
def test_the_ingress_cuts_no_view_for_a_pipeline_version_that_only_starts_like_its_own() -> None:
    """The ingress cuts a worker's view only under its own pipeline version, the whole ``v<N>-`` prefix: a
    worker of pipeline 30 (``v30-...``) is another build to an ingress of pipeline 3, however the string
    begins."""
    import asyncio

    import numpy as np
    from ierf.images import PIPELINE_VERSION
    from ierf.serving.deployments import Ingress
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    from serving.fakes import Method
    from serving.test_upgrade_findings import _outcome

    jobs: list[Any] = []

    def run(version: str) -> Any:
        class Worker:
            async def _explain(self, job: Any) -> Any:
                jobs.append(job)
                return _outcome(version)

            async def _describe(self) -> Any:
                return ModelDescription(
                    "m", "digest", 32, 32, version, [str(i) for i in range(10)], [LayerShape("l", 4, 8, 8)],
                    ["srd"], "srd", "cpu", resize=36,
                )  # fmt: skip

            def __init__(self) -> None:
                self.explain = Method(self._explain)
                self.describe = Method(self._describe)

        ingress = Ingress.func_or_class({"m": Worker()}, ServiceConfig.from_args({"models": [{"id": "m"}]}))
        photo = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
        image = pb.Image(tensor=pb.Tensor(data=photo.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(photo.shape)))

        async def scenario() -> None:
            await ingress.GetModel(pb.GetModelRequest(model_id="m"))
            await ingress.Explain(pb.ExplainRequest(image=image, target=1))

        asyncio.run(scenario())
        return jobs.pop()

    own = run(f"v{PIPELINE_VERSION}-r36-c32-imagenet")
    assert own.pixels.shape == (32, 32, 3), "the ingress no longer cuts views for its own pipeline"
    other = run(f"v{PIPELINE_VERSION}0-r36-c32-imagenet")
    assert other.pixels.shape == (100, 120, 3), f"cut a view for pipeline v{PIPELINE_VERSION}0's worker"


# --------------------------------------------------------------------------- ingress graceful shutdown
def test_the_ingress_outlives_a_longer_worker_shutdown_unless_the_operator_set_its_own() -> None:
    """A worker given a longer graceful shutdown (a large model's 120 s jobs) lifts the ingress's to match, so
    a redeploy does not kill the ingress calls waiting on it; an ingress timeout the operator set is theirs."""
    from ierf.serving.app import configured_deployments
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": "m", "name": "resnet18", "random_init": True}]})
    (model,) = config.models

    def ingress_timeout(overrides: dict[str, Any]) -> float:
        return configured_deployments(config, overrides)["Ingress"]._deployment_config.graceful_shutdown_timeout_s

    assert ingress_timeout({model.deployment_name: {"graceful_shutdown_timeout_s": 120}}) == 120
    both = {model.deployment_name: {"graceful_shutdown_timeout_s": 120}, "Ingress": {"graceful_shutdown_timeout_s": 45}}
    assert ingress_timeout(both) == 45

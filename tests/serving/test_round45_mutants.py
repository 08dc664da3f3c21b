"""Round 45 mutants (image references): the tests that tell each survivor from the product.

The ingress parts drive the real Ingress over a real ModelHost (randomly initialised ResNet18), as
test_image_references.py does; the SDK parts talk to a loopback gRPC server playing the service's side of the
protocol, as test_sdk_image_references.py does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_client import AsyncClient, Client, DataLossError
from ierf_proto.v1 import explainer_pb2 as pb

from serving.test_image_references import _by_reference, _refused
from serving.test_repeats_by_hash import _explain, _ingress, _Worker
from serving.test_round27_mutants import _serving
from serving.test_sdk_image_references import FLAVOURS, PHOTO, _Service, _session
from serving.test_sdk_image_references import _explain as _sdk_explain
from serving.test_worker_warm_up import _host


# ------------------------------------------------------------------------------------------ ingress
@pytest.mark.slow
def test_a_reference_failed_by_an_earlier_build_is_image_needed_and_what_pixels_meet_too_is_the_callers() -> None:
    """R04: a worker of an earlier build fails a job without pixels (a RayTaskError around its TypeError): the
    caller gets FAILED_PRECONDITION ("send its pixels"), not an INTERNAL, and the replica forgets the image.
    R06: an overload or a dead replica met by a reference is the caller's answer (what pixels would meet too),
    not a request for the pixels. R09: the refusal of a hash never sent is ImageNeeded."""
    from ierf.serving.errors import ImageNeeded, Overloaded, Unavailable
    from ray.exceptions import RayActorError, RayTaskError

    from serving.fakes import BackPressureError

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    content_hash = _explain(ingress, 0, 1).provenance.content_hash
    assert ("r18", content_hash) in ingress._sent
    earlier = TypeError("expected a PIL.Image or a uint8 numpy array, got NoneType")
    worker.raise_for_hash = RayTaskError("explain", "Traceback ...", earlier).as_instanceof_cause()
    request = pb.ExplainRequest(image=_by_reference(content_hash), target=2)
    code, details = _refused(lambda c: ingress.Explain(request, c))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "send its pixels" in details
    assert ("r18", content_hash) not in ingress._sent

    for error, expected in ((RayActorError(), Unavailable), (BackPressureError("queue full"), Overloaded)):
        worker.raise_for_hash = error
        with pytest.raises(expected):
            asyncio.run(ingress.Explain(request))

    worker.raise_for_hash = None  # R09: the refusal is ImageNeeded, not the workers' PixelsNeeded passed on
    with pytest.raises(ImageNeeded, match="is not held by the workers"):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_by_reference("0" * 64))))


@pytest.mark.slow
def test_accept_image_references_must_be_a_boolean() -> None:
    """R19: "no" in a config file is a string, which would read as true."""
    from ierf.serving.settings import ServiceConfig

    with pytest.raises(ValueError, match="accept_image_references must be true or false"):
        ServiceConfig.from_args({"models": ["r18"], "ingress": {"accept_image_references": "no"}})


# ---------------------------------------------------------------------------------------------- SDK
def test_remembered_images_takes_a_numpy_integer() -> None:
    """R24: a count read from an array (np.int64) is an int to the caller."""
    for cls in (Client, AsyncClient):
        client = cls("127.0.0.1:1", remembered_images=np.int64(3))
        assert client._references.capacity == 3 and type(client._references.capacity) is int


@FLAVOURS
def test_images_that_differ_only_in_their_last_pixel_are_not_taken_for_each_other(flavour: str) -> None:
    """R32: the key covers every byte of the image, not a prefix: the second image is sent with its pixels."""
    service = _Service()
    changed = PHOTO.copy()
    changed[-1, -1, -1] ^= 1
    with _serving(service) as address:
        results = _session(flavour, address, [_sdk_explain(PHOTO, 1), _sdk_explain(changed, 1)])
    assert service.sent == ["pixels", "pixels"]
    assert results[0].provenance.content_hash != results[1].provenance.content_hash


@FLAVOURS
def test_an_answer_without_a_content_hash_teaches_the_client_nothing(flavour: str) -> None:
    """R36: a server that names no content hash (an older one) gets the pixels every time, never an empty
    reference that it would refuse."""

    class Nameless(_Service):
        def _provenance(self, content_hash: str, model: str) -> pb.Provenance:
            provenance = super()._provenance(content_hash, model)
            provenance.ClearField("content_hash")
            return provenance

    service = Nameless()
    with _serving(service) as address:
        _session(flavour, address, [_sdk_explain(PHOTO, 1), _sdk_explain(PHOTO, 2)])
    assert service.sent == ["pixels", "pixels"]


@FLAVOURS
def test_an_image_then_kept_in_no_tier_is_forgotten(flavour: str) -> None:
    """R34: an image noted as held, then answered with a "disabled" tier (recomputed and kept nowhere) when its
    pixels followed a refused reference: the client forgets it, and the next repeat sends the pixels rather
    than a reference."""
    service = _Service()

    def evicted_and_kept_nowhere() -> None:
        service.held.clear()
        service.keeps = False

    with _serving(service) as address:
        steps = [_sdk_explain(PHOTO, 1), evicted_and_kept_nowhere, _sdk_explain(PHOTO, 2), _sdk_explain(PHOTO, 3)]
        _session(flavour, address, steps)
    assert service.sent == ["pixels", "reference", "pixels", "pixels"]


@FLAVOURS
def test_an_answer_by_reference_is_noted_too(flavour: str) -> None:
    """R48 (sync), R49 (asyncio): the answer to a reference is noted like any other: one whose artefacts the
    service now keeps in no tier makes the client forget the image, and the next repeat sends the pixels."""
    service = _Service()

    def kept_nowhere() -> None:
        service.keeps = False

    with _serving(service) as address:
        steps = [_sdk_explain(PHOTO, 1), kept_nowhere, _sdk_explain(PHOTO, 2), _sdk_explain(PHOTO, 3)]
        _session(flavour, address, steps)
    assert service.sent == ["pixels", "reference", "pixels"]


@FLAVOURS
def test_an_empty_method_is_srd_and_goes_by_reference(flavour: str) -> None:
    """R28: method="" is the service's default (SRD), answered from the caches like "srd"."""
    service = _Service()
    with _serving(service) as address:
        results = _session(flavour, address, [_sdk_explain(PHOTO, 1, method=""), _sdk_explain(PHOTO, 2, method="")])
    assert service.sent == ["pixels", "reference"] and results[1].target.index == 2


def test_an_answer_with_pixels_makes_its_image_the_most_recently_used() -> None:
    """R39: noting an answer renews its image's place, also for an image already remembered (an answer with
    pixels to a call made while another call's answer taught the client its hash): the next image evicts the
    other one."""
    from ierf_client import _core

    references = _core.ImageReferences(2)
    a, b, c = b"a", b"b", b"c"
    for key in (a, b, a):
        references.note(key, pb.Provenance(content_hash=key.hex() * 32))
    references.note(c, pb.Provenance(content_hash="c" * 64))  # b goes
    assert references.lookup(a) == "61" * 32 and references.lookup(b) is None


@FLAVOURS
def test_a_refused_reference_is_forgotten_even_when_the_pixels_then_fail(flavour: str) -> None:
    """R50 (sync), R51 (asyncio): the reference refused, the resend with pixels fails (DATA_LOSS, not retried):
    the next call sends the pixels at once instead of the stale reference again."""

    class Failing(_Service):
        fail_pixels = False

        def Explain(self, request: Any, context: Any) -> Any:
            if self.fail_pixels and request.image.WhichOneof("source") != "content_hash":
                self.sent.append("pixels")
                context.abort(grpc.StatusCode.DATA_LOSS, "boom")
            return super().Explain(request, context)

    service = Failing()

    def forget_and_fail() -> None:
        service.held.clear()
        service.fail_pixels = True

    with _serving(service) as address:
        if flavour == "sync":
            with Client(address, timeout=10) as client:
                client.explain(PHOTO, 1, overlay=False)
                forget_and_fail()
                with pytest.raises(DataLossError):
                    client.explain(PHOTO, 2, overlay=False)
                service.fail_pixels = False
                client.explain(PHOTO, 3, overlay=False)
        else:

            async def run() -> None:
                async with AsyncClient(address, timeout=10) as client:
                    await client.explain(PHOTO, 1, overlay=False)
                    forget_and_fail()
                    with pytest.raises(DataLossError):
                        await client.explain(PHOTO, 2, overlay=False)
                    service.fail_pixels = False
                    await client.explain(PHOTO, 3, overlay=False)

            asyncio.run(run())
    assert service.sent == ["pixels", "reference", "pixels", "pixels"]


def test_a_request_by_reference_keeps_every_other_field_and_their_presence() -> None:
    """R42, R44: by_reference copies repeated fields (positions) and the last field set, and keeps an
    optional field's presence (target=0 is class 0, not "the predicted class")."""
    from ierf_client import _core

    h = "ab" * 32
    requests = [
        pb.ExplainRequest(model_id="m", image=pb.Image(encoded=b"x"), target=0, method="srd", contrast="c",
                          contrast_class=0, map_dtype=pb.DATA_TYPE_FLOAT16, overlay=True, return_input=True),
        pb.ComputeIERFRequest(model_id="m", image=pb.Image(encoded=b"x"), layer="l", map_dtype=pb.DATA_TYPE_FLOAT16,
                              positions=[pb.Position(row=1, col=2), pb.Position(row=3)]),
        pb.PredictRequest(model_id="m", image=pb.Image(encoded=b"x"), top_k=3),
    ]  # fmt: skip
    for request in requests:
        expected = type(request)()
        expected.CopyFrom(request)
        expected.image.Clear()
        expected.image.content_hash = h
        got = _core.by_reference(request, h)
        assert got == expected and got.image.WhichOneof("source") == "content_hash"
    explain = _core.by_reference(requests[0], h)
    assert explain.HasField("target") and explain.HasField("contrast_class")
    assert not _core.by_reference(pb.ExplainRequest(image=pb.Image(encoded=b"x")), h).HasField("target")


def test_a_retry_is_not_made_with_less_than_an_attempts_minimum_left() -> None:
    """Defect found in round 45: the SDK's references commit defined ``MIN_ATTEMPT_S`` a second time (0.001 s
    for the floor of an attempt's timeout), which silently replaced the 0.05 s that retry_pause keeps for the
    next attempt: a retry was then made with 1 ms left, only to meet its deadline. With 20 ms left, give up."""
    from ierf_client import RetryPolicy, _core

    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001)
    assert _core.retry_pause(policy, grpc.StatusCode.UNAVAILABLE, 1, time.monotonic() + 0.02) is None
    assert _core.retry_pause(policy, grpc.StatusCode.UNAVAILABLE, 1, time.monotonic() + 1.0) is not None
    assert _core.attempt_timeout(0.0) <= 0.001  # an attempt made with (almost) no time left still meets it

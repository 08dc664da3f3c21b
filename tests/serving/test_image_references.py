"""A caller names an image by its content hash (``Image.content_hash``) instead of sending the pixels.

The ingress sends such a job by hash to the model's workers, which answer from their caches or refuse; the caller
then gets FAILED_PRECONDITION and sends the pixels (the SDK does so by itself). These tests drive the real Ingress
over a real ModelHost (randomly initialised ResNet18): an answer by reference is exactly the answer with pixels,
overlays, the returned input and other methods included (the workers keep the model's view), a malformed hash
is a readable INVALID_ARGUMENT, and a reference the workers do not hold is FAILED_PRECONDITION, never a wrong
answer or a failure.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from serving.fakes import GrpcContext
from serving.test_repeats_by_hash import LAYER, _explain, _image, _ingress, _map, _Worker
from serving.test_worker_warm_up import _host

pytestmark = pytest.mark.slow


def _by_reference(content_hash: str) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    return pb.Image(content_hash=content_hash)


@pytest.fixture(scope="module")
def served() -> tuple[Any, Any, str]:
    """A worker, an ingress, and the content hash of an image it answered for (shared by the refusal tests)."""
    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    return worker, ingress, _explain(ingress, 0, 1).provenance.content_hash


def _refused(call: Any) -> tuple[Any, str]:
    context = GrpcContext()
    asyncio.run(call(context))
    return context.code, context.details


def test_an_image_named_by_its_hash_is_answered_as_with_its_pixels() -> None:
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    first = _explain(ingress, 0, 1)
    content_hash = first.provenance.content_hash

    by_reference = asyncio.run(ingress.Explain(pb.ExplainRequest(image=_by_reference(content_hash), target=2)))
    with_pixels = _explain(ingress, 0, 2)
    np.testing.assert_array_equal(_map(by_reference), _map(with_pixels))
    assert by_reference.provenance.content_hash == content_hash
    assert [c.tier for c in by_reference.provenance.cache] == [pb.CACHE_TIER_L1]
    stages = {t.stage for t in by_reference.provenance.timings}
    assert "decode" not in stages and "admission" not in stages and "dispatch" in stages
    assert worker.sent[-2:] == [False, False]  # neither carried pixels: the second went by hash as a repeat

    erf = pb.ComputeIERFRequest(image=_by_reference(content_hash), layer=LAYER, positions=[pb.Position(row=1)])
    erf_pixels = pb.ComputeIERFRequest(image=_image(0), layer=LAYER, positions=[pb.Position(row=1)])
    got, expected = asyncio.run(ingress.ComputeIERF(erf)), asyncio.run(ingress.ComputeIERF(erf_pixels))
    assert got.maps.data == expected.maps.data
    top = asyncio.run(ingress.Predict(pb.PredictRequest(image=_by_reference(content_hash), top_k=3)))
    assert top.top_classes == asyncio.run(ingress.Predict(pb.PredictRequest(image=_image(0), top_k=3))).top_classes


def test_a_reference_the_workers_do_not_hold_is_failed_precondition_and_the_service_answers_on() -> None:
    """Never sent, evicted, sent for another model: FAILED_PRECONDITION naming the image, before any work."""
    import grpc
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    never_sent = "0" * 64
    code, details = _refused(lambda c: ingress.Explain(pb.ExplainRequest(image=_by_reference(never_sent)), c))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "image 0000000000000000… is not held by the workers of model 'r18'" in details
    assert "send its pixels" in details

    content_hash = _explain(ingress, 0, 1).provenance.content_hash
    worker.host.cache.l1.clear()  # evicted
    request = pb.PredictRequest(image=_by_reference(content_hash), top_k=2)
    code, _ = _refused(lambda c: ingress.Predict(request, c))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert ("r18", content_hash) not in ingress._sent  # forgotten: a repeat with pixels goes whole
    again = _explain(ingress, 0, 1)
    assert worker.sent[-1] is True and again.provenance.cache[0].tier == pb.CACHE_TIER_MISS
    assert asyncio.run(ingress.Predict(request)).top_classes  # held again


@pytest.mark.parametrize("fields", [{"overlay": True}, {"return_input": True}, {"method": "gradient"}])
def test_a_job_that_reads_the_pixels_is_answered_from_the_kept_view(served: Any, fields: dict) -> None:
    """Overlays, the returned input and other methods read the model's view, which the workers keep: by
    reference they are answered exactly as with the pixels, and no pixels travel."""
    from ierf_proto.v1 import explainer_pb2 as pb

    worker, ingress, content_hash = served
    sent = len(worker.sent)
    by_reference = asyncio.run(
        ingress.Explain(pb.ExplainRequest(image=_by_reference(content_hash), target=2, **fields))
    )
    assert worker.sent[sent:] == [False]
    assert pb.CacheLookup(artifact="view", tier=pb.CACHE_TIER_L1) in by_reference.provenance.cache
    with_pixels = _explain(_ingress(_Worker(_host({"redis_url": None}))), 0, 2, **fields)
    np.testing.assert_array_equal(_map(by_reference), _map(with_pixels))
    assert by_reference.overlay_png == with_pixels.overlay_png
    assert by_reference.model_input == with_pixels.model_input


@pytest.mark.parametrize(
    ("content_hash", "message"),
    [
        ("abc", "is not a content hash: 64 lowercase hex digits"),
        ("A" * 64, "is not a content hash"),
        ("g" * 64, "is not a content hash"),
        ("a" * 65, "is not a content hash"),
        ("a" * 63, "is not a content hash"),  # round 45's R15: exactly 64
        ("a" * 63 + "\n", "is not a content hash"),
    ],
)
def test_a_malformed_content_hash_is_invalid_argument(served: Any, content_hash: str, message: str) -> None:
    import grpc
    from ierf_proto.v1 import explainer_pb2 as pb

    worker, ingress, _ = served
    sent = len(worker.sent)
    code, details = _refused(lambda c: ingress.Explain(pb.ExplainRequest(image=_by_reference(content_hash)), c))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    assert len(worker.sent) == sent


def test_references_can_be_turned_off() -> None:
    import grpc
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker, accept_image_references=False)
    content_hash = _explain(ingress, 0, 1).provenance.content_hash
    code, details = _refused(lambda c: ingress.Explain(pb.ExplainRequest(image=_by_reference(content_hash)), c))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "accept_image_references is off" in details


def test_another_ingress_replica_answers_a_reference_from_the_workers_caches() -> None:
    """Serve's proxy spreads a caller's requests over the ingress replicas: the reference is resolved by the
    workers, not by the memory of the replica that saw the pixels."""
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    first, second = _ingress(worker), _ingress(worker)
    content_hash = _explain(first, 0, 1).provenance.content_hash
    answer = asyncio.run(second.Explain(pb.ExplainRequest(image=_by_reference(content_hash), target=1)))
    assert answer.provenance.cache[0].tier == pb.CACHE_TIER_L1
    assert ("r18", content_hash) in second._sent  # now remembered there too

"""Round 43's mutation gaps: repeats by content hash and the ingress's replica check.

Each test names the mutants it kills. The worker side is a real ModelHost (randomly initialised ResNet18)
behind fake Serve handles, as in test_repeats_by_hash; the replica check needs only a Serve handle and a
controller, both faked as in test_operator_findings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from serving.test_operator_findings import _all_is_well, _predicting_ingress, _prediction
from serving.test_repeats_by_hash import _explain, _ingress, _observed_host, _Worker
from serving.test_worker_warm_up import _host

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("by_hash", ["refused", "failed"])
def test_an_image_whose_job_by_hash_went_wrong_is_forgotten_even_when_the_job_sent_again_fails(by_hash: str) -> None:
    """H06, H10: a job by hash refused with PixelsNeeded (the worker no longer holds the image) or failed in the
    worker's code (a replica of an earlier build) makes the ingress forget the image then, not only when the
    job sent again with the pixels comes back. When that job fails too (a full queue here), the image stays
    forgotten: the next repeat goes with its pixels instead of paying another wasted hop."""
    from ierf.serving.errors import Overloaded
    from ray.exceptions import RayTaskError

    from serving.fakes import BackPressureError

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    _explain(ingress, 0, 1)
    if by_hash == "refused":
        worker.host.cache.l1.clear()  # evicted: the next repeat by hash is refused
    else:
        earlier = TypeError("expected a PIL.Image or a uint8 numpy array, got NoneType")
        worker.raise_for_hash = RayTaskError("explain", "Traceback ...", earlier).as_instanceof_cause()
    answer = worker.explain._fn

    async def full_for_pixels(job: Any) -> Any:
        if job.pixels is not None:
            worker.sent.append(True)
            raise BackPressureError("queue full")
        return await answer(job)

    worker.explain._fn = full_for_pixels
    with pytest.raises(Overloaded):
        _explain(ingress, 0, 2)
    assert worker.sent == [True, False, True]
    assert not ingress._sent  # forgotten when the job by hash went wrong
    worker.explain._fn = answer
    ingress._refused_at.clear()  # the queue has room again (the ingress sheds calls for a moment otherwise)
    _explain(ingress, 0, 3)
    assert worker.sent[3:] == [True]  # with its pixels at once, not by hash first


def test_a_job_by_hash_failing_in_the_workers_code_as_internal_is_sent_again_with_its_pixels() -> None:
    """H26: an earlier build's worker may fail a job without pixels with any exception, not only a TypeError
    (INVALID_ARGUMENT): an AttributeError on ``None.shape`` maps to INTERNAL, and the caller still gets the
    answer the job with pixels gets."""
    import numpy as np
    from ray.exceptions import RayTaskError

    from serving.test_repeats_by_hash import _map

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    reference = _explain(_ingress(_Worker(_host({"redis_url": None})), remembered_images=0), 0, 2)
    _explain(ingress, 0, 1)
    earlier = AttributeError("'NoneType' object has no attribute 'shape'")
    worker.raise_for_hash = RayTaskError("explain", "Traceback ...", earlier).as_instanceof_cause()
    np.testing.assert_array_equal(_map(_explain(ingress, 0, 2)), _map(reference))
    assert worker.sent == [True, False, True]


def test_a_prediction_by_hash_counts_its_cache_misses_only_when_it_is_answered() -> None:
    """H47: as a job by hash for a decomposition, one for logits that misses is sent again with its pixels, and
    that job counts the miss: an eviction reads as one miss of one request, not two."""
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import PredictJob

    from serving.test_worker_warm_up import HASH, PIXELS

    host, lookups = _observed_host(None)
    host.predict(PredictJob(PIXELS, HASH))
    host.predict(PredictJob(None, HASH, top_k=2))
    assert lookups == [("l1", "miss"), ("l1", "hit")]
    host.cache.l1.clear()
    with pytest.raises(PixelsNeeded):
        host.predict(PredictJob(None, HASH))
    assert lookups[2:] == []
    host.predict(PredictJob(PIXELS, HASH))
    assert lookups[2:] == [("l1", "miss")]


def test_a_job_by_hash_counts_an_earlier_tiers_miss_and_a_corrupt_value_as_any_request(
    redis_flushed: Any,
) -> None:
    """H49, H50: only misses that end in a refusal go uncounted. A job by hash found in Redis after missing L1
    counts that miss as any request does, and a corrupt value in Redis is counted as corrupt (the operator's
    signal of bad cached data), although the job is then sent again with its pixels."""
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob

    from serving.test_worker_warm_up import HASH, PIXELS, _tamper, _truncate_a_ratio_map

    host, lookups = _observed_host(redis_flushed.url)
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    assert host.cache.flush(10.0)
    assert lookups == [("l1", "miss"), ("l2", "miss")]
    host.cache.l1.clear()
    host.explain(ExplainJob(None, HASH, target=2))  # found in Redis
    assert lookups[2:] == [("l1", "miss"), ("l2", "hit")]

    _tamper(redis_flushed.url, host._key("decomposition", "srd", HASH), _truncate_a_ratio_map)  # fails the layout
    host.cache.discard(host._key("view", "view", HASH))  # else the decomposition is recomputed from the view
    host.cache.l1.clear()
    with pytest.raises(PixelsNeeded):
        host.explain(ExplainJob(None, HASH, target=3))
    assert lookups[4:] == [("l2", "corrupt")]  # the L1 miss is counted by the job sent again


def test_an_unanswered_call_asks_the_controller_less_and_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """H30, H31, H36: a call unanswered for NO_REPLICA_CHECK_S asks Serve's controller whether a replica runs,
    then again after twice as long each time: at 0.1, 0.3 and 0.7 s of a call answered at 1.1 s. Asked at
    once, at a fixed pause or back to back, a long job's waits would load the controller for nothing."""
    asked: list[float] = []
    began = [0.0]

    def status() -> Any:  # all is well: the call keeps waiting
        asked.append(time.monotonic() - began[0])
        return _all_is_well()

    async def predict(job: Any) -> Any:  # between the third ask (~0.7 s) and a fourth (~1.5 s)
        await asyncio.sleep(1.1)
        return _prediction()

    predict_call, context = _predicting_ingress(monkeypatch, 0.1, status, predict)

    async def call() -> Any:
        began[0] = time.monotonic()
        return await predict_call()

    response = asyncio.run(call())
    assert context.code is None and [c.index for c in response.top_classes] == [3]
    # at ~0.1, ~0.3 and ~0.7 s: late only on a loaded machine (then the third may fall after the answer), never early
    assert 2 <= len(asked) <= 3, asked
    assert asked[0] >= 0.08 and asked[1] - asked[0] >= 0.18, asked
    assert len(asked) < 3 or asked[2] - asked[1] >= 0.38, asked


def test_a_slow_controller_reply_is_awaited_without_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    """H28: while the controller's reply is awaited (up to 2 s from a slow one) the loop waits for it or the
    answer, not for a pause already past: that spun the event loop, a CPU of the ingress busy doing nothing
    for as long as the controller took."""
    replied = threading.Event()

    def slow_status() -> Any:  # a controller that takes 1 s to say all is well
        time.sleep(1.0)
        replied.set()
        return _all_is_well()

    async def predict(job: Any) -> Any:  # answers just after the controller's reply
        while not replied.is_set():
            await asyncio.sleep(0.01)
        return _prediction()

    predict_call, context = _predicting_ingress(monkeypatch, 0.05, slow_status, predict)

    async def call() -> tuple[Any, float]:
        cpu = time.thread_time()  # this thread's CPU: the event loop's, not the controller call's thread
        response = await predict_call()
        return response, time.thread_time() - cpu

    response, cpu = asyncio.run(call())
    assert context.code is None and [c.index for c in response.top_classes] == [3]
    assert cpu < 0.4, f"the event loop used {cpu:.2f} s of CPU in a call of ~1 s spent waiting"


def test_a_controller_question_still_in_flight_when_the_answer_arrives_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """H32: the answer arrives while Serve's controller is still being asked; the question is cancelled with
    the call, not left running as a task nobody awaits (one per long call, each holding the controller's
    reply and its thread's wait for up to 2 s)."""
    asked = threading.Event()

    def slow_status() -> Any:  # a controller that takes 1 s to say all is well
        asked.set()
        time.sleep(1.0)
        return _all_is_well()

    async def predict(job: Any) -> Any:  # answers while the controller is asked
        while not asked.is_set():
            await asyncio.sleep(0.01)
        return _prediction()

    predict_call, context = _predicting_ingress(monkeypatch, 0.05, slow_status, predict)

    async def call() -> tuple[Any, list[asyncio.Task]]:
        response = await predict_call()
        await asyncio.sleep(0.05)  # a cancelled task ends at the loop's next turns
        questions = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_deployment_down"]
        return response, [t for t in questions if not t.done()]

    response, left = asyncio.run(call())
    assert context.code is None and [c.index for c in response.top_classes] == [3]
    assert not left, left


@pytest.mark.parametrize("device", ["xpu", "hpu", "privateuseone"])
def test_a_backend_this_torch_was_built_without_is_a_value_error(device: str) -> None:
    """H60, and a defect: torch names devices whose backends a build may lack, and refuses them three ways:
    RuntimeError (CUDA without a driver), AssertionError ("Torch not compiled with XPU enabled") and
    ModuleNotFoundError ("No module named 'torch.hpu'", which reached the caller). All are ValueError."""
    import re

    import ierf
    import torch
    from torch import nn

    backend = getattr(torch, device, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        pytest.skip(f"this torch can use {device}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    srd = ierf.SRD(model)
    state = srd.decompose(torch.randn(1, 3, 8, 8)).state_dict()
    with pytest.raises(ValueError, match=rf"device {re.escape(repr(device))} is not available in this process: "):
        srd.load_decomposition(state, device=device)

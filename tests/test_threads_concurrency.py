"""The engine embedded in multi-threaded hosts (a web server's thread pool, a notebook's background threads, a
training loop beside an explainer): concurrent use must be correct or refused, never silently wrong, and one
thread's explanation must not break or change what another thread is doing.

Each interleaving is forced with events (a patched checkpoint or hook), not left to a race.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from pathlib import Path

import ierf
import pytest
import torch
from torch import nn


def _small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_an_lrp_call_after_a_weight_change_does_not_break_other_threads_forwards() -> None:
    """LRP copies the model again on the first call after its weights change (README: "taken again when the
    model's parameters ... change"), and checking the copy's batch-norm merges traces it with torch.fx, which
    patches ``nn.Module.__call__`` process-wide. Any module another thread runs meanwhile (an unrelated model
    in a serving pool, the training loop that changed the weights) then goes through LRP's tracer and fails
    with ``NameError: module is not installed as a submodule``. The README confines tracing to building an
    explainer ("build explainers before serving threads start"); this one traces during a call."""
    from ierf.baselines import lrp as lrp_module
    from ierf.models import load_model

    model = load_model("resnet18", random_init=True).module
    unrelated = _small_net()
    explainer = ierf.create_explainer("lrp", model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.fc.bias.add_(0.1)  # a fine-tuning step, new weights loaded: the next call copies again

    tracing, ran, finished = threading.Event(), threading.Event(), threading.Event()
    original = lrp_module._LeafTracer.is_leaf_module

    def held(self, module, name):  # hold LRP's trace open until the other thread has run its forward
        if not tracing.is_set():
            tracing.set()
            ran.wait(10)
        return original(self, module, name)

    outcome: dict[str, object] = {}

    def other_thread() -> None:
        while not (tracing.is_set() or finished.is_set()):
            time.sleep(0.005)
        try:
            with torch.no_grad():
                outcome["logits"] = unrelated(torch.randn(2, 3, 8, 8))
        except Exception as exc:
            outcome["error"] = exc
        ran.set()

    thread = threading.Thread(target=other_thread)
    lrp_module._LeafTracer.is_leaf_module = held
    try:
        thread.start()
        maps = explainer.saliency(x, 1)
    finally:
        lrp_module._LeafTracer.is_leaf_module = original
        finished.set()
        thread.join(20)
    assert maps.shape == (1, 64, 64)
    assert "error" not in outcome, f"another thread's forward failed during the LRP call: {outcome['error']!r}"
    assert isinstance(outcome.get("logits"), torch.Tensor)


def test_srd_never_answers_with_a_mix_of_old_and_new_weights() -> None:
    """Another thread loads new weights (``load_state_dict``, an optimiser step) while an SRD call runs.
    Stages decomposed before the change use the old weights, later ones the new: the map matches neither
    model (ResNet18 at 64 px: 0.7-1.8x the map's maximum off both), still sums exactly to the mixed forward's
    logit, and nothing said so. Now refused (the parameters' versions moved during the call); the next call
    explains the new weights."""
    import ierf.srd.program as program
    from ierf.models import load_model

    model = load_model("resnet18", random_init=True).module
    old_state = copy.deepcopy(model.state_dict())
    new_state = load_model("resnet18", random_init=True, seed=1).module.state_dict()
    explainer = ierf.SRD(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.load_state_dict(new_state)
    new = explainer.saliency(x, 3)
    model.load_state_dict(old_state)

    calls = [0]
    original = program.checkpoint

    def other_thread_loads_weights_midway() -> None:
        original()
        calls[0] += 1
        if calls[0] == 30:  # about half-way through ResNet18's graph
            model.load_state_dict(new_state)

    program.checkpoint = other_thread_loads_weights_midway
    try:
        with pytest.raises(ierf.ModelChangedError, match="parameters were written while SRD explained it"):
            explainer.saliency(x, 3)
    finally:
        program.checkpoint = original
    assert calls[0] > 30, "the weights were loaded mid-call"
    torch.testing.assert_close(explainer.saliency(x, 3), new)  # called again: the new weights' map


def test_a_gradient_map_does_not_erase_a_training_step_running_in_another_thread() -> None:
    """The gradient and CAM baselines freeze the caller's parameters (``requires_grad_(False)``) for the length
    of the call and then put back each parameter's ``.grad`` as it was before the call. A training loop in
    another thread (fine-tuning in a notebook's background thread, the model in eval mode for frozen batch
    norms) whose backward runs meanwhile gets no gradients at all, silently: ``loss.backward()`` succeeds,
    every ``p.grad`` stays None and the optimiser step does nothing. README: every explainer "leaves the model
    exactly as found"; here it also takes away what another thread did to it."""
    import ierf.baselines._common as common

    model = _small_net()
    explainer = ierf.create_explainer("gradient", model)
    x = torch.randn(2, 3, 8, 8)
    loss = model(x).sum()  # the trainer's forward, before the explanation starts

    inside, release = threading.Event(), threading.Event()
    original = common.checkpoint

    def held() -> None:  # the explanation is part-way through (before its forward)
        inside.set()
        release.wait(10)
        original()

    errors: list[BaseException] = []

    def explain() -> None:
        try:
            explainer.saliency(x, 0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            inside.set()

    common.checkpoint = held
    thread = threading.Thread(target=explain)
    try:
        thread.start()
        inside.wait(10)
        loss.backward()  # the trainer's backward while the explanation runs
    finally:
        release.set()
        thread.join(20)
        common.checkpoint = original
    assert not errors, errors
    lost = [name for name, p in model.named_parameters() if p.grad is None]
    assert not lost, f"the training step's gradients were erased by the explanation: {lost}"


def test_fused_statistics_raise_the_recompile_limit_in_every_thread_that_runs_them() -> None:
    """``fused.run`` raises Dynamo's recompile limit from 8 to RECOMPILE_LIMIT "once, process-wide", on the
    first call. Torch 2.14's config values set by a user are thread-local, so only the thread that made the
    first fused call gets the raised limit: with IERF_FUSED=1 in a thread pool every other thread falls back
    to the eager statistics after 8 shape variants of a stage (dynamic batch sizes, 1-image batches), which
    is the work fusion was turned on to speed up."""
    import torch._dynamo.config as dynamo_config
    from ierf.srd import fused

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    seen: dict[str, int] = {}

    def stats_probe(who: str) -> str:
        return who

    def compiled(who: str) -> str:  # stands in for the compiled function: what Dynamo would read, per thread
        seen[who] = getattr(dynamo_config, name)
        return who

    saved_compile = torch.compile
    fused._compiled.pop(stats_probe.__name__, None)
    torch.compile = lambda fn, **kwargs: compiled  # type: ignore[assignment]
    try:
        for who in ("first", "second"):
            thread = threading.Thread(target=fused.run, args=(stats_probe, who))
            thread.start()
            thread.join(10)
    finally:
        torch.compile = saved_compile
        fused._compiled.pop(stats_probe.__name__, None)
    assert seen["first"] >= fused.RECOMPILE_LIMIT
    assert seen["second"] >= fused.RECOMPILE_LIMIT, (
        f"the second thread's fused calls run with a limit of {seen['second']}"
    )


def test_cli_writes_in_two_threads_leave_the_process_umask_alone(tmp_path: Path) -> None:
    """The CLI reads the umask to set its output's mode by setting it to 0 and back (``_umask``). Two writes
    in threads (``ierf.cli.main`` called from a notebook's or a job runner's threads) interleave as
    umask(0) -> 022, umask(0) -> 0, umask(022), umask(0): the process is left with umask 0, so every file it
    creates afterwards is world-writable, and one of the two PNGs is written 0666."""
    from ierf import cli

    real_umask = os.umask
    lock = threading.Lock()
    order = [0]
    first_set, second_set, first_restored = threading.Event(), threading.Event(), threading.Event()

    def interleaved(mask: int) -> int:
        with lock:
            order[0] += 1
            step = order[0]
        if step == 2:
            first_set.wait(5)
        previous = real_umask(mask)
        if step == 1:
            first_set.set()
            second_set.wait(5)
        elif step == 2:
            second_set.set()
            first_restored.wait(5)
        elif step == 3:
            first_restored.set()
        return previous

    saved = real_umask(0o022)
    os.umask = interleaved  # type: ignore[assignment]
    try:
        codes: list[int] = []
        threads = [
            threading.Thread(
                target=lambda i=i: codes.append(cli.main(["demo-image", "coffee", "-o", str(tmp_path / f"{i}.png")]))
            )
            for i in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        os.umask = real_umask  # type: ignore[assignment]
        left = real_umask(saved)
    assert codes == [0, 0]
    assert left == 0o022, f"the process umask was left at {left:03o}"
    modes = sorted(oct((tmp_path / f"{i}.png").stat().st_mode & 0o777) for i in range(2))
    assert modes == [oct(0o644)] * 2, modes


def test_lrp_calls_queued_on_one_explainer_survive_a_weight_change() -> None:
    """One LRP explainer serves a thread pool; calls queue on its private copy's lock (``model_guard``). New
    weights arrive while call A waits: the next call B copies again (``self.model`` becomes a new copy) and
    registers Zennit's composite on it under that copy's lock, and A, entering with the old copy's lock,
    registers its composite on ``self.model``, B's copy. Both composites' canonizers then sit on one model:
    A's removal deletes what B's canonizer set, and B fails in its own ``composite.remove()`` with
    ``AttributeError: 'BasicBlock' object has no attribute 'forward'`` (other interleavings run one call with
    both composites' rule hooks). Each call must use the copy whose lock it holds, and answer for the
    weights that copy holds: A for the old, B for the new (mutation round 16b: A's gradient once ran on
    ``self.model``, B's copy, and answered for the new weights unseen)."""
    import contextlib

    from ierf.baselines import lrp as lrp_module
    from ierf.models import load_model

    model = load_model("resnet18", random_init=True).module
    before = copy.deepcopy(model)
    explainer = ierf.create_explainer("lrp", model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a_in_guard, b_registered, a_done = threading.Event(), threading.Event(), threading.Event()
    original_guard, original_gradient = lrp_module.model_guard, lrp_module.Gradient

    @contextlib.contextmanager
    def guard(module):  # A has taken the lock of the copy it read and is about to register
        with original_guard(module):
            if threading.current_thread().name == "A":
                a_in_guard.set()
                b_registered.wait(10)
            yield

    class Gradient:  # B has registered its composite and is about to run its backward
        def __init__(self, module):
            self.inner = original_gradient(module)

        def __call__(self, *args):
            if threading.current_thread().name == "B":
                b_registered.set()
                a_done.wait(10)
            return self.inner(*args)

    maps: dict[str, torch.Tensor] = {}
    errors: dict[str, BaseException] = {}

    def call(who: str) -> None:
        try:
            maps[who] = explainer.saliency(x, 1)
        except BaseException as exc:
            errors[who] = exc
        finally:
            if who == "A":
                a_done.set()
            b_registered.set()

    lrp_module.model_guard, lrp_module.Gradient = guard, Gradient
    try:
        a = threading.Thread(target=call, args=("A",), name="A")
        a.start()
        a_in_guard.wait(10)
        with torch.no_grad():
            model.fc.bias.add_(0.5)  # new weights while A is in its call
        b = threading.Thread(target=call, args=("B",), name="B")
        b.start()
        a.join(30)
        b.join(30)
    finally:
        lrp_module.model_guard, lrp_module.Gradient = original_guard, original_gradient
    assert not errors, {who: repr(exc) for who, exc in errors.items()}
    old = ierf.create_explainer("lrp", before).saliency(x, 1)
    new = ierf.create_explainer("lrp", model).saliency(x, 1)
    assert float((old - new).abs().max() / new.abs().max()) > 1e-3  # the change is visible in the map
    # A took its copy before the change and B after it: each explains the weights of the copy it holds.
    for who, ref in (("A", old), ("B", new)):
        gap = float((maps[who] - ref).abs().max() / ref.abs().max())
        assert gap < 1e-4, f"call {who}'s map is not that of the weights its copy holds: {gap}"


def test_a_random_init_model_is_its_seeds_model_whatever_other_threads_draw_meanwhile() -> None:
    """``load_model(random_init=True, seed=s)`` seeds torch's global generator inside ``fork_rng`` under a
    lock that only other loads take. Any other thread drawing from the global generator meanwhile (a
    training loop's ``torch.randn``, dropout, a data augmentation) takes numbers out of the seeded stream, so
    the model gets other weights, while its ``weights_digest``, hashed once per (name, seed) and cached, still
    names the seed's weights: two replicas (or a cache keyed on the digest) then disagree on the same id."""
    from ierf.models import load_model

    clean = load_model("resnet18", random_init=True, seed=3)
    original = nn.init.kaiming_normal_
    started, drawn = threading.Event(), threading.Event()

    def first_init_waits_for_the_other_thread(*args, **kwargs):
        if not started.is_set():
            started.set()
            drawn.wait(10)
        return original(*args, **kwargs)

    def other_thread() -> None:
        started.wait(10)
        torch.randn(1000)  # the other thread's ordinary use of the global generator
        drawn.set()

    thread = threading.Thread(target=other_thread)
    nn.init.kaiming_normal_ = first_init_waits_for_the_other_thread
    try:
        thread.start()
        loaded = load_model("resnet18", random_init=True, seed=3)
    finally:
        nn.init.kaiming_normal_ = original
        drawn.set()
        thread.join(10)
    same = all(
        torch.equal(a, b)
        for a, b in zip(clean.module.state_dict().values(), loaded.module.state_dict().values(), strict=True)
    )
    assert same or loaded.weights_digest != clean.weights_digest, (
        "other weights under the same weights_digest " + loaded.weights_digest
    )

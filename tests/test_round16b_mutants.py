"""Mutation round 16, second half: tests killing mutants of c54c7e4^..49d3ae4 that survived the suite."""

from __future__ import annotations

import threading
import time
import weakref

import ierf
import torch
from test_round16_mutants import _model
from torch import nn


def test_a_model_built_under_inference_mode_is_explained_like_its_ordinary_twin() -> None:
    """Parameters made under ``torch.inference_mode()`` (a model loaded inside a serving loop) have no version
    counter: the check for weights written during a call skips them instead of raising on ``_version``."""
    ordinary = _model()
    with torch.inference_mode():
        frozen = _model()
    assert all(p.is_inference() for p in frozen.parameters())
    x = torch.randn(2, 3, 12, 12)
    expected = ierf.SRD(ordinary).saliency(x, 1)
    torch.testing.assert_close(ierf.SRD(frozen).saliency(x, 1), expected)


def test_a_disturbed_random_init_build_does_not_evict_the_seeds_cached_digest(monkeypatch) -> None:
    """The digest of a seed's weights is hashed once and cached with their fingerprint. A build whose draws
    another thread disturbed gets its own digest, but must not replace the seed's entry: the next clean load
    would hash the weights again (~0.2 s for a ResNet18, once per model per replica)."""
    from ierf.models import registry

    monkeypatch.delitem(registry._random_init_digests, ("resnet18", 11), raising=False)  # restored afterwards
    hashed = []
    digest = registry._state_digest
    monkeypatch.setattr(registry, "_state_digest", lambda module: hashed.append(1) or digest(module))
    clean = registry.load_model("resnet18", random_init=True, seed=11)
    assert len(hashed) == 1
    fingerprint = registry._state_fingerprint
    monkeypatch.setattr(registry, "_state_fingerprint", lambda module: (-1.0,))  # as if another thread drew
    registry.load_model("resnet18", random_init=True, seed=11)
    assert len(hashed) == 2
    monkeypatch.setattr(registry, "_state_fingerprint", fingerprint)
    again = registry.load_model("resnet18", random_init=True, seed=11)
    assert len(hashed) == 2, "the disturbed build replaced the seed's cached digest"
    assert again.weights_digest == clean.weights_digest


def test_lrp_after_an_architecture_change_chooses_its_canonizers_again() -> None:
    """The canonizers chosen at build are reused only while the modules are the same (only tensors changed).
    A block swapped in afterwards (here a residual block into a plain net) needs the residual canonizer: kept
    stale, the map misses the block's sum rule (85 % off a fresh explainer's)."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Identity(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    explainer = ierf.create_explainer("lrp", model)
    explainer.saliency(x, 1)
    model[3] = BasicBlock(8, 8).eval()
    expected = ierf.create_explainer("lrp", model).saliency(x, 1)
    torch.testing.assert_close(explainer.saliency(x, 1), expected)


def test_lrp_calls_racing_after_a_weight_change_copy_the_model_once() -> None:
    """Calls that find the caller's model changed decide under one lock whether to copy it again: the second
    caller finds the first's copy current. Without the lock both copy (a deep copy of the model each), and
    the later copy replaces the earlier one under the first caller."""
    from ierf.baselines import lrp as lrp_module

    model = _model()
    explainer = ierf.create_explainer("lrp", model)
    with torch.no_grad():
        model[6].bias.add_(0.5)
    copies: list[str] = []
    first_copying, second_started = threading.Event(), threading.Event()
    original = lrp_module.LRPExplainer._copy_source

    def slow_copy(self, stamp, canonizers) -> None:
        copies.append(threading.current_thread().name)
        if threading.current_thread().name == "first":
            first_copying.set()
            second_started.wait(10)
            time.sleep(0.3)  # the second caller reaches the stamp check meanwhile (without the lock)
        original(self, stamp, canonizers)

    def second() -> None:
        first_copying.wait(10)  # the first caller holds the lock (it is copying)
        second_started.set()
        explainer._current()

    explainer._copy_source = slow_copy.__get__(explainer)
    first = threading.Thread(target=explainer._current, name="first")
    other = threading.Thread(target=second, name="second")
    first.start()
    other.start()
    first.join(20)
    other.join(20)
    assert copies == ["first"], copies


def _chain(cache) -> tuple[list[torch.Tensor], list]:
    """weight -> derived -> derived-of-derived, each entry's value the next one's source."""
    weight = torch.randn(64, 64)
    first = cache.get("first", (weight,), lambda: weight * 2)
    second = cache.get("second", (first,), lambda: first + 1)
    return [weight, first, second], [weakref.ref(first), weakref.ref(second)]


def test_a_purge_inside_a_lookup_also_takes_the_entries_whose_sources_it_freed() -> None:
    """A model deleted while the cache's lock is taken only queues its keys; the next lookup purges them. The
    value each purged entry held is freed inside that purge, so entries derived from it are purged in the same
    pass, not left pinning their tensors until some later call."""
    import gc

    from ierf.srd.derived import DerivedCache

    cache = DerivedCache()
    tensors, refs = _chain(cache)
    with cache._lock:  # as when the collection runs inside another lookup
        del tensors[:]
        gc.collect()
    assert len(cache._dead) == 1  # the weight's entry, queued: the lock was taken
    other = torch.randn(4)
    cache.get("other", (other,), lambda: other * 3)
    assert [r() for r in refs] == [None, None], "an entry derived from a purged value outlived the lookup"
    assert list(cache._entries) == [("other", id(other))]


def test_keys_queued_while_a_callback_purges_are_taken_before_it_returns() -> None:
    """A source that dies in another thread while one callback purges (its callback finds the lock taken and
    only queues its key) is purged by the callback holding the lock, after its pass and before it returns."""
    from ierf.srd.derived import DerivedCache

    cache = DerivedCache()
    first_weight, late_weight = torch.randn(8, 8), torch.randn(8, 8)
    for tag, source in (("first", first_weight), ("late", late_weight)):
        cache.get(tag, (source,), source.mul(2).clone)
    del source
    late = [late_weight]
    del late_weight
    purge = cache._purge_dead

    def purge_then_a_late_death() -> None:
        purge()
        late.clear()  # the other thread's source dies now: its callback queues and returns

    cache._purge_dead = purge_then_a_late_death
    del first_weight  # the callback purges, meets the late death, and takes it too
    assert len(cache._entries) == 0 and not cache._dead

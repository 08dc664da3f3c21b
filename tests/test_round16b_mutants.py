"""Mutation round 16, second half: tests killing mutants of c54c7e4^..49d3ae4 that survived the suite."""

from __future__ import annotations

import ierf
import torch
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


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

    key = ("resnet18", 11)
    registry._random_init_digests.pop(key, None)
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
    registry._random_init_digests.pop(key, None)

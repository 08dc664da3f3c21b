"""Memory a long-running process (a notebook, a batch job, a service) must get back from the engine: what
SRD keeps between calls is bounded in bytes, and dropping a model gives back what was kept for it.

Measured as the bytes of the tensor storages alive (gc), not RSS or wall-clock: deterministic and fast."""

from __future__ import annotations

import gc

import ierf
import torch
from ierf.srd.derived import clear_derived_cache
from torch import nn


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process."""
    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except RuntimeError:  # a fake or functional tensor left by compiler tests elsewhere: no memory
                continue
            if pointer not in seen:
                seen.add(pointer)
                total += storage.nbytes()
    return total


def _bn_net() -> nn.Module:
    """Batch norms to fold: their folded kernels (128 x 64 x 3 x 3 floats, 295 kB) are parameter-derived."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 10),
    ).eval()


def test_deleting_a_model_frees_its_derived_tensors_without_waiting_for_another_call() -> None:
    """README: "The cache holds parameters weakly: deleting a model frees its entries." The entries of a
    deleted model were only dropped by the *next* SRD call (``DerivedCache._purge_dead`` runs inside
    ``get``): ``del explainer, model; gc.collect()`` left the folds alive, 84 MB for a ResNet18 (twice its
    weights), on the GPU for a CUDA model, while the caller loads the next model. The weak-reference callback
    only queues the key; it should drop the entry itself when it can take the lock."""
    warm = _bn_net()
    ierf.SRD(warm).saliency(torch.randn(1, 3, 8, 8), 1)
    del warm
    clear_derived_cache()
    before = _live_tensor_bytes()

    model = _bn_net()
    explainer = ierf.SRD(model)
    explainer.saliency(torch.randn(1, 3, 8, 8), 1)
    del explainer, model
    retained = _live_tensor_bytes() - before

    assert retained <= 16 * 1024, f"{retained} bytes of tensors made for a deleted model are still alive"


def test_explaining_many_input_sizes_keeps_a_bounded_number_of_bytes() -> None:
    """An engine user explains photos at their own sizes (a dataset of varied aspect ratios). Average
    pooling's uniform kernels are kept per (channels, kh, kw, dtype, device) in a ``functools.lru_cache``
    of 256 entries, bounded by count only: each is a full ``channels x kh x kw`` float tensor (a global
    average pool's kernel is the size of the last feature map), so 36 sizes of a 256-channel model kept
    32 MB, 256 sizes of a 512-channel one 300 MB, a ResNet50 on ~1 Mpx photos would keep over 1 GB, and all
    of it stays after the model is deleted (the cache is process-wide). Kept caches are bounded by bytes
    (as ``DerivedCache`` is), or the kernel is an expanded scalar that costs nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 256, 1, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)
    ).eval()
    explainer = ierf.SRD(model)
    explainer.saliency(torch.randn(1, 3, 64, 64), 1)
    before = _live_tensor_bytes()

    for rows in range(27, 33):
        for cols in range(27, 33):  # last feature maps 27x27 .. 32x32: 36 sizes
            explainer.saliency(torch.randn(1, 3, 8 * rows, 8 * cols), 1)
    grown = _live_tensor_bytes() - before
    assert grown <= 8 * 2**20, f"36 input sizes left {grown / 2**20:.1f} MiB of tensors alive"

    del explainer, model
    clear_derived_cache()
    left = _live_tensor_bytes() - before
    assert left <= 2**20, f"{left / 2**20:.1f} MiB of tensors made for a deleted model are still alive"

"""Full float32 arithmetic for SRD on CUDA.

cuDNN convolutions run in TF32 by default on Ampere and later GPUs (a 10-bit mantissa, PyTorch's
default for cuDNN): SRD's ratios are exact quantities, and with TF32 a ResNet50 map on an H200 was
2.2 % off the CPU's (max-normalised), against 7e-7 in full float32. So SRD's own work on CUDA runs with
TF32 off for convolutions and matrix products, and the caller's settings are put back afterwards.
The settings are process-wide: another thread's CUDA work during the window also runs in full
float32 (slower, never less exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matrix products while SRD runs on ``device``; nothing
    changes on other devices."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        # The per-operator API (torch >= 2.9): the legacy allow_tf32 flags must not be mixed with it.
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved_legacy = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved_legacy

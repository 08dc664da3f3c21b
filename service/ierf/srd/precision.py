"""Full float32 arithmetic for SRD on CUDA.

cuDNN convolutions run in TF32 by default on Ampere and later GPUs (a 10-bit mantissa, PyTorch's
default for cuDNN): SRD's ratios are exact quantities, and with TF32 a ResNet50 map on an H200 was
2.2 % off the CPU's (max-normalised), against 7e-7 in full float32. So SRD's own work on CUDA runs with
TF32 off for convolutions and matrix products, and the caller's settings are put back afterwards.
The settings are process-wide: another thread's CUDA work during the window also runs in full
float32 (slower, never less exact). A caller's ``torch.autocast`` region (thread-local) is switched off
for SRD's work on any device: its ratios need the model's own dtype throughout.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Autocast off, and TF32 off for cuDNN convolutions and CUDA matrix products, while SRD runs on
    ``device``."""
    with contextlib.ExitStack() as stack:
        if torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(_no_tf32(device))
        yield


@contextlib.contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        # The per-operator API (torch >= 2.9): the legacy allow_tf32 flags must not be mixed with it.
        wanted = [(conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        wanted = [(torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    global _saved, _depth
    with _tf32_lock:  # the first call in saves and sets the flags, the last one out puts them back
        if _depth == 0:
            _saved = [(owner, name, getattr(owner, name)) for owner, name, _ in wanted]
            for owner, name, value in wanted:
                setattr(owner, name, value)
        _depth += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _depth -= 1
            if _depth == 0:
                for owner, name, value in _saved:
                    setattr(owner, name, value)
                _saved = []


# The flags are process-wide: overlapping SRD calls in several threads share one window. Each call saving
# and restoring on its own let the first to finish turn TF32 back on under the second, and the second put
# the first's "ieee" back as the caller's setting.
_tf32_lock = threading.Lock()
_depth = 0
_saved: list[tuple[object, str, object]] = []

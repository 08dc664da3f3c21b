"""Which CPU library runs SRD's matrix products: the BLAS behind ``torch.mm`` or oneDNN's 1x1 convolution.

Most of SRD's channel work is products of a channels-last map (rows of C_in) with a kernel. PyTorch sends a
float32 ``mm`` on the CPU to its BLAS (MKL in the PyPI wheels) and a convolution to oneDNN. The two are
not equally fast everywhere: on an AMD EPYC (Zen 5, AVX-512) MKL ran these shapes at ~210 GFLOP/s on two
cores and oneDNN's 1x1 convolution over the same memory at ~440 GFLOP/s, while the gradient baseline's
convolutions all run in oneDNN. On the Intel hosts the engine was first tuned on, BLAS was the faster for
few rows (the 2048 -> 1000 head at 7x7: 3.0 against 6.6 ms).

So the choice is measured, once per process, on two of ResNet50's product shapes, and the faster library
is used from then on; ``IERF_GEMM=blas`` or ``IERF_GEMM=onednn`` fixes it. The choice is made at the first
float32 CPU product while oneDNN is switched on (:func:`chosen` stays None until then). Both compute the same float32
products (sums in another order, so results differ in the last bits).
"""

from __future__ import annotations

import os
import threading
import time

import torch
import torch.nn.functional as F

ENV = "IERF_GEMM"
BACKENDS = ("blas", "onednn")
# oneDNN is taken only when it is clearly faster: within this factor, BLAS (the default path) stays.
MARGIN = 0.85

_lock = threading.Lock()
_choice: str | None = None


def rows_by_kernel(rows: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``rows @ kernel.T`` for rows (M, K) and a kernel (N, K) stored contiguously, as a contiguous (M, N)
    tensor, through the library :func:`use_onednn` picks for the operands."""
    if use_onednn(rows):
        return conv_rows(rows, kernel)
    return rows @ kernel.t()


def channels_by_kernel(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x @ kernel.T`` over the last dimension of a channels-last tensor (..., K) -> (..., N)."""
    rows = rows_by_kernel(x.reshape(-1, x.shape[-1]), kernel)
    return rows.view(*x.shape[:-1], kernel.shape[0])


def conv_rows(rows: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same product as a 1x1 convolution over a channels-last view of the rows (no copy when the rows
    are contiguous); the result is (M, N) contiguous, the convolution's channels-last output."""
    m, k = rows.shape
    n = kernel.shape[0]
    image = rows.contiguous().view(1, m, 1, k).permute(0, 3, 1, 2)  # (1, K, M, 1) stored channels-last
    # With K == 1 the image is also NCHW-contiguous and the convolution may answer in NCHW: then copy.
    return F.conv2d(image, kernel.view(n, k, 1, 1)).permute(0, 2, 3, 1).contiguous().view(m, n)


def use_onednn(t: torch.Tensor) -> bool:
    """True where products with ``t`` should run as 1x1 convolutions: float32 on the CPU, oneDNN switched
    on (with ``torch.backends.mkldnn.flags(enabled=False)`` convolutions fall back to slow loops), and
    oneDNN measured (or set) faster than BLAS here."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or not torch.backends.mkldnn.enabled:
        return False
    return backend() == "onednn"


def backend() -> str:
    """The CPU library for float32 products in this process: ``IERF_GEMM`` if set, else measured once."""
    global _choice
    if _choice is None:
        with _lock:
            if _choice is None:
                _choice = _configured() or _measure()
    return _choice


def chosen() -> str | None:
    """The library chosen so far, without measuring (None before the first float32 CPU product)."""
    return _choice


def _configured() -> str | None:
    value = os.environ.get(ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    if value == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError(f"{ENV}=onednn: this PyTorch build has no oneDNN")
    return value


# (rows, input channels, output channels): a 56x56 map's 3x3 taps and a 14x14 map's 1x1 expansion.
CALIBRATION_SHAPES = ((3136, 64, 576), (196, 256, 1024))


def _measure(repeats: int = 7) -> str:
    """Best-of-``repeats`` time of both libraries on :data:`CALIBRATION_SHAPES` (30-90 ms in all), after a
    warm-up of each (a process's first oneDNN call also builds its kernels) and interleaved, so that a
    burst of load elsewhere slows both alike."""
    if not torch.backends.mkldnn.is_available():
        return "blas"
    generator = torch.Generator().manual_seed(0)
    runs: dict[str, list] = {"blas": [], "onednn": []}
    for m, k, n in CALIBRATION_SHAPES:
        # float32 on the CPU whatever the caller's torch.set_default_dtype / set_default_device
        rows = torch.randn(m, k, generator=generator, dtype=torch.float32, device="cpu")
        kernel = torch.randn(n, k, generator=generator, dtype=torch.float32, device="cpu")
        runs["blas"].append(lambda rows=rows, kernel=kernel: rows @ kernel.t())
        runs["onednn"].append(lambda rows=rows, kernel=kernel: conv_rows(rows, kernel))
    best = {name: [float("inf")] * len(CALIBRATION_SHAPES) for name in runs}
    with torch.no_grad():
        for calls in runs.values():
            for call in calls:
                call()
                call()
        for _ in range(repeats):
            for name, calls in runs.items():
                for i, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    best[name][i] = min(best[name][i], time.perf_counter() - start)
    return "onednn" if sum(best["onednn"]) < MARGIN * sum(best["blas"]) else "blas"


def reset() -> None:
    """Forget the choice (tests; a changed ``IERF_GEMM`` or thread count), so the next product decides again."""
    global _choice
    with _lock:
        _choice = None

"""SRD speed and memory against an input-gradient pass, measured side by side in one run.

For each model and batch size: SRD saliency time, input-gradient time (forward + backward to the input,
parameters frozen) and their ratio (median of --repeats runs after warm-up, the two interleaved so load
drift hits both), plus peak resident memory of each in a fresh process. Then, on ResNet50 at batch 1:
iERF of 49 seeds in one call against one seed, and a second target on the same image (ratios kept)
against the first.

Targets (issue 2): SRD <= 0.75x input-gradient on ResNet50 at batch 1 and 8; 49 seeds <= 1.2x one seed;
second target <= 0.1x the first. ResNet50 is also measured with the opt-in fused stage statistics
(IERF_FUSED=1); every other row runs the default eager path. On the CPU, SRD's float32 matrix products run
in BLAS or as oneDNN 1x1 convolutions, whichever each process measured faster (ierf.srd.gemm): the header
names the CPU and the choice, and ResNet50 is also measured with each library forced (IERF_GEMM).

    python benchmarks/srd_speed.py [--repeats 7] [--models resnet50,vgg16,efficientnet_lite0] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Steadier glibc malloc for large short-lived tensors (temporaries stay mapped between runs instead of
# being faulted in afresh, which made timings swing); set before torch loads.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}


def _build(name: str, device: str):
    import torch
    import torchvision

    if name == "efficientnet_lite0":
        from ierf.models import load_model

        return load_model("efficientnet_lite0", device=device).module
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval().to(device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timeit(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _peak_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import ierf
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model = _build(spec["model"], device)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(spec["batch"], 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    target = torch.arange(spec["batch"], device=device) + 1
    kind, repeats = spec["kind"], spec["repeats"]

    if kind == "ratio":
        srd = ierf.SRD(model)

        from ierf.srd.precision import full_float32

        def grad_pass():
            # in full float32, as SRD runs: on CUDA PyTorch's default TF32 convolutions would flatter the gradient
            with full_float32(x.device):
                xi = x.clone().requires_grad_(True)
                out = model(xi)
                (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)
            return g

        def srd_pass():
            with torch.no_grad():
                return srd.saliency(x, target)

        for _ in range(2):  # warm-up (first SRD call also learns a gradient head's start layer)
            grad_pass()
            srd_pass()
        t_grad, t_srd = [], []
        for _ in range(repeats):
            t_grad.append(_timeit(grad_pass, device))
            t_srd.append(_timeit(srd_pass, device))
        from ierf.srd import gemm

        return {"grad": statistics.median(t_grad), "srd": statistics.median(t_srd), "gemm": gemm.backend()}

    if kind in ("mem_grad", "mem_srd"):
        if kind == "mem_grad":
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xi).gather(1, target[:, None]).sum(), xi)
        else:
            with torch.no_grad():
                ierf.SRD(model).saliency(x, target)
        return {"peak_mb": _peak_mb(device)}

    if kind == "seeds":
        srd = ierf.SRD(model)
        layer = spec["layer"]
        h = w = 7 if layer.startswith("layer4") else 28
        all_pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        seeds = all_pos[torch.linspace(0, len(all_pos) - 1, 49).long()]
        one = seeds[:1]
        with torch.no_grad():
            for _ in range(2):
                srd.ierf(x, layer, one)
                srd.ierf(x, layer, seeds)
            t1, t49 = [], []
            for _ in range(repeats):
                t1.append(_timeit(lambda: srd.ierf(x, layer, one), device))
                t49.append(_timeit(lambda: srd.ierf(x, layer, seeds), device))
            separate = _timeit(lambda: [srd.ierf(x, layer, seeds[i : i + 1]) for i in range(49)], device)
        return {"one": statistics.median(t1), "many": statistics.median(t49), "separate": separate}

    if kind == "second_target":
        srd = ierf.SRD(model)
        firsts, seconds = [], []
        with torch.no_grad():
            holder: dict = {}

            def first():
                holder["dec"] = srd.decompose(x)
                return holder["dec"].saliency(3)

            def second():
                return holder["dec"].saliency(500)

            for i in range(repeats + 1):
                tf = _timeit(first, device)
                ts = _timeit(second, device)
                if i:  # the first round is warm-up
                    firsts.append(tf)
                    seconds.append(ts)
        return {"first": statistics.median(firsts), "second": statistics.median(seconds)}
    raise ValueError(kind)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
        return ", ".join(sorted(names)) or "unknown"
    except OSError:
        import platform

        return platform.processor() or "unknown"


def run_in_fresh_process(spec: dict) -> dict:
    env = {**os.environ, **MALLOC_ENV, "IERF_FUSED": "1" if spec.get("fused") else "0"}
    if spec.get("gemm"):
        env["IERF_GEMM"] = spec["gemm"]
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _code_and_load() -> str:
    """Which code ran (a results file must name it) and how busy the machine was (a loaded VM moves the ratios)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "?"
    return f"code {commit or 'unknown'}{' (modified)' if dirty else ''}, load average {load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vgg16,efficientnet_lite0")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    print(
        f"torch {torch.__version__}, device {args.device}, threads {args.threads}, repeats {args.repeats}, "
        f"malloc tuned ({', '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())})"
    )
    print(f"CPU: {_cpu_name()}; {_code_and_load()}; MB columns: whole-process peak RSS (CUDA: peak allocated)")
    chosen: set[str] = set()
    print(
        f"{'model':<26}{'batch':>6}{'SRD s':>10}{'grad s':>10}{'SRD/grad':>10}{'SRD MB':>10}{'grad MB':>10}"
        f"{'products':>10}"
    )
    base = {"device": args.device, "threads": args.threads, "repeats": args.repeats}
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            spec = {**base, "model": model, "batch": batch}
            r = run_in_fresh_process({**spec, "kind": "ratio"})
            chosen.add(r["gemm"])
            m_srd = run_in_fresh_process({**spec, "kind": "mem_srd"})["peak_mb"]
            m_grad = run_in_fresh_process({**spec, "kind": "mem_grad"})["peak_mb"]
            print(
                f"{model:<26}{batch:>6}{r['srd']:>10.3f}{r['grad']:>10.3f}{r['srd'] / r['grad']:>10.2f}"
                f"{m_srd:>10.0f}{m_grad:>10.0f}{r['gemm'] if args.device == 'cpu' else '':>10}",
                flush=True,
            )

    if args.device == "cpu":
        print(
            f"float32 products ran in: {', '.join(sorted(chosen))} (each row's process measured its own: the "
            "products column; IERF_GEMM fixes it)"
        )
    if "resnet50" in args.models.split(",") and args.device == "cpu":
        for library in ("blas", "onednn"):
            for batch in (int(b) for b in args.batches.split(",")):
                r = run_in_fresh_process(
                    {**base, "model": "resnet50", "batch": batch, "kind": "ratio", "gemm": library}
                )
                label, ratio = f"resnet50 IERF_GEMM={library}", r["srd"] / r["grad"]
                print(f"{label:<26}{batch:>6}{r['srd']:>10.3f}{r['grad']:>10.3f}{ratio:>10.2f}", flush=True)

    if "resnet50" in args.models.split(",") and args.device == "cpu":
        # Opt-in compiled stage statistics (ierf.srd.fused, CPU only); the warm-up calls absorb the compilation.
        for batch in (int(b) for b in args.batches.split(",")):
            r = run_in_fresh_process({**base, "model": "resnet50", "batch": batch, "kind": "ratio", "fused": True})
            label, ratio = "resnet50 IERF_FUSED=1", r["srd"] / r["grad"]
            print(f"{label:<26}{batch:>6}{r['srd']:>10.3f}{r['grad']:>10.3f}{ratio:>10.2f}", flush=True)

    spec = {**base, "model": "resnet50", "batch": 1}
    for layer in ("layer4.2", "layer2.3"):
        s = run_in_fresh_process({**spec, "kind": "seeds", "layer": layer})
        print(
            f"resnet50 iERF at {layer}: 49 seeds in one call {s['many']:.3f} s vs one seed {s['one']:.3f} s "
            f"-> {s['many'] / s['one']:.2f}x (49 separate calls: {s['separate']:.2f} s)",
            flush=True,
        )
    t = run_in_fresh_process({**spec, "kind": "second_target"})
    print(
        f"resnet50 second target with ratios kept: {t['second']:.4f} s vs first {t['first']:.3f} s "
        f"-> {t['second'] / t['first']:.3f}x"
    )


if __name__ == "__main__":
    main()

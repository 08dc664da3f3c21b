"""Explain latency through the service (gRPC -> Ray Serve -> worker) against the same work in-process.

Starts its own private Ray cluster, Serve (gRPC on a free loopback port) and redis-server, then
measures, for one model:

- cold: a new image (decomposition computed) — in-process ``srd.decompose(x).saliency(t)`` vs Explain;
- warm: another class on an image already seen — in-process ``decomposition.saliency(t)`` vs Explain,
  served from the worker's in-process LRU (L1) and, in a last phase with L1 off, from Redis (L2); the SDK
  names a repeated image by its content hash. Phase 1b repeats the first with the SDK sending the pixels
  (``Client(remembered_images=0)``; the ingress still sends the repeat on by hash), phase 2 with the pixels
  on both legs (the ingress's ``remembered_images: 0`` too): what each saves;
- floor: probes of a trivial two-deployment app on the same proxy, interleaved with the warm calls (an
  ingress whose ``Health.Check`` returns at once, or first awaits a no-op on a second deployment): what
  Ray Serve's proxy and one or two deployment hops cost on this machine with no work at all.

Targets (issue 3): overhead p50 <= 15 ms; warm <= 0.2 x cold for ResNet50 on CPU.

Ray Serve feature flags set in the environment reach the cluster it starts (Ray's processes inherit this
one's environment). With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` each ingress replica also serves gRPC on a
port of its own (40000-41000) beside the proxy, and the calls and floor probes go straight there: what the
proxy hop costs.

The script re-runs itself under the service's process settings (``ierf.serving.settings.PROCESS_ENV``:
malloc thresholds, OpenMP spin count), which the cluster it starts inherits, so the in-process reference
computes with the same settings as the worker it is compared with.

    python benchmarks/service_latency.py                       # resnet50 (random weights), CPU
    python benchmarks/service_latency.py --model efficientnet_lite0 --cold 12 --warm 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEMO_IMAGES = ("coffee", "chelsea", "rocket", "astronaut", "motorcycle")
# Pause before each cold measurement and before the warm series: the worker writes a new decomposition
# to Redis ~50 ms after its answer, and that work must not land in the next measurement.
SETTLE_S = 0.25


@dataclass
class Series:
    name: str
    seconds: list[float]

    def pct(self, q: float) -> float:
        ordered = sorted(self.seconds)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds) * 1000


def images(count: int, offset: int) -> list[np.ndarray]:
    """Real photos, made unique per index (one pixel nudged) so every one is a cache miss."""
    from ierf.images import demo_image

    base = [demo_image(name) for name in DEMO_IMAGES]
    out = []
    for i in range(count):
        picture = base[i % len(base)].copy()
        picture[0, 0, 0] = (int(picture[0, 0, 0]) + offset + i + 1) % 256
        out.append(picture)
    return out


class InProcess:
    """The same model and engine in this process: the reference for "the same work"."""

    def __init__(self, model_id: str, random_init: bool, threads: int) -> None:
        import ierf
        import torch
        from ierf.models import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_model(model_id, random_init=random_init)
        self.srd = ierf.SRD(self.model.module)
        self.decomposition = None

    def cold(self, picture: np.ndarray) -> float:
        start = time.perf_counter()
        view = self.model.resize_crop(picture)
        x = self.model.normalize(self.torch.from_numpy(view).permute(2, 0, 1)[None])
        self.decomposition = self.srd.decompose(x)
        self.decomposition.saliency(int(self.decomposition.logits.argmax()))
        return time.perf_counter() - start

    def warm(self, target: int) -> float:
        start = time.perf_counter()
        self.decomposition.saliency(target)
        return time.perf_counter() - start


FLOOR_APP = "serve-floor"
SERIES = ("ref cold", "grpc cold", "ref warm", "grpc warm", "health", "floor 1 hop", "floor 2 hops")


def deploy_floor() -> None:
    """A do-nothing app shaped like ours, on the same proxy: gRPC proxy -> ingress whose Health.Check
    returns at once ("floor 1 hop"), or first awaits a no-op on a second deployment ("floor 2 hops")."""
    from grpc_health.v1 import health_pb2
    from ray import serve

    @serve.deployment(name="FloorWorker", ray_actor_options={"num_cpus": 0})
    class FloorWorker:
        async def ping(self, value: int) -> int:
            return value

    @serve.deployment(name="FloorIngress", ray_actor_options={"num_cpus": 0})
    class FloorIngress:
        def __init__(self, worker) -> None:
            self.worker = worker

        async def Check(self, request, grpc_context=None):
            if request.service == "two-hops":
                await self.worker.ping.remote(1)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    serve.run(FloorIngress.bind(FloorWorker.bind()), name=FLOOR_APP, route_prefix="/serve-floor")


def direct_ingress_address(app_name: str, timeout_s: float = 60.0) -> str | None:
    """The gRPC address of ``app_name``'s ingress replica when the cluster runs with direct ingress, found
    through Serve's controller (its port changes when the replica is replaced); None otherwise."""
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return None
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            if group.protocol == RequestProtocol.GRPC and group.app_name == app_name and group.targets:
                target = group.targets[0]
                return f"{target.ip}:{target.port}"
        time.sleep(0.5)
    raise TimeoutError(f"no direct-ingress gRPC target for {app_name} within {timeout_s} s")


def measure(
    reference: InProcess,
    address: str,
    cold_images,
    warm_targets,
    label: str,
    warmup_offset: int = 10_000,
    floor_address: str | None = None,
    sdk_remembered_images: int | None = None,
) -> dict[str, Series]:
    """Alternate in-process calls, gRPC calls and the floor probes so all see the same machine load
    (other jobs share the cores). Two Serve apps run, so every call names its application."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ierf.serving.local import APP_NAME
    from ierf_client import Client

    out = {k: Series(k, []) for k in SERIES}
    tiers: set[str] = set()
    stages: dict[str, Series] = {}  # server-side stage timings of the warm gRPC calls (provenance)
    cold_stages: dict[str, Series] = {}  # ... and of the cold ones
    with (
        Client(
            address,
            timeout=600,
            application=APP_NAME,
            **({} if sdk_remembered_images is None else {"remembered_images": sdk_remembered_images}),
        ) as client,
        grpc.insecure_channel(floor_address or address) as channel,
    ):
        floor = health_pb2_grpc.HealthStub(channel)

        def probe(service: str) -> float:
            start = time.perf_counter()
            floor.Check(
                health_pb2.HealthCheckRequest(service=service), metadata=(("application", FLOOR_APP),), timeout=60
            )
            return time.perf_counter() - start

        client.wait_until_serving(timeout=300)
        # Warm-up, both paths, until steady state (a fresh cluster's own processes are still busy at first).
        for picture in images(3, warmup_offset):  # new to this phase: a replaced worker warms up on misses
            reference.cold(picture)
            client.explain(picture, overlay=False)
        for target in range(10):
            reference.warm(target)
            client.explain(picture, target=target, overlay=False)
            client.health()
            probe("")
            probe("two-hops")
        for picture in cold_images:
            time.sleep(SETTLE_S)
            out["ref cold"].seconds.append(reference.cold(picture))
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            result = client.explain(picture, overlay=False)
            out["grpc cold"].seconds.append(time.perf_counter() - start)
            assert result.provenance.cache.get("decomposition") == "miss", result.provenance.cache
            for stage, seconds in result.provenance.timings.items():
                cold_stages.setdefault(stage, Series(stage, [])).seconds.append(seconds)
        time.sleep(SETTLE_S)  # the last cold image's deferred cache write lands before the warm series

        def grpc_warm(target: int) -> Any:
            start = time.perf_counter()
            result = client.explain(cold_images[-1], target=target, overlay=False)
            out["grpc warm"].seconds.append(time.perf_counter() - start)
            return result

        for i, target in enumerate(warm_targets):  # the last cold image, other classes
            # In turn first: the call made first meets the tail of the floor probes' work in the service's
            # processes (always the reference, it ran 1.5-3 ms slower than the worker's own explain stage).
            if i % 2:
                result = grpc_warm(target)
            out["ref warm"].seconds.append(reference.warm(target))
            if not i % 2:
                result = grpc_warm(target)
            tiers.add(str(result.provenance.cache.get("decomposition")))
            for stage, seconds in result.provenance.timings.items():
                stages.setdefault(stage, Series(stage, [])).seconds.append(seconds)
            start = time.perf_counter()
            client.health()
            out["health"].seconds.append(time.perf_counter() - start)
            out["floor 1 hop"].seconds.append(probe(""))
            out["floor 2 hops"].seconds.append(probe("two-hops"))
    for series in out.values():
        series.name = f"{series.name} ({label})"
    out["tiers"] = Series(",".join(sorted(tiers)), [])
    out["stages"] = Series(", ".join(f"{k} {v.p50:.1f}" for k, v in stages.items()), [])
    out["cold stages"] = Series(", ".join(f"{k} {v.p50:.1f}" for k, v in cold_stages.items()), [])
    return out


def idle_wake_penalty(pause_s: float = SETTLE_S, repeats: int = 5) -> tuple[float, float]:
    """(ms back to back, ms after ``pause_s`` idle) to read 4 MB this process already holds, medians.

    On the VMs this was developed on, code that touches memory ran 10-40x slower for the first tens of
    milliseconds after a process had slept ~0.25 s (pure arithmetic did not; no page faults were counted):
    a platform effect every process on a request's path pays after an idle gap, which the cold series here
    (each call after a SETTLE_S pause, through four processes against one) include, and the warm series
    (back to back) do not. Printed with the results so that they can be read for what the machine did."""
    buffer = np.ones(4 << 17)  # 4 MB of float64
    buffer.sum()
    hot, after_idle = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        hot.append(time.perf_counter() - start)
        time.sleep(pause_s)
        start = time.perf_counter()
        buffer.sum()
        after_idle.append(time.perf_counter() - start)
    return statistics.median(hot) * 1000, statistics.median(after_idle) * 1000


def _code_and_load() -> str:
    """Which code ran (a results file must name it) and how busy the machine was, as srd_speed.py prints."""
    here = Path(__file__).resolve().parent
    git = ["git", "-C", str(here)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        code = f"code {commit.stdout.strip() or 'unknown'}{' (modified)' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.SubprocessError):
        code = "code unknown"
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "?"
    return f"{code}, load average {load}"


def run_with_service_environment() -> None:
    """Re-exec under PROCESS_ENV (glibc and libgomp read theirs when a process starts); a value the
    caller set is kept."""
    from ierf.serving.settings import PROCESS_ENV

    missing = {key: value for key, value in PROCESS_ENV.items() if key not in os.environ}
    if "IERF_GEMM" not in os.environ:
        # SRD picks BLAS or oneDNN per process by timing both (ierf.srd.gemm); the two differ by ~30 % on
        # ResNet50, more than the overhead measured here: the reference and the worker must use one library
        from ierf.srd import gemm

        missing["IERF_GEMM"] = gemm.backend()
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **missing})  # flags, -m kept


def main() -> None:
    run_with_service_environment()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", choices=("random", "real"), default=None, help="default: real if bundled")
    parser.add_argument("--cold", type=int, default=12, help="new images per series")
    parser.add_argument("--warm", type=int, default=30, help="second-target requests per series")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the worker")
    args = parser.parse_args()
    random_init = (args.weights or ("real" if args.model == "efficientnet_lite0" else "random")) == "random"

    from ierf.serving.app import build_application
    from ierf.serving.local import RedisProcess, free_port, load_serve_config, start_service
    from ierf.serving.settings import ServiceConfig
    from ray import serve

    cold_images = images(args.cold, 0)
    warm_targets = [(17 * i + 3) % 1000 for i in range(args.warm)]
    print(f"model {args.model} ({'random' if random_init else 'real'} weights), torch threads {args.threads}")
    print(f"{_code_and_load()}; float32 products in {os.environ.get('IERF_GEMM', '?')} (reference and worker alike)")
    from ierf.serving.settings import PROCESS_ENV

    print("process settings (this process and the cluster): " + ", ".join(f"{k}={os.environ[k]}" for k in PROCESS_ENV))
    hot, after_idle = idle_wake_penalty()
    print(f"this machine: reading 4 MB took {hot:.2f} ms back to back, {after_idle:.2f} ms after {SETTLE_S} s idle")
    reference = InProcess(args.model, random_init, args.threads)

    model_args = {"id": args.model, "random_init": random_init, "num_threads": args.threads}
    app_args = {"models": [model_args], "default_model": args.model, "cache": {}}
    config = load_serve_config()
    app = config["applications"][0]
    app["deployments"] = [
        {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}},
        {"name": f"Worker_{args.model}", "max_ongoing_requests": 1, "max_queued_requests": 8,
         "ray_actor_options": {"num_cpus": 1}},
    ]  # fmt: skip
    print("starting Ray + Serve + Redis ...", flush=True)
    redis = RedisProcess(maxmemory="1gb").start()
    service = None
    try:
        app_args["cache"]["redis_url"] = redis.url
        service = start_service(
            config,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            num_cpus=os.cpu_count(),
            args_overrides=app_args,
        )
        deploy_floor()
        print("phase 1: worker with L1 + L2 ...", flush=True)
        from ierf.serving.local import APP_NAME

        floor_direct = direct_ingress_address(FLOOR_APP)
        address = direct_ingress_address(APP_NAME) or service.grpc_address
        print(f"Explain calls to {address}, floor probes to {floor_direct or service.grpc_address}", flush=True)
        l1 = measure(reference, address, cold_images, warm_targets, "L1", floor_address=floor_direct)
        overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
        # Phase 1b: the SDK sends the pixels with every request (remembered_images=0), the ingress sends a
        # repeat on to the worker by its content hash: what naming the image by hash saves on the first leg.
        print("phase 1b: worker with L1 + L2, the SDK sends pixels ...", flush=True)
        l1_sdk_pixels = measure(
            reference,
            address,
            images(args.cold, 125),
            warm_targets,
            "L1, SDK pixels",
            12_500,
            floor_address=floor_direct,
            sdk_remembered_images=0,
        )
        # Phase 2: pixels on both legs (the SDK and the ingress remember no image): what sending a repeat by
        # its content hash alone saves in all.
        with_pixels = ServiceConfig.from_args({**app_args, "ingress": {"remembered_images": 0}})
        serve.run(build_application(with_pixels, overrides), name=APP_NAME, route_prefix="/")
        print("phase 2: worker with L1 + L2, pixels with every job ...", flush=True)
        address = direct_ingress_address(APP_NAME) or service.grpc_address
        l1_pixels = measure(
            reference,
            address,
            images(args.cold, 250),
            warm_targets,
            "L1, pixels",
            15_000,
            floor_address=floor_direct,
            sdk_remembered_images=0,
        )
        # Phase 3: same cluster, worker without L1, so every reuse is a Redis fetch + rebuild.
        no_l1 = ServiceConfig.from_args({**app_args, "cache": {"redis_url": redis.url, "l1_bytes": 0}})
        serve.run(build_application(no_l1, overrides), name=APP_NAME, route_prefix="/")
        print("phase 3: worker with L2 only ...", flush=True)
        address = direct_ingress_address(APP_NAME) or service.grpc_address
        print(f"Explain calls to {address}", flush=True)
        l2 = measure(
            reference, address, images(args.cold, 500), warm_targets, "L2 only", 20_000, floor_address=floor_direct
        )
    finally:
        if service is not None:
            service.stop()
        redis.cleanup()

    print()
    print(f"{'series':<26} {'n':>4} {'p50 ms':>10} {'p99 ms':>10}")
    phases = {"L1": l1, "L1, SDK pixels": l1_sdk_pixels, "L1, pixels": l1_pixels, "L2 only": l2}
    for phase in phases.values():
        for key in SERIES:
            series = phase[key]
            print(f"{series.name:<26} {len(series.seconds):>4} {series.p50:>10.1f} {series.pct(99):>10.1f}")
    print()
    print("(p99 of fewer than 100 calls is the largest of them)")
    print("overhead = gRPC p50 - in-process p50 for the same work (target p50 <= 15 ms); paired = median of")
    print("the differences of each gRPC call and the in-process call next to it on the same image/class")
    for phase in phases.values():
        for kind in ("cold", "warm"):
            grpc_s, ref_s = phase[f"grpc {kind}"], phase[f"ref {kind}"]
            paired = statistics.median(g - r for g, r in zip(grpc_s.seconds, ref_s.seconds, strict=True)) * 1000
            print(
                f"  {grpc_s.name:<24} {grpc_s.p50 - ref_s.p50:+9.1f} ms   ratio {grpc_s.p50 / ref_s.p50:6.2f}x"
                f"   paired {paired:+6.1f} ms"
            )
    print("Ray Serve floor: the same proxy and hops with no work (probes interleaved with the warm calls)")
    for phase in phases.values():
        grpc_s, ref_s, two = phase["grpc warm"], phase["ref warm"], phase["floor 2 hops"]
        print(
            f"  {grpc_s.name:<24} two-hop floor {two.p50:5.1f} ms; overhead above it "
            f"{grpc_s.p50 - ref_s.p50 - two.p50:+6.1f} ms"
        )
    print("where a gRPC call spends its time on the server, p50 ms (provenance; total = the ingress)")
    for label, phase in phases.items():
        print(f"  {'warm ' + label:<16} {phase['stages'].name}")
        print(f"  {'cold ' + label:<16} {phase['cold stages'].name}")
    print("warm / cold through the service, p50 (target <= 0.2)")
    hits = ((l1, "L1 hit"), (l1_sdk_pixels, "L1, SDK pixels"), (l1_pixels, "L1 hit, pixels"), (l2, "L2 hit"))
    for phase, label in hits:
        ratio = phase["grpc warm"].p50 / phase["grpc cold"].p50
        print(f"  {label:<15} {ratio:6.3f}   (decomposition served from: {phase['tiers'].name})")


if __name__ == "__main__":
    main()

"""Explain latency through the service (gRPC -> Ray Serve -> worker) against the same work in-process.

Starts its own private Ray cluster, Serve (gRPC on a free loopback port) and redis-server, then
measures, for one model:

- cold: a new image (decomposition computed) — in-process ``srd.decompose(x).saliency(t)`` vs Explain;
- warm: another class on an image already seen — in-process ``decomposition.saliency(t)`` vs Explain,
  served from the worker's in-process LRU (L1) and, in a second phase with L1 off, from Redis (L2).

Targets (issue 3): overhead p50 <= 15 ms; warm <= 0.2 x cold for ResNet50 on CPU.

    python benchmarks/service_latency.py                       # resnet50 (random weights), CPU
    python benchmarks/service_latency.py --model efficientnet_lite0 --cold 6 --warm 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEMO_IMAGES = ("coffee", "chelsea", "rocket", "astronaut", "motorcycle")


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


def in_process(model_id: str, random_init: bool, threads: int, cold_images, warm_targets):
    import ierf
    import torch
    from ierf.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_id, random_init=random_init)
    srd = ierf.SRD(model.module)

    def model_input(picture: np.ndarray) -> torch.Tensor:
        view = model.resize_crop(picture)
        return model.normalize(torch.from_numpy(view).permute(2, 0, 1)[None])

    srd.decompose(model_input(cold_images[0])).saliency(0)  # warm-up: lazy init, allocator
    cold, warm = [], []
    decomposition = None
    for picture in cold_images:
        start = time.perf_counter()
        x = model_input(picture)
        decomposition = srd.decompose(x)
        decomposition.saliency(int(decomposition.logits.argmax()))
        cold.append(time.perf_counter() - start)
    for target in warm_targets:
        start = time.perf_counter()
        decomposition.saliency(target)
        warm.append(time.perf_counter() - start)
    return Series("in-process cold", cold), Series("in-process warm", warm)


def through_service(address: str, cold_images, warm_targets, label: str):
    from ierf_client import Client

    with Client(address, timeout=600) as client:
        client.wait_until_serving(timeout=300)
        client.explain(images(1, 10_000)[0], overlay=False)  # warm-up of the worker
        cold, warm, tiers = [], [], set()
        for picture in cold_images:
            start = time.perf_counter()
            result = client.explain(picture, overlay=False)
            cold.append(time.perf_counter() - start)
            assert result.provenance.cache.get("decomposition") == "miss", result.provenance.cache
        last = cold_images[-1]
        for target in warm_targets:
            start = time.perf_counter()
            result = client.explain(last, target=target, overlay=False)
            warm.append(time.perf_counter() - start)
            tiers.add(result.provenance.cache.get("decomposition"))
    return Series(f"gRPC cold ({label})", cold), Series(f"gRPC warm ({label})", warm), tiers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", choices=("random", "real"), default=None, help="default: real if bundled")
    parser.add_argument("--cold", type=int, default=6, help="new images per series")
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
    print("in-process ...", flush=True)
    ref_cold, ref_warm = in_process(args.model, random_init, args.threads, cold_images, warm_targets)

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
        print("service, L1 + L2 ...", flush=True)
        cold_l1, warm_l1, tiers_l1 = through_service(service.grpc_address, cold_images, warm_targets, "L1")
        # Phase 2: same cluster, worker without L1, so every reuse is a Redis fetch + rebuild.
        overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
        no_l1 = ServiceConfig.from_args({**app_args, "cache": {"redis_url": redis.url, "l1_bytes": 0}})
        serve.run(build_application(no_l1, overrides), name="ierf", route_prefix="/")
        print("service, L2 only ...", flush=True)
        cold_l2, warm_l2, tiers_l2 = through_service(
            service.grpc_address, images(args.cold, 500), warm_targets, "L2 only"
        )
    finally:
        if service is not None:
            service.stop()
        redis.cleanup()

    rows = [ref_cold, cold_l1, cold_l2, ref_warm, warm_l1, warm_l2]
    print()
    print(f"{'series':<24} {'n':>4} {'p50 ms':>10} {'p99 ms':>10}")
    for series in rows:
        print(f"{series.name:<24} {len(series.seconds):>4} {series.p50:>10.1f} {series.pct(99):>10.1f}")
    print()
    print("overhead = gRPC p50 - in-process p50 for the same work (target p50 <= 15 ms)")
    for grpc_series, ref in ((cold_l1, ref_cold), (warm_l1, ref_warm), (warm_l2, ref_warm)):
        extra = grpc_series.p50 - ref.p50
        print(f"  {grpc_series.name:<22} {extra:+9.1f} ms   ratio {grpc_series.p50 / ref.p50:6.2f}x")
    print("warm / cold through the service (target <= 0.2)")
    print(f"  L1 hit  {warm_l1.p50 / cold_l1.p50:6.3f}   (tiers served: {sorted(map(str, tiers_l1))})")
    print(f"  L2 hit  {warm_l2.p50 / cold_l2.p50:6.3f}   (tiers served: {sorted(map(str, tiers_l2))})")


if __name__ == "__main__":
    main()

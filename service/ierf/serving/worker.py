"""The model host: one model per replica, every method in-process, target-independent work cached.

:class:`ModelHost` is plain Python (no Ray) so its logic is tested directly; the Serve deployment
in :mod:`ierf.serving.deployments` only wraps it. Jobs and outcomes are small dataclasses of numpy
arrays and strings: they cross the ingress->worker hop through Ray's object store.

Why the decomposition is the cached unit: SRD's ``decompose(x)`` (forward pass + sharing ratios of
every layer) is the expensive, target-independent part; saliency for any class and the iERF of any
PFV are cheap reads of it. Its ``state_dict()`` is flat tensors, so it goes to Redis as safetensors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ierf.interrupt import Interrupted
from ierf.serving.cache import CacheKey, RedisSettings, RedisTier, TieredCache, tensors_nbytes
from ierf.serving.errors import DeadlineExceeded, InvalidArgument, PixelsNeeded, ServiceError, StaleView
from ierf.serving.jobs import (  # re-exported: the worker's protocol, defined torch-free for the ingress
    DEFAULT_METHOD,
    ExplainJob,
    IERFJob,
    LayerShape,
    ModelDescription,
    Outcome,
    PredictJob,
    Provenance,
    Score,
    check_explain_args,
    check_ierf_args,
    check_response_fits,
    check_top_k,
)
from ierf.serving.settings import CacheConfig, ModelConfig

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica log

# The "method" of the plain forward pass in cache keys: the logits artifact is keyed
# ``...:model@<architecture>+ierf-<version>:...`` (weights and preprocessing are key fields of their own).
FORWARD_METHOD = "model"
# The "method" of the model's view in cache keys (``...:view@<preprocess version>:...``): the uint8 crop that
# overlays, the returned input and every method other than SRD saliency read, kept so that jobs sent by
# content hash alone can do without the pixels.
VIEW_METHOD = "view"
_R = TypeVar("_R")


def _layer_shape(name: str, shape: tuple[int, ...]) -> LayerShape:
    """A PFV map (C, H, W), or a fully connected layer's vector (C,) on a 1x1 grid (VGG's head)."""
    from ierf.srd import pfv_grid

    height, width = pfv_grid(shape)
    return LayerShape(name, int(shape[0]), int(height), int(width))


class _Stages:
    """Collects (stage, seconds) for provenance and forwards them to the metrics."""

    def __init__(self, record: Any, model: str) -> None:
        self.items: list[tuple[str, float]] = []
        self._record = record
        self._model = model

    def add(self, stage: str, seconds: float) -> None:
        self.items.append((stage, seconds))
        self._record(stage, self._model, seconds)

    def timed(self, stage: str) -> _Timer:
        return _Timer(self, stage)


class _Timer:
    def __init__(self, stages: _Stages, stage: str) -> None:
        self._stages, self._stage = stages, stage

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._stages.add(self._stage, time.perf_counter() - self._start)


class _ModelInput:
    """The model's view of the image, computed only when needed: a cache hit skips preprocessing. A job sent by
    content hash alone (``pixels`` None) reads the view the workers kept of it (:meth:`ModelHost._cached_view`)
    when it needs the pixels after all (an overlay, the returned input, another method, a decomposition
    evicted since), and is refused with PixelsNeeded when that is gone too."""

    def __init__(
        self,
        host: ModelHost,
        pixels: np.ndarray | None,
        content_hash: str,
        stages: _Stages,
        view_version: str = "",
        prov: Provenance | None = None,
    ) -> None:
        self._host, self._pixels, self._stages, self._prov = host, pixels, stages, prov
        self.content_hash = content_hash
        self._view: np.ndarray | None = None
        self._x: torch.Tensor | None = None
        self.made_view = False  # the view came with the job or was cut from its pixels: worth keeping
        if view_version:  # the ingress made the view; by this replica's preprocessing, or not at all
            stale = host.stale_view(pixels, view_version)
            if stale is not None:
                raise stale
            self._view, self.made_view = pixels, True

    def read_view_first(self) -> None:
        """For a job by hash whose answer shows the view (an overlay, the returned input, a method that reads the
        pixels): read it before any work, so that a replica that no longer holds it refuses at once instead of
        after computing the map it would then compute again for the job sent with the pixels."""
        if self._pixels is None:
            self.view  # noqa: B018 - read for its refusal (PixelsNeeded) and to hold it for the job

    @property
    def has_pixels(self) -> bool:
        """False for a job sent by content hash alone whose view is not at hand in L1 either: a cache miss of it
        sends the job back for its pixels, and that job counts the miss."""
        return self._pixels is not None or self._host.view_in_l1(self.content_hash)

    @property
    def view(self) -> np.ndarray:
        """uint8 (H, W, 3) after resize and centre crop: the pixels every map refers to."""
        if self._view is None:
            if self._pixels is None:
                self._view = self._host._cached_view(self.content_hash, self._stages, self._prov)
            else:
                with self._stages.timed("preprocess"):
                    self._view = self._host.model.resize_crop(self._pixels)
                self.made_view = True
        return self._view

    @property
    def x(self) -> torch.Tensor:
        """Normalised (1, 3, H, W) float input on the model's device."""
        if self._x is None:
            view = self.view
            with self._stages.timed("preprocess"):
                # channels first in one copy, which is writable: the view may be the job's own buffer, which
                # Ray delivers read-only (torch.from_numpy warns on those)
                pixels = torch.from_numpy(np.array(view.transpose(2, 0, 1), order="C"))[None]
                self._x = self._host.model.normalize(pixels).to(self._host.device)
        return self._x


def _check_deadline(deadline: float | None, before: str) -> None:
    if deadline is not None and time.time() > deadline:
        late = time.time() - deadline
        raise DeadlineExceeded(f"deadline passed {late:.3f} s ago, before {before}; no work was done for it")


# Work whose time each replica learns so that a request which cannot finish before its deadline is
# refused before it starts: the worker computes on one thread, and a job nobody waits for would hold up
# every request behind it. Started work stops only at the engine's checkpoints (ierf.interrupt: SRD's
# graph nodes, the forward passes of the gradient baselines), so refusing up front still saves the most.
DECOMPOSE = "decompose"  # SRD's forward pass + sharing ratios
FORWARD = "forward"  # the logits alone
WARM_UP_PASSES = 2  # the first pays the one-off costs, the second gives the estimates


def _explain_work(method: str) -> str:
    return f"explain:{method}"


def _work_name(work: str) -> str:
    if work == DECOMPOSE:
        return "decomposing a new image"
    if work == FORWARD:
        return "a forward pass"
    return f"{work.removeprefix('explain:')} saliency"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------- host
# What an L1 entry costs beside its tensor data (the tensor object, its storage, the key, the LRU's node): ~1 kB,
# which for a model's 4 kB of logits was a quarter more than L1's byte bound counted.
L1_ENTRY_OVERHEAD_BYTES = 1024


def _logits_nbytes(logits: torch.Tensor) -> int:
    return logits.numel() * logits.element_size() + L1_ENTRY_OVERHEAD_BYTES


@functools.cache
def engine_code_digest() -> str:
    """sha256 (12 hex) of the engine's source: every ``ierf`` module outside ``ierf.serving`` (methods,
    models, preprocessing). Cached values are keyed by the code that made them, and a version number kept
    by hand stayed "1.0" through engine changes that moved maps: a shared Redis would have served the old
    code's values to the new one (and in a rolling upgrade each would delete the other's as corrupt)."""
    import ierf

    root = Path(ierf.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("serving/"):
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.cache  # a handful of names; on the name alone, so no host is kept alive by the cache
def _method_version(name: str) -> str:
    """The method's own version when it declares one (SRD does), the package version and the engine code's
    digest (see :func:`engine_code_digest`)."""
    import ierf
    from ierf.methods import method_version

    declared = method_version(name)
    named = f"{name}-{declared}" if declared else name
    return f"{named}+ierf-{ierf.__version__}.{engine_code_digest()}"


class ModelHost:
    """Loads one model once; answers describe / explain / ierf / predict in-process."""

    def __init__(
        self,
        config: ModelConfig,
        cache_config: CacheConfig,
        *,
        stage_observer: Any = None,
        cache_observer: Any = None,
        defer_cache_writes: bool = False,
    ) -> None:
        """``defer_cache_writes``: a new decomposition's Redis copy waits, unencoded, until the owner calls
        ``cache.write_deferred()`` on the compute thread once the answer has left (the Serve worker does)."""
        import ierf
        from ierf.models import load_model

        self.config = config
        self.defer_cache_writes = defer_cache_writes
        self.device = resolve_device(config.device)
        self.model = load_model(
            config.name,
            weights=config.weights,
            random_init=config.random_init,
            device=self.device,
            **({"seed": config.seed} if config.random_init else {}),
            **({"resize": config.resize} if config.resize else {}),
        )
        self.srd = ierf.SRD(self.model.module)
        self._explainers: dict[str, Any] = {DEFAULT_METHOD: self.srd}
        self._explainers_lock = threading.Lock()
        # method -> why it cannot explain this model: what the architecture refuses up front, then what a
        # method's explainer refused when first built. The methods' code loads on their first request.
        self._unavailable: dict[str, str] = {
            method: f"method {method!r} is not available for model {config.id}: {reason}"
            for method in ierf.available_methods()
            if (reason := ierf.why_unsupported(method, self.model.module))
        }
        self.methods = [method for method in ierf.available_methods() if method not in self._unavailable]
        size = self.model.input_size
        self.input_hw = (size, size)
        self.layers = {name: _layer_shape(name, self.srd.layer_shape(name, self.input_hw)) for name in self.srd.layers}
        self._estimates: dict[str, float] = {}  # work (DECOMPOSE, FORWARD, explain:<method>) -> moving seconds
        # the same, as runs that finished measured it (refusals lower only the estimates above)
        self._measured: dict[str, float] = {}
        self._layout = self._warm_up()
        self._record_stage = stage_observer or (lambda stage, model, seconds: None)
        redis_url = cache_config.resolved_redis_url()
        redis_tier = None
        if redis_url:
            redis_tier = RedisTier(
                RedisSettings(
                    url=redis_url,
                    connect_timeout_s=cache_config.connect_timeout_s,
                    timeout_s=cache_config.timeout_s,
                    ttl_s=cache_config.ttl_s,
                    max_value_bytes=cache_config.max_value_bytes,
                    failure_threshold=cache_config.failure_threshold,
                    open_seconds=cache_config.open_seconds,
                )
            )
        self.cache = TieredCache(
            cache_config.l1_bytes,
            redis_tier,
            **({"observer": cache_observer} if cache_observer else {}),
            write_behind_bytes=cache_config.write_behind_bytes,
        )

    def _warm_up(self) -> Any:
        """Run SRD and the forward pass on a synthetic image before the replica takes traffic.

        The first calls in a process pay one-off costs (allocator growth, oneDNN kernel choices, a gradient
        head finding its start map; a ResNet50 decomposition took 0.55 s instead of 0.25 s) that would
        otherwise land on the first caller. The last pass's timings seed the deadline estimates, so the
        first request with too short a deadline is refused up front like any later one. The
        decomposition's layout is what a cached one read back from Redis must match."""
        from ierf.srd import StateLayout

        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (*self.input_hw, 3), dtype=np.uint8)
        x = _ModelInput(self, pixels, "warm-up", _Stages(lambda *_: None, self.config.id)).x
        layout = None
        for _ in range(WARM_UP_PASSES):
            start = time.perf_counter()
            decomposition = self.srd.decompose(x)
            decomposed = time.perf_counter()
            decomposition.saliency(int(decomposition.logits.reshape(-1).argmax()))
            explained = time.perf_counter()
            with torch.inference_mode():
                self.model.module(x)
            self._estimates[DECOMPOSE] = decomposed - start
            self._estimates[_explain_work(DEFAULT_METHOD)] = explained - decomposed
            self._estimates[FORWARD] = time.perf_counter() - explained
            layout = layout or StateLayout.of(decomposition)
        self._measured = dict(self._estimates)
        return layout

    # ------------------------------------------------------------------------------- description
    def stale_view(self, pixels: np.ndarray | None, view_version: str) -> StaleView | None:
        """The refusal of a view (``view_version`` set) cut by other preprocessing than this replica's, else
        None; cheap, so the Serve worker checks it before a job queues for the compute thread."""
        expected = (*self.input_hw, 3)
        shape = getattr(pixels, "shape", None)
        if not view_version or (view_version == self.model.preprocess_version and shape == expected):
            return None
        return StaleView(
            f"view made by preprocessing {view_version} at {shape}; this replica uses "
            f"{self.model.preprocess_version} at {expected}"
        )

    def pixels_needed(self, job: ExplainJob | IERFJob | PredictJob) -> PixelsNeeded | None:
        """The refusal of a job sent without its pixels that this replica surely cannot answer from its caches
        (:meth:`TieredCache.may_hold`), else None. Cheap, so the Serve worker checks it before the job queues
        for the compute thread: the ingress sends the job again with the pixels, and the refused attempt
        should not first wait behind the job being computed. A job that passes may still be refused on the
        compute thread (evicted meanwhile, or not in Redis after all).

        The kept view answers any job (the decomposition or the logits are recomputed from it); without it,
        SRD saliency and iERFs need the decomposition and Predict the logits, while overlays, the returned
        input and the other methods read the view itself."""
        if job.pixels is not None or self.cache.may_hold(self._key("view", VIEW_METHOD, job.content_hash)):
            return None
        if isinstance(job, PredictJob):
            artifact = self._key("logits", FORWARD_METHOD, job.content_hash)
        elif (isinstance(job, IERFJob) or (job.method or DEFAULT_METHOD) == DEFAULT_METHOD) and not (
            job.overlay or job.return_input
        ):
            artifact = self._key("decomposition", DEFAULT_METHOD, job.content_hash)
        else:
            artifact = None  # the pixels themselves are read
        if artifact is not None and self.cache.may_hold(artifact):
            return None
        return PixelsNeeded(f"image {job.content_hash[:16]} is not cached here: send its pixels")

    def view_in_l1(self, content_hash: str) -> bool:
        return self._key("view", VIEW_METHOD, content_hash) in self.cache.l1

    def _cached_view(self, content_hash: str, stages: _Stages, prov: Provenance | None) -> np.ndarray:
        """The view kept of an image sent earlier (L1 or Redis), for a job that came without its pixels;
        PixelsNeeded when no tier holds it (the ingress then sends them)."""
        key = self._key("view", VIEW_METHOD, content_hash)
        start = time.perf_counter()
        found = self.cache.get(key, self._rebuilt_view, misses_counted=False)
        stages.add("cache_get", time.perf_counter() - start)
        if found.value is None:
            raise PixelsNeeded(f"image {content_hash[:16]} is not cached here: send its pixels")
        if prov is not None:
            prov.cache.append(("view", found.tier))
        return found.value

    def _rebuilt_view(self, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, int]:
        """A view read back from Redis: uint8 of this model's input size, or a miss (ValueError)."""
        view = state.get("view")
        expected = (*self.input_hw, 3)
        if not isinstance(view, torch.Tensor) or view.dtype != torch.uint8 or tuple(view.shape) != expected:
            raise ValueError(f"a cached view is not a {expected} uint8 tensor")
        array = view.numpy()
        return array, array.nbytes + L1_ENTRY_OVERHEAD_BYTES

    def _keep_view(self, inputs: _ModelInput, stages: _Stages) -> None:
        """Keep the view a job made (its pixels cut, or the ingress's crop), unless L1 already holds it, so that
        a later job by content hash alone can render overlays, return the input or run any method. Written
        like the decomposition: L1 now, Redis after the answer. 150 KB for a 224x224 model.

        Every job on the image renews the view's place in L1 (a lookup of its own, not counted): a hot image's
        view, read only by some jobs, would otherwise age out under the decomposition every job reads, and each
        overlay by hash would then cost a refused hop and the pixels."""
        key = self._key("view", VIEW_METHOD, inputs.content_hash)
        if self.cache.l1.get(key) is not None or not inputs.made_view:
            return
        start = time.perf_counter()
        view = np.array(inputs.view, dtype=np.uint8, order="C", copy=True)  # not the job's (read-only) buffer
        self.cache.put(
            key,
            view,
            view.nbytes + L1_ENTRY_OVERHEAD_BYTES,
            {"view": torch.from_numpy(view)},
            background=True,
            deferred=self.defer_cache_writes,
            tensors_size=view.nbytes,
        )
        stages.add("cache_put", time.perf_counter() - start)

    def close(self, timeout_s: float = 1.0) -> None:
        """Write what waits for Redis (up to ``timeout_s`` for queued writes) and release the connection; a host
        with Redis write-behind is otherwise kept alive by its writer thread."""
        self.cache.close(timeout_s=timeout_s)

    def describe(self) -> ModelDescription:
        return self.description

    @functools.cached_property
    def description(self) -> ModelDescription:
        return ModelDescription(
            id=self.config.id,
            weights_digest=self.model.weights_digest,
            input_height=self.input_hw[0],
            input_width=self.input_hw[1],
            preprocess_version=self.model.preprocess_version,
            resize=self.model.preprocessing.resize,
            class_names=list(self.model.class_names),
            layers=list(self.layers.values()),
            methods=list(self.methods),
            default_method=DEFAULT_METHOD,
            device=str(self.device),
            refused_methods=dict(self._unavailable),
            layer_aliases={
                alias: self.srd.program.names[sid]
                for alias, sid in self.srd.program.lookup.items()
                if alias != self.srd.program.names[sid]
            },
        )

    # ----------------------------------------------------------------------------------- helpers
    def _provenance(self, method: str, content_hash: str) -> Provenance:
        return Provenance(
            model_id=self.config.id,
            weights_digest=self.model.weights_digest,
            method=method,
            method_version=_method_version(method) if method in self.methods else "",
            preprocess_version=self.model.preprocess_version,
            content_hash=content_hash,
        )

    def _key(self, artifact: str, method: str, content_hash: str) -> str:
        return CacheKey(
            artifact=artifact,
            model_id=self.config.id,
            weights_digest=self.model.weights_digest,
            preprocess_version=self.model.preprocess_version,
            method=method,
            method_version=(
                self._forward_version
                if method == FORWARD_METHOD
                else self.model.preprocess_version
                if method == VIEW_METHOD
                else _method_version(method)
            ),
            content_hash=content_hash,
        ).redis_key()

    @functools.cached_property
    def _forward_version(self) -> str:
        """What the logits depend on besides the weights and preprocessing (key fields of their own): the
        architecture's code, which ships with the package (the model registry, bundled models), and so is
        in the engine code's digest."""
        import ierf

        return f"{self.model.name}+ierf-{ierf.__version__}.{engine_code_digest()}"

    def _score(self, logits: torch.Tensor, index: int) -> Score:
        flat = logits.detach().reshape(-1).to(torch.float64)
        probability = torch.softmax(flat, dim=0)[index]
        return Score(index, self.model.class_names[index], float(probability), float(flat[index]))

    def _decomposition(
        self,
        inputs: _ModelInput,
        prov: Provenance,
        stages: _Stages,
        deadline: float | None,
        then: tuple[str, ...] = (),
        fresh: bool = False,
    ) -> tuple[Any, bool]:
        """The SRD decomposition of this image and whether it came from a cache: from L1, L2, or computed
        (single-flight per image); ``fresh`` skips the cache and replaces what it holds.

        ``then``: the work that follows in this request, refused along with the decomposition when both
        cannot finish in time."""
        key = self._key("decomposition", DEFAULT_METHOD, inputs.content_hash)

        def rebuild(state: dict[str, torch.Tensor]) -> tuple[Any, int]:
            # checked exactly against this replica's layout (anything else under the key is a miss:
            # ValueError, never a failure), on the CPU, then moved; once (a second, structural check cost
            # another 1.4 ms of each Redis hit)
            decomposition = self.srd.load_decomposition(state, like=self._layout, device=self.device)
            return decomposition, tensors_nbytes(state)

        with self.cache.single_flight(key):
            found = None
            if fresh:  # the put below overwrites both tiers, but a write-behind SET may be dropped
                self.cache.discard(key)
            else:
                start = time.perf_counter()
                found = self.cache.get(key, rebuild, misses_counted=inputs.has_pixels)
                stages.add("cache_get", time.perf_counter() - start)
                if found.value is not None:
                    prov.cache.append(("decomposition", found.tier))
                    return found.value, True
            self._check_time_after_miss(found, deadline, "the forward pass", DECOMPOSE, *then)
            x = inputs.x  # the preprocessing, timed as its own stage, before the forward's clock starts
            if found is not None:
                self.cache.count_withheld(found)  # a job by hash that found the view in Redis: not sent again
            start = time.perf_counter()
            decomposition = self.srd.decompose(x)
            seconds = time.perf_counter() - start
            stages.add("forward", seconds)
            self._learn(DECOMPOSE, seconds)
            start = time.perf_counter()
            nbytes = decomposition.nbytes
            # the state for Redis is assembled (~1 ms on ResNet50) when the deferred write runs, after the answer
            self.cache.put(
                key,
                decomposition,
                nbytes,
                decomposition.state_dict,
                background=True,
                deferred=self.defer_cache_writes,
                tensors_size=nbytes,
            )
            logits_key = self._key("logits", FORWARD_METHOD, inputs.content_hash)
            if self.cache.get(logits_key, self._cached_logits, counted=False).value is None:
                # The decomposition's logits differ from the plain forward's by float rounding (~1e-6): logits
                # a Predict cached before (here, or in Redis by another replica) are kept, so repeated
                # Predicts agree to the last digit.
                self._put_logits(inputs.content_hash, decomposition.logits)
            stages.add("cache_put", time.perf_counter() - start)
            prov.cache.append(("decomposition", "miss" if self.cache.can_keep(nbytes, nbytes) else "disabled"))
            return decomposition, False

    def _with_decomposition(
        self,
        inputs: _ModelInput,
        prov: Provenance,
        stages: _Stages,
        deadline: float | None,
        use: Callable[[Any], _R],
        then: tuple[str, ...] = (),
    ) -> _R:
        """``use(decomposition)`` on this image's decomposition. A cached one that ``use`` fails on (a value
        of the right structure whose numbers this replica would never compute: overflowing ratios, say) is
        dropped from both tiers and the image computed afresh: a bad cache value costs latency, never the
        request. An error on a fresh decomposition is the input's own and reaches the caller."""
        decomposition, cached = self._decomposition(inputs, prov, stages, deadline, then)
        try:
            return use(decomposition)
        except (ServiceError, Interrupted):  # the caller's, not the cached value's
            raise
        except Exception as exc:
            if not cached:
                raise
            logger.warning(
                "cached decomposition of %s failed (%s: %s); dropped and recomputed",
                inputs.content_hash[:16],
                type(exc).__name__,
                exc,
            )
        decomposition, _ = self._decomposition(inputs, prov, stages, deadline, then, fresh=True)
        return use(decomposition)

    def _check_time_for(self, deadline: float | None, before: str, *work: str) -> None:
        """Refuse ``work`` (about to start; once started, it stops only at the engine's checkpoints) when it
        cannot finish in time: the deadline has passed, or the time left is clearly below what that work has
        taken here.
        Work never measured on this replica is let through (its first run teaches the estimate)."""
        _check_deadline(deadline, before)
        known = {name: self._estimates[name] for name in work if name in self._estimates}
        if deadline is None or not known:
            return
        needed = sum(known.values())
        left = deadline - time.time()
        if left < 0.8 * needed:
            # Each refusal lowers the estimates, so one slow run (a cold start, a busy machine) cannot
            # lock short-deadline callers out for good: after a few refusals one is let through and
            # re-measures.
            for name, estimate in known.items():
                self._estimates[name] = 0.8 * estimate
            what = " and ".join(_work_name(name) for name in known)
            raise DeadlineExceeded(
                f"{left:.2f} s left before the deadline, but {what} {'needs' if len(known) == 1 else 'need'} about "
                f"{needed:.2g} s on this replica; "
                "send a longer deadline"
            )
        # Let through: when the refusals had lowered the estimates, this is the probe that re-measures. Until
        # it finishes (and _learn blends in what it took) the measured values apply again; a probe stopped at
        # its deadline teaches nothing, and the lowered estimates would let every later such caller run too.
        for name in known:
            self._estimates[name] = max(self._estimates[name], self._measured.get(name, 0.0))

    def _check_time_after_miss(self, found: Any, deadline: float | None, before: str, *work: str) -> None:
        """:meth:`_check_time_for` after a lookup that missed. Its refusal reaches the caller: a job by hash is
        not sent again with its pixels, so the misses its lookup held back (``misses_counted=False``) are
        counted here, or by no one."""
        try:
            self._check_time_for(deadline, before, *work)
        except DeadlineExceeded:
            if found is not None:
                self.cache.count_withheld(found)
            raise

    def _learn(self, work: str, seconds: float) -> None:
        previous = self._measured.get(work)
        self._estimates[work] = self._measured[work] = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    def _put_logits(self, content_hash: str, logits: torch.Tensor) -> str:
        """Cache the logits; their tier for provenance ("miss", or "disabled" when no tier can keep them)."""
        value = logits.detach().reshape(1, -1).to("cpu", torch.float32).contiguous()
        key = self._key("logits", FORWARD_METHOD, content_hash)
        data_bytes = value.numel() * value.element_size()
        nbytes = data_bytes + L1_ENTRY_OVERHEAD_BYTES
        self.cache.put(key, value, nbytes, {"logits": value}, background=True, tensors_size=data_bytes)
        return "miss" if self.cache.can_keep(nbytes, data_bytes) else "disabled"

    def _logits(
        self, inputs: _ModelInput, prov: Provenance, stages: _Stages, deadline: float | None, then: tuple[str, ...] = ()
    ) -> torch.Tensor:
        """The logits of this image: from L1, L2, or a forward pass (``then`` as for the decomposition)."""
        key = self._key("logits", FORWARD_METHOD, inputs.content_hash)
        start = time.perf_counter()
        found = self.cache.get(key, self._cached_logits, misses_counted=inputs.has_pixels)
        stages.add("cache_get", time.perf_counter() - start)
        if found.value is not None:
            prov.cache.append(("logits", found.tier))
            return found.value
        self._check_time_after_miss(found, deadline, "the forward pass", FORWARD, *then)
        x = inputs.x  # preprocessed first: its own stage, not the forward's
        self.cache.count_withheld(found)  # as for the decomposition
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.model.module(x)
        seconds = time.perf_counter() - start
        stages.add("forward", seconds)
        self._learn(FORWARD, seconds)
        prov.cache.append(("logits", self._put_logits(inputs.content_hash, logits)))
        return logits.detach().reshape(1, -1).to("cpu", torch.float32)

    def _cached_logits(self, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Logits read back from Redis: (1, classes) finite float32, or a miss (ValueError)."""
        logits = state.get("logits")
        classes = len(self.model.class_names)
        if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.shape != (1, classes):
            raise ValueError(f"cached logits are not a (1, {classes}) float32 tensor")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("cached logits hold NaN or infinite values")
        return logits, _logits_nbytes(logits)

    def _explainer(self, method: str, stages: _Stages | None = None) -> Any:
        """The explainer for a method already checked against ``self.methods`` (check_explain_args). Building
        it (a method's first call on this replica: seconds for a baseline's imports) is worker time, booked
        as ``explain``; untimed, the ingress would book it as ``dispatch``, Serve's routing."""
        with self._explainers_lock:
            explainer = self._explainers.get(method)
            if explainer is None:
                if method in self._unavailable:
                    raise InvalidArgument(self._unavailable[method])
                import ierf

                try:
                    with contextlib.nullcontext() if stages is None else stages.timed("explain"):
                        explainer = self._explainers[method] = ierf.create_explainer(method, self.model.module)
                except (ValueError, TypeError) as exc:  # the method cannot handle this architecture
                    reason = f"method {method!r} is not available for model {self.config.id}: {exc}"
                    self._unavailable[method] = reason  # remembered: not rebuilt (and refused) per request
                    raise InvalidArgument(reason) from None
            return explainer

    # --------------------------------------------------------------------------------------- RPCs
    def explain(self, job: ExplainJob) -> Outcome:
        stages = _Stages(self._record_stage, self.config.id)
        method = job.method or DEFAULT_METHOD
        contrast = job.contrast
        check_explain_args(self.description, method, job.target, contrast)
        explainer = self._explainer(method, stages)
        prov = self._provenance(method, job.content_hash)
        inputs = _ModelInput(self, job.pixels, job.content_hash, stages, job.view_version, prov)
        if job.overlay or job.return_input or method != DEFAULT_METHOD:
            inputs.read_view_first()
        work = _explain_work(method)
        if method == DEFAULT_METHOD:

            def explain(decomposition: Any) -> tuple[torch.Tensor, int, float, torch.Tensor]:
                logits = decomposition.logits
                target = job.target if job.target is not None else int(logits.reshape(-1).argmax())
                if contrast == target:  # the target chosen here (auto): the ingress checked a given one
                    raise InvalidArgument(
                        f"contrast_class {contrast} is the predicted class, which became the target: target "
                        "minus itself is zero everywhere; contrast with another class or set the target"
                    )
                self._check_time_for(job.deadline, "the explanation", work)
                start = time.perf_counter()
                return logits, target, start, decomposition.saliency(target, contrast=contrast)

            logits, target, start, saliency = self._with_decomposition(
                inputs, prov, stages, job.deadline, explain, then=(work,)
            )
        else:
            logits = self._logits(inputs, prov, stages, job.deadline, then=(work,))
            target = job.target if job.target is not None else int(logits.reshape(-1).argmax())
            self._check_time_for(job.deadline, "the explanation", work)
            x = inputs.x
            start = time.perf_counter()
            saliency = explainer.saliency(x, target)
        seconds = time.perf_counter() - start
        stages.add("explain", seconds)
        self._learn(work, seconds)
        saliency_map = (
            saliency.detach().reshape(saliency.shape[-2], saliency.shape[-1]).to("cpu", torch.float32).numpy()
        )
        outcome = Outcome(provenance=prov, maps=saliency_map, target=self._score(logits, target))
        if job.overlay:
            from ierf.serving.overlay import saliency_png
            from ierf.viz import saliency_caption

            names = self.model.class_names
            subtracted = contrast if isinstance(contrast, str) else f"minus {contrast} {names[contrast]!r}"
            caption = saliency_caption(method, target, names[target], subtracted)
            view = inputs.view  # on a cache hit the crop happens here: its own stage, not inside "render"
            _check_deadline(job.deadline, "rendering the overlay")
            with stages.timed("render"):
                outcome.overlays.append(saliency_png(view, saliency_map, caption))
        if job.return_input:
            outcome.model_input = inputs.view
        self._keep_view(inputs, stages)
        prov.timings = stages.items
        return outcome

    def ierf(self, job: IERFJob) -> Outcome:
        stages = _Stages(self._record_stage, self.config.id)
        # a copy: Ray delivers the job's arrays read-only, and torch.from_numpy warns on those (below)
        positions = np.array(job.positions, dtype=np.int64).reshape(-1, 2)
        layer = check_ierf_args(self.description, job.layer, positions)
        check_response_fits(self.description, len(positions), job.map_itemsize, job.overlay, job.return_input)
        prov = self._provenance(DEFAULT_METHOD, job.content_hash)
        inputs = _ModelInput(self, job.pixels, job.content_hash, stages, job.view_version, prov)
        if job.overlay or job.return_input:
            inputs.read_view_first()

        def ierf(decomposition: Any) -> torch.Tensor:
            _check_deadline(job.deadline, "the iERF computation")
            with stages.timed("explain"):
                return decomposition.ierf(layer.name, torch.from_numpy(positions).to(self.device))

        maps = self._with_decomposition(inputs, prov, stages, job.deadline, ierf)
        maps_np = maps.detach().reshape(len(positions), *maps.shape[-2:]).to("cpu", torch.float32).numpy()
        outcome = Outcome(provenance=prov, maps=maps_np, layer=layer)
        if job.overlay:
            from ierf.interrupt import checkpoint
            from ierf.serving.overlay import ierf_png

            view = inputs.view  # as in explain: the crop is not rendering
            with stages.timed("render"):
                for m, (r, c) in zip(maps_np, positions.tolist(), strict=True):
                    # ~25 ms each, up to max_positions of them: a caller gone or out of time stops the rest
                    checkpoint()
                    _check_deadline(job.deadline, "rendering the overlays")
                    box = (int(r), int(c))
                    caption = f"iERF {layer.name} @ {r},{c}"
                    outcome.overlays.append(ierf_png(view, m, box, (layer.height, layer.width), caption))
        if job.return_input:
            outcome.model_input = inputs.view
        self._keep_view(inputs, stages)
        prov.timings = stages.items
        return outcome

    def predict(self, job: PredictJob) -> Outcome:
        stages = _Stages(self._record_stage, self.config.id)
        top_k = check_top_k(self.description, job.top_k)
        prov = self._provenance("", job.content_hash)
        inputs = _ModelInput(self, job.pixels, job.content_hash, stages, job.view_version, prov)
        logits = self._logits(inputs, prov, stages, job.deadline).reshape(-1)
        probabilities = torch.softmax(logits.to(torch.float64), dim=0)
        values, indices = probabilities.topk(top_k)
        top = [
            Score(int(i), self.model.class_names[int(i)], float(p), float(logits[int(i)]))
            for p, i in zip(values, indices, strict=True)
        ]
        self._keep_view(inputs, stages)
        prov.timings = stages.items
        return Outcome(provenance=prov, top_classes=top)

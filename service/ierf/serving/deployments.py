"""Ray Serve deployments: a thin gRPC ingress and one model-host worker deployment per model.

Ingress (cheap, many requests in flight): decoding with caps, canonicalisation and
content hash, deadline, error -> gRPC status mapping, protobuf packing, request metrics, health.
Worker (heavy, few requests in flight, bounded queue): holds the model once per replica and runs
every method in-process (:class:`ierf.serving.worker.ModelHost`). One hop, small messages: the
canonical image goes in, float32 maps come out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np
import ray
from ray import serve

from ierf.baselines import BASELINE_METHODS  # names only: the package imports no method code (nor torch)
from ierf.images import PIPELINE_VERSION, resize_crop
from ierf.interrupt import Interrupted, interruptible
from ierf.serving.errors import (
    RETRY_AFTER_MS,
    DeadlineExceeded,
    ImageNeeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    PixelsNeeded,
    ServiceError,
    StaleView,
    Unavailable,
    clip,
    echo,
    error_for,
    retry_after_ms,
    retry_trailers,
    to_status,
    unwrap,
)
from ierf.serving.jobs import CONTRAST_NAMES, DEFAULT_METHOD, Outcome
from ierf.serving.protocol import UnparsedRequest
from ierf.serving.settings import CacheConfig, ModelConfig, ServiceConfig

R = TypeVar("R")
logger = logging.getLogger("ray.serve")  # Serve writes it to the replica log, with the request context

SERVICE_NAME = "ierf.v1.ExplainService"
TIMEOUT_METADATA_KEY = "ierf-timeout-ms"  # remaining client budget; Serve's proxy does not forward grpc-timeout
DESCRIBE_TIMEOUT_S = 30.0
# Health: a worker that answered within HEALTH_CACHE_S (a request, or a probe) is not probed again, so
# health checks add no load; otherwise one probe (describe, which skips the compute thread) per worker is
# shared by every concurrent check, and a worker that does not answer it within HEALTH_PROBE_TIMEOUT_S,
# or whose replica died under a request, reads NOT_SERVING.
HEALTH_CACHE_S = 2.0
HEALTH_PROBE_TIMEOUT_S = 2.0
# A probe that only times out is no proof of an outage: it queues in Serve's router behind the requests
# filling a busy worker's slots. Such a worker reads SERVING while it answered anything within this window;
# an error (the replica died) reads NOT_SERVING at once. Flapping to NOT_SERVING under load would make a
# load balancer drain capacity exactly when it is needed.
HEALTH_BUSY_GRACE_S = 30.0
# Image decoding in the ingress (ierf.serving.admission): threads for admitted decodes, and the encoded
# size above which the header check (a linear walk over the bytes) leaves the event loop.
DECODE_THREADS = 4
INLINE_OPEN_BYTES = 256 * 1024
# Decoding is refused before it starts when it would outlast the deadline, by a moving estimate of
# seconds per pixel for each kind of image (PNG, JPEG, WEBP, tensor), taken from decodes of at least this
# many pixels and applied to them (below it, fixed costs swamp the per-pixel rate and decoding is quick).
DECODE_ESTIMATE_MIN_PIXELS = 1_000_000
# Images up to this many pixels (a 12 MP photo's quarter, a 1000x1000 crop) may wait to decode past the
# decoding queue's bound: they go first and take milliseconds (see DecodeGate).
SMALL_IMAGE_PIXELS = 1_000_000
# A decoded image of at least this many times the model's view (its input, uint8 RGB) travels to the worker as that
# view, made here; a smaller one travels whole (see Ingress._send).
VIEW_MIN_FACTOR = 2
DEADLINE_CAP_LABEL = "deadline_cap_s"  # in a request's labels (not a metric label): the cap that bound its deadline
CALLER_GONE = "the caller went away"  # why a job stopped when its request was cancelled
BUILT_IN_METHODS = [DEFAULT_METHOD, *BASELINE_METHODS]
# A new decomposition's Redis copy is encoded and sent this long after its request was answered (behind
# any job that arrived meanwhile, on the compute thread): by then the answer has crossed the ingress and
# the proxy (~10 ms), which it would otherwise compete with for the cores.
CACHE_WRITE_DELAY_S = 0.05


def _assigned_cpus() -> float:
    """The CPUs Ray assigned this replica's actor. In Serve's local testing mode the replica is no actor: 1,
    also where the process is a Ray driver (a notebook that called ``ray.init()``), which has no assignment
    to read (Ray asserts there)."""
    if not ray.is_initialized():  # no Ray runtime (and none must be started)
        return 1.0
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return 1.0
    return float(context.get_assigned_resources().get("CPU", 1.0))


def _timed(fn: Callable[[], R]) -> tuple[float, R]:
    """``fn()`` and the seconds it ran."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _log_failure(future: Any) -> None:
    """A background job's exception, logged (a future nobody awaits would keep it silent)."""
    if not future.cancelled() and future.exception() is not None:
        logger.error("writing deferred cache values failed", exc_info=future.exception())


@serve.deployment(
    name="Worker",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=2,
    max_queued_requests=8,
    # Serve learns of a dead replica (SIGKILL, OOM kill) only from a failed check: at 10 s a health probe
    # read SERVING for ~10 s with no worker. check_health is a field read, so every 2 s costs nothing.
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class ExplainerWorker:
    """Hosts one model. All tensor work, loading included, runs on one dedicated compute thread.

    Off the event loop, so the replica stays responsive to health checks; and always the same thread,
    because OpenMP keeps a thread team per calling thread: with a team for each of asyncio's pool
    threads, libgomp sees more threads than cores and throttles its spin-waits, and element-wise ops
    then used 1.2-1.3 of 2 cores (a ResNet50 decomposition took ~1.5x as long as in-process).
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig) -> None:
        from ierf.serving.metrics import ServiceMetrics

        threads = model.num_threads or max(1, math.ceil(_assigned_cpus()))
        self.metrics = ServiceMetrics()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ierf-compute-{model.id}")
        try:
            self.host = self._compute.submit(self._load, model, cache, threads).result()
        except BaseException:  # a model that cannot load: the replica fails to start, leaving no thread behind
            self._compute.shutdown(wait=False)
            raise
        self.metrics.model_info(model.id, self.host.model.weights_digest, str(self.host.device))
        from ierf.srd import gemm

        l2 = self.host.cache.l2
        logger.info(
            "worker %s ready on %s with %d torch threads (float32 CPU products: %s); cache L1 %d MiB, L2 %s; "
            "warm-up times: %s",
            model.id,
            self.host.device,
            threads,
            gemm.chosen() or "none yet",
            self.host.cache.l1.capacity_bytes // 2**20,
            f"Redis at {l2.where}" if l2 is not None else "off",
            ", ".join(f"{work} {seconds:.3f} s" for work, seconds in self.host._estimates.items()),
        )

    def _load(self, model: ModelConfig, cache: CacheConfig, threads: int) -> Any:
        import torch

        from ierf.serving.worker import ModelHost

        torch.set_num_threads(threads)
        return ModelHost(
            model,
            cache,
            stage_observer=self.metrics.stage,
            cache_observer=self.metrics.cache,
            defer_cache_writes=True,
        )

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        compute = getattr(self, "_compute", None)
        if compute is not None:
            compute.shutdown(wait=False, cancel_futures=True)
        host = getattr(self, "host", None)
        if host is not None:
            with contextlib.suppress(Exception):
                host.close(timeout_s=1.0)  # queued Redis writes get a moment to land

    async def _run(self, fn: Callable[[Any], Outcome], job: Any) -> Any:
        """``fn(job)`` on the compute thread. A job whose caller has gone (the request was cancelled: the
        caller's own gRPC deadline, which Serve does not forward, or a cancel) or whose deadline has
        passed stops at the engine's next checkpoint (:mod:`ierf.interrupt`) instead of holding the
        thread; one still queued never starts."""
        loop = asyncio.get_running_loop()
        queued = time.perf_counter()
        cancelled = threading.Event()

        def why_stop() -> str | None:
            # The deadline first: when it passes, the ingress's wait for this call ends too and cancels it,
            # so both hold at the next checkpoint, and the caller (still waiting) was failed by the budget.
            if job.deadline is not None and time.time() > job.deadline:
                return "the deadline passed"
            if cancelled.is_set():
                return CALLER_GONE
            return None

        def run(job: Any) -> Outcome:
            waited = time.perf_counter() - queued  # behind other jobs for the compute thread
            try:
                with interruptible(why_stop):
                    outcome = fn(job)
            except Interrupted as stopped:
                reason = "cancelled" if str(stopped) == CALLER_GONE else "deadline"  # the check's own answer
                self.metrics.stopped(self.host.config.id, reason)
                raise DeadlineExceeded(f"stopped part-way: {stopped}; the work done for it was dropped") from None
            outcome.provenance.timings.insert(0, ("queue", waited))
            self.metrics.stage("queue", self.host.config.id, waited)
            return outcome

        try:
            return await loop.run_in_executor(self._compute, run, job)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except ServiceError as refusal:
            # A refusal (a bad argument the ingress could not check, a deadline that cannot be met) is an
            # answer, not a failure of the replica: returned, so Serve does not log "Request failed" with
            # a traceback for each one. The ingress raises it (Ingress._call).
            return refusal
        finally:
            loop.call_later(CACHE_WRITE_DELAY_S, self._write_deferred)

    def _write_deferred(self) -> None:
        """Queue the Redis copies the last jobs left for after their answers on the compute thread. Always
        queued, even when nothing is deferred yet: a request cancelled by its deadline gets here while its
        job still runs, and the write must follow that job (an empty call costs microseconds)."""
        try:
            future = self._compute.submit(self.host.cache.write_deferred)
        except RuntimeError:  # the executor shut down: close() writes them instead
            return
        future.add_done_callback(_log_failure)

    async def describe(self) -> Any:
        return self.host.describe()

    async def explain(self, job: Any) -> Any:
        return self._refused_at_once(job) or await self._run(self.host.explain, job)

    async def ierf(self, job: Any) -> Any:
        return self._refused_at_once(job) or await self._run(self.host.ierf, job)

    async def predict(self, job: Any) -> Any:
        return self._refused_at_once(job) or await self._run(self.host.predict, job)

    def _refused_at_once(self, job: Any) -> Any:
        """Refusals the ingress answers by sending the job again, made here instead of after waiting for the
        compute thread (the attempt would otherwise queue twice): a view cut by other preprocessing (during a
        rollout, every large image), and a job sent by hash for an image this replica surely does not hold."""
        return self.host.stale_view(job.pixels, job.view_version) or self.host.pixels_needed(job)

    def check_health(self) -> None:
        # The model lives in this process; a cache outage must not restart replicas, so nothing else here.
        if self.host.model is None:
            raise RuntimeError("model not loaded")


# A cancel this close to the end of the caller's ierf-timeout-ms budget is its deadline passing: the budget
# was measured when the caller sent the request, a few milliseconds before the ingress started on it.
DEADLINE_SLACK_S = 0.05


_MILLIS = re.compile(r"[0-9]+(\.[0-9]+)?")
_CONTENT_HASH = re.compile(r"[0-9a-f]{64}")  # sha256 hex, as ierf.serving.images.content_hash writes it


def _caller_budget_s(grpc_context: Any) -> float | None:
    """The caller's budget in seconds from the ``ierf-timeout-ms`` metadata; None when it sent none."""
    if grpc_context is None:
        return None
    budget = None
    for key, value in grpc_context.invocation_metadata():
        if key == TIMEOUT_METADATA_KEY:
            # ASCII digits with an optional fraction, as any gRPC stack would parse them (Python's float()
            # also takes " 500 ", "1_000", "inf" and "1e3")
            text = value if isinstance(value, str) else ""
            millis = float(text) if _MILLIS.fullmatch(text) else math.nan
            if not math.isfinite(millis):
                raise InvalidArgument(
                    f"metadata {TIMEOUT_METADATA_KEY} must be a finite number of milliseconds >= 0 (digits, "
                    f"optionally with a fraction), got {echo(value)}"
                )
            budget = millis / 1000.0 if budget is None else min(budget, millis / 1000.0)
    return budget


async def _deployment_overview(handle: Any) -> Any:
    """Serve's controller's view of ``handle``'s deployment, or None where it cannot say (local testing mode,
    a handle without names, the controller slow or unreachable)."""
    app, deployment = getattr(handle, "app_name", None), getattr(handle, "deployment_name", None)
    if not app or not deployment or not ray.is_initialized():  # serve.status() would start a Ray cluster
        return None
    try:
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=HEALTH_PROBE_TIMEOUT_S)
        return status.applications[app].deployments[deployment]
    except Exception:  # no answer is no evidence either way
        return None


async def _running_replicas(handle: Any) -> int | None:
    """Replicas of ``handle``'s deployment that Serve's controller counts as RUNNING, or None where it
    cannot say (local testing mode, a handle without names, the controller slow or unreachable). Asked
    only when a health probe went unanswered, so its few milliseconds cost nothing in the common case."""
    overview = await _deployment_overview(handle)
    if overview is None:
        return None
    return sum(n for state, n in overview.replica_states.items() if getattr(state, "value", state) == "RUNNING")


#: A worker call unanswered this long asks Serve's controller whether its deployment has any replica
#: RUNNING: a model whose replicas cannot start (a replaced weights file) answered no call, and each waited
#: its whole deadline (300 s without one) to end DEADLINE_EXCEEDED with no cause.
NO_REPLICA_CHECK_S = 1.5


async def _deployment_down(handle: Any) -> str | None:
    """Serve's reason when ``handle``'s deployment has no RUNNING replica and is failing (UNHEALTHY or
    DEPLOY_FAILED); None while it runs, is starting or scaling, or the controller cannot say."""
    overview = await _deployment_overview(handle)
    if overview is None:
        return None
    states = {getattr(state, "value", state): n for state, n in overview.replica_states.items()}
    health = getattr(overview.status, "value", overview.status)
    if states.get("RUNNING", 0) or health not in ("UNHEALTHY", "DEPLOY_FAILED"):
        return None
    message = str(overview.message or "").strip()
    return clip(message.splitlines()[-1] if message else f"the deployment is {health}")  # a traceback's last line


def _failed_without_pixels(exc: Exception) -> bool:
    """Whether a job sent by content hash alone failed in the worker's code (an exception, not one of its
    refusals, nor an overload, a dead replica or the deadline, which the same job with pixels would meet too)."""
    if isinstance(unwrap(exc), ServiceError):
        return False
    return to_status(exc)[0] in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)


def _caller_deadline_passed(grpc_context: Any, start: float) -> bool:
    """Whether a cancel of the call that began at ``start`` (perf_counter) came with its caller's deadline:
    Serve's proxy turns an expired gRPC deadline into a cancel, which the metrics should count as
    DEADLINE_EXCEEDED, as the caller sees it. Known only for callers that send ``ierf-timeout-ms``."""
    try:
        budget = _caller_budget_s(grpc_context)
    except InvalidArgument:
        return False
    return budget is not None and time.perf_counter() - start >= budget - DEADLINE_SLACK_S


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    max_queued_requests=128,
    # At least the worker's: the ingress is replaced on any change of the app's args, and its calls wait on
    # a worker that may still take that long (Serve's default 20 s killed calls a worker would have finished)
    graceful_shutdown_timeout_s=30,
)
class Ingress:
    """gRPC entry point: methods are named exactly like the RPCs (the Serve proxy routes by name)."""

    def __init__(self, workers: dict[str, Any], config: ServiceConfig) -> None:
        import ierf
        from ierf.serving.admission import DecodeGate
        from ierf.serving.metrics import ServiceMetrics

        self.workers = workers
        self.config = config
        self.limits = config.ingress.limits
        self._decode_gate = DecodeGate(*config.ingress.decode_budget, small_pixels=SMALL_IMAGE_PIXELS)
        self._decode_rates: dict[str, float] = {}  # image kind -> seconds per pixel (moving average)
        # Its own threads: decodes never queue behind other thread work, nor it behind them. More threads
        # than cores so that small images admitted beside large ones need not wait for a thread.
        self._decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="ierf-decode")
        self.metrics = ServiceMetrics()
        self.server_version = ierf.__version__
        self._descriptions: dict[str, Any] = {}
        self._fetching: set[str] = set()  # model ids whose description is being fetched in the background
        self._health: dict[str, tuple[float, bool]] = {}  # model id -> (time.monotonic(), the worker answered)
        self._probes: dict[str, asyncio.Task] = {}  # model id -> the health probe in flight
        self._answered_at: dict[str, float] = {}  # model id -> time.monotonic() of its last answer
        self._refused_at: dict[str, float] = {}  # model id -> time.monotonic() its worker's queue last refused a job
        # (model id, content hash) of images sent to the model's workers lately, oldest first (see _send)
        self._sent: OrderedDict[tuple[str, str], None] = OrderedDict()

    # ------------------------------------------------------------------------------ plumbing
    def _deadline(self, grpc_context: Any, labels: dict[str, Any] | None = None) -> float:
        """The request's deadline: the caller's budget, capped at ``request_timeout_s``. When the cap is what
        binds, ``labels`` notes it, so a refusal for too little time names the cap (which the caller cannot
        raise) rather than asking for a longer deadline."""
        budget = self.config.ingress.request_timeout_s
        caller = _caller_budget_s(grpc_context)
        if labels is not None and (caller is None or caller > budget):
            labels[DEADLINE_CAP_LABEL] = budget
        return time.time() + (budget if caller is None else min(budget, caller))

    def _worker(self, model_id: str) -> tuple[str, Any]:
        model_id = model_id or self.config.default_model
        handle = self.workers.get(model_id)
        if handle is None:
            raise NotFound(f"unknown model {echo(model_id)}; served: {', '.join(sorted(self.workers))}")
        return model_id, handle

    async def _send(
        self,
        model_id: str,
        method: Any,
        job: Any,
        pixels: np.ndarray | None,
        desc: Any,
        deadline: float,
        timings: list[tuple[str, float]],
    ) -> Any:
        """:meth:`_call`, with the image by its content hash alone when the caller named it so (``pixels``
        None: :meth:`_send_referenced`), or when this replica sent it to the model's workers recently: their
        caches hold its decomposition, logits and view, so another class, PFV, overlay or method on an image
        already explained, the product's warm path, skips the view cut and most of the hop's bytes. A worker
        that no longer holds it answers PixelsNeeded (one more hop), and the job goes again with the pixels.

        With pixels, as the model's view (resize + centre crop, made here by the model's description) when
        the decoded image is at least :data:`VIEW_MIN_FACTOR` times the view's size: a photo is mostly
        pixels the model never sees, and the hop to the worker costs by the byte (a 512x512 image's
        dispatch took ~2 ms more than a 224x224 one's). The worker refuses a view made by another
        preprocessing than its own (a redeploy): the description is dropped and the decoded image sent
        instead."""
        if pixels is None:  # the caller named the image by its content hash
            return await self._send_referenced(model_id, method, job, deadline, timings)
        seen = (model_id, job.content_hash)
        if seen in self._sent:
            start = time.perf_counter()
            outcome = await self._by_hash(model_id, method, job, deadline, timings)
            if outcome is not None:
                return outcome
            self._stage(timings, "dispatch", model_id, time.perf_counter() - start)  # the refused hop
        outcome = None
        view = await self._model_view(pixels, desc, model_id, timings)
        if view is not None:
            try:
                viewed = dataclasses.replace(job, pixels=view, view_version=desc.preprocess_version)
                outcome = await self._call(model_id, method, viewed, deadline, timings)
            except StaleView:
                self._descriptions.pop(model_id, None)
        if outcome is None:
            outcome = await self._call(model_id, method, job, deadline, timings)
        self._remember_sent(seen, outcome)
        return outcome

    async def _send_referenced(
        self, model_id: str, method: Any, job: Any, deadline: float, timings: list[tuple[str, float]]
    ) -> Any:
        """A job whose caller named the image by content hash (``Image.content_hash``): sent by hash to the
        model's workers, whichever ingress replica the caller's earlier requests reached, since each worker
        reads its own L1 and the shared Redis. A worker that does not hold the image answers PixelsNeeded,
        which reaches the caller as ImageNeeded (FAILED_PRECONDITION): the caller sends the pixels."""
        outcome = await self._by_hash(model_id, method, job, deadline, timings)
        if outcome is None:
            raise ImageNeeded(
                f"image {job.content_hash[:16]}… is not held by the workers of model {model_id!r} (evicted, or never "
                "sent to it): send its pixels in image.encoded or image.tensor"
            )
        return outcome

    async def _by_hash(
        self, model_id: str, method: Any, job: Any, deadline: float, timings: list[tuple[str, float]]
    ) -> Any:
        """The job sent by content hash alone; None when the workers could not answer it so (PixelsNeeded, or
        a failure in their code: a worker of an earlier build, during a rollout, does not know jobs without
        pixels), and then the image is forgotten. Any other error (an overload, a dead replica, the deadline,
        a refusal of the request) is what the same job with pixels would meet: raised."""
        seen = (model_id, job.content_hash)
        try:
            outcome = await self._call(model_id, method, dataclasses.replace(job, pixels=None), deadline, timings)
        except Exception as exc:
            if not isinstance(exc, PixelsNeeded):
                if not _failed_without_pixels(exc):
                    raise
                logger.warning(
                    "a job on image %s sent by content hash alone failed (%s: %s); the pixels are needed",
                    job.content_hash[:16],
                    type(exc).__name__,
                    to_status(exc)[1],
                )
            self._sent.pop(seen, None)
            return None
        # noted again, not moved: while it was in flight newer images or a concurrent repeat's refusal may have
        # made this replica forget it (move_to_end raised KeyError: an INTERNAL for a right answer)
        self._remember_sent(seen, outcome)
        return outcome

    def _remember_sent(self, seen: tuple[str, str], outcome: Any) -> None:
        """Note an image a worker now holds, unless its artefacts were kept in no cache tier ("disabled": too big,
        the cache off, Redis known down), where a repeat by hash would only cost a refused hop: then an image
        noted before is forgotten (a job with pixels, an overlay say, recomputed it and kept it nowhere)."""
        capacity = self.config.ingress.remembered_images
        if capacity <= 0 or any(tier == "disabled" for _, tier in outcome.provenance.cache):
            self._sent.pop(seen, None)
            return
        self._sent[seen] = None
        self._sent.move_to_end(seen)
        while len(self._sent) > capacity:
            self._sent.popitem(last=False)

    async def _model_view(
        self, pixels: np.ndarray, desc: Any, model_id: str, timings: list[tuple[str, float]]
    ) -> np.ndarray | None:
        if desc is None or desc.resize <= 0 or desc.input_height != desc.input_width:
            return None
        if not desc.preprocess_version.startswith(f"v{PIPELINE_VERSION}-"):
            # A worker of another build (a rolling upgrade that changed the pipeline): this replica's
            # resize_crop is not its arithmetic, and the view would carry the worker's version all the same
            return None
        if pixels.nbytes < VIEW_MIN_FACTOR * desc.input_height * desc.input_width * 3:
            return None  # sending it costs less than resizing it here
        start = time.perf_counter()
        try:
            view = await asyncio.get_running_loop().run_in_executor(
                self._decoder, resize_crop, pixels, desc.resize, desc.input_height
            )
        except ValueError:  # a description this image cannot be cut by: the worker says what is wrong
            return None
        self._stage(timings, "preprocess", model_id, time.perf_counter() - start)
        return view

    async def _call(
        self, model_id: str, method: Any, job: Any, deadline: float, timings: list[tuple[str, float]]
    ) -> Any:
        """The worker's answer to ``job``; adds the "dispatch" stage: the wait not covered by the worker's
        own stages (Serve's routing and queueing, the hop and the transfer both ways)."""
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the request reached a worker")
        start = time.perf_counter()
        response = method.remote(job)
        answer = asyncio.ensure_future(response)  # any awaitable: a Serve response, a local-mode coroutine
        # Unanswered for a while: is there a replica to answer at all? Asked less and less, and beside the
        # answer: one arriving while Serve's controller is asked is not held for its reply (up to 2 s).
        check: asyncio.Future[str | None] | None = None
        try:
            pause = NO_REPLICA_CHECK_S
            ask_at = time.time() + pause
            while True:
                waiting = {answer} if check is None else {answer, check}
                until = deadline if check is not None else min(deadline, ask_at)
                done, _ = await asyncio.wait(
                    waiting, timeout=max(until - time.time(), 0.0), return_when=asyncio.FIRST_COMPLETED
                )
                if answer in done:
                    break
                if time.time() >= deadline:
                    raise DeadlineExceeded(f"deadline exceeded after {remaining:.3f} s waiting for the worker")
                if check is None:
                    check = asyncio.ensure_future(_deployment_down(self.workers.get(model_id)))
                elif check.done():
                    down, check = check.result(), None
                    if down is not None:
                        raise Unavailable(f"model {model_id!r} has no running replica: {down}")
                    pause *= 2
                    ask_at = time.time() + pause
            outcome = answer.result()
        except Exception as exc:
            if type(exc).__name__ == "BackPressureError":  # matched by name, as in errors.py
                self._refused_at[model_id] = time.monotonic()
            if to_status(exc)[0].name == "UNAVAILABLE":  # the replica died under the request: health says so
                self._health[model_id] = (time.monotonic(), False)
                self._answered_at.pop(model_id, None)
            raise
        finally:
            if check is not None:
                check.cancel()
            if not answer.done():  # the caller went away (its gRPC deadline, a cancel), or gets no answer
                with contextlib.suppress(Exception):  # Ray's cancel() can raise a refusal again
                    response.cancel()
                answer.cancel()
        self._health[model_id] = self._answered(model_id)
        self._refused_at.pop(model_id, None)  # a job went through: its queue has room again
        if isinstance(outcome, ServiceError):  # the worker's refusal (ExplainerWorker._run)
            raise outcome
        self._forget_stale_description(model_id, outcome)
        worker_seconds = sum(seconds for _, seconds in outcome.provenance.timings)
        self._stage(timings, "dispatch", model_id, max(0.0, time.perf_counter() - start - worker_seconds))
        return outcome

    def _forget_stale_description(self, model_id: str, outcome: Any) -> None:
        """A replica restarted on a replaced weights file, or redeployed with another resize, serves other than
        the description says: drop it, so GetModel/ListModels fetch what the replicas serve now (and the
        ingress stops cutting views by it)."""
        provenance = getattr(outcome, "provenance", None)
        desc = self._descriptions.get(model_id)
        if desc is None or provenance is None:
            return
        for field in ("weights_digest", "preprocess_version"):  # other weights, or other resize (a redeploy)
            answered = getattr(provenance, field, "")
            if answered and answered != getattr(desc, field, answered):
                self._descriptions.pop(model_id, None)
                return

    def _answered(self, model_id: str) -> tuple[float, bool]:
        now = time.monotonic()
        self._answered_at[model_id] = now
        return now, True

    async def _serve(
        self,
        rpc: str,
        request: Any,
        grpc_context: Any,
        handler: Callable[[Any, Any, dict[str, str]], Awaitable[Any]],
        empty: Callable[[], Any],
    ) -> Any:
        """Run one RPC: metrics and error mapping. ``labels`` is filled by the handler (model, method)."""
        start = time.perf_counter()
        labels: dict[str, Any] = {"model": "none", "method": "none"}
        code, reason = "OK", "none"
        self.metrics.inflight(rpc, +1)
        try:
            if isinstance(request, UnparsedRequest):  # see ierf.serving.protocol
                raise InvalidArgument(request.describe())
            return await handler(request, grpc_context, labels)
        except asyncio.CancelledError:  # the caller went away, or its deadline passed at the proxy
            code = "DEADLINE_EXCEEDED" if _caller_deadline_passed(grpc_context, start) else "CANCELLED"
            raise
        except Exception as exc:
            cap = labels.get(DEADLINE_CAP_LABEL)
            if isinstance(exc, DeadlineExceeded) and cap is not None:
                exc = DeadlineExceeded(
                    f"{exc.message} (this server caps every call at request_timeout_s = {cap:g} s, whatever "
                    "deadline the caller sends: ask its operator, or send less work)"
                )
            status, message = to_status(exc)
            code = status.name
            if status.name == "RESOURCE_EXHAUSTED":  # a full queue (retry later) or a cap (never)
                reason = "overload" if retry_after_ms(exc) is not None else "cap"
            if status.name == "INTERNAL":
                logger.exception("%s failed", rpc)
            if grpc_context is None:  # handle call (tests, local mode): raise the precise error
                if isinstance(exc, ServiceError):
                    raise exc from None
                if retry_after_ms(exc) is not None:  # Serve's back-pressure: a full queue, as the trailers say
                    raise Overloaded(message) from exc
                raise error_for(status, message) from exc
            grpc_context.set_code(status)
            grpc_context.set_details(clip(message))
            trailers = retry_trailers(exc, status)  # an overload's pause, or "never retry" for a cap
            if trailers:
                grpc_context.set_trailing_metadata(trailers)
            return empty()
        finally:
            self.metrics.inflight(rpc, -1)
            self.metrics.request(rpc, labels["method"], labels["model"], code, time.perf_counter() - start, reason)

    async def _decode(self, image: Any, model: str, timings: list[tuple[str, float]], deadline: float) -> Any:
        """Caps and header first (a raw tensor's or a small file's inline: microseconds), then the pixels,
        admitted by their count (``DecodeGate``) onto the decode threads."""
        from ierf.serving.convert import open_image

        source = image.WhichOneof("source")
        if source == "content_hash":
            return self._referenced(image.content_hash)
        start = time.perf_counter()
        if source == "encoded" and len(image.encoded) > INLINE_OPEN_BYTES:
            pending = await asyncio.to_thread(open_image, image, self.limits)  # a linear walk over the bytes
        else:
            pending = open_image(image, self.limits)
        opened = time.perf_counter() - start
        refused = self._refused_at.get(model)
        if refused is not None and time.monotonic() - refused < RETRY_AFTER_MS / 1000:
            # Shed before the expensive part: within the pause its last refusal asked for, the worker's queue
            # is taken as still full (a 16 Mpx PNG took 1.3-2.2 s to decode only to be refused, and the
            # retries the refusals invited kept the cores from the worker).
            raise Overloaded(
                f"service overloaded, retry later: the worker for model {model!r} refused a job "
                f"{(time.monotonic() - refused) * 1000:.0f} ms ago with its queue full"
            )
        large = pending.pixels >= DECODE_ESTIMATE_MIN_PIXELS
        rate = self._decode_rates.get(pending.kind) if large else None

        def start_decoding() -> asyncio.Future[tuple[float, Any]]:
            if rate is not None and rate * pending.pixels > deadline - time.time():
                raise DeadlineExceeded(
                    f"{max(0.0, deadline - time.time()):.3f} s left before the deadline, but decoding this "
                    f"{pending.pixels / 1e6:.1f} Mpx {pending.kind} image needs about {rate * pending.pixels:.3f} s"
                )
            return asyncio.get_running_loop().run_in_executor(self._decoder, _timed, pending.decode)

        seconds, canonical = await self._decode_gate.run(pending.pixels, deadline, start_decoding)
        if large:  # timed on its thread: waiting for a thread is not decoding
            measured = seconds / pending.pixels
            self._decode_rates[pending.kind] = measured if rate is None else 0.7 * rate + 0.3 * measured
        # "admission": the wait for the decode gate and a thread; "decode": the header and the pixels.
        waited = max(0.0, time.perf_counter() - start - opened - seconds)
        self._stage(timings, "admission", model, waited)
        self._stage(timings, "decode", model, opened + seconds)
        return canonical

    def _referenced(self, content_hash: str) -> Any:
        """An image named by its content hash: no pixels (``_send`` sends the job by hash alone)."""
        from ierf.serving.images import CanonicalImage

        if not self.config.ingress.accept_image_references:
            raise InvalidArgument(
                "image.content_hash: this service takes no images by reference (ingress.accept_image_references "
                "is off): send image.encoded or image.tensor"
            )
        if not _CONTENT_HASH.fullmatch(content_hash):
            raise InvalidArgument(
                f"image.content_hash {echo(content_hash)} is not a content hash: 64 lowercase hex digits, as in "
                "an answer's provenance.content_hash"
            )
        return CanonicalImage(pixels=None, content_hash=content_hash)  # type: ignore[arg-type]

    def _stage(self, timings: list[tuple[str, float]], stage: str, model: str, seconds: float) -> None:
        """An ingress stage, for provenance and for ``explainer_stage_duration_seconds``."""
        timings.append((stage, seconds))
        self.metrics.stage(stage, model, seconds)

    @staticmethod
    def _request_id(grpc_context: Any) -> str:
        """The caller's ``request_id`` metadata, else the id the Serve proxy generated (also in trailers)."""
        if grpc_context is not None and grpc_context.request_id():
            return str(grpc_context.request_id())
        try:
            from ray.serve.context import _get_serve_request_context  # no public accessor in Ray 2.60

            return str(_get_serve_request_context().request_id or "")
        except Exception:
            return ""

    def _finish_timings(self, timings: list[tuple[str, float]], start: float, model: str) -> None:
        timings.append(("total", time.perf_counter() - start))

    # ---------------------------------------------------------------------------------- RPCs
    async def Explain(self, request: Any, grpc_context: Any = None) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        return await self._serve("Explain", request, grpc_context, self._explain, pb.ExplainResponse)

    async def _explain(self, request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        from ierf.serving import convert
        from ierf.serving.jobs import DEFAULT_METHOD, ExplainJob, check_explain_args

        start = time.perf_counter()
        deadline = self._deadline(grpc_context, labels)
        model_id, worker = self._worker(request.model_id)
        labels["model"] = model_id
        method = request.method or DEFAULT_METHOD
        labels["method"] = method if method in self._known_methods(model_id) else "other"
        dtype = convert.map_dtype(request.map_dtype)
        named = request.contrast.lower()  # the names in any case, as the SDK sends them; others echoed as sent
        contrast: str | int = named if named in CONTRAST_NAMES else request.contrast or "identity"
        if request.HasField("contrast_class"):
            if contrast != "identity":
                raise InvalidArgument("set either contrast ('identity'/'mean') or contrast_class, not both")
            contrast = int(request.contrast_class)
        target = int(request.target) if request.HasField("target") else None
        desc = self._description_if_known(model_id)
        if desc is not None:  # a caller's mistake answered now, not after the queue (the worker checks too)
            check_explain_args(desc, method, target, contrast)
        timings: list[tuple[str, float]] = []
        image = await self._decode(request.image, model_id, timings, deadline)
        job = ExplainJob(
            pixels=image.pixels,
            content_hash=image.content_hash,
            method=method,
            target=target,
            contrast=contrast,
            overlay=request.overlay,
            return_input=request.return_input,
            deadline=deadline,
        )
        outcome = await self._send(model_id, worker.explain, job, image.pixels, desc, deadline, timings)
        encode_start = time.perf_counter()
        response = pb.ExplainResponse(
            map=convert.tensor_message(convert.outcome_maps(outcome), dtype),
            target=convert.score_message(outcome.target),
            overlay_png=outcome.overlays[0] if outcome.overlays else b"",
        )
        if outcome.model_input is not None:
            response.model_input.CopyFrom(convert.input_message(outcome.model_input))
        self._stage(timings, "encode", model_id, time.perf_counter() - encode_start)
        self._finish_timings(timings, start, model_id)
        response.provenance.CopyFrom(
            convert.provenance_message(outcome.provenance, timings, self._request_id(grpc_context), self.server_version)
        )
        return response

    def _known_methods(self, model_id: str) -> list[str]:
        """The model's methods, for the metrics' method label; before its description has arrived, the
        built-in ones (a name outside them is "other": labels stay bounded)."""
        desc = self._descriptions.get(model_id)
        return desc.methods if desc is not None else BUILT_IN_METHODS

    async def ComputeIERF(self, request: Any, grpc_context: Any = None) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        return await self._serve("ComputeIERF", request, grpc_context, self._ierf, pb.ComputeIERFResponse)

    async def _ierf(self, request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        from ierf.serving import convert
        from ierf.serving.jobs import IERFJob, check_ierf_args, check_response_fits

        start = time.perf_counter()
        deadline = self._deadline(grpc_context, labels)
        model_id, worker = self._worker(request.model_id)
        labels["model"], labels["method"] = model_id, "srd"
        dtype = convert.map_dtype(request.map_dtype)
        if not request.layer:
            raise InvalidArgument("layer is empty: name one of the model's layers (see GetModel)")
        if len(request.positions) > self.config.ingress.max_positions:
            limit = self.config.ingress.max_positions
            raise InvalidArgument(f"{len(request.positions)} positions requested; at most {limit} per call")
        positions = convert.positions_array(request.positions)
        desc = self._description_if_known(model_id)
        if desc is not None:
            check_ierf_args(desc, request.layer, positions)
            check_response_fits(desc, len(positions), np.dtype(dtype).itemsize, request.overlay, request.return_input)
        timings: list[tuple[str, float]] = []
        image = await self._decode(request.image, model_id, timings, deadline)
        job = IERFJob(
            pixels=image.pixels,
            content_hash=image.content_hash,
            layer=request.layer,
            positions=positions,
            overlay=request.overlay,
            return_input=request.return_input,
            deadline=deadline,
            map_itemsize=np.dtype(dtype).itemsize,
        )
        outcome = await self._send(model_id, worker.ierf, job, image.pixels, desc, deadline, timings)
        encode_start = time.perf_counter()
        response = pb.ComputeIERFResponse(
            maps=convert.tensor_message(convert.outcome_maps(outcome), dtype),
            layer=convert.layer_message(outcome.layer),
            overlay_png=outcome.overlays,
        )
        if outcome.model_input is not None:
            response.model_input.CopyFrom(convert.input_message(outcome.model_input))
        self._stage(timings, "encode", model_id, time.perf_counter() - encode_start)
        self._finish_timings(timings, start, model_id)
        response.provenance.CopyFrom(
            convert.provenance_message(outcome.provenance, timings, self._request_id(grpc_context), self.server_version)
        )
        return response

    async def Predict(self, request: Any, grpc_context: Any = None) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        return await self._serve("Predict", request, grpc_context, self._predict, pb.PredictResponse)

    async def _predict(self, request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        from ierf.serving import convert
        from ierf.serving.jobs import PredictJob, check_top_k

        start = time.perf_counter()
        deadline = self._deadline(grpc_context, labels)
        model_id, worker = self._worker(request.model_id)
        labels["model"] = model_id
        if not 0 <= request.top_k <= self.config.ingress.max_top_k:
            raise InvalidArgument(f"top_k {request.top_k} is out of range: 1..{self.config.ingress.max_top_k} (0: 5)")
        desc = self._description_if_known(model_id)
        if desc is not None:
            check_top_k(desc, request.top_k)
        timings: list[tuple[str, float]] = []
        image = await self._decode(request.image, model_id, timings, deadline)
        job = PredictJob(pixels=image.pixels, content_hash=image.content_hash, top_k=request.top_k, deadline=deadline)
        outcome = await self._send(model_id, worker.predict, job, image.pixels, desc, deadline, timings)
        response = pb.PredictResponse(top_classes=[convert.score_message(s) for s in outcome.top_classes])
        self._finish_timings(timings, start, model_id)
        response.provenance.CopyFrom(
            convert.provenance_message(outcome.provenance, timings, self._request_id(grpc_context), self.server_version)
        )
        return response

    def _description_if_known(self, model_id: str) -> Any:
        """The model's description if this replica holds it; else None, and fetch it in the background
        (never on a request's path: a worker busy with a long job would make the request wait)."""
        desc = self._descriptions.get(model_id)
        if desc is None and model_id not in self._fetching:
            self._fetching.add(model_id)

            def fetched(task: asyncio.Task) -> None:
                self._fetching.discard(model_id)
                if not task.cancelled():
                    task.exception()  # a failure is retried by the next request; retrieving it keeps asyncio quiet

            asyncio.get_running_loop().create_task(self._description(model_id)).add_done_callback(fetched)
        return desc

    async def _description(self, model_id: str) -> Any:
        desc = self._descriptions.get(model_id)
        if desc is None:
            _, worker = self._worker(model_id)
            try:
                desc = await asyncio.wait_for(worker.describe.remote(), timeout=DESCRIBE_TIMEOUT_S)
            except TimeoutError:
                raise Unavailable(f"model {model_id!r} did not describe itself within {DESCRIBE_TIMEOUT_S} s") from None
            self._descriptions[model_id] = desc
        return desc

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        async def handler(request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
            from ierf.serving import convert

            descs = await asyncio.gather(*(self._description(m) for m in sorted(self.workers)))
            return pb.ListModelsResponse(
                models=[convert.model_message(d, self.config.ingress) for d in descs],
                default_model_id=self.config.default_model,
            )

        return await self._serve("ListModels", request, grpc_context, handler, pb.ListModelsResponse)

    async def GetModel(self, request: Any, grpc_context: Any = None) -> Any:
        from ierf_proto.v1 import explainer_pb2 as pb

        async def handler(request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
            from ierf.serving import convert

            model_id, _ = self._worker(request.model_id)
            labels["model"] = model_id
            return convert.model_message(await self._description(model_id), self.config.ingress)

        return await self._serve("GetModel", request, grpc_context, handler, pb.ModelInfo)

    # --------------------------------------------------------------------- grpc.health.v1.Health
    async def _status(self, service: str) -> Any:
        from grpc_health.v1 import health_pb2

        if service not in ("", SERVICE_NAME):
            raise NotFound(f"unknown service {echo(service)}; this server serves {SERVICE_NAME!r}")
        answered = await asyncio.gather(*(self._worker_answers(m) for m in sorted(self.workers)))
        return health_pb2.HealthCheckResponse.SERVING if all(answered) else health_pb2.HealthCheckResponse.NOT_SERVING

    async def _worker_answers(self, model_id: str) -> bool:
        """Whether the model's worker answered within the last HEALTH_CACHE_S, else a probe's answer."""
        checked = self._health.get(model_id)
        if checked is not None and time.monotonic() - checked[0] < HEALTH_CACHE_S:
            return checked[1]
        probe = self._probes.get(model_id)
        if probe is None:
            probe = self._probes[model_id] = asyncio.get_running_loop().create_task(self._probe(model_id))
            probe.add_done_callback(lambda _, m=model_id: self._probes.pop(m, None))
        return await asyncio.shield(probe)  # a caller that gives up leaves the probe to finish for the next

    async def _probe(self, model_id: str) -> bool:
        _, worker = self._worker(model_id)
        response = worker.describe.remote()
        try:
            desc = await asyncio.wait_for(response, timeout=HEALTH_PROBE_TIMEOUT_S)
        except Exception as exc:
            # No answer in time, or the probe not even queued (Serve's router refuses it with back-pressure
            # when the worker's queue is full, matched by name as in errors.py): a busy worker, not a gone one.
            if isinstance(exc, TimeoutError) or type(exc).__name__ == "BackPressureError":
                # Ray 2.60's cancel() of a call its router refused raises that refusal again: a probe
                # answered RESOURCE_EXHAUSTED exactly under load, when a load balancer must not drain
                with contextlib.suppress(Exception):
                    response.cancel()
                last = self._answered_at.get(model_id)
                busy = last is not None and time.monotonic() - last < HEALTH_BUSY_GRACE_S
                if busy and await _running_replicas(worker) == 0:
                    # Serve re-queues calls (and probes) for the replacement of a replica that died rather
                    # than failing them, so no error ever says so: a worker with no replica running is not
                    # busy, whatever it answered shortly before (SIGKILL: SERVING for 14-19 s otherwise)
                    logger.warning("health check: worker %s has no replica running", model_id)
                    busy = False
                    self._answered_at.pop(model_id, None)
                elif not busy:
                    logger.warning("health check: worker %s has not answered for %.0f s", model_id, HEALTH_BUSY_GRACE_S)
                self._health[model_id] = (time.monotonic(), busy)
                return busy
            logger.warning("health check: worker %s does not answer: %s", model_id, exc)
            self._health[model_id] = (time.monotonic(), False)
            self._answered_at.pop(model_id, None)
            return False
        self._descriptions[model_id] = desc  # the latest answer: a restarted replica may serve other weights
        self._health[model_id] = self._answered(model_id)
        return True

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        async def handler(request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
            return health_pb2.HealthCheckResponse(status=await self._status(request.service))

        return await self._serve("Check", request, grpc_context, handler, health_pb2.HealthCheckResponse)

    async def List(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        async def handler(request: Any, grpc_context: Any, labels: dict[str, str]) -> Any:
            statuses = {
                name: health_pb2.HealthCheckResponse(status=await self._status(name)) for name in ("", SERVICE_NAME)
            }
            return health_pb2.HealthListResponse(statuses=statuses)

        return await self._serve("List", request, grpc_context, handler, health_pb2.HealthListResponse)

    async def Watch(self, request: Any, grpc_context: Any = None):
        """Not offered (probes use Check); answers UNIMPLEMENTED as the health protocol allows.

        A streaming method's status only reaches the caller when the generator raises after setting it
        (Ray 2.60 then keeps the user-set code), so this raises instead of returning.
        """
        import grpc

        message = "Health.Watch is not implemented; poll Health.Check"
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            grpc_context.set_details(message)
        raise NotImplementedError(message)
        yield  # makes this an async generator, which the proxy expects for streaming RPCs

"""Operator acceptance findings: start-up checks of the local runner, `make run`/`make stop` bookkeeping, and a
model whose replicas cannot start. Each test is fast: no Ray cluster (Ray's start is stubbed out where the
local runner is driven), no model."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from serving.fakes import GrpcContext, Method

ROOT = Path(__file__).resolve().parents[2]


class _RayWouldStart(Exception):
    """Raised in place of starting the private Ray cluster: the start got past every up-front check."""


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from ierf.serving import local

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise _RayWouldStart("the start went on to ray.init")

    monkeypatch.setattr(local, "_init_ray", refuse)


def _start(**kwargs: Any) -> Any:
    from ierf.serving.local import free_port, start_service

    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    return start_service(**{"redis_url": "", "num_cpus": 2, **ports, **kwargs})


# ------------------------------------------------------------------------------------ start-up checks
@pytest.mark.parametrize("other", ["http_port", "metrics_port"])
def test_start_refuses_one_port_for_grpc_and_another_listener(no_ray: None, other: str) -> None:
    """`make run GRPC_PORT=8000` (HTTP's default port) started "ready": Serve's HTTP proxy took
    127.0.0.1:8000 and its gRPC server [::]:8000 beside it (SO_REUSEPORT), so gRPC on 127.0.0.1 reached the
    HTTP server and every call failed UNAVAILABLE ("Failed parsing HTTP/2"), while the launcher printed
    "gRPC 127.0.0.1:8000". Two of the service's listeners on one port is a config mistake: refused up front."""
    from ierf.serving.local import free_port

    port = free_port()
    with pytest.raises(ValueError, match=str(port)):
        _start(grpc_port=port, **{other: port})


def test_start_refuses_a_grpc_port_taken_on_another_local_address(no_ray: None) -> None:
    """The pre-start port check connects to 127.0.0.1 only, but Serve's gRPC server binds [::]:PORT (every
    address). A port held on another address (the host's own IP, 127.0.0.2, ::) passed the check and the
    start failed ~20 s later with the proxy's multi-line traceback ("Failed to bind to address [::]:PORT")
    instead of README's one line naming the taken port."""
    from serving.test_round30_mutants import _held_on_another_loopback_address

    with _held_on_another_loopback_address() as port, pytest.raises(RuntimeError, match=rf"gRPC port {port}\b.*in use"):
        _start(grpc_port=port)


@pytest.mark.parametrize(
    "section,key",
    [("grpc_options", "prot"), ("http_options", "hots")],
)
def test_local_runner_refuses_unknown_keys_in_the_serve_sections_it_reads(no_ray: None, section: str, key: str) -> None:
    """README: a start that cannot succeed exits "with one line naming the reason: a config mistake (the file,
    key or deployment named)". The runner reads grpc_options/http_options itself, yet a typo there
    (`grpc_options: {prot: 9100}`) was ignored: the service came up on 9000 without a word."""
    from ierf.serving.local import load_serve_config

    config = load_serve_config()
    config[section][key] = 9100
    with pytest.raises(ValueError, match=key):
        _start(serve_config=config)


def test_local_runner_refuses_applications_it_will_not_deploy(no_ray: None) -> None:
    """The runner deploys applications[0] only: a second application in the config file (another set of
    models, say) was dropped silently, and its models answered NOT_FOUND."""
    import copy

    from ierf.serving.local import load_serve_config

    config = load_serve_config()
    second = copy.deepcopy(config["applications"][0])
    second["name"], second["route_prefix"] = "other", "/other"
    config["applications"].append(second)
    with pytest.raises(ValueError, match="other"):
        _start(serve_config=config)


def test_a_missing_weights_file_is_refused_before_the_cluster_starts(no_ray: None, tmp_path: Path) -> None:
    """A model whose weights file does not exist on this machine cost a full start (~60 s here), three
    crashing replicas, and the error named only the deployments Serve had marked failed by then (a second
    broken model, still retrying, went unmentioned). The local runner's replicas see this machine's files:
    the path can be checked before anything starts."""
    missing = tmp_path / "resnet18-mine.pth"
    with pytest.raises((ValueError, FileNotFoundError), match=r"resnet18-mine\.pth"):
        _start(
            args_overrides={
                "models": [{"id": "mine", "name": "resnet18", "weights": str(missing)}],
                "default_model": "mine",
            },
            serve_config={"applications": [{"name": "ierf", "import_path": "ierf.serving.app:build_app", "args": {}}]},
        )


# ------------------------------------------------------------------------------------ make run / stop
def _stamp() -> str:
    digest = hashlib.md5(
        (ROOT / "pyproject.toml").read_bytes() + (ROOT / "clients" / "python" / "pyproject.toml").read_bytes()
    ).hexdigest()[:12]
    return f".venv/.installed-{digest}"


def _detached(seconds: int = 60, name: str = "sleep") -> int:
    """A process that is not pytest's child (so no zombie lingers for `kill -0` to find once it is gone),
    running under the command name ``name``."""
    command = f"(exec -a {name} sleep {seconds}) >/dev/null 2>&1 & echo $!"
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    return int(out.stdout)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _end(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _make(target: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # its own session: a `make stop` that kills process groups must never reach pytest's
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-o", _stamp(), target, *args],
        capture_output=True,
        text=True,
        timeout=90,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_stop_leaves_alone_a_process_that_reused_the_service_pid(tmp_path: Path) -> None:
    """run/service.pid outlives the service (a reboot, a crash, a service killed by the OOM killer) and its
    number is reused: `make stop` sent SIGTERM to whatever now held it ("service stopped (pid N)"), and
    `make run` said "service already running" with nothing on the port. A pid is only the service's while
    that process is the ierf launcher."""
    stranger = _detached()  # stands in for an unrelated process that got the old pid
    try:
        (tmp_path / "service.pid").write_text(f"{stranger}\n")
        (tmp_path / "service.port").write_text("19000 8080 8000\n")
        done = _make("stop", f"RUN_DIR={tmp_path}")
        time.sleep(0.3)
        assert _alive(stranger), f"make stop killed an unrelated process: {done.stdout}{done.stderr}"
    finally:
        _end(stranger)


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_stop_removes_what_a_killed_launcher_left_running(tmp_path: Path) -> None:
    """`make stop` SIGKILLs the launcher when it does not stop in 60 s (and a launcher may die on its own, OOM):
    Ray's dashboard agent and runtime-env agent outlived it here, reparented to init, ignoring SIGTERM, the
    agent still holding METRICS_PORT, so the next `make run` was refused ("metrics port 8080 ... in use")
    and nothing recorded what to stop. The launcher is stood in for by a script in place of the venv's
    python that leaves a child behind, as Ray's agents were left."""
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run.mkdir()
    child_file = tmp_path / "child.pid"
    fake = bin_dir / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'sleep 300 & echo $! > "$IERF_TEST_CHILD"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --ready-file ] && touch "$2"; shift; done\n'
        "exec sleep 300\n"
    )
    fake.chmod(0o755)
    redis = _detached(name="redis-server")
    (run / "redis.pid").write_text(f"{redis}\n")
    (run / "redis.port").write_text("16379\n")
    ports = ["GRPC_PORT=19000", "METRICS_PORT=18080", "HTTP_PORT=18000", "REDIS_PORT=16379"]
    child = 0
    try:
        started = _make("start", f"RUN_DIR={run}", f"BIN={bin_dir}", *ports, env={"IERF_TEST_CHILD": str(child_file)})
        assert started.returncode == 0, started.stdout + started.stderr
        child = int(child_file.read_text())
        os.kill(int((run / "service.pid").read_text()), signal.SIGKILL)  # the launcher is gone
        time.sleep(0.3)
        _make("stop", f"RUN_DIR={run}")
        time.sleep(0.3)
        assert not _alive(child), "a process the service started outlived `make stop`"
    finally:
        _end(redis)
        if child:
            _end(child)


# ------------------------------------------------------------------------------- a model that cannot start
def test_a_call_to_a_model_with_no_replica_running_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker replica that died and cannot come back (its weights file replaced by a bad one): Serve marks
    the deployment UNHEALTHY and retries it, health reads NOT_SERVING, but each Predict/Explain waited its
    whole deadline (DEADLINE_EXCEEDED after 20 s with the SDK's timeout=20, up to the 300 s cap without one),
    saying nothing of the cause. A call to a model Serve counts no RUNNING replica for should end soon with
    UNAVAILABLE naming the model."""
    from types import SimpleNamespace

    from ierf.serving import deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    reason = "ValueError: cannot load weights from /models/r18.pth: not a readable PyTorch state_dict file"

    def status() -> Any:
        overview = SimpleNamespace(replica_states={"STARTING": 1}, status="UNHEALTHY", message=reason)
        return SimpleNamespace(applications={"ierf": SimpleNamespace(deployments={"Worker_r18": overview})})

    monkeypatch.setattr(deployments.serve, "status", status)
    monkeypatch.setattr("ray.is_initialized", lambda: True)

    async def never(*args: Any) -> Any:  # Serve queues the call for a replica that never comes
        await asyncio.sleep(3600)

    worker = SimpleNamespace(describe=Method(never), predict=Method(never), explain=Method(never))
    worker.app_name, worker.deployment_name = "ierf", "Worker_r18"
    config = ServiceConfig.from_args({"models": ["r18"], "ingress": {"request_timeout_s": 6}})
    ingress = Ingress.func_or_class({"r18": worker}, config)
    pixels = bytes(4 * 4 * 3)
    request = pb.PredictRequest(
        image=pb.Image(tensor=pb.Tensor(data=pixels, dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))
    )
    context = GrpcContext()
    start = time.monotonic()
    asyncio.run(ingress.Predict(request, context))
    took = time.monotonic() - start
    assert context.code is not None and context.code.name == "UNAVAILABLE", (context.code, context.details, took)
    assert "r18" in (context.details or "")
    assert took < 4, f"the call waited {took:.1f} s of its 6 s budget"


def _all_is_well() -> Any:
    """What ``serve.status()`` says of a Worker_r18 deployment with one replica RUNNING."""
    from types import SimpleNamespace

    overview = SimpleNamespace(replica_states={"RUNNING": 1}, status="HEALTHY", message="")
    return SimpleNamespace(applications={"ierf": SimpleNamespace(deployments={"Worker_r18": overview})})


def _predicting_ingress(
    monkeypatch: pytest.MonkeyPatch, check_s: float, status: Callable[[], Any], predict: Callable[[Any], Any]
) -> tuple[Callable[[], Awaitable[Any]], GrpcContext]:
    """An ingress over a Worker_r18 handle whose Predict is ``predict``, asking Serve's controller (``status``,
    as ``serve.status`` in a replica) after ``check_s`` unanswered: (a Predict call to await, its context)."""
    from types import SimpleNamespace

    from ierf.serving import deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    monkeypatch.setattr(deployments, "NO_REPLICA_CHECK_S", check_s)
    monkeypatch.setattr(deployments.serve, "status", status)
    monkeypatch.setattr("ray.is_initialized", lambda: True)

    async def never(*args: Any) -> Any:
        await asyncio.sleep(3600)

    worker = SimpleNamespace(describe=Method(never), predict=Method(predict), explain=Method(never))
    worker.app_name, worker.deployment_name = "ierf", "Worker_r18"
    ingress = Ingress.func_or_class({"r18": worker}, ServiceConfig.from_args({"models": ["r18"]}))
    request = pb.PredictRequest(
        image=pb.Image(tensor=pb.Tensor(data=bytes(4 * 4 * 3), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))
    )
    context = GrpcContext()
    return lambda: ingress.Predict(request, context), context


def test_an_answer_arriving_while_the_controller_is_asked_is_not_held_for_its_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call unanswered for NO_REPLICA_CHECK_S asks Serve's controller whether any replica runs. That question
    was awaited before the answer was looked at again, so a long job's answer arriving meanwhile waited for the
    controller's reply (up to HEALTH_PROBE_TIMEOUT_S, 2 s, from a slow or restarting controller)."""
    import threading

    asked = threading.Event()

    def slow_status() -> Any:  # a controller that takes 1.5 s to answer, and then says all is well
        asked.set()
        time.sleep(1.5)
        return _all_is_well()

    async def predict(job: Any) -> Any:  # answers 0.2 s after the controller was asked
        while not asked.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        return _prediction()

    call, context = _predicting_ingress(monkeypatch, 0.1, slow_status, predict)

    async def timed() -> tuple[Any, float]:  # timed inside the loop: asyncio.run then waits for the thread
        start = time.monotonic()
        return await call(), time.monotonic() - start

    response, took = asyncio.run(timed())
    assert context.code is None and [c.index for c in response.top_classes] == [3]
    assert took < 0.9, f"the answer waited for the controller: {took:.2f} s"


def _prediction() -> Any:
    from ierf.serving.jobs import Outcome, Provenance, Score

    return Outcome(provenance=Provenance("r18", "d", "", "", "v", "h"), top_classes=[Score(3, "three", 0.5, 1.0)])


@pytest.mark.parametrize("setting", ["grpc_port", "http_port"])
def test_port_zero_is_refused_not_read_as_unset(no_ray: None, setting: str) -> None:
    """`--grpc-port 0` fell back to the config's 9000 (0 was taken for "not given"): refused by name."""
    with pytest.raises(ValueError, match=rf"{setting} must be a port number .*got 0"):
        _start(**{setting: 0})


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_stop_with_nothing_running_says_so(tmp_path: Path) -> None:
    done = _make("stop", f"RUN_DIR={tmp_path}")
    assert done.returncode == 0 and "nothing to stop" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_run_serves_another_config_by_name(tmp_path: Path) -> None:
    """`make run` always served the bundled config: an operator trying another one (a second model, more
    replicas) had to leave make, and with it the pid bookkeeping `make stop` relies on. CONFIG=FILE reaches
    the launcher as an absolute --config; a CONFIG that names no file is refused before anything starts."""
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run.mkdir()
    args_file = tmp_path / "args"
    fake = bin_dir / "python"  # stands in for the launcher: records its arguments, says ready, then waits
    fake.write_text(
        "#!/bin/bash\n"
        'echo "$@" > "$IERF_TEST_ARGS"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --ready-file ] && touch "$2"; shift; done\n'
        "exec sleep 300\n"
    )
    fake.chmod(0o755)
    config = tmp_path / "two-models.yaml"
    config.write_text("applications: []\n")
    redis = _detached(name="redis-server")
    (run / "redis.pid").write_text(f"{redis}\n")
    (run / "redis.port").write_text("16379\n")
    ports = ["GRPC_PORT=19000", "METRICS_PORT=18080", "HTTP_PORT=18000", "REDIS_PORT=16379"]
    env = {"IERF_TEST_ARGS": str(args_file)}
    try:
        missing = _make("start", f"RUN_DIR={run}", f"BIN={bin_dir}", "CONFIG=nowhere.yaml", *ports, env=env)
        assert missing.returncode != 0 and "CONFIG=nowhere.yaml: no readable file" in missing.stdout + missing.stderr
        assert not args_file.exists() and not (run / "service.pid").exists()
        started = _make("start", f"RUN_DIR={run}", f"BIN={bin_dir}", f"CONFIG={config}", *ports, env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"serve --config {config} --grpc-port 19000" in args_file.read_text()
    finally:
        with contextlib.suppress(OSError, ValueError):
            _end(int((run / "service.pid").read_text()))
        _end(redis)

"""How ``ierf.serving.local`` sets Ray up before starting it (no cluster is started here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest
from ierf.serving import local
from ierf.serving.local import GRPC_MAX_MESSAGE_ENV, choose_node_ip, grpc_max_message_bytes, is_loopback


@pytest.fixture
def routable(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(local, "routable_ip", lambda: "10.1.2.3")
    return "10.1.2.3"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"])
def test_a_loopback_http_host_keeps_ray_and_its_metrics_on_loopback(host: str, routable: str) -> None:
    assert choose_node_ip(host) == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", ""])
def test_a_wildcard_http_host_puts_the_node_on_the_routable_address(host: str, routable: str) -> None:
    assert choose_node_ip(host) == routable


def test_without_a_routable_address_the_node_stays_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "routable_ip", lambda: None)
    assert choose_node_ip("0.0.0.0") == "127.0.0.1"


def test_a_specific_address_is_the_node_address_and_an_explicit_node_ip_wins(routable: str) -> None:
    assert choose_node_ip("192.0.2.7") == "192.0.2.7"
    assert choose_node_ip("0.0.0.0", node_ip="127.0.0.1") == "127.0.0.1"
    assert choose_node_ip("127.0.0.1", node_ip="192.0.2.7") == "192.0.2.7"


def test_routable_ip_skips_loopback_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No route out (the UDP probe's source is loopback): fall back to the host name's address, and to
    None when that is loopback too (Debian maps the host name to 127.0.1.1)."""

    class LoopbackRoute:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> LoopbackRoute:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def connect(self, address: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", 40000)

    monkeypatch.setattr(local.socket, "socket", LoopbackRoute)
    monkeypatch.setattr(local.socket, "gethostbyname", lambda name: "127.0.1.1")
    assert local.routable_ip() is None
    monkeypatch.setattr(local.socket, "gethostbyname", lambda name: "10.1.2.3")
    assert local.routable_ip() == "10.1.2.3"
    assert is_loopback("127.0.1.1") and not is_loopback("10.1.2.3")


def test_grpc_cap_sits_above_the_image_cap() -> None:
    assert grpc_max_message_bytes(32 * 2**20, {}) == 40 * 2**20
    assert grpc_max_message_bytes(64 * 2**20, {}) == 65 * 2**20  # follows a raised image cap
    assert grpc_max_message_bytes(32 * 2**20, {GRPC_MAX_MESSAGE_ENV: "50000000"}) == 50_000_000
    with pytest.raises(ValueError, match="would refuse images the ingress accepts"):
        grpc_max_message_bytes(40 * 2**20, {GRPC_MAX_MESSAGE_ENV: str(40 * 2**20)})


def test_loopback_start_sets_rays_switch_only_while_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import ray_constants

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    seen = {}

    def fake_init(**kwargs: object) -> None:
        seen.update(kwargs)
        seen["env"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        seen["constant"] = ray_constants.ENABLE_RAY_CLUSTER

    import ray

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: seen["_node_ip_address"])
    before = ray_constants.ENABLE_RAY_CLUSTER
    assert local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "127.0.0.1") == "127.0.0.1"
    assert (seen["env"], seen["constant"]) == ("0", False)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    assert local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "192.0.2.7") == "192.0.2.7"
    assert (seen["env"], seen["constant"]) == (None, before)


def test_stop_keeps_the_replicas_logs_before_removing_the_clusters_files(tmp_path, no_cluster: list[str]) -> None:
    """The worker's ready line, Redis warnings and access logs lived only in the private cluster's
    directory, which stop() removes: `make stop` keeps a copy in run/serve-logs/<session>, and nothing
    already in that directory is removed (``--keep-logs .`` once emptied the working directory)."""
    from ierf.serving.local import RunningService

    temp_dir = tmp_path / "ierf-ray-x"
    session = temp_dir / "session_2026-11-27_07-00-00_1"
    (session / "logs" / "serve").mkdir(parents=True)
    (session / "logs" / "serve" / "replica_ierf_Worker.log").write_text("worker ready\n")
    (temp_dir / "session_latest").symlink_to(session)
    kept = tmp_path / "run" / "serve-logs"
    kept.mkdir(parents=True)
    (kept / "mine.txt").write_text("the user's\n")
    service = RunningService(9000, 8000, 8080, str(temp_dir), owns_temp_dir=True, keep_logs_in=str(kept))
    assert service.replica_logs == str(temp_dir / "session_latest" / "logs" / "serve")
    service.stop()  # Serve and Ray shut down as recording no-ops (a live test cluster stays up)
    assert (kept / session.name / "replica_ierf_Worker.log").read_text() == "worker ready\n"
    assert (kept / session.name / ".ierf-kept-logs").is_file()  # what pruning looks for
    assert (kept / "mine.txt").read_text() == "the user's\n" and not temp_dir.exists()


def test_only_the_newest_kept_sessions_stay(tmp_path) -> None:
    """Every stop added a copy and nothing pruned them; only Ray's session folders are ever removed."""
    from ierf.serving.local import KEPT_MARK, prune_kept_sessions

    names = [f"session_2026-11-{day:02d}_07-00-00_123456_{100 + day}" for day in range(1, 14)]  # as Ray names them
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / KEPT_MARK).write_text("")
    live = "session_2026-11-01_06-00-00_123456_99"  # a live Ray session (no mark): --keep-logs /tmp/ray
    (tmp_path / live).mkdir()
    (tmp_path / "session_notes").mkdir()  # not Ray's: stays
    (tmp_path / "mine.txt").write_text("the user's\n")
    prune_kept_sessions(str(tmp_path), keep=10)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*names[3:], live, "session_notes", "mine.txt"])


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve's and Ray's shutdown as no-ops that record their calls, in a process that reads as running Ray
    (stop() shuts down only then): no real cluster is started, and a live test cluster is not touched."""
    import ray
    from ray import serve

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    return calls


def test_a_redis_that_exits_at_start_is_reported_at_once() -> None:
    """redis-server exits when its port is taken: start() must say so (RuntimeError with the exit code), not
    keep pinging the port (where another listener may even answer) until it gives up with a TimeoutError."""
    import shutil
    import socket

    from ierf.serving.local import RedisProcess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisProcess(port=taken.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match=r"redis-server exited with code \d+ \(port \d+ taken\?\)"):
                server.start(timeout_s=5.0)
        finally:
            server.cleanup()


def test_a_redis_that_never_answers_is_stopped_when_start_gives_up(tmp_path: Path) -> None:
    """start() raised TimeoutError but left the unresponsive process running: every failed `make run`
    would leak a server nobody holds the PID of."""
    from ierf.serving.local import RedisProcess

    mute = tmp_path / "mute-redis"
    pid_file = tmp_path / "pid"
    mute.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    mute.chmod(0o755)
    server = RedisProcess(executable=str(mute), workdir=tmp_path)
    try:
        with pytest.raises(TimeoutError, match="did not answer PING"):
            server.start(timeout_s=1.0)
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # terminated and reaped
    finally:
        server.stop()


def test_redis_cleanup_removes_only_the_folder_it_made(tmp_path: Path) -> None:
    """cleanup() removed ``workdir`` whoever made it: a caller's own folder passed as Redis' working directory
    went with everything in it (the ownership slip ``owns_temp_dir`` fixed for the Ray temp dir)."""
    from ierf.serving.local import RedisProcess

    keep = tmp_path / "callers"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    given = RedisProcess(workdir=keep).start()
    made = RedisProcess().start()
    made_dir = made.workdir
    assert made_dir is not None and made_dir.is_dir()
    given.cleanup()
    made.cleanup()
    assert (keep / "notes.txt").read_text() == "mine"
    assert not made_dir.exists() and made.workdir is None
    made.cleanup()  # a second cleanup is harmless


def test_stop_leaves_a_temp_dir_the_caller_owns(tmp_path: Path, no_cluster: list[str]) -> None:
    """``start_service(temp_dir=...)``: the directory is the caller's (a shared Ray temp dir, say), so stop()
    removes only the ones it created itself."""
    from ierf.serving.local import RunningService

    temp_dir = tmp_path / "callers-ray"
    (temp_dir / "notes").mkdir(parents=True)
    RunningService(9000, 8000, 8080, str(temp_dir), owns_temp_dir=False).stop()
    assert no_cluster == ["serve.shutdown", "ray.shutdown"]
    assert (temp_dir / "notes").is_dir()


def test_metrics_urls_add_the_node_address_only_when_it_is_not_loopback() -> None:
    """``make run`` prints these for Prometheus: a loopback node has one endpoint, a routable node
    (``--http-host 0.0.0.0``) is also scraped on its own address, an IPv6 one in brackets."""
    from ierf.serving.local import RunningService

    def urls(node_ip: str) -> list[str]:
        return RunningService(9000, 8000, 8080, "/nonexistent", node_ip=node_ip).metrics_urls

    assert urls("127.0.0.1") == ["http://127.0.0.1:8080/metrics"]
    assert urls("10.1.2.3") == ["http://127.0.0.1:8080/metrics", "http://10.1.2.3:8080/metrics"]
    assert urls("fd00::7") == ["http://127.0.0.1:8080/metrics", "http://[fd00::7]:8080/metrics"]


@pytest.mark.parametrize("taken_name", ["gRPC", "HTTP", "metrics"])
def test_a_port_in_use_is_refused_before_ray_starts(taken_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the three ports is probed first: a taken metrics port otherwise started the whole cluster and
    failed (or bound the exporter elsewhere) only later, naming no port."""
    import socket

    from ierf.serving.local import free_port, load_serve_config, start_service

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("Ray must not start when a port is taken")

    monkeypatch.setattr(local, "_init_ray", no_ray)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"gRPC": free_port(), "HTTP": free_port(), "metrics": free_port(), taken_name: port}
        with pytest.raises(RuntimeError, match=rf"{taken_name} port {port} on 127.0.0.1 is already in use"):
            start_service(
                load_serve_config(), grpc_port=ports["gRPC"], http_port=ports["HTTP"], metrics_port=ports["metrics"]
            )


def test_args_overrides_merge_into_the_config_files_cache_and_ingress(monkeypatch: pytest.MonkeyPatch) -> None:
    """``args_overrides`` merges ``cache``/``ingress`` (documented): replacing them dropped the file's
    settings (its 32 MiB image cap fell back to 20 MiB, its Redis URL to none) without a word."""
    import ierf.serving.app
    from ierf.serving.local import load_serve_config, start_service

    built = []

    class Built(Exception):
        pass

    def record(config: object, overrides: object = None, deployments: object = None) -> None:
        built.append(config)
        raise Built  # stop before any port or cluster is touched

    monkeypatch.setattr(ierf.serving.app, "build_application", record)
    with pytest.raises(Built):
        start_service(load_serve_config(), args_overrides={"cache": {"ttl_s": 60}, "ingress": {"max_positions": 8}})
    with pytest.raises(Built):
        start_service(load_serve_config(), redis_url="")  # '' turns the Redis tier off
    merged, no_redis = built
    file_args = load_serve_config()["applications"][0]["args"]
    assert (merged.cache.ttl_s, merged.ingress.max_positions) == (60, 8)
    assert merged.cache.redis_url == file_args["cache"]["redis_url"]
    assert merged.ingress.max_image_bytes == file_args["ingress"]["max_image_bytes"]
    assert no_redis.cache.redis_url is None and no_redis.cache.ttl_s == file_args["cache"]["ttl_s"]


def test_serve_forever_removes_its_ready_file_and_stops_on_sigterm(
    tmp_path: Path, no_cluster: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` waits for the ready file and `make stop` sends SIGTERM: a ready file left behind would
    make the next `make run` report a dead service as ready. The file comes by a rename, whole (CI once
    read it empty between a plain write's open and its write)."""
    import signal
    import threading
    import time

    from ierf.serving.local import RunningService, serve_forever

    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    ready = tmp_path / "ready"
    service = RunningService(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    seen: list[str] = []
    renamed_to: list[str] = []
    real_replace = os.replace

    def recording_replace(source: str, destination: str) -> None:
        renamed_to.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(local.os, "replace", recording_replace)

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(ready.read_text())
        os.kill(os.getpid(), signal.SIGTERM)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=stop_when_ready, daemon=True)
    thread.start()
    try:
        serve_forever(service, str(ready))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    thread.join(5)
    assert seen == ["127.0.0.1:9123\n"] and renamed_to == [str(ready)]
    assert not ready.exists()
    assert no_cluster == ["serve.shutdown", "ray.shutdown"] and not temp_dir.exists()  # stop() ran


def test_the_ready_file_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI once read the ready file in the moment between its creation and its write and got "": the file
    must come into being with its content (a rename), and a failed write leaves neither it nor a staging file."""
    ready = tmp_path / "ready"
    real_replace = os.replace
    renames: list[tuple[bool, str]] = []

    def watching_replace(source: str, destination: str) -> None:
        renames.append((Path(destination).exists(), Path(source).read_text()))
        real_replace(source, destination)

    monkeypatch.setattr(local.os, "replace", watching_replace)
    local.write_file_atomically(str(ready), "127.0.0.1:9000\n")
    assert renames == [(False, "127.0.0.1:9000\n")]
    assert ready.read_text() == "127.0.0.1:9000\n" and list(tmp_path.iterdir()) == [ready]
    assert ready.stat().st_mode & 0o777 == 0o644  # readable as a plain write_text left it

    def failing_replace(source: str, destination: str) -> None:
        raise OSError(28, "No space left on device")

    ready.unlink()
    monkeypatch.setattr(local.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        local.write_file_atomically(str(ready), "127.0.0.1:9000\n")
    assert list(tmp_path.iterdir()) == []


def test_fewer_kept_sessions_than_the_limit_are_all_kept(tmp_path: Path) -> None:
    """With 8 copies and room for 10, none may go (a slice without its floor at 0 removed the oldest 6)."""
    from ierf.serving.local import KEPT_MARK, prune_kept_sessions

    names = [f"session_2026-11-{day:02d}_07-00-00_123456_{100 + day}" for day in range(1, 9)]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / KEPT_MARK).write_text("")
    prune_kept_sessions(str(tmp_path), keep=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_python_dash_m_serving_reports_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`make run` with a config file that is not a Serve config: exit status 2 and one readable line on
    stderr, not a traceback."""
    from ierf.serving.__main__ import main

    bad = tmp_path / "serve.yaml"
    bad.write_text("proxy_location: HeadOnly\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"ierf.serving: error: {bad}: not a Serve config file")


def test_ray_starts_with_the_chosen_node_ip_and_the_callers_process_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cluster: list[str]
) -> None:
    """What Ray's processes inherit: ``--node-ip`` wins over the HTTP host's choice, the gRPC message cap
    and PROCESS_ENV are set while Ray starts (a value the caller set is kept: it tuned its machine) and put
    back afterwards; and a start that fails removes the temp dir it created (one /tmp/ierf-ray-* leaked per
    failed `make run`)."""
    from ierf.serving.local import PROCESS_ENV, free_port, load_serve_config, start_service

    seen: dict[str, object] = {}

    class RayFailed(Exception):
        pass

    def init_ray(num_cpus: object, object_store_bytes: int, temp_dir: str, metrics_port: int, node_ip: str) -> str:
        seen.update(temp_dir=temp_dir, node_ip=node_ip, env={key: os.environ.get(key) for key in env_keys})
        raise RayFailed

    env_keys = [GRPC_MAX_MESSAGE_ENV, *PROCESS_ENV]
    monkeypatch.delenv(GRPC_MAX_MESSAGE_ENV, raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    for key in env_keys[1:]:
        if key != "GOMP_SPINCOUNT":
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(local, "_init_ray", init_ray)
    config = load_serve_config()
    with pytest.raises(RayFailed):
        start_service(
            config, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), node_ip="192.0.2.7"
        )
    max_image = config["applications"][0]["args"]["ingress"]["max_image_bytes"]
    expected = {**PROCESS_ENV, "GOMP_SPINCOUNT": "5", GRPC_MAX_MESSAGE_ENV: str(grpc_max_message_bytes(max_image, {}))}
    assert seen["node_ip"] == "192.0.2.7"
    assert seen["env"] == expected
    assert {key: os.environ.get(key) for key in env_keys} == {
        **dict.fromkeys(env_keys),
        "GOMP_SPINCOUNT": "5",
    }  # put back
    assert no_cluster == ["ray.shutdown"] and not os.path.exists(str(seen["temp_dir"]))


@pytest.mark.parametrize("ray_running", [True, False])
def test_stop_shuts_serve_down_only_while_this_process_runs_ray(
    tmp_path, no_cluster: list[str], monkeypatch: pytest.MonkeyPatch, ray_running: bool
) -> None:
    """With no Ray in the process (a second stop, or Ray already gone), ``serve.shutdown()`` runs a bare
    ``ray.init()``: a throw-away cluster, or one already running on the host whose Serve applications it
    would shut down. stop() then only removes its files."""
    import ray
    from ierf.serving.local import RunningService

    monkeypatch.setattr(ray, "is_initialized", lambda: ray_running)
    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    RunningService(9000, 8000, 8080, str(temp_dir), owns_temp_dir=True).stop()
    assert no_cluster == (["serve.shutdown", "ray.shutdown"] if ray_running else [])
    assert not temp_dir.exists()


def _failed_deploy_status(deployment: str, reason: str) -> object:
    """What ``serve.status()`` holds after a worker's constructor failed: the reason (the constructor's
    traceback) is in the deployment's message; the application's message only names the deployment."""
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
    from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

    failed = DeploymentStatusOverview(
        status=DeploymentStatus.DEPLOY_FAILED,
        status_trigger=DeploymentStatusTrigger.REPLICA_STARTUP_FAILED,
        replica_states={},
        message="The deployment failed to start 3 times in a row. This may be due to a problem with its "
        "constructor or initial health check failing. See controller logs for details. Error:\nTraceback (most "
        f'recent call last):\n  File "worker.py", line 169, in __init__\n{reason}',
    )
    return ServeStatus(
        applications={
            "ierf": ApplicationStatusOverview(
                status=ApplicationStatus.DEPLOY_FAILED,
                message=f"Failed to update the deployments ['{deployment}'].",
                last_deployed_time_s=0.0,
                deployments={deployment: failed},
            )
        }
    )


def test_a_worker_that_cannot_start_is_reported_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cluster: list[str]
) -> None:
    """A weights file that is missing or corrupt, ``redis_url: env:VAR`` with the variable unset, ``device:
    cuda`` without a GPU: each stops the worker replica "at start with the reason" (README), but
    ``python -m ierf.serving`` printed only Serve's application message, "Deploying application ierf failed:
    Failed to update the deployments ['Worker_r18']", and then removed the cluster's directory, the replica
    log holding the reason with it (also under --keep-logs, which applies only once started). The reason is
    in the deployment's status while the cluster is still up."""
    import ray
    from ierf.serving.local import free_port, load_serve_config, start_service
    from ray import serve

    reason = "ValueError: cannot load weights from /models/r18.pth: not a readable PyTorch state_dict file"
    monkeypatch.setattr(local, "_init_ray", lambda *args, **kwargs: "127.0.0.1")
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)

    def failed_run(*args: object, **kwargs: object) -> None:  # what serve.run raises (ray/serve/_private/client.py)
        raise RuntimeError("Deploying application ierf failed: Failed to update the deployments ['Worker_r18'].")

    monkeypatch.setattr(serve, "run", failed_run)
    monkeypatch.setattr(serve, "status", lambda: _failed_deploy_status("Worker_r18", reason))
    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    weights = tmp_path / "r18.pth"  # present (a missing file is refused before the cluster starts), unreadable
    weights.write_bytes(b"not a state dict")
    with pytest.raises(RuntimeError) as info:
        start_service(
            load_serve_config(),
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            redis_url="",
            num_cpus=8,
            temp_dir=str(temp_dir),
            args_overrides={
                "models": [
                    {"id": "efficientnet_lite0"},
                    {"id": "r18", "name": "resnet18", "weights": str(weights)},
                ]
            },
        )
    assert "Worker_r18" in str(info.value)
    assert "cannot load weights from /models/r18.pth" in str(info.value)


@pytest.mark.parametrize(
    ("models", "num_cpus"),
    [
        ([{"id": "efficientnet_lite0"}], 1.0),  # `--num-cpus 1`: the shipped config asks 0.25 + 1.5 CPUs
        ([{"id": "efficientnet_lite0"}, {"id": "r18", "name": "resnet18", "random_init": True}], 2.0),
    ],
    ids=["num-cpus-1", "second-model-on-2-cpus"],
)
def test_replicas_that_cannot_fit_the_private_clusters_cpus_are_refused_before_ray_starts(
    models: list[dict[str, object]], num_cpus: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local cluster has exactly ``num_cpus`` and never grows, yet Serve waits for resources forever:
    `python -m ierf.serving serve --num-cpus 1`, or a second model in `models` (its Worker_<id> takes Serve's
    default 1 CPU beside the shipped 0.25 + 1.5) on 2 cores, hung in serve.run with no output, the only hint
    ("taken more than 30s to be scheduled") in the controller's log; `make run` then gave up after its start
    timeout, leaving the process running."""
    from ierf.serving.local import free_port, load_serve_config, start_service

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("Ray must not start for replicas that cannot be scheduled")

    monkeypatch.setattr(local, "_init_ray", no_ray)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)cpu"):
        start_service(
            load_serve_config(),
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            redis_url="",
            num_cpus=num_cpus,
            args_overrides={"models": models},
        )


def test_serve_forever_stops_the_service_when_its_ready_file_cannot_be_written(
    tmp_path: Path, no_cluster: list[str]
) -> None:
    """`--ready-file run/x/ready` in a directory that does not exist: the file was written outside the
    try/finally, so after a full start the command died with a FileNotFoundError traceback (exit 1) without
    stopping the service: the cluster's directory stayed in /tmp and --keep-logs copied nothing."""
    from ierf.serving.local import RunningService, serve_forever

    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    service = RunningService(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.suppress(OSError):
            serve_forever(service, str(tmp_path / "missing" / "ready"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert no_cluster == ["serve.shutdown", "ray.shutdown"] and not temp_dir.exists()  # stop() ran


def test_sigterm_while_the_service_starts_removes_the_clusters_directory(tmp_path: Path) -> None:
    """`make stop` (SIGTERM) while `python -m ierf.serving serve` is still starting (a slow start, or one
    waiting on resources): only serve_forever handled SIGTERM, so the process died by the signal and left its
    /tmp/ierf-ray-* directory (and, for a while, the cluster's actors) behind. Ctrl-C during the start is
    cleaned up (KeyboardInterrupt reaches start_service's handler); SIGTERM should be too."""
    import subprocess
    import sys

    from ierf.serving.local import free_port

    made = tmp_path / "made"
    script = f"""
import os, signal, sys, tempfile, time
from ierf.serving import local
from ierf.serving.__main__ import main
real_mkdtemp = tempfile.mkdtemp
def mkdtemp(*args, **kwargs):
    path = real_mkdtemp(*args, **kwargs)
    open({str(made)!r}, "w").write(path)
    return path
local.tempfile.mkdtemp = mkdtemp
def slow_start(*args, **kwargs):  # Ray starting: `make stop` arrives now
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(20)
    raise AssertionError("SIGTERM was not acted on")
local._init_ray = slow_start
sys.exit(main(["serve", "--grpc-port", "{free_port()}", "--http-port", "{free_port()}",
               "--metrics-port", "{free_port()}", "--redis-url", ""]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    temp_dir = made.read_text()
    try:
        assert "SIGTERM was not acted on" not in done.stderr
        assert not os.path.exists(temp_dir), f"left behind: {temp_dir} (exit status {done.returncode})"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("applications:", "applications: [\n", "line"),  # a YAML syntax error: the position, no traceback
        ("      - name: Ingress", "      - nme: Ingress", "name"),  # a deployments entry without its name
        ("{num_cpus: 0.25}", '{num_cpus: "0.25"}', "Ingress"),  # Ray's TypeError, uncaught
        ("num_replicas: 1", "num_replicas: 0", "Ingress"),  # "num_replicas is expected to larger than 0"
        ("port: 9000", "port: nine", "grpc_options.port"),  # "invalid literal for int() with base 10: 'nine'"
    ],
    ids=["yaml-syntax", "deployment-without-name", "num-cpus-string", "num-replicas-0", "grpc-port-string"],
)
def test_python_dash_m_serving_names_the_mistake_in_a_config_file(
    old: str, new: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mistakes in the Serve config file outside ``args`` ended in a Python traceback (exit 1) or in one line
    naming neither the key nor the deployment; ``args`` mistakes name the key (README: Configuration)."""
    from ierf.serving.__main__ import main
    from ierf.serving.local import DEFAULT_CONFIG

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("Ray must not start on a bad config")

    monkeypatch.setattr(local, "_init_ray", no_ray)
    shipped = DEFAULT_CONFIG.read_text()
    assert old in shipped
    config = tmp_path / "serve.yaml"
    config.write_text(shipped.replace(old, new, 1))
    args = ["serve", "--config", str(config), "--http-port", str(local.free_port())]
    args += ["--metrics-port", str(local.free_port()), "--redis-url", ""]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ierf.serving: error:") and named in err and "Traceback" not in err


def test_a_malformed_grpc_message_size_variable_is_named() -> None:
    """``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=40MiB`` stopped the start with "invalid literal for int() with base
    10: '40MiB'", naming neither the variable nor what it should hold."""
    with pytest.raises(ValueError, match=GRPC_MAX_MESSAGE_ENV):
        grpc_max_message_bytes(32 * 2**20, {GRPC_MAX_MESSAGE_ENV: "40MiB"})


def _deployments(overrides: dict[str, dict[str, object]], models: list[object] | None = None) -> dict[str, object]:
    from ierf.serving.app import configured_deployments
    from ierf.serving.settings import ServiceConfig

    return configured_deployments(ServiceConfig.from_args({"models": models} if models else {}), overrides)


def test_the_replica_check_counts_gpus_initial_replicas_and_one_node() -> None:
    """What Serve waits on forever on one fixed node: GPUs the host lacks, autoscaling's initial replicas (not
    only min_replicas), and more replicas than max_replicas_per_node lets one node hold."""
    from ierf.serving.local import check_replicas_fit

    worker = "Worker_efficientnet_lite0"
    gpu = {worker: {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}}
    with pytest.raises(ValueError, match=r"ask for 1 GPU \(Worker_efficientnet_lite0 1 x 1\) but Ray finds 0"):
        check_replicas_fit(_deployments(gpu), num_cpus=4, num_gpus=0)
    check_replicas_fit(_deployments(gpu), num_cpus=4, num_gpus=1)
    scaled = {worker: {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 3, "max_replicas": 4}}}
    with pytest.raises(ValueError, match=r"ask for 3.25 CPUs \(Ingress 1 x 0.25, Worker_efficientnet_lite0 3 x 1\)"):
        check_replicas_fit(_deployments(scaled), num_cpus=3, num_gpus=0)
    to_zero = {worker: {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}}}
    check_replicas_fit(_deployments(to_zero), num_cpus=0.25, num_gpus=0)  # starts without a worker replica
    spread = {"Ingress": {"num_replicas": 2, "max_replicas_per_node": 1}}
    with pytest.raises(ValueError, match=r"'Ingress' starts 2 replicas but max_replicas_per_node is 1"):
        check_replicas_fit(_deployments(spread), num_cpus=8, num_gpus=0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"http_options": {"port": "8000"}}, r"http_options.port must be a port number"),
        ({"http_options": {"port": True}}, r"http_options.port must be a port number"),
        ({"grpc_options": {"request_timeout_s": "300s"}}, r"^grpc_options: request_timeout_s: .*'300s'"),
        ({"deployments": [{"name": "Ingress"}, {"name": "Ingress"}]}, r"'Ingress' is listed twice"),
        ({"deployments": [{"name": "Ingress", "max_ongoing_requests": "x"}]}, r"^deployment 'Ingress': max_ongoing"),
    ],
    ids=["http-port-string", "http-port-bool", "grpc-timeout-string", "deployment-twice", "pydantic-error-in-one-line"],
)
def test_start_service_names_more_config_mistakes_before_ray_starts(
    change: dict[str, object], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ierf.serving.local import free_port, load_serve_config, start_service

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("Ray must not start on a bad config")

    monkeypatch.setattr(local, "_init_ray", no_ray)
    config = load_serve_config()
    if "deployments" in change:
        config["applications"][0]["deployments"] = change["deployments"]
    else:
        config.update(change)
    with pytest.raises(ValueError, match=named) as info:
        start_service(config, metrics_port=free_port(), redis_url="")
    assert "\n" not in str(info.value)


def test_a_ready_file_that_cannot_be_written_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ierf.serving.__main__ import main

    def no_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may start")

    monkeypatch.setattr("ierf.serving.__main__.start_service", no_start)
    missing = tmp_path / "run" / "ready"
    assert main(["serve", "--ready-file", str(missing)]) == 2
    assert (
        capsys.readouterr().err
        == f"ierf.serving: error: --ready-file {missing}: directory {missing.parent} does not exist\n"
    )


def test_a_sigterm_while_ray_starts_is_acted_on_once_ray_init_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init sets a SIGTERM handler that exits at once, also halfway through starting the node: ray.shutdown()
    then did not know that node, and its dashboard agent stayed up on the metrics port. The signal now waits
    until ray.init has returned, when the whole node can be shut down."""
    import ray
    import ray._private.utils

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
    steps: list[str] = []

    def fake_init(**kwargs: object) -> None:  # what ray.init does with signals, and no cluster
        ray._private.utils.set_sigterm_handler(lambda signum, frame: steps.append("Ray's handler"))
        os.kill(os.getpid(), signal.SIGTERM)
        steps.append("node started")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    try:
        local.stop_on_sigterm()
        with pytest.raises(local.Terminated):
            local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "127.0.0.1")
        assert steps == ["node started"]
        os.kill(os.getpid(), signal.SIGTERM)  # a second one, while the cleanup runs: ignored
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_the_replica_check_takes_zero_cpus_and_a_full_node_as_they_are() -> None:
    """Serve fills in one CPU only where ``ray_actor_options`` leave ``num_cpus`` out: a worker that asks for
    0 CPUs asks for none (guards against ``num_cpus or 1``). ``max_replicas_per_node`` equal to the replica
    count fits one node (guards against ``>=``). Both were refused before Ray started, on a config that runs."""
    from ierf.serving.local import check_replicas_fit

    worker = "Worker_efficientnet_lite0"
    check_replicas_fit(_deployments({worker: {"ray_actor_options": {"num_cpus": 0}}}), num_cpus=0.25, num_gpus=0)
    full_node = {"Ingress": {"num_replicas": 2, "max_replicas_per_node": 2}}
    check_replicas_fit(_deployments(full_node), num_cpus=8, num_gpus=0)


def test_a_yaml_mistake_names_the_file_line_and_column_counted_from_one(tmp_path: Path) -> None:
    """An editor shows line and column from 1: guards against printing PyYAML's 0-based mark."""
    from ierf.serving.local import load_serve_config

    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - name: ierf\n    route_prefix: a: b\n")
    with pytest.raises(ValueError) as info:
        load_serve_config(config)
    assert str(info.value) == f"{config}: not valid YAML: mapping values are not allowed here at line 3, column 20"


def test_without_num_cpus_the_replica_check_counts_the_containers_cpus_not_the_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``os.cpu_count()`` is the host's: under ``docker run --cpus=1.5`` on a many-core host the local cluster was
    told it had every core, and took configs its container could not run. Ray's own count reads the cgroup."""
    import ray._private.utils as ray_utils
    from ierf.serving.local import check_replicas_fit, host_cpus

    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda **_: 1.5)
    assert host_cpus() == 1.5
    worker = "Worker_efficientnet_lite0"
    with pytest.raises(ValueError, match=r"the local cluster has 1.5 \(this container's CPUs"):
        check_replicas_fit(_deployments({worker: {"num_replicas": 2}}), num_cpus=None)


def test_without_num_cpus_the_private_cluster_starts_with_the_containers_cpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The replica check and the cluster itself must count the same CPUs: ``ray.init`` given the host's
    ``os.cpu_count()`` would let Serve place replicas the container's quota cannot run."""
    import ray
    import ray._private.utils as ray_utils
    from ierf.serving import local

    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda **_: 1.5)
    seen: dict[str, object] = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    local._init_ray(None, 100_000_000, str(tmp_path), 0)
    assert seen["num_cpus"] == 1.5
    local._init_ray(3, 100_000_000, str(tmp_path), 0)
    assert seen["num_cpus"] == 3


def test_free_ports_come_from_outside_the_ranges_ray_and_the_os_hand_out() -> None:
    """Ports for the proxy and metrics are picked before Ray starts; one from the kernel's ephemeral range could
    be taken by one of Ray's own sockets before the proxy binds it (a start failed so). Each pick is free and in
    20000-32767; a taken one is skipped."""
    import socket

    from ierf.serving.local import FREE_PORT_RANGE, free_port

    low, high = FREE_PORT_RANGE
    assert (low, high) == (20000, 32768)  # Linux's default ephemeral range starts at 32768
    held = []
    try:
        for _ in range(20):
            port = free_port()
            assert low <= port < high
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))  # free indeed; held, so later picks must skip it
            held.append(sock)
        assert len({s.getsockname()[1] for s in held}) == 20
    finally:
        for sock in held:
            sock.close()

"""How ``ierf.serving.local`` sets Ray up before starting it (no cluster is started here)."""

from __future__ import annotations

import os
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

    def record(config: object, overrides: object = None) -> None:
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


def test_serve_forever_removes_its_ready_file_and_stops_on_sigterm(tmp_path: Path, no_cluster: list[str]) -> None:
    """`make run` waits for the ready file and `make stop` sends SIGTERM: a ready file left behind would
    make the next `make run` report a dead service as ready."""
    import signal
    import threading
    import time

    from ierf.serving.local import RunningService, serve_forever

    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    ready = tmp_path / "ready"
    service = RunningService(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    seen: list[str] = []

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
    assert seen == ["127.0.0.1:9123\n"]
    assert not ready.exists()
    assert no_cluster == ["serve.shutdown", "ray.shutdown"] and not temp_dir.exists()  # stop() ran


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

"""Mutation round 30 on ``ierf.serving.local``, ``ierf.serving.__main__`` and ``ierf.serving.app``.

Each test fails on a plausible slip that the suite let through: the local runner ignoring ``http_host``, the
config's application name, route prefix or servicer list, tripping over a config without a proxy timeout, or
forgetting its default ports; an interrupted start waiting on Serve's graceful shutdown; stop() no longer
pruning kept log copies (or keeping another number of them), failing to copy again on a second stop, or a
symlink taking a copy's place; a failed start no longer naming where the replica logs were kept; Redis started
on every interface, without protected mode or LRU eviction, on port 0, taken as up when anything answers, or
its directory and PID left behind; the weights check not expanding ``~`` or taking a directory; an HTTP port
held on another loopback address refused as if it were gRPC's; the everywhere-bind check counting TIME_WAIT
leftovers; port 65535 refused; malformed ``deployments`` entries ending in the wrong message or a traceback;
failed deployments' reasons cut, unhealthy ones dropped, empty ones listed; a second stop_on_sigterm epoch
deaf to SIGTERM, or one SIGTERM acted on twice; ray.init started with the dashboard, driver logs or without the
system config; the ready file staged outside its directory, or ``--ready-file ''`` taken for a file; SIGINT not
stopping serve_forever; ``python -m ierf.serving`` dropping an option on the way to start_service, its exit
statuses for SIGTERM/SIGINT, a weights or port refusal as a traceback, a directory as ready file, or a
keep-logs file; and the app builder refusing
options Serve takes, naming neither the architecture a model asks for nor a pydantic error's message, or passing
on a multi-line Serve error as it came.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ierf.serving import local
from ierf.serving.local import KEPT_MARK, RunningService, free_port, load_serve_config, start_service


class _Recorded(Exception):
    """Raised by a recording stand-in to end a start once what it records has been seen."""


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve's and Ray's shutdown as no-ops that record their calls, in a process that reads as running Ray
    (as in test_local_start): no cluster is started, and a live test cluster is not touched."""
    import ray
    from ray import serve

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    return calls


@pytest.fixture
def recorded_start(monkeypatch: pytest.MonkeyPatch, no_cluster: list[str]) -> dict[str, Any]:
    """start_service with Ray's start and Serve's start/run recording what they were given (no cluster)."""
    import ray
    from ray import serve

    seen: dict[str, Any] = {"calls": no_cluster}

    def init_ray(num_cpus: object, object_store_bytes: int, temp_dir: str, metrics_port: int, node_ip: str) -> str:
        seen["node_ip"] = node_ip
        return node_ip

    monkeypatch.setattr(local, "_init_ray", init_ray)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: seen["node_ip"])
    monkeypatch.setattr(serve, "start", lambda **kwargs: seen.update(start=kwargs))
    monkeypatch.setattr(serve, "run", lambda application, **kwargs: seen.update(run=kwargs))
    return seen


def _ports() -> dict[str, int]:
    return {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}


# ------------------------------------------------------------------------------ what start_service passes on
def test_start_passes_the_http_host_application_name_route_and_servicers_it_was_given(
    recorded_start: dict[str, Any], tmp_path: Path
) -> None:
    """L48, L50, L52, L55, L56: ``--http-host`` wins over the file's host (and picks the node address), the
    config's application name, route prefix and servicer list reach Serve, and a config without a proxy timeout
    (Serve's default: none) is not compared with the ingress's."""
    config = load_serve_config()
    app = config["applications"][0]
    app["name"], app["route_prefix"] = "explain", "/explain"
    servicers = ["ierf.serving.protocol.add_explain_service"]
    config["grpc_options"] = {"grpc_servicer_functions": servicers}  # no request_timeout_s
    service = start_service(config, http_host="192.0.2.7", redis_url="", num_cpus=8, **_ports())
    try:
        assert recorded_start["node_ip"] == service.node_ip == "192.0.2.7"
        assert recorded_start["start"]["http_options"]["host"] == "192.0.2.7"
        grpc_options = recorded_start["start"]["grpc_options"]
        assert list(grpc_options.grpc_servicer_functions) == servicers and grpc_options.request_timeout_s is None
        assert recorded_start["run"] == {"name": "explain", "route_prefix": "/explain"}
    finally:
        service.stop()
    assert not os.path.exists(service.temp_dir)


def test_the_healthz_address_is_where_the_config_files_http_host_listens(
    recorded_start: dict[str, Any], tmp_path: Path
) -> None:
    """Noticed in round 30: `python -m ierf.serving serve` printed ``http://127.0.0.1:…/-/healthz`` for a config
    file whose ``http_options.host`` names one address (nothing listens on loopback then), and an IPv6
    ``--http-host`` without brackets. The address is the one Serve was given; a wildcard is reached on loopback."""
    config = load_serve_config()
    config.setdefault("http_options", {})["host"] = "192.0.2.7"
    service = start_service(config, redis_url="", num_cpus=8, **_ports())
    try:
        assert recorded_start["start"]["http_options"]["host"] == "192.0.2.7"
        assert service.healthz_url == f"http://192.0.2.7:{service.http_port}/-/healthz"
    finally:
        service.stop()
    expected = {
        "127.0.0.1": "127.0.0.1",
        "0.0.0.0": "127.0.0.1",
        "::": "127.0.0.1",
        "[::]": "127.0.0.1",
        "": "127.0.0.1",
        "::1": "[::1]",
        "[::1]": "[::1]",
        "2001:db8::5": "[2001:db8::5]",
        "localhost": "localhost",
    }
    for bound, shown in expected.items():
        probe = RunningService(9000, 8123, 8080, str(tmp_path), owns_temp_dir=False, http_host=bound)
        assert probe.healthz_url == f"http://{shown}:8123/-/healthz", bound


def test_the_printed_healthz_line_is_the_services_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The banner's healthz line comes from the running service, not from the ``--http-host`` flag alone."""
    from ierf.serving import __main__ as entry

    service = RunningService(9000, 8123, 8080, str(tmp_path), owns_temp_dir=False, http_host="2001:db8::5")
    monkeypatch.setattr(entry, "start_service", lambda config, **kwargs: service)
    monkeypatch.setattr(entry, "serve_forever", lambda running, ready_file: None)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        assert entry.main(["serve"]) == 0
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert "healthz   http://[2001:db8::5]:8123/-/healthz\n" in capsys.readouterr().out


def test_without_ports_in_the_config_grpc_takes_9000_and_http_8000(monkeypatch: pytest.MonkeyPatch) -> None:
    """L46, L47: README's defaults, for a config file that names no ports (the ports are recorded at the
    port check, before anything binds them, so ports in use on this machine do not matter)."""
    checked: list[dict[str, int]] = []

    def record(ports: dict[str, int], bound_everywhere: set[str]) -> None:
        checked.append(dict(ports))
        raise _Recorded

    monkeypatch.setattr(local, "_check_ports", record)
    config = load_serve_config()
    config.pop("grpc_options", None)
    config.pop("http_options", None)
    metrics = free_port()
    with pytest.raises(_Recorded):
        start_service(config, metrics_port=metrics, redis_url="", num_cpus=8)
    assert checked == [{"gRPC": 9000, "HTTP": 8000, "metrics": metrics}]


def test_an_interrupted_start_skips_serves_graceful_shutdown(
    recorded_start: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """L29, L59: Ctrl-C or SIGTERM while Serve deploys: nothing serves yet, and Serve's shutdown waits up to
    30 s for replicas still starting; only Ray is shut down (its processes all end with it)."""
    from ray import serve

    def interrupted(application: object, **kwargs: object) -> None:
        raise local.Terminated

    monkeypatch.setattr(serve, "run", interrupted)
    with pytest.raises(local.Terminated):
        start_service(load_serve_config(), redis_url="", num_cpus=8, **_ports())
    assert recorded_start["calls"] == ["ray.shutdown"]


def test_stop_graceful_false_shuts_ray_down_without_serve(tmp_path: Path, no_cluster: list[str]) -> None:
    """L29: ``stop(graceful=False)`` is the fast stop; ``stop()`` shuts Serve down first."""
    RunningService(9000, 8000, 8080, str(tmp_path / "a"), owns_temp_dir=False).stop(graceful=False)
    assert no_cluster == ["ray.shutdown"]
    RunningService(9000, 8000, 8080, str(tmp_path / "a"), owns_temp_dir=False).stop()
    assert no_cluster == ["ray.shutdown", "serve.shutdown", "ray.shutdown"]


def _cluster_dir(tmp_path: Path, session: str = "session_2026-11-29_07-00-00_123456_42") -> Path:
    """A Ray temp dir as a started cluster leaves it: session_latest -> the session, with Serve's logs."""
    temp_dir = tmp_path / "ierf-ray-x"
    logs = temp_dir / session / "logs" / "serve"
    logs.mkdir(parents=True)
    (logs / "replica_ierf_Worker.log").write_text("worker ready\n")
    (temp_dir / "session_latest").symlink_to(temp_dir / session)
    return temp_dir


def test_stop_prunes_kept_copies_to_the_newest_ten(tmp_path: Path, no_cluster: list[str]) -> None:
    """L35, L42: every `make stop` adds a copy; stop() itself prunes them to the newest 10 (the new one is
    the newest), not only when prune_kept_sessions is called by hand."""
    kept = tmp_path / "kept"
    older = [f"session_2026-11-{day:02d}_07-00-00_123456_{100 + day}" for day in range(1, 13)]
    for name in older:
        (kept / name).mkdir(parents=True)
        (kept / name / KEPT_MARK).write_text("")
    temp_dir = _cluster_dir(tmp_path)
    service = RunningService(9000, 8000, 8080, str(temp_dir), keep_logs_in=str(kept))
    service.stop()
    assert service.kept_logs == str(kept / "session_2026-11-29_07-00-00_123456_42")
    assert sorted(p.name for p in kept.iterdir()) == [*older[3:], "session_2026-11-29_07-00-00_123456_42"]


def test_a_second_stop_copies_the_logs_again_into_the_same_folder(tmp_path: Path, no_cluster: list[str]) -> None:
    """L32: stop() again (the caller owns the temp dir, so its logs stay) copies what was logged since into
    the same per-session folder; refusing an existing folder kept the first copy only."""
    temp_dir = _cluster_dir(tmp_path)
    kept = tmp_path / "kept"
    service = RunningService(9000, 8000, 8080, str(temp_dir), owns_temp_dir=False, keep_logs_in=str(kept))
    service.stop()
    log = Path(service.replica_logs) / "replica_ierf_Worker.log"
    log.write_text("worker ready\nworker stopped\n")
    service.stop()
    copy = Path(str(service.kept_logs))
    assert (copy / "replica_ierf_Worker.log").read_text() == "worker ready\nworker stopped\n"


def test_a_symlink_named_like_a_session_takes_no_kept_copys_place(tmp_path: Path) -> None:
    """L38: only directories stop() made count towards the ten; a symlink (to a marked copy elsewhere) that
    counted pushed the oldest real copy out, and is not itself removed."""
    from ierf.serving.local import prune_kept_sessions

    names = [f"session_2026-11-{day:02d}_07-00-00_123456_{100 + day}" for day in range(1, 11)]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / KEPT_MARK).write_text("")
    link = tmp_path / "session_2026-12-01_07-00-00_123456_999"
    link.symlink_to(tmp_path / names[-1])
    prune_kept_sessions(str(tmp_path), keep=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, link.name])


def test_a_failed_start_names_where_the_replica_logs_were_kept(
    recorded_start: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L34, L62: with --keep-logs, a deployment that failed to start is reported with its reason and the
    folder its replica logs were copied into (the cluster's own directory is gone by then)."""
    from ray import serve

    from serving.test_local_start import _failed_deploy_status

    def failed_run(application: object, **kwargs: object) -> None:
        raise RuntimeError("Deploying application ierf failed: Failed to update the deployments ['Ingress'].")

    monkeypatch.setattr(serve, "run", failed_run)
    monkeypatch.setattr(serve, "status", lambda: _failed_deploy_status("Ingress", "ValueError: broken"))
    temp_dir = _cluster_dir(tmp_path)
    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError) as info:
        start_service(
            load_serve_config(), redis_url="", num_cpus=8, temp_dir=str(temp_dir), keep_logs=str(kept), **_ports()
        )
    copy = kept / "session_2026-11-29_07-00-00_123456_42"
    assert str(info.value).endswith(f"Ingress: ValueError: broken (replica logs kept in {copy})")
    assert (copy / "replica_ierf_Worker.log").read_text() == "worker ready\n"


# ------------------------------------------------------------------------------------------------- Redis
def test_a_throw_away_redis_listens_on_loopback_only_with_lru_eviction_and_leaves_nothing(tmp_path: Path) -> None:
    """L15, L16, L17, L18, L24, L25: RedisProcess() picks a free port (the default port 0 is "pick one"),
    binds 127.0.0.1 only in protected mode, evicts by LRU at maxmemory (a cache, not a store), and cleanup()
    stops it (no PID kept) and removes its directory."""
    import shutil

    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = local.RedisProcess(maxmemory="16mb")
    try:
        server.start(timeout_s=20.0)
        assert server.port > 0 and server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            keys = ("bind", "protected-mode", "maxmemory-policy", "save", "appendonly")
            settings = {key: client.config_get(key)[key] for key in keys}
        finally:
            client.close()
        assert settings == {
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "maxmemory-policy": "allkeys-lru",
            "save": "",
            "appendonly": "no",
        }
        workdir, process = server.workdir, server.process
        assert workdir is not None and workdir.is_dir() and process is not None
    finally:
        server.cleanup()
    assert process.poll() is not None and server.pid is None and not workdir.exists()


def test_a_listener_that_does_not_answer_pong_is_not_taken_for_redis(tmp_path: Path) -> None:
    """L22: start() waits for +PONG; anything else listening on the port (here a server that answers every
    connection with an error line) is not a ready Redis, and start gives up with TimeoutError."""
    fake = tmp_path / "not-redis"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import socket, sys\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "server = socket.create_server(('127.0.0.1', port))\n"
        "while True:\n"
        "    conn, _ = server.accept()\n"
        "    conn.sendall(b'-ERR not redis\\r\\n')\n"
        "    conn.close()\n"
    )
    fake.chmod(0o755)
    server = local.RedisProcess(executable=str(fake), workdir=tmp_path)
    try:
        with pytest.raises(TimeoutError, match="did not answer PING"):
            server.start(timeout_s=5.0)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- start-up checks
def test_a_weights_path_under_home_is_found_and_a_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L67, L68: the replicas expand ``~`` when they load weights, so the up-front check must too; a
    directory is not a weights file (it passed the check and failed in each replica)."""
    from ierf.serving.local import _check_weights_files
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r18.pth").write_bytes(b"weights")
    (tmp_path / "models").mkdir()

    def config(weights: str) -> ServiceConfig:
        return ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "weights": weights}]})

    _check_weights_files(config("~/r18.pth"))
    with pytest.raises(FileNotFoundError, match=r"r18: ~/models"):
        _check_weights_files(config("~/models"))


@contextlib.contextmanager
def _held_on_another_loopback_address() -> Iterator[int]:
    """A free port with a listener on 127.0.0.2 (not on 127.0.0.1); skips where that address cannot be bound."""
    port = free_port()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.2", port))
    except OSError:
        holder.close()
        pytest.skip("127.0.0.2 is not bindable here")
    with holder:
        holder.listen()
        yield port


def test_an_http_port_held_on_another_loopback_address_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """L70: only Serve's gRPC server binds every address; the HTTP proxy binds its host (127.0.0.1), so a
    port someone holds on 127.0.0.2 does not stop it (only gRPC is checked on every address)."""

    def ray_would_start(*args: object, **kwargs: object) -> str:
        raise _Recorded

    monkeypatch.setattr(local, "_init_ray", ray_would_start)
    with _held_on_another_loopback_address() as port, pytest.raises(_Recorded):
        start_service(load_serve_config(), redis_url="", num_cpus=8, **{**_ports(), "http_port": port})


@pytest.mark.parametrize(
    ("listener", "options"),
    [("metrics", {"node_ip": "192.0.2.7"}), ("HTTP", {"http_host": "0.0.0.0", "node_ip": "127.0.0.1"})],
    ids=["metrics-on-a-routable-node", "http-on-a-wildcard-host"],
)
def test_a_port_held_on_another_local_address_is_refused_for_a_listener_that_binds_them_all(
    monkeypatch: pytest.MonkeyPatch, listener: str, options: dict[str, str]
) -> None:
    """Noticed in round 30: Ray's metrics exporter binds every interface on a non-loopback node, and Serve's
    HTTP proxy does for a wildcard host; a port held on 127.0.0.2 passed the loopback probe and the start failed
    later, inside Ray or Serve. It is refused up front by name, as gRPC's is."""

    def ray_would_start(*args: object, **kwargs: object) -> str:
        raise _Recorded

    monkeypatch.setattr(local, "_init_ray", ray_would_start)
    with _held_on_another_loopback_address() as port:
        ports = {**_ports(), ("metrics_port" if listener == "metrics" else "http_port"): port}
        with pytest.raises(RuntimeError, match=f"{listener} port {port} is already in use on another local address"):
            start_service(load_serve_config(), redis_url="", num_cpus=8, **ports, **options)


def test_a_port_left_in_time_wait_counts_as_free_for_grpc() -> None:
    """L71: a service just stopped leaves its gRPC port's connections in TIME_WAIT for a minute; the gRPC
    server reuses such a port, so the check must not refuse it (``make stop && make run``)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its end (port PORT) waits in TIME_WAIT
        client.recv(1)
        client.close()
    assert not local.port_in_use(port)
    assert local._bindable_everywhere(port)


def test_the_highest_port_number_is_a_port() -> None:
    """L75: 65535 is a valid port; 65536 is not."""
    assert local._port(65535, "grpc_port") == 65535
    with pytest.raises(ValueError, match="65536"):
        local._port(65536, "grpc_port")


@pytest.mark.parametrize(
    ("deployments", "message"),
    [
        ({"Ingress": {"num_replicas": 1}}, r"applications\[0\]\.deployments must be a list of mappings"),
        (["Ingress"], r"applications\[0\]\.deployments\[0\] must be a mapping of deployment options, got 'Ingress'"),
        ([{"name": "", "num_replicas": 1}], r"applications\[0\]\.deployments\[0\] has no name"),
    ],
    ids=["mapping-not-list", "entry-not-mapping", "empty-name"],
)
def test_malformed_deployment_entries_are_named(deployments: object, message: str) -> None:
    """L76, L77, L78: each mistake in the config's ``deployments`` list is named by its place, not met later as
    an AttributeError traceback or an "unknown deployment ['']"."""
    with pytest.raises(ValueError, match=message):
        local._deployment_overrides({"deployments": deployments})


def test_choose_node_ip_edge_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    """L04, L05, L09, L11: ``localhost`` and a bracketed IPv6 loopback are loopback; an empty ``--node-ip`` is
    no choice; a host name that cannot be resolved keeps the node on loopback (not on every interface)."""
    monkeypatch.setattr(local, "routable_ip", lambda: "10.1.2.3")
    assert local.is_loopback("localhost") and local.is_loopback("[::1]") and not local.is_loopback("[fd00::7]")
    assert local.choose_node_ip("0.0.0.0", node_ip="") == "10.1.2.3"
    assert local.choose_node_ip("x" * 64) == "127.0.0.1"  # an invalid name: refused before any DNS query
    assert RunningService(9000, 8000, 8080, "/nonexistent", node_ip="localhost").metrics_urls == [
        "http://127.0.0.1:8080/metrics"
    ]


def test_an_empty_applications_list_is_not_a_serve_config(tmp_path: Path) -> None:
    """L03: ``applications: []`` deploys nothing: refused with the file named, like a file without the key."""
    config = tmp_path / "serve.yaml"
    config.write_text("applications: []\n")
    with pytest.raises(ValueError, match=r"not a Serve config file \(no 'applications'\)"):
        load_serve_config(config)


# ---------------------------------------------------------------------------------- failure reasons
def test_exception_line_keeps_a_message_of_exactly_the_limit_and_the_whole_exception() -> None:
    """L89, L90, L91: the reason is what follows the last indented frame line, all of it, not cut at exactly
    the limit; a traceback that ends on a frame line gives that line rather than nothing."""
    from ierf.serving.local import exception_line

    trace = 'Traceback (most recent call last):\n  File "w.py", line 1, in f\nValueError: bad\nmore detail\n'
    assert exception_line(trace) == "ValueError: bad more detail"
    assert exception_line('Traceback:\n  File "w.py", line 1, in f\n') == 'File "w.py", line 1, in f'
    assert exception_line("x" * 20, limit=20) == "x" * 20
    assert exception_line("x" * 21, limit=20) == "x" * 17 + "..."


def test_unhealthy_deployments_are_reported_and_ones_without_a_message_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """L87, L88: serve.status() marks a deployment whose replicas fail their health checks UNHEALTHY (also a
    reason a start fails); a failed status with no message has no reason to give."""
    from ray import serve
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
    from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

    def overview(status: DeploymentStatus, message: str) -> DeploymentStatusOverview:
        return DeploymentStatusOverview(
            status=status,
            status_trigger=DeploymentStatusTrigger.HEALTH_CHECK_FAILED,
            replica_states={},
            message=message,
        )

    status = ServeStatus(
        applications={
            "ierf": ApplicationStatusOverview(
                status=ApplicationStatus.DEPLOY_FAILED,
                message="",
                last_deployed_time_s=0.0,
                deployments={
                    "Ingress": overview(DeploymentStatus.UNHEALTHY, "RuntimeError: health check failed"),
                    "Worker_a": overview(DeploymentStatus.DEPLOY_FAILED, ""),
                },
            )
        }
    )
    monkeypatch.setattr(serve, "status", lambda: status)
    assert local.deployment_failures() == ["Ingress: RuntimeError: health check failed"]


# --------------------------------------------------------------------------------------------- signals
def _raise_pending_signal() -> None:
    """Give the interpreter a few chances to run a Python signal handler (it runs in the main thread)."""
    for _ in range(200):
        time.sleep(0.01)


def test_each_stop_on_sigterm_acts_on_one_sigterm_of_its_own() -> None:
    """L93: stop_on_sigterm() starts afresh: after one SIGTERM was acted on, a later start in the same process
    (tests, a notebook) must still be stoppable by the next one."""
    saved = signal.getsignal(signal.SIGTERM)
    try:
        for _ in range(2):
            local.stop_on_sigterm()
            with pytest.raises(local.Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                _raise_pending_signal()
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_a_sigterm_held_during_ray_init_is_acted_on_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """L95: the SIGTERM held while ray.init ran is raised once; Ray started again in the same stop_on_sigterm
    epoch (no new signal) is not interrupted by it a second time."""
    import ray

    def init_with_sigterm(**kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        _raise_pending_signal()  # held: the handler only records it

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    saved = signal.getsignal(signal.SIGTERM)
    try:
        local.stop_on_sigterm()
        monkeypatch.setattr(ray, "init", init_with_sigterm)
        with pytest.raises(local.Terminated):
            local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "127.0.0.1")
        monkeypatch.setattr(ray, "init", lambda **kwargs: None)
        try:
            assert local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "127.0.0.1") == "127.0.0.1"
        except local.Terminated:
            pytest.fail("the SIGTERM already acted on was raised again")
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_ray_init_gets_no_dashboard_no_driver_logs_and_the_system_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """L98, L99, L100: the private cluster starts without the dashboard (its port and processes), without
    echoing every replica's log to `make run`'s terminal, and with inline arguments up to 4 MiB. Ray's init
    adds the session's spilling directory to the system config it is given (the full suite showed it: a real
    start earlier in the process had changed the module's dict), so each start is given a fresh copy."""
    import ray

    seen: dict[str, object] = {}
    given: list[dict[str, object]] = []

    def init(**kwargs: Any) -> None:
        seen.update(kwargs)
        given.append(dict(kwargs["_system_config"]))
        kwargs["_system_config"]["object_spilling_config"] = '{"type": "filesystem"}'  # as Ray 2.60 does

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    for _ in range(2):
        local._init_ray(2, 80 * 2**20, "/tmp/x", 9999, "127.0.0.1")
    assert given == [{"max_direct_call_object_size": 4 * 1024 * 1024}] * 2  # no stale spilling path the 2nd time
    del seen["_system_config"]
    assert seen == {
        "address": "local",
        "num_cpus": 2,
        "include_dashboard": False,
        "object_store_memory": 80 * 2**20,
        "_temp_dir": "/tmp/x",
        "_metrics_export_port": 9999,
        "_node_ip_address": "127.0.0.1",
        "log_to_driver": False,
    }


def test_the_ready_file_is_staged_beside_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """L103: the staging file is made in the ready file's own directory, so the rename is atomic (from /tmp to
    another filesystem os.replace fails, or copies)."""
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(source: str, destination: str) -> None:
        renames.append((os.path.dirname(source), os.path.dirname(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(local.os, "replace", recording_replace)
    local.write_file_atomically(str(tmp_path / "ready"), "127.0.0.1:9000\n")
    assert renames == [(str(tmp_path), str(tmp_path))]


def _signal_when(condition: Any, signum: int) -> threading.Thread:
    """Send ``signum`` to this process once ``condition()`` holds (polled, up to 30 s)."""

    def wait_then_signal() -> None:
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _harmless_signals() -> Any:
    """SIGTERM/SIGINT ignored around the block and put back after: a signal sent late never ends pytest."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in saved:
        signal.signal(sig, lambda signum, frame: None)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_serve_forever_stops_on_sigint_too(tmp_path: Path, no_cluster: list[str]) -> None:
    """L104: Ctrl-C on `python -m ierf.serving serve` in a terminal: SIGINT stops the service the same way
    (ready file removed, Serve and Ray shut down, its directory removed), not by a KeyboardInterrupt."""
    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    ready = tmp_path / "ready"
    service = RunningService(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    with _harmless_signals():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what serve_forever must take over
        thread = _signal_when(ready.exists, signal.SIGINT)
        try:
            local.serve_forever(service, str(ready))
        except KeyboardInterrupt:
            pytest.fail("SIGINT reached serve_forever as a KeyboardInterrupt")
        finally:
            thread.join(35)
    assert not ready.exists() and not temp_dir.exists()
    assert no_cluster == ["serve.shutdown", "ray.shutdown"]


def test_an_empty_ready_file_name_means_no_ready_file(tmp_path: Path, no_cluster: list[str]) -> None:
    """L106: ``--ready-file ''`` (an unset make variable) names no file, as ``--redis-url ''`` names no Redis: the
    service serves until SIGTERM instead of failing to write a file called "" and stopping at once."""
    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    service = RunningService(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    with _harmless_signals():
        harmless = signal.getsignal(signal.SIGTERM)
        thread = _signal_when(lambda: signal.getsignal(signal.SIGTERM) is not harmless, signal.SIGTERM)
        try:
            local.serve_forever(service, "")
        finally:
            thread.join(35)
    assert no_cluster == ["serve.shutdown", "ray.shutdown"] and not temp_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- python -m ierf.serving
def test_the_command_line_reaches_start_service_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """M01, M17-M23: every option of `python -m ierf.serving serve` is passed on (a dropped one was ignored
    without a word), and the metrics port defaults to 8080 (what `make run` and the docs scrape)."""
    from ierf.serving.__main__ import main

    calls: list[dict[str, object]] = []

    def record(config: object, **kwargs: object) -> None:
        calls.append(kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr("ierf.serving.__main__.start_service", record)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["serve"]) == 2
        args = ["serve", "--grpc-port", "9100", "--http-port", "8100", "--http-host", "0.0.0.0"]
        args += ["--metrics-port", "8180", "--node-ip", "192.0.2.7", "--redis-url", ""]
        args += ["--num-cpus", "1.5", "--keep-logs", str(tmp_path / "logs")]
        assert main(args) == 2
    finally:
        signal.signal(signal.SIGTERM, saved)
    unset = dict.fromkeys(["grpc_port", "http_port", "http_host", "redis_url", "num_cpus", "node_ip", "keep_logs"])
    assert calls[0] == {**unset, "metrics_port": 8080}
    assert calls[1] == {
        "grpc_port": 9100,
        "http_port": 8100,
        "http_host": "0.0.0.0",
        "metrics_port": 8180,
        "redis_url": "",
        "num_cpus": 1.5,
        "node_ip": "192.0.2.7",
        "keep_logs": str(tmp_path / "logs"),
    }


@pytest.mark.parametrize(
    ("interrupt", "status", "said"),
    [(local.Terminated, 143, "SIGTERM while starting"), (KeyboardInterrupt, 130, "SIGINT while starting")],
    ids=["sigterm", "sigint"],
)
def test_an_interrupted_start_exits_as_the_signal_says(
    interrupt: type[BaseException],
    status: int,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """M06, M07: `make stop` during the start ends the command with 128 + 15, Ctrl-C with 128 + 2 (what a shell
    and `make` report for the signal), each named on stderr."""
    from ierf.serving.__main__ import main

    def interrupted(config: object, **kwargs: object) -> None:
        raise interrupt

    monkeypatch.setattr("ierf.serving.__main__.start_service", interrupted)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["serve"]) == status
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert capsys.readouterr().err == f"ierf.serving: {said}: stopped what had started\n"


class _InterruptedWhilePrinting(RunningService):
    """A started service whose address is asked for the moment `make stop` arrives: SIGTERM after
    start_service returned, before serve_forever took the signals over."""

    @property
    def grpc_address(self) -> str:
        raise local.Terminated


def test_a_sigterm_between_the_start_and_serve_forever_stops_the_service(
    tmp_path: Path, no_cluster: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """M10: the service had started; the command must stop it (Serve, Ray, its directory) before it exits."""
    from ierf.serving.__main__ import main

    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    service = _InterruptedWhilePrinting(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    monkeypatch.setattr("ierf.serving.__main__.start_service", lambda config, **kwargs: service)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["serve"]) == 143
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert no_cluster == ["serve.shutdown", "ray.shutdown"] and not temp_dir.exists()
    assert "SIGTERM as it started" in capsys.readouterr().err


def test_the_command_writes_the_ready_file_and_removes_it_at_stop(
    tmp_path: Path, no_cluster: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """M09: `make run` waits for --ready-file and reads the gRPC address from it; `make stop` (SIGTERM)
    removes it and stops the service, and the command exits 0."""
    from ierf.serving.__main__ import main

    temp_dir = tmp_path / "ierf-ray-x"
    temp_dir.mkdir()
    ready = tmp_path / "ready"
    service = RunningService(9123, 8000, 8080, str(temp_dir), owns_temp_dir=True)
    monkeypatch.setattr("ierf.serving.__main__.start_service", lambda config, **kwargs: service)
    seen: list[str] = []

    def ready_seen() -> bool:
        if ready.exists():
            seen.append(ready.read_text())
            return True
        return False

    with _harmless_signals():
        thread = _signal_when(ready_seen, signal.SIGTERM)
        try:
            assert main(["serve", "--ready-file", str(ready)]) == 0
        finally:
            thread.join(35)
    assert seen == ["127.0.0.1:9123\n"] and not ready.exists() and not temp_dir.exists()
    assert "gRPC      127.0.0.1:9123" in capsys.readouterr().out


def test_refusals_at_start_are_one_line_with_exit_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """M04, M05: a missing weights file (FileNotFoundError) and a taken port (RuntimeError) end the command
    with one line and status 2, as a config mistake does, not a traceback."""
    from ierf.serving.__main__ import main

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(local, "_init_ray", no_ray)
    config = tmp_path / "serve.yaml"
    shipped = local.DEFAULT_CONFIG.read_text()
    config.write_text(
        shipped.replace(
            "      models:\n", "      models:\n        - {id: mine, name: resnet18, weights: /no/w.pth}\n", 1
        )
    )
    ports = ["--http-port", str(free_port()), "--metrics-port", str(free_port()), "--redis-url", "", "--num-cpus", "8"]
    saved = signal.getsignal(signal.SIGTERM)
    try:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            grpc = str(taken.getsockname()[1])
            assert main(["serve", "--grpc-port", grpc, *ports]) == 2
            assert (
                capsys.readouterr().err
                == f"ierf.serving: error: gRPC port {grpc} on 127.0.0.1 is already in use; choose another\n"
            )
        assert main(["serve", "--config", str(config), "--grpc-port", str(free_port()), *ports]) == 2
        assert (
            capsys.readouterr().err
            == "ierf.serving: error: weights file(s) not found on this machine: mine: /no/w.pth\n"
        )
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_path_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """M11, M15, M16: a directory given as --ready-file, and a file given as --keep-logs, are refused up
    front; a --keep-logs directory that does not exist yet is fine (stop() makes it)."""
    from ierf.serving.__main__ import _path_problem

    (tmp_path / "file").write_text("")
    assert _path_problem(str(tmp_path), None) == f"--ready-file {tmp_path} is a directory; name a file"
    assert _path_problem(None, str(tmp_path / "file")) == f"--keep-logs {tmp_path / 'file'} is not a directory"
    assert _path_problem(str(tmp_path / "ready"), str(tmp_path / "new" / "logs")) is None


# ------------------------------------------------------------------------------------------------- app
def test_serve_options_a_config_may_set_are_taken() -> None:
    """A02, A03, A06: ``user_config`` and ``health_check_timeout_s`` are Serve options a config may set per
    deployment; options that are not a mapping are refused with the deployment named."""
    from ierf.serving.app import configured_deployments
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({})
    made = configured_deployments(config, {"Ingress": {"health_check_timeout_s": 7, "user_config": {"a": 1}}})
    assert made["Ingress"]._deployment_config.health_check_timeout_s == 7
    assert made["Ingress"]._deployment_config.user_config == {"a": 1}
    with pytest.raises(ValueError, match=r"deployment 'Ingress': options must be a mapping, got 3"):
        configured_deployments(config, {"Ingress": 3})


def test_an_unknown_architecture_names_the_model_and_its_name() -> None:
    """A16: a model whose ``name`` differs from its id is named by both (the id alone hides the typo)."""
    from ierf.serving.app import configured_deployments
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": "mine", "name": "resnet81"}], "default_model": "mine"})
    with pytest.raises(ValueError, match=r"^model 'mine' \(name 'resnet81'\): unknown architecture"):
        configured_deployments(config)


def test_first_error_of_a_model_wide_pydantic_error_is_its_message() -> None:
    """A13, A14: a pydantic error with no field location is its message alone, not ": message (got ...)"; any
    other error (Serve's own TypeError or ValueError) is put on one line, whatever its line breaks."""
    import pydantic
    from ierf.serving.app import first_error

    class Options(pydantic.BaseModel):
        low: int
        high: int

        @pydantic.model_validator(mode="after")
        def ordered(self) -> Options:
            if self.low > self.high:
                raise ValueError("low is above high")
            return self

    with pytest.raises(pydantic.ValidationError) as info:
        Options(low=2, high=1)
    assert first_error(info.value) == "Value error, low is above high"
    assert first_error(ValueError("num_replicas is expected\n  to be larger than 0")) == (
        "num_replicas is expected to be larger than 0"
    )

"""Run the service on this machine: a private Ray cluster + Serve (gRPC) and, optionally, Redis.

Used by ``make run`` (through ``python -m ierf.serving``), by the integration tests and by the
latency benchmark, so all three exercise the same start-up path. With the default loopback HTTP host
everything binds 127.0.0.1 except Serve's gRPC proxy and each replica's internal gRPC port, which Ray
2.60 always binds on all interfaces (no host option exists). With a non-loopback HTTP host
(``--http-host 0.0.0.0`` in a container) the Ray node takes this host's routable address, and Ray then
binds its metrics exporter, and its own ports (GCS, raylet, agent, workers), on every interface too:
publish only the ports you mean to expose.

The Ray cluster is private to the process that starts it (``address="local"``): stopping it never
touches another Ray instance on the host (``ray stop`` would kill them all).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ierf.serving.settings import (  # re-exported: the runner's callers and tests read them here
    GRPC_MAX_MESSAGE_ENV,
    PROCESS_ENV,
    grpc_max_message_bytes,
)

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "local.yaml"
# Images (<= 4 MiB decoded) and maps then travel inline in the ingress->worker RPC instead of through
# the object store: measured on 2 cores, a 150 KB argument hop fell from ~10 ms to ~5 ms. On clusters
# set the same through the environment: RAY_max_direct_call_object_size=4194304.
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 4 * 1024 * 1024}
APP_NAME = "ierf"
LOOPBACK = "127.0.0.1"
# On Linux, Ray swaps a loopback node IP for this host's routable address (ray/_private/services.py:
# resolve_ip_for_localhost -> get_node_ip_address) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0, the
# switch that keeps macOS/Windows nodes on 127.0.0.1. On the routable address the GCS, raylet, agent,
# workers and the metrics exporter listen on every interface, so the loopback start sets it to 0.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# Where free_port looks: below Linux's ephemeral range (32768-60999), from which the OS hands a port to every
# socket bound to port 0 (Ray's GCS, raylet, workers and their gRPC servers among them), and above Ray's worker
# port range (10002-19999 for `ray start`). A port the OS picked from the ephemeral range could be taken by one
# of Ray's processes between the pick and the proxy's bind: a benchmark start failed once in a dozen with
# "Failed to bind to address '127.0.0.1:35467'".
FREE_PORT_RANGE = (20000, 32768)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, from :data:`FREE_PORT_RANGE` (else one the OS picks)."""
    import random

    pick = random.SystemRandom()
    for _ in range(64):
        port = pick.randrange(*FREE_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken: another one
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def load_serve_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> dict[str, Any]:
    """A Serve config file (the format ``serve deploy`` and KubeRay's serveConfigV2 take). A YAML mistake
    is a ValueError naming the file and the position, as other config mistakes are, not a parser traceback."""
    import yaml

    with open(path) as stream:
        try:
            config = yaml.safe_load(stream)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML: {problem}{where}") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: not a Serve config file (no 'applications')")
    return config


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def routable_ip() -> str | None:
    """The IPv4 address this host reaches other hosts from (a container's own address), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("8.8.8.8", 80))  # UDP: picks the route's source address, sends nothing
        address = sock.getsockname()[0]
        if not ipaddress.ip_address(address).is_loopback:
            return str(address)
    with contextlib.suppress(OSError, ValueError):
        address = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface ("", 0.0.0.0, ``::``, ``[::]``)."""
    host = host.strip().strip("[]")
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


def _url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def choose_node_ip(http_host: str, node_ip: str | None = None) -> str:
    """The Ray node's IP address for a service whose HTTP proxy binds ``http_host``.

    Ray's reporter agent binds the Prometheus exporter to 127.0.0.1 when the node IP is a loopback
    address and to every interface otherwise (``ray/dashboard/modules/reporter/reporter_agent.py``;
    its other servers follow the same rule), so: a loopback host (the default) keeps the node on
    127.0.0.1; a wildcard host (0.0.0.0, ``::``) gives it this host's routable address (127.0.0.1 when
    there is none); a specific address is used as it is. ``node_ip`` overrides the choice.
    """
    if node_ip:
        return node_ip
    host = http_host.strip().strip("[]")
    if is_loopback(host):
        return LOOPBACK
    if is_wildcard(host):
        return routable_ip() or LOOPBACK
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: whatever it resolves to
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return LOOPBACK
    if address.is_loopback:
        return LOOPBACK
    if address.is_unspecified:
        return routable_ip() or LOOPBACK
    return str(address)


# ------------------------------------------------------------------------------------------ Redis
@dataclass
class RedisProcess:
    """A throw-away redis-server on 127.0.0.1: no persistence, ``maxmemory`` with ``allkeys-lru``.

    ``stop()``/``start()`` keep the port, so tests can take Redis away mid-run and bring it back.
    """

    port: int = 0
    maxmemory: str = "256mb"
    executable: str = "redis-server"
    workdir: Path | None = None  # a folder given here is the caller's: cleanup() leaves it
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_workdir: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        binary = shutil.which(self.executable)
        if binary is None:
            raise FileNotFoundError(
                f"{self.executable} not found on PATH; install Debian's redis-server (apt-get install -y redis-server)"
            )
        if not self.port:
            self.port = free_port()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="ierf-redis-"))
            self._owns_workdir = True
        self.process = subprocess.Popen(
            [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--maxmemory", self.maxmemory,
                "--maxmemory-policy", "allkeys-lru",
                "--dir", str(self.workdir),
                "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode} (port {self.port} taken?)")
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer PING on port {self.port} within {timeout_s} s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server this object started (by PID), waiting for it to exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self.process = None

    def cleanup(self) -> None:
        """Stop the server and remove the folder ``start()`` made for it (never one the caller passed in)."""
        self.stop()
        if self.workdir is not None and self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir, self._owns_workdir = None, False


# ---------------------------------------------------------------------------------- Ray + Serve
@dataclass
class RunningService:
    grpc_port: int
    http_port: int
    metrics_port: int
    temp_dir: str
    owns_temp_dir: bool = True
    node_ip: str = LOOPBACK  # when not loopback, Ray's metrics exporter listens on every interface
    keep_logs_in: str | None = None  # stop() copies the replicas' logs into <this>/<session> first
    kept_logs: str | None = field(default=None, init=False)  # where stop() copied them
    http_host: str = LOOPBACK  # what Serve's HTTP proxy binds (the flag's, else the config file's)

    @property
    def replica_logs(self) -> str:
        """Serve's logs (controller, proxy, each replica: ready lines, warnings, access logs)."""
        return os.path.join(self.temp_dir, "session_latest", "logs", "serve")

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def healthz_url(self) -> str:
        """Serve's HTTP health route where this host reaches it: a wildcard bind is reached on loopback, a
        specific address (the config file may name one) on that address, an IPv6 one in brackets."""
        host = LOOPBACK if is_wildcard(self.http_host) else self.http_host.strip().strip("[]")
        return f"http://{_url_host(host)}:{self.http_port}/-/healthz"

    @property
    def metrics_urls(self) -> list[str]:
        """Where Prometheus can scrape: loopback, and the node's address when it is not loopback."""
        urls = [self.metrics_url]
        if not is_loopback(self.node_ip):
            urls.append(f"http://{_url_host(self.node_ip)}:{self.metrics_port}/metrics")
        return urls

    def stop(self, graceful: bool = True) -> None:
        """Shut Serve and the private Ray cluster down; bounded by Ray's own shutdown timeouts. Again, or
        once Ray is down, only the files are handled: with no Ray in this process ``serve.shutdown()`` runs a
        bare ``ray.init()``, which starts a throw-away cluster (~5 s) or attaches to one already running on
        the host (``ray start``, ``RAY_ADDRESS``) and would shut down its Serve applications.
        ``graceful=False`` skips Serve's shutdown, which waits up to 30 s for replicas still starting (a start
        interrupted by SIGTERM took 40 s to stop): ``ray.shutdown()`` ends every process of the cluster anyway."""
        import ray
        from ray import serve

        if ray.is_initialized():
            if graceful:
                with contextlib.suppress(Exception):
                    serve.shutdown()
            ray.shutdown()
        if self.keep_logs_in and os.path.isdir(self.replica_logs):
            # one folder per run (session_<date>_<pid>), beside what the directory holds; only older marked
            # copies are pruned
            session = os.path.basename(os.path.realpath(os.path.join(self.temp_dir, "session_latest")))
            with contextlib.suppress(OSError):
                copy = os.path.join(self.keep_logs_in, session)
                shutil.copytree(self.replica_logs, copy, dirs_exist_ok=True)
                with open(os.path.join(copy, KEPT_MARK), "w") as mark:
                    mark.write("copied by ierf at stop; pruned beyond the newest copies\n")
                self.kept_logs = copy
            prune_kept_sessions(self.keep_logs_in)
        if self.owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


# Copies of Ray's session folders (session_<date>_<time>_<pid>: names sort by start time) that stop()
# made, each marked: a Ray temp dir given as the target holds live sessions of that name, never marked.
_SESSION_DIR = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_?\d*")
KEPT_MARK = ".ierf-kept-logs"
KEPT_SESSIONS = 10


def prune_kept_sessions(directory: str, keep: int = KEPT_SESSIONS) -> None:
    """Only the newest ``keep`` log copies stay (a busy service's logs run to ~10 MB an hour, and every
    stop added one); nothing but the copies stop() made and marked is touched."""
    with contextlib.suppress(OSError):
        sessions = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir(follow_symlinks=False)
            and _SESSION_DIR.fullmatch(entry.name)
            and os.path.isfile(os.path.join(entry.path, KEPT_MARK))
        )
        for name in sessions[: max(0, len(sessions) - keep)]:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def start_service(
    serve_config: dict[str, Any] | None = None,
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    http_host: str | None = None,
    metrics_port: int | None = None,
    redis_url: str | None = None,
    args_overrides: dict[str, Any] | None = None,
    num_cpus: float | None = None,
    object_store_bytes: int = 300 * 1024 * 1024,
    temp_dir: str | None = None,
    node_ip: str | None = None,
    keep_logs: str | None = None,
) -> RunningService:
    """Start a private Ray cluster, Serve with gRPC, and deploy the app; returns when it is RUNNING.

    Ports default to the config file's (gRPC), 8000 (HTTP, for /-/healthz) and, for metrics, a free one
    (``python -m ierf.serving`` passes 8080); the HTTP host to the config's (127.0.0.1). In a container
    pass ``http_host="0.0.0.0"``: the Ray node then takes the container's routable address, so the metrics
    port is reachable from outside (``choose_node_ip``; ``node_ip`` overrides it).
    ``redis_url`` replaces the config's ``cache.redis_url``; ``args_overrides`` is merged into the
    application args (top-level keys replace, ``cache``/``ingress`` dicts merge). ``keep_logs``: the
    directory stop() copies the replicas' logs into, also when the start fails.

    Config mistakes, and replicas asking for more CPUs or GPUs than the cluster has (Serve would wait for
    them forever), raise ValueError before anything starts; a deployment that fails to start raises
    RuntimeError with each failed deployment's reason, and whatever started is stopped.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray import serve
    from ray.serve.config import gRPCOptions

    from ierf.serving.app import GRPC_SERVICER_FUNCTIONS, build_application, configured_deployments, first_error
    from ierf.serving.settings import ServiceConfig

    serve_config = serve_config or load_serve_config()
    app_spec = _first_application(serve_config)
    args = dict(app_spec.get("args") or {})
    for key, value in (args_overrides or {}).items():
        if key in ("cache", "ingress") and isinstance(value, dict):
            args[key] = {**(args.get(key) or {}), **value}
        else:
            args[key] = value
    if redis_url is not None:
        args["cache"] = {**(args.get("cache") or {}), "redis_url": redis_url or None}
    config = ServiceConfig.from_args(args)  # fail on a bad config before starting anything
    overrides = _deployment_overrides(app_spec)
    deployments = configured_deployments(config, overrides)
    application = build_application(config, overrides, deployments)
    check_replicas_fit(deployments, num_cpus)

    grpc_cfg = _section(serve_config, "grpc_options")
    grpc_port = (
        _port(grpc_port, "grpc_port")
        if grpc_port is not None
        else _port(grpc_cfg.get("port", 9000), "grpc_options.port")
    )
    http_cfg = _section(serve_config, "http_options")
    http_port = (
        _port(http_port, "http_port")
        if http_port is not None
        else _port(http_cfg.get("port", 8000), "http_options.port")
    )
    http_host = http_host or str(http_cfg.get("host", "127.0.0.1"))
    metrics_port = _port(metrics_port, "metrics_port") if metrics_port else free_port()
    try:
        grpc_options = gRPCOptions(
            port=grpc_port,
            grpc_servicer_functions=list(grpc_cfg.get("grpc_servicer_functions") or GRPC_SERVICER_FUNCTIONS),
            request_timeout_s=grpc_cfg.get("request_timeout_s"),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grpc_options: {first_error(exc)}") from None
    proxy_cap = grpc_options.request_timeout_s
    if proxy_cap is not None and proxy_cap < config.ingress.request_timeout_s:
        # GetModel advertises the ingress's cap as max_deadline_s and the ingress plans work for it, but the
        # proxy would cut every call at its own
        raise ValueError(
            f"grpc_options.request_timeout_s ({proxy_cap:g} s) is below ingress.request_timeout_s "
            f"({config.ingress.request_timeout_s:g} s): Serve's proxy would end every call at {proxy_cap:g} s while "
            "the service promises callers the longer deadline; raise the first or lower the second"
        )
    node_ip = choose_node_ip(http_host, node_ip)
    grpc_max_message = grpc_max_message_bytes(config.ingress.max_image_bytes)
    bound_everywhere = {"gRPC"}  # Serve's gRPC server binds [::]
    if not is_loopback(node_ip):
        bound_everywhere.add("metrics")  # Ray's exporter binds every interface then (see choose_node_ip)
    if is_wildcard(http_host):
        bound_everywhere.add("HTTP")
    _check_ports({"gRPC": grpc_port, "HTTP": http_port, "metrics": metrics_port}, bound_everywhere)
    _check_weights_files(config)
    app_name = str(app_spec.get("name", APP_NAME))
    owns_temp_dir = temp_dir is None
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="ierf-ray-", dir="/tmp")  # short: Unix socket paths
    service = RunningService(
        grpc_port, http_port, metrics_port, temp_dir, owns_temp_dir, node_ip, keep_logs, http_host=http_host
    )
    ray_started = False
    # One guard from here on: Ctrl-C, SIGTERM (as turned into Terminated by stop_on_sigterm) or a failure at
    # any step stops whatever part of the cluster did start and removes its directory.
    try:
        # Ray's processes (raylet, then the Serve proxy and replicas it starts) inherit this process's
        # environment; process settings the caller chose are kept.
        process_env = {key: os.environ.get(key, value) for key, value in PROCESS_ENV.items()}
        with _environ({GRPC_MAX_MESSAGE_ENV: str(grpc_max_message), **process_env}):
            service.node_ip = _init_ray(num_cpus, object_store_bytes, temp_dir, metrics_port, node_ip)
        ray_started = True
        serve.start(http_options={"host": http_host, "port": http_port}, grpc_options=grpc_options)
        serve.run(application, name=app_name, route_prefix=app_spec.get("route_prefix", "/"))
    except BaseException as exc:
        # read before stopping: Serve's error names the failed deployments only, and the replica logs with
        # the reason go with the cluster's directory
        failures = deployment_failures(app_name) if ray_started and isinstance(exc, Exception) else []
        if ray_started:
            service.stop(graceful=isinstance(exc, Exception))  # interrupted: nothing serves yet, stop fast
        else:
            import ray

            ray.shutdown()  # whatever part of the cluster did start
            if owns_temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
        if failures:
            kept = f" (replica logs kept in {service.kept_logs})" if service.kept_logs else ""
            raise RuntimeError(f"{exc} {'; '.join(failures)}{kept}") from exc
        raise
    return service


def _first_application(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The config's one application (this runner deploys one), checked to be a mapping."""
    applications = serve_config.get("applications") if isinstance(serve_config, dict) else None
    if not isinstance(applications, list) or not applications or not isinstance(applications[0], dict):
        raise ValueError(f"applications must be a non-empty list of mappings, got {applications!r}")
    if len(applications) > 1:
        names = [a.get("name", "?") if isinstance(a, dict) else a for a in applications[1:]]
        raise ValueError(
            f"applications: this runner deploys one application, and would drop {names} silently; list every "
            "model under the first application's args.models (one worker deployment each), or deploy the file "
            "with `serve deploy` on a cluster"
        )
    return applications[0]


# What this runner reads from Serve's sections (anything else there would be ignored without a word).
_SECTION_KEYS = {
    "grpc_options": {"port", "request_timeout_s", "grpc_servicer_functions"},
    "http_options": {"host", "port"},
}


def _section(serve_config: dict[str, Any], key: str) -> dict[str, Any]:
    section = serve_config.get(key) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{key} must be a mapping, got {section!r}")
    unknown = sorted(map(str, set(section) - _SECTION_KEYS[key]))
    if unknown:
        raise ValueError(
            f"{key}: unknown key(s) {unknown}; this runner reads {sorted(_SECTION_KEYS[key])} (a typo would "
            "otherwise start the service on its defaults)"
        )
    return section


def _check_weights_files(config: Any) -> None:
    """Weights files named in the config exist on this machine, where the local runner's replicas read them:
    checked before the cluster starts (a missing one cost a full start and crashing replicas), all at once."""
    missing = [
        f"{m.id}: {m.weights}"
        for m in config.models
        if m.weights is not None and not Path(m.weights).expanduser().is_file()
    ]
    if missing:
        raise FileNotFoundError(f"weights file(s) not found on this machine: {'; '.join(missing)}")


def _check_ports(ports: dict[str, int], bound_everywhere: set[str]) -> None:
    """Three distinct ports, each free: on loopback, and on every address for the listeners that bind them all
    (``bound_everywhere``: Serve's gRPC server binds [::]:PORT, so a port held on another local address failed
    the start ~20 s later; the same for Ray's metrics exporter on a non-loopback node and a wildcard HTTP host)."""
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise ValueError(
                f"{seen[port]} and {name} are both port {port}: the gRPC, HTTP and metrics listeners need one "
                "port each (on one port, gRPC calls on 127.0.0.1 reached the HTTP server)"
            )
        seen[port] = name
    for name, port in ports.items():
        if port_in_use(port):  # probe loopback: catches our own and other local listeners
            raise RuntimeError(f"{name} port {port} on 127.0.0.1 is already in use; choose another")
        if name in bound_everywhere and not _bindable_everywhere(port):
            raise RuntimeError(
                f"{name} port {port} is already in use on another local address (it is bound on all); choose another"
            )


def _bindable_everywhere(port: int) -> bool:
    """Whether a listener could bind ``port`` on every address (IPv6 and IPv4, as gRPC's [::] does)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        host = "::"
    except OSError:  # a kernel without IPv6: gRPC binds 0.0.0.0 there
        sock, host = socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _port(value: object, where: str) -> int:
    """A TCP port number, refused by name otherwise (``port: nine`` gave "invalid literal for int()")."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{where} must be a port number (an integer 1-65535), got {value!r}")
    return value


def _deployment_overrides(app_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The application's ``deployments`` entries as {name: options}: each must be a mapping that names its
    deployment, once (a missing name was a KeyError traceback, a repeated one silently lost the first)."""
    entries = app_spec.get("deployments") or []
    if not isinstance(entries, list):
        raise ValueError(f"applications[0].deployments must be a list of mappings, got {entries!r}")
    overrides: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        where = f"applications[0].deployments[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping of deployment options, got {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"{where} has no name (the deployment it tunes: Ingress or Worker_<model id>), got keys {sorted(entry)}"
            )
        if name in overrides:
            raise ValueError(f"{where}: deployment {name!r} is listed twice")
        overrides[name] = {key: value for key, value in entry.items() if key != "name"}
    return overrides


def host_cpus() -> float:
    """The CPUs this container may use, by Ray's own count (a cgroup quota such as ``docker run --cpus=2``, a
    cpuset): ``os.cpu_count()`` is the host's, and a local cluster given that took configs its container
    could not run."""
    try:
        from ray._private.utils import get_num_cpus  # no public accessor in Ray 2.60

        return float(get_num_cpus(override_docker_cpu_warning=True))
    except Exception:  # another Ray: the affinity mask at least
        return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def check_replicas_fit(deployments: dict[str, Any], num_cpus: float | None, num_gpus: float | None = None) -> None:
    """Refuse deployments whose replicas, at the count Serve starts them with, ask for more CPUs or GPUs than
    the private cluster has (``num_cpus``: None for this container's CPUs, as ``_init_ray`` starts it;
    ``num_gpus``: None for what Ray detects). The cluster never grows, and Serve would wait for them forever
    with no word outside its controller log."""
    demand = {name: replica_demand(deployment) for name, deployment in deployments.items()}
    for resource, index in (("CPU", 1), ("GPU", 2)):
        asked = {name: (each[0], each[index]) for name, each in demand.items() if each[0] and each[index]}
        needed = sum(replicas * per_replica for replicas, per_replica in asked.values())
        if needed <= 0:
            continue
        if resource == "CPU":
            have = float(num_cpus if num_cpus is not None else host_cpus())
            source = "--num-cpus" if num_cpus is not None else "this container's CPUs; --num-cpus sets it"
            found, remedy = f"the local cluster has {have:g} ({source})", "or raise --num-cpus"
        else:
            have = local_gpus() if num_gpus is None else float(num_gpus)
            found = f"Ray finds {have:g} on this host (CUDA_VISIBLE_DEVICES and the like limit what it sees)"
            remedy = "or run where the GPUs are"
        if needed > have + 1e-6:
            parts = ", ".join(f"{name} {replicas} x {per_replica:g}" for name, (replicas, per_replica) in asked.items())
            unit = resource if needed == 1 else f"{resource}s"
            default = " (a model without a Worker_<id> entry takes 1 CPU, Serve's default)" if resource == "CPU" else ""
            raise ValueError(
                f"the deployments' replicas ask for {needed:g} {unit} ({parts}) but {found}: Serve would wait for "
                f"them forever. Lower ray_actor_options.num_{resource.lower()}s, num_replicas or autoscaling_config."
                f"min_replicas/initial_replicas in the config's deployments, {remedy}{default}"
            )
    for name, deployment in deployments.items():
        replicas = demand[name][0]
        per_node = getattr(getattr(deployment, "_replica_config", None), "max_replicas_per_node", None)
        if per_node is not None and replicas > per_node:
            raise ValueError(
                f"deployment {name!r} starts {replicas} replicas but max_replicas_per_node is {per_node}, and the "
                "local cluster is one node: Serve would wait for another node forever"
            )


def replica_demand(deployment: Any) -> tuple[int, float, float]:
    """(replicas Serve starts, CPUs and GPUs each asks) for a deployment with its options applied: the
    autoscaling config's initial (else minimum) replicas, or ``num_replicas``; Serve fills in ``num_cpus:
    1`` where ray_actor_options leave it out (ray/serve/_private/config.py, ReplicaConfig)."""
    autoscaling = getattr(getattr(deployment, "_deployment_config", None), "autoscaling_config", None)
    if autoscaling is not None:
        initial = autoscaling.initial_replicas
        replicas = int(initial if initial is not None else autoscaling.min_replicas)
    else:
        replicas = int(deployment.num_replicas or 1)
    options = deployment.ray_actor_options or {}
    cpus = options.get("num_cpus")
    return replicas, float(1 if cpus is None else cpus), float(options.get("num_gpus") or 0)


def local_gpus() -> float:
    """The GPUs a Ray node started here gets, found as Ray finds them (its accelerator manager, capped by
    CUDA_VISIBLE_DEVICES and the like); 0 when none is found."""
    try:
        from ray._private import accelerators

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return float(min(count, len(visible)) if visible is not None else count)
    except Exception:  # a Ray without this (private) API: let Serve decide
        return float("inf")


def deployment_failures(app_name: str = APP_NAME) -> list[str]:
    """``<deployment>: <reason>`` for each deployment of ``app_name`` that Serve marks failed or unhealthy,
    from ``serve.status()`` (the cluster must still be up). The reason is the last exception line of the
    deployment's message, the constructor's traceback for a replica that could not start."""
    from ray import serve

    try:
        application = serve.status().applications.get(app_name)
    except Exception:
        return []
    if application is None:
        return []
    failures = []
    for name, deployment in application.deployments.items():
        status = getattr(deployment.status, "value", deployment.status)
        if status in ("DEPLOY_FAILED", "UNHEALTHY") and deployment.message:
            failures.append(f"{name}: {exception_line(deployment.message)}")
    return failures


def exception_line(message: str, limit: int = 1000) -> str:
    """The exception a traceback ends with (what follows its last indented frame line), on one line."""
    lines = [line for line in message.splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line[:1].isspace()]
    tail = lines[frames[-1] + 1 :] if frames else lines
    text = " ".join(line.strip() for line in (tail or lines[-1:]))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Terminated(KeyboardInterrupt):
    """SIGTERM while the service starts: unwinds the way Ctrl-C does, so whatever started is stopped."""


@dataclass
class _SigtermState:
    deferred: bool = False  # while ray.init runs: a node half started could not be shut down
    pending: bool = False
    fired: bool = False


_SIGTERM = _SigtermState()


def _on_sigterm(signum: int, frame: object) -> None:
    if _SIGTERM.fired:  # once: the cleanup the first one started runs undisturbed
        return
    if _SIGTERM.deferred:
        _SIGTERM.pending = True
        return
    _SIGTERM.fired = True
    raise Terminated


def stop_on_sigterm() -> None:
    """From now on, SIGTERM raises Terminated in the main thread, once. ``make stop`` sends SIGTERM, also to a
    service that is still starting, where the default action killed the process and left its cluster's
    directory and actors; start_service's guard now stops them, as for Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        _SIGTERM.fired = _SIGTERM.pending = False
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def _sigterm_after_ray_init() -> Iterator[None]:
    """Hold stop_on_sigterm's SIGTERM while ray.init runs and act on it once it returns. ray.init sets
    Ray's own handlers: a Python one that exits, also midway through starting the node, which ray.shutdown()
    then does not know of (its dashboard agent stayed up, holding the metrics port), and, once the driver
    connects, a C++ one that kills the process at once. Ray is kept from setting the Python ones, and ours is
    put back over the C++ one afterwards."""
    import ray._private.utils

    if signal.getsignal(signal.SIGTERM) is not _on_sigterm or threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGTERM.deferred = True
    try:
        with _attribute(ray._private.utils, "set_sigterm_handler", lambda handler: None):
            yield
    finally:
        signal.signal(signal.SIGTERM, _on_sigterm)
        _SIGTERM.deferred = False
    if _SIGTERM.pending and not _SIGTERM.fired:
        _SIGTERM.fired = True
        raise Terminated


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _attribute(owner: object, name: str, value: object) -> Iterator[None]:
    """Set ``owner.name`` for the block when it exists, then put the old value back."""
    if not hasattr(owner, name):
        yield
        return
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _init_ray(
    num_cpus: float | None, object_store_bytes: int, temp_dir: str, metrics_port: int, node_ip: str = LOOPBACK
) -> str:
    """Start the private Ray cluster on ``node_ip``; returns the node IP Ray took."""
    import ray
    from ray._private import ray_constants

    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_after_ray_init())
        if is_loopback(node_ip):
            stack.enter_context(_environ(RAY_LOOPBACK_ENV))  # Ray's processes read it when they start
            # ... and this one read it when ray was first imported, maybe before the variable was set
            stack.enter_context(_attribute(ray_constants, "ENABLE_RAY_CLUSTER", False))
        ray.init(
            address="local",
            num_cpus=num_cpus if num_cpus is not None else host_cpus(),
            include_dashboard=False,
            object_store_memory=object_store_bytes,
            _temp_dir=temp_dir,
            _metrics_export_port=metrics_port,
            _node_ip_address=node_ip,
            log_to_driver=False,
            # a copy: ray.init adds this session's spilling directory to the dict it is given, which a later
            # start in this process (tests, a notebook) would pass on, pointing at a removed directory
            _system_config=dict(RAY_SYSTEM_CONFIG),
        )
    return str(ray.util.get_node_ip_address())


def write_file_atomically(path: str, text: str) -> None:
    """Write ``text`` so that readers see the whole file or none: ``make run`` (and a test) polls for the
    ready file and reads it the moment it exists; a plain write leaves an empty file for a moment."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, staging = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the address from a reader of another user
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def serve_forever(service: RunningService, ready_file: str | None = None) -> None:
    """Block until SIGTERM/SIGINT, then stop the service (``make stop`` sends SIGTERM by PID)."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if ready_file:  # inside the guard: a file that cannot be written still stops the service
            write_file_atomically(ready_file, f"{service.grpc_address}\n")
        while not stopping:
            time.sleep(0.5)
    finally:
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        service.stop()

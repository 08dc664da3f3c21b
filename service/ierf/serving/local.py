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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV, PROCESS_ENV

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
# Serve's gRPC proxy takes messages up to 2 GiB unless told otherwise, so an oversize request is read
# whole and shipped to the ingress before the ingress refuses it. The proxy reads GRPC_MAX_MESSAGE_ENV when
# it starts (ray/serve/_private/constants.py) and applies it to what it receives *and* what it sends.
# Requests are one image plus a few hundred bytes of fields; the largest response (ComputeIERF with
# 64 positions: 64 float32 224x224 maps, 12.25 MiB, plus 64 overlay PNGs and the input crop) came to
# 17.2 MiB on a noise image, whose overlays compress worst. Clusters set the same variable (Dockerfile
# ENV, the RayService's container env).
GRPC_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
GRPC_REQUEST_OVERHEAD_BYTES = 1024 * 1024  # what a request carries besides its image, with room to spare


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def load_serve_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> dict[str, Any]:
    """A Serve config file (the format ``serve deploy`` and KubeRay's serveConfigV2 take)."""
    import yaml

    with open(path) as stream:
        config = yaml.safe_load(stream)
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: not a Serve config file (no 'applications')")
    return config


def grpc_max_message_bytes(max_image_bytes: int, environ: dict[str, str] | None = None) -> int:
    """The message cap for Serve's gRPC proxy: ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` when set, else 40 MiB
    (or more, when the ingress's image cap needs it). Refuses a set value that would stop images the
    ingress accepts."""
    environ = os.environ if environ is None else environ
    needed = max_image_bytes + GRPC_REQUEST_OVERHEAD_BYTES
    raw = environ.get(GRPC_MAX_MESSAGE_ENV, "").strip()
    if not raw:
        return max(GRPC_MAX_MESSAGE_BYTES, needed)
    value = int(raw)
    if value < needed:
        raise ValueError(
            f"{GRPC_MAX_MESSAGE_ENV}={value} is below ingress.max_image_bytes ({max_image_bytes}) + "
            f"{GRPC_REQUEST_OVERHEAD_BYTES}: the gRPC proxy would refuse images the ingress accepts"
        )
    return value


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
    if not host:  # an empty host binds every interface
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
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

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
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


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
    def metrics_urls(self) -> list[str]:
        """Where Prometheus can scrape: loopback, and the node's address when it is not loopback."""
        urls = [self.metrics_url]
        if not is_loopback(self.node_ip):
            host = f"[{self.node_ip}]" if ":" in self.node_ip else self.node_ip
            urls.append(f"http://{host}:{self.metrics_port}/metrics")
        return urls

    def stop(self) -> None:
        """Shut Serve and the private Ray cluster down; bounded by Ray's own shutdown timeouts. Again, or
        once Ray is down, only the files are handled: with no Ray in this process ``serve.shutdown()`` runs a
        bare ``ray.init()``, which starts a throw-away cluster (~5 s) or attaches to one already running on
        the host (``ray start``, ``RAY_ADDRESS``) and would shut down its Serve applications."""
        import ray
        from ray import serve

        if ray.is_initialized():
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
) -> RunningService:
    """Start a private Ray cluster, Serve with gRPC, and deploy the app; returns when it is RUNNING.

    Ports default to the config file's (gRPC), 8000 (HTTP, for /-/healthz) and a free one (metrics);
    the HTTP host to the config's (127.0.0.1). In a container pass ``http_host="0.0.0.0"``: the Ray
    node then takes the container's routable address, so the metrics port is reachable from outside
    (``choose_node_ip``; ``node_ip`` overrides it).
    ``redis_url`` replaces the config's ``cache.redis_url``; ``args_overrides`` is merged into the
    application args (top-level keys replace, ``cache``/``ingress`` dicts merge).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray import serve
    from ray.serve.config import gRPCOptions

    from ierf.serving.app import GRPC_SERVICER_FUNCTIONS, build_application
    from ierf.serving.settings import ServiceConfig

    serve_config = serve_config or load_serve_config()
    app_spec = serve_config["applications"][0]
    args = dict(app_spec.get("args") or {})
    for key, value in (args_overrides or {}).items():
        if key in ("cache", "ingress") and isinstance(value, dict):
            args[key] = {**(args.get(key) or {}), **value}
        else:
            args[key] = value
    if redis_url is not None:
        args["cache"] = {**(args.get("cache") or {}), "redis_url": redis_url or None}
    config = ServiceConfig.from_args(args)  # fail on a bad config before starting anything
    overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app_spec.get("deployments") or []}
    application = build_application(config, overrides)

    grpc_cfg = serve_config.get("grpc_options") or {}
    grpc_port = grpc_port or int(grpc_cfg.get("port", 9000))
    http_cfg = serve_config.get("http_options") or {}
    http_port = http_port or int(http_cfg.get("port", 8000))
    http_host = http_host or str(http_cfg.get("host", "127.0.0.1"))
    metrics_port = metrics_port or free_port()
    node_ip = choose_node_ip(http_host, node_ip)
    grpc_max_message = grpc_max_message_bytes(config.ingress.max_image_bytes)
    for name, port in (("gRPC", grpc_port), ("HTTP", http_port), ("metrics", metrics_port)):
        if port_in_use(port):  # probe loopback: catches our own and other local listeners
            raise RuntimeError(f"{name} port {port} on 127.0.0.1 is already in use; choose another")
    owns_temp_dir = temp_dir is None
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="ierf-ray-", dir="/tmp")  # short: Unix socket paths
    try:
        # Ray's processes (raylet, then the Serve proxy and replicas it starts) inherit this process's
        # environment; process settings the caller chose are kept.
        process_env = {key: os.environ.get(key, value) for key, value in PROCESS_ENV.items()}
        with _environ({GRPC_MAX_MESSAGE_ENV: str(grpc_max_message), **process_env}):
            node_ip = _init_ray(num_cpus, object_store_bytes, temp_dir, metrics_port, node_ip)
    except BaseException:
        import ray

        ray.shutdown()  # whatever part of the cluster did start
        if owns_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    service = RunningService(grpc_port, http_port, metrics_port, temp_dir, owns_temp_dir, node_ip)
    try:
        serve.start(
            http_options={"host": http_host, "port": http_port},
            grpc_options=gRPCOptions(
                port=grpc_port,
                grpc_servicer_functions=list(grpc_cfg.get("grpc_servicer_functions") or GRPC_SERVICER_FUNCTIONS),
                request_timeout_s=grpc_cfg.get("request_timeout_s"),
            ),
        )
        serve.run(application, name=app_spec.get("name", APP_NAME), route_prefix=app_spec.get("route_prefix", "/"))
    except BaseException:
        service.stop()
        raise
    return service


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
        if is_loopback(node_ip):
            stack.enter_context(_environ(RAY_LOOPBACK_ENV))  # Ray's processes read it when they start
            # ... and this one read it when ray was first imported, maybe before the variable was set
            stack.enter_context(_attribute(ray_constants, "ENABLE_RAY_CLUSTER", False))
        ray.init(
            address="local",
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
            include_dashboard=False,
            object_store_memory=object_store_bytes,
            _temp_dir=temp_dir,
            _metrics_export_port=metrics_port,
            _node_ip_address=node_ip,
            log_to_driver=False,
            _system_config=RAY_SYSTEM_CONFIG,
        )
    return str(ray.util.get_node_ip_address())


def serve_forever(service: RunningService, ready_file: str | None = None) -> None:
    """Block until SIGTERM/SIGINT, then stop the service (``make stop`` sends SIGTERM by PID)."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if ready_file:
        Path(ready_file).write_text(f"{service.grpc_address}\n")
    try:
        while not stopping:
            time.sleep(0.5)
    finally:
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        service.stop()

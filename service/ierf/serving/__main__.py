"""``python -m ierf.serving serve``: run the service in the foreground until SIGTERM (``make run``)."""

from __future__ import annotations

import argparse
import os
import sys

from ierf.serving.local import (
    DEFAULT_CONFIG,
    Terminated,
    load_serve_config,
    serve_forever,
    start_service,
    stop_on_sigterm,
)


def main(argv: list[str] | None = None) -> int:
    from ierf import __version__

    parser = argparse.ArgumentParser(prog="python -m ierf.serving", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ierf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start Ray + Serve (gRPC) locally and block until SIGTERM")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (YAML)")
    serve.add_argument("--grpc-port", type=int, help="default: the config's grpc_options.port (9000)")
    serve.add_argument("--http-port", type=int, help="default: the config's http_options.port (8000)")
    serve.add_argument("--http-host", help="default: the config's http_options.host (127.0.0.1)")
    serve.add_argument("--metrics-port", type=int, default=8080, help="Prometheus endpoint of Ray (default 8080)")
    serve.add_argument(
        "--node-ip",
        help="Ray's node address; the metrics endpoint listens on 127.0.0.1 when it is loopback, on every "
        "interface otherwise (default: 127.0.0.1 for a loopback --http-host, this host's routable address "
        "for 0.0.0.0, else the --http-host address)",
    )
    serve.add_argument("--redis-url", help="replaces cache.redis_url; '' turns the Redis tier off")
    serve.add_argument("--num-cpus", type=float, help="CPUs Ray may schedule (default: all)")
    serve.add_argument("--ready-file", help="written with the gRPC address once the app is RUNNING")
    serve.add_argument(
        "--keep-logs",
        help="directory the replicas' logs are copied into at stop, one folder per run (the cluster's own files are "
        "removed; of the directory's contents only copies made this way beyond the newest 10 are)",
    )
    args = parser.parse_args(argv)
    problem = _path_problem(args.ready_file, args.keep_logs)
    if problem:
        print(f"ierf.serving: error: {problem}", file=sys.stderr)
        return 2
    stop_on_sigterm()  # `make stop` may come while the service starts: stop what started, like Ctrl-C
    try:
        service = start_service(
            load_serve_config(args.config),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            http_host=args.http_host,
            metrics_port=args.metrics_port,
            redis_url=args.redis_url,
            num_cpus=args.num_cpus,
            node_ip=args.node_ip,
            keep_logs=args.keep_logs,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"ierf.serving: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # start_service stopped what it had started
        return _interrupted(exc, "while starting")
    try:
        print(f"gRPC      {service.grpc_address}  (ierf.v1.ExplainService, grpc.health.v1.Health, reflection)")
        print(f"metrics   {'  '.join(service.metrics_urls)}")
        print(f"healthz   {service.healthz_url}")
        kept = f" (copied into {args.keep_logs}/ at stop)" if args.keep_logs else ""
        print(f"replica logs {service.replica_logs}{kept}", flush=True)
        serve_forever(service, args.ready_file)  # takes SIGTERM/SIGINT over
    except KeyboardInterrupt as exc:  # before serve_forever took the signals over
        service.stop()
        return _interrupted(exc, "as it started")
    return 0


def _path_problem(ready_file: str | None, keep_logs: str | None) -> str | None:
    """Why ``--ready-file`` or ``--keep-logs`` cannot be written, found before anything starts (a ready
    file in a missing directory failed only after a full start)."""
    if ready_file:
        directory = os.path.dirname(os.path.abspath(ready_file))
        if os.path.isdir(ready_file):
            return f"--ready-file {ready_file} is a directory; name a file"
        if not os.path.isdir(directory):
            return f"--ready-file {ready_file}: directory {directory} does not exist"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"--ready-file {ready_file}: directory {directory} is not writable"
    if keep_logs and os.path.exists(keep_logs) and not os.path.isdir(keep_logs):
        return f"--keep-logs {keep_logs} is not a directory"
    return None


def _interrupted(exc: KeyboardInterrupt, when: str) -> int:
    signame, status = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
    print(f"ierf.serving: {signame} {when}: stopped what had started", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The Serve application: ``import_path: ierf.serving.app:build_app`` in a Serve config file.

Deployment names are fixed so a config file can tune them: ``Ingress`` and ``Worker_<model id>``
(replicas, ``num_cpus``/``num_gpus``, autoscaling, ``max_ongoing_requests``/``max_queued_requests``).
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application, Deployment

from ierf.serving.deployments import ExplainerWorker, Ingress
from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV, ServiceConfig, grpc_max_message_bytes

# Import paths the Serve gRPC proxy loads; the generated modules must be importable in every Ray worker.
GRPC_SERVICER_FUNCTIONS = [
    "ierf.serving.protocol.add_explain_service",
    "ierf.serving.protocol.add_health_service",
]
# Keys accepted in a config file's per-deployment overrides (Serve's own schema, minus the name).
DEPLOYMENT_OPTION_KEYS = {
    "num_replicas",
    "ray_actor_options",
    "max_ongoing_requests",
    "max_queued_requests",
    "autoscaling_config",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "user_config",
    "max_replicas_per_node",
}


def build_application(
    config: ServiceConfig,
    overrides: dict[str, dict[str, Any]] | None = None,
    deployments: dict[str, Deployment] | None = None,
) -> Application:
    """Bind one worker deployment per model and the ingress over them.

    ``overrides`` maps a deployment name to Serve options; Serve applies a config file's ``deployments``
    itself when deploying, the local runner passes them here, with the ``deployments`` it already made
    from them (``configured_deployments``) to check against its cluster.
    """
    deployments = deployments if deployments is not None else configured_deployments(config, overrides)
    workers = {model.id: deployments[model.deployment_name].bind(model, config.cache) for model in config.models}
    return deployments["Ingress"].bind(workers, config)


def configured_deployments(
    config: ServiceConfig, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Deployment]:
    """``Ingress`` and each model's ``Worker_<id>`` with their options applied, unbound: what the local
    runner checks against its cluster. Serve checks the options here, and its error is re-raised naming the
    deployment (a ``num_cpus: "0.25"`` was a TypeError traceback, ``num_replicas: 0`` named no deployment)."""
    _check_architectures(config)
    overrides = dict(overrides or {})
    names = {"Ingress"} | {m.deployment_name for m in config.models}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"deployment override(s) for unknown deployment(s) {unknown}; deployments: {sorted(names)}")
    for name, options in overrides.items():
        if not isinstance(options, dict):
            raise ValueError(f"deployment {name!r}: options must be a mapping, got {options!r}")
        bad = sorted(set(options) - DEPLOYMENT_OPTION_KEYS)
        if bad:
            raise ValueError(f"unsupported option(s) {bad} for deployment {name!r}")
    workers = {}
    for model in config.models:
        name = model.deployment_name
        workers[name] = _with_options(ExplainerWorker, name, {"name": name, **overrides.get(name, {})})
    ingress_options = dict(overrides.get("Ingress", {}))
    if "graceful_shutdown_timeout_s" not in ingress_options:
        # the ingress outlives the longest worker shutdown, so a redeploy never kills the calls it waits on
        longest = max((w._deployment_config.graceful_shutdown_timeout_s for w in workers.values()), default=0)
        if longest > Ingress._deployment_config.graceful_shutdown_timeout_s:
            ingress_options["graceful_shutdown_timeout_s"] = longest
    return {"Ingress": _with_options(Ingress, "Ingress", ingress_options), **workers}


def _with_options(deployment: Deployment, name: str, options: dict[str, Any]) -> Deployment:
    try:
        return deployment.options(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"deployment {name!r}: {first_error(exc)}") from None


def first_error(exc: BaseException) -> str:
    """One line: pydantic's multi-line ValidationError (Serve's option checks) cut to its first error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            return f"{where}: {first['msg']} (got {first.get('input')!r})" if where else str(first["msg"])
        except Exception:  # not pydantic's shape after all
            pass
    return " ".join(str(exc).split())


def _check_architectures(config: ServiceConfig) -> None:
    """An architecture the registry lacks would fail only in each worker replica's constructor, which Serve
    retries until the deployment is marked failed: refused here, where the application is built."""
    from ierf.models.names import ARCHITECTURES, CENTRE_CROPS  # torch-free: the driver of `make run` builds the app

    for model in config.models:
        named = f"model {model.id!r}" + (f" (name {model.name!r})" if model.name != model.id else "")
        if model.name not in ARCHITECTURES:
            raise ValueError(f"{named}: unknown architecture; available: {', '.join(ARCHITECTURES)}")
        if model.resize and model.resize < CENTRE_CROPS[model.name]:
            raise ValueError(
                f"{named}: resize {model.resize} is below its centre crop {CENTRE_CROPS[model.name]} "
                "(0 keeps the registry's)"
            )


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are the ``applications[].args`` of the config file.

    On a cluster (KubeRay, ``serve deploy``) this is the only code that sees the config before it serves, so
    it refuses an image cap that the proxy's message cap (the containers' environment) would not carry:
    images between the two would be refused inside Serve's proxy, never by the ingress or in its metrics.
    """
    config = ServiceConfig.from_args(args)
    if os.environ.get(GRPC_MAX_MESSAGE_ENV, "").strip():  # unset: the proxy takes up to 2 GiB
        grpc_max_message_bytes(config.ingress.max_image_bytes)
    return build_application(config)

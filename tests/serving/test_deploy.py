"""Deployment artefacts agree with the code: KubeRay serveConfigV2, Grafana queries, Dockerfile pins."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ierf.serving.app import GRPC_SERVICER_FUNCTIONS, build_application
from ierf.serving.metrics import METRICS
from ierf.serving.settings import ServiceConfig

ROOT = Path(__file__).resolve().parents[2]
RAY_ADDED_LABELS = {"deployment", "replica", "application"}
SCRAPE_LABELS = {"namespace", "pod"}  # added by the Prometheus Operator's PodMonitor scrape


def _rayservice() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    return service


def test_rayservice_serve_config_builds_the_app() -> None:
    import ray

    service = _rayservice()
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    (app,) = serve_config["applications"]
    assert app["import_path"] == "ierf.serving.app:build_app"
    config = ServiceConfig.from_args(app["args"])
    overrides = {d.pop("name"): d for d in app["deployments"]}
    build_application(config, overrides)  # raises on unknown deployments or options


def test_every_ray_container_gets_the_redis_url_the_config_reads() -> None:
    service = _rayservice()
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    redis_ref = serve_config["applications"][0]["args"]["cache"]["redis_url"]
    assert redis_ref.startswith("env:")
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
            assert env[redis_ref[4:]].startswith("redis://:$(IERF_REDIS_PASSWORD)@ierf-redis:6379/")
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["serve-grpc"] == 9000 and ports["metrics"] == 8080 and ports["serve"] == 8000


REDIS_SECRET = {"secretKeyRef": {"name": "ierf-redis", "key": "password"}}


def _secret_env(container: dict) -> dict[str, int]:
    """Each variable taken from Redis's Secret, with its place in the container's env list."""
    return {e["name"]: i for i, e in enumerate(container.get("env", [])) if e.get("valueFrom") == REDIS_SECRET}


def test_redis_requires_the_secrets_password_and_everything_that_talks_to_it_sends_it() -> None:
    """Whoever can write to Redis changes the maps served: the NetworkPolicy alone kept it private.
    Redis, its probe and its exporter, and every Ray container read one Secret; the URL expands the
    password from a variable listed before it (Kubernetes expands $(VAR) only then)."""
    redis_pod = next(d for d in _k8s("redis.yaml") if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in redis_pod["containers"]}
    server = containers["redis"]
    assert server["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} <= set(_secret_env(server))  # redis-cli ping needs auth
    assert server["readinessProbe"]["exec"]["command"][0] == "redis-cli"
    assert "REDIS_PASSWORD" in _secret_env(containers["exporter"])  # redis_exporter's variable
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            secrets = _secret_env(container)
            names = [e["name"] for e in container["env"]]
            url = container["env"][names.index("IERF_REDIS_URL")]["value"]
            (variable,) = re.findall(r"\$\((\w+)\)", url)
            assert variable in secrets and secrets[variable] < names.index("IERF_REDIS_URL")


def test_grpc_services_select_only_pods_kuberay_marks_as_serving() -> None:
    # ray.io/serve="true": KubeRay's label for RayService pods fit for traffic (head: proxy health
    # checked by the operator; workers: set at creation, gated by the proxy readiness probe).
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text()))
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"ierf-grpc", "ierf-grpc-headless"}
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for service in services:
        selector = service["spec"]["selector"]
        assert selector["ray.io/serve"] == "true"
        own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
        assert own == {"app.kubernetes.io/name": "ierf"}
        for template in templates:  # every Ray pod matches once KubeRay adds its label
            assert own.items() <= template["metadata"]["labels"].items()
            ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def _ray_container_envs(service: dict) -> list[dict[str, str]]:
    """The literal environment of every Ray container of the RayService (head and worker groups);
    variables taken from a Secret are left out."""
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [
        {e["name"]: e["value"] for e in c["env"] if "value" in e} for t in templates for c in t["spec"]["containers"]
    ]


def _dockerfile_env() -> dict[str, str]:
    """KEY=VALUE pairs of the Dockerfile's ENV instructions, read as Docker does (comment lines dropped,
    then continuations joined), so a broken continuation leaves its variables out."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    env: dict[str, str] = {}
    for instruction in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if instruction.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", instruction))
    return env


def test_grpc_message_cap_is_set_wherever_ray_runs_and_fits_the_image_cap() -> None:
    from ierf.serving.local import GRPC_MAX_MESSAGE_ENV, grpc_max_message_bytes, load_serve_config

    service = _rayservice()
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    max_image = app["args"]["ingress"]["max_image_bytes"]
    caps = set()
    for env in _ray_container_envs(service):
        assert GRPC_MAX_MESSAGE_ENV in env  # Ray's default is 2 GiB
        caps.add(grpc_max_message_bytes(max_image, env))  # raises when below the image cap
    docker_cap = _dockerfile_env()[GRPC_MAX_MESSAGE_ENV]
    local_image = load_serve_config()["applications"][0]["args"]["ingress"]["max_image_bytes"]
    assert caps == {grpc_max_message_bytes(local_image, {GRPC_MAX_MESSAGE_ENV: docker_cap})} == {40 * 2**20}


def test_process_settings_are_the_same_wherever_ray_runs() -> None:
    from ierf.serving.settings import PROCESS_ENV

    for env in _ray_container_envs(_rayservice()):
        assert {key: env.get(key) for key in PROCESS_ENV} == PROCESS_ENV
    docker = _dockerfile_env()
    assert {key: docker.get(key) for key in PROCESS_ENV} == PROCESS_ENV


def test_dashboard_queries_use_exported_metric_names_and_labels() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ierf-service.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    seen = set()
    for expr in exprs:
        for match in re.finditer(r"ray_(explainer_\w+?)(_bucket|_sum|_count)?\b", expr):
            name = match.group(1)
            assert name in METRICS, f"{name} is not defined in ierf.serving.metrics"
            seen.add(name)
            labels = set(METRICS[name][2]) | RAY_ADDED_LABELS | SCRAPE_LABELS | {"le"}
            for group in re.findall(r"by \(([^)]*)\)", expr):
                used = {label.strip() for label in group.split(",")}
                assert used <= labels, f"{expr}: labels {used - labels} not on {name}"
            for label in re.findall(r"(\w+)=~?\"", expr):
                assert label in labels, f"{expr}: label {label} not on {name}"
    assert seen == set(METRICS)  # every metric has a panel
    # one namespace at a time (staging and production were summed) and only ierf's own Redis
    assert all('namespace=~"$namespace"' in expr for expr in exprs), [e for e in exprs if "$namespace" not in e]


def _k8s(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if d]


def test_kustomization_applies_every_manifest() -> None:
    (kustomization,) = _k8s("kustomization.yaml")
    manifests = {p.name for p in (ROOT / "deploy" / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_alert_rules_use_exported_metric_names_and_labels() -> None:
    (rule,) = _k8s("alerts.yaml")
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert exprs
    for expr in exprs:
        # each selector's matchers name labels of its own metric (a rule may read Serve's metrics beside ours)
        for match in re.finditer(r"ray_(explainer_\w+?)(_bucket|_sum|_count)?\{([^}]*)\}", expr):
            name = match.group(1)
            assert name in METRICS, f"{name} is not defined in ierf.serving.metrics"
            labels = set(METRICS[name][2]) | RAY_ADDED_LABELS | SCRAPE_LABELS | {"le"}
            for label in re.findall(r"(\w+)\s*!?=~?\s*\"", match.group(3)):
                assert label in labels, f"{expr}: label {label} not on {name}"
        if "ray_serve_" not in expr:  # grouping by labels of ours only: each must be on the metric
            for match in re.finditer(r"ray_(explainer_\w+?)(_bucket|_sum|_count)?\b", expr):
                labels = set(METRICS[match.group(1)][2]) | RAY_ADDED_LABELS | SCRAPE_LABELS | {"le"}
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    assert {label.strip() for label in group.split(",")} <= labels, expr


def test_network_policies_let_the_ray_pods_reach_redis_and_callers_reach_grpc() -> None:
    """A policy whose selectors miss the pods would cut the service off from its cache, or callers off
    from the service, only on clusters that enforce policies: checked here against the pod templates."""
    policies = {p["metadata"]["name"]: p["spec"] for p in _k8s("networkpolicy.yaml")}
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    redis_pod = next(d for d in _k8s("redis.yaml") if d["kind"] == "Deployment")["spec"]["template"]

    def selects(selector: dict, template: dict) -> bool:
        return selector["matchLabels"].items() <= template["metadata"]["labels"].items()

    redis = policies["ierf-redis"]
    assert selects(redis["podSelector"], redis_pod)
    (cache_rule,) = [r for r in redis["ingress"] if {p["port"] for p in r["ports"]} == {6379}]
    assert all(selects(cache_rule["from"][0]["podSelector"], t) for t in templates)
    ray = policies["ierf-ray"]
    assert all(selects(ray["podSelector"], t) for t in templates)
    open_ports = {p["port"] for r in ray["ingress"] if "from" not in r for p in r["ports"]}
    for template in templates:
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert {ports["serve-grpc"], ports["serve"], ports["metrics"]} <= open_ports
        assert 8265 not in open_ports  # Ray's dashboard runs submitted jobs: the operator only


def test_pods_run_as_the_images_unprivileged_user() -> None:
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user is not None
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] and pod["runAsUser"] == int(user.group(1))
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("pin", ["torch==2.14.1", "torchvision==0.29.1"])
def test_dockerfile_pins_match_the_project(pin: str) -> None:
    assert pin in (ROOT / "pyproject.toml").read_text()
    assert pin in (ROOT / "Dockerfile").read_text()


def test_readme_lists_every_metric_with_its_labels() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, (kind, _, labels) in METRICS.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `ray_{name}` |")), None)
        assert row is not None, f"README has no row for ray_{name}"
        assert f"| {kind} | {', '.join(labels)} |" in row


def test_the_cpu_worker_group_holds_every_replica_at_full_scale() -> None:
    """Worker max_replicas x num_cpus plus the Ingress must fit the CPU group's nodes, replica by replica
    (Ray places whole replicas on nodes): with 4 nodes of 8 CPUs only 7 of the 8 Workers fit, and Ray's
    autoscaler would have started a GPU node for the 8th."""
    service = _rayservice()
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    cluster = service["spec"]["rayClusterConfig"]
    assert float(cluster["headGroupSpec"]["rayStartParams"].get("num-cpus", "1")) == 0  # nothing runs on the head
    (cpu_group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "cpu"]
    node_cpus = float(cpu_group["rayStartParams"]["num-cpus"])
    free = [node_cpus] * int(cpu_group["maxReplicas"])
    replicas = []
    for deployment in serve_config["applications"][0]["deployments"]:
        count = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        replicas += [float(deployment["ray_actor_options"]["num_cpus"])] * count
    for need in sorted(replicas, reverse=True):  # first fit, largest first: a lower bound on what fits
        slot = next((i for i, cpus in enumerate(free) if cpus >= need), None)
        assert slot is not None, f"a replica needing {need} CPUs finds no CPU node with room at full scale"
        free[slot] -= need


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
@pytest.mark.parametrize(
    "other,refused",
    [([], False), (["METRICS_PORT=18081"], True), (["HTTP_PORT=18001"], True)],
    ids=["same", "metrics", "http"],
)
def test_make_start_on_other_ports_while_one_runs_is_refused(tmp_path: Path, other: list[str], refused: bool) -> None:
    """README (Service): "a `make run` on other ports while one runs is refused: `make stop` first". Only the
    gRPC and Redis ports were compared with the running ones: `make run METRICS_PORT=…` (or HTTP_PORT) found
    the service "already running", exited 0 and printed a metrics/healthz address nothing listens on. The
    running service and Redis are stood in for by a live process whose pid is in the run directory."""
    stamp = (
        ".venv/.installed-"
        + hashlib.md5(
            (ROOT / "pyproject.toml").read_bytes() + (ROOT / "clients" / "python" / "pyproject.toml").read_bytes()
        ).hexdigest()[:12]
    )
    # named as both (make checks a pid file's process by its command line: a reused pid is not the service)
    alive = subprocess.Popen(["bash", "-c", 'exec -a "redis-server ierf.serving serve" sleep 60'])
    try:
        for name, port in (("redis", "16379"), ("service", "19000 8080 8000")):  # as make start records them
            (tmp_path / f"{name}.pid").write_text(f"{alive.pid}\n")
            (tmp_path / f"{name}.port").write_text(f"{port}\n")
        ports = ["GRPC_PORT=19000", "REDIS_PORT=16379", f"RUN_DIR={tmp_path}"]
        done = subprocess.run(
            ["make", "-s", "-C", str(ROOT), "-o", stamp, "start", *ports, *other],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        alive.kill()
        alive.wait()
    if refused:
        assert done.returncode != 0, done.stdout + done.stderr
        assert "make stop first" in done.stdout + done.stderr
    else:  # the same ports: the running service is taken as it is
        assert done.returncode == 0 and "service already running" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_start_records_the_ports_it_compares_a_later_start_with(tmp_path: Path) -> None:
    """`make start` writes run/service.port and a later `make start` compares its own ports with it: the two
    must agree. Had the writer kept recording the gRPC port alone, a second `make run` on the very same ports
    would be refused ("make stop first") and one on other metrics/HTTP ports still taken as "already running".
    The service is stood in for by a script in place of the venv's python that only marks itself ready; Redis
    by a live process whose pid is in the run directory."""
    stamp = (
        ".venv/.installed-"
        + hashlib.md5(
            (ROOT / "pyproject.toml").read_bytes() + (ROOT / "clients" / "python" / "pyproject.toml").read_bytes()
        ).hexdigest()[:12]
    )
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run.mkdir()
    fake = bin_dir / "python"
    fake.write_text(
        '#!/bin/bash\nargs="$*"\nwhile [ $# -gt 0 ]; do [ "$1" = --ready-file ] && touch "$2"; shift; done\n'
        'exec -a "python $args" sleep 60\n'  # keeps the launcher's command line, by which make knows it
    )
    fake.chmod(0o755)
    redis = subprocess.Popen(["bash", "-c", "exec -a redis-server sleep 60"])
    (run / "redis.pid").write_text(f"{redis.pid}\n")
    (run / "redis.port").write_text("16379\n")
    ports = ["GRPC_PORT=19000", "METRICS_PORT=18080", "HTTP_PORT=18000", "REDIS_PORT=16379"]

    def start(*other: str) -> subprocess.CompletedProcess[str]:
        command = ["make", "-s", "-C", str(ROOT), "-o", stamp, "start", f"RUN_DIR={run}", f"BIN={bin_dir}"]
        return subprocess.run([*command, *ports, *other], capture_output=True, text=True, timeout=60)

    try:
        first = start()
        assert first.returncode == 0 and "service ready" in first.stdout, first.stdout + first.stderr
        again = start()
        assert again.returncode == 0 and "service already running" in again.stdout, again.stdout + again.stderr
        other = start("METRICS_PORT=18081")
        assert other.returncode != 0 and "make stop first" in other.stdout + other.stderr, other.stdout
    finally:
        redis.kill()
        redis.wait()
        pid = (run / "service.pid").read_text().strip() if (run / "service.pid").exists() else ""
        if pid:
            subprocess.run(["kill", pid], check=False)

"""Deploy artefacts checked by the tools that consume them, not by regexes.

* ``promtool check rules`` parses the PrometheusRule's alerts, and ``promtool test rules`` runs
  tests/serving/alerts_test.yaml: each alert fires on series shaped as Ray and the PodMonitor export them and
  stays silent in the look-alike situation it is not for.
* ``promtool check rules`` parses every query of the Grafana dashboard (as recording rules, Grafana's variables
  substituted).
* The real ``prometheus`` scrapes the live service every second and answers every panel and alert query
  (integration).
* ``kubernetes-validate --strict`` checks every built-in kind in deploy/k8s, and the RayService's pod templates
  as core PodTemplates: a misspelt field, silently dropped by the API server, fails here.

The binaries come from Debian's prometheus package (``make prometheus-tools``, run by ``make test``) in
.venv/tools, else from PATH. A missing tool skips these tests on a developer's machine; under CI (``CI`` set,
as .ci/run does) it fails them, so CI cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "ierf-service.json"
TOOLS = ROOT / ".venv" / "tools"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 carries
# Kinds the API server only knows once an operator installs its CRD: no offline schema (kubernetes-validate
# carries Kubernetes' own types only; KubeRay publishes none on PyPI, and cloudcoil's Prometheus Operator
# models need Python >= 3.14 in their current release). The RayService's pod templates are checked as core
# PodTemplates below and the PrometheusRule's rules by promtool (which refuses unknown fields); the rest is
# read by test_deploy.py and test_security_deploy.py.
CRD_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}
# Panels that may stay empty on a lone local service after one good and one bad request: no redis_exporter,
# no Redis trouble, no job stopped part-way. Every other panel query must return series (its selectors match
# what Ray really exports).
MAY_BE_EMPTY = (
    "Redis trouble",
    "Redis memory and evictions",
    "Worker jobs stopped part-way",
)


def _missing(what: str) -> None:
    """Skip for a developer without the tool; fail under CI, where the build installs it."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{what}, and CI is set: the build must install it (make test)")
    pytest.skip(f"{what}; skipped as CI is not set (under CI this fails)")


def _tool(name: str) -> str:
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        _missing(f"{name} is not installed (make prometheus-tools puts it in {TOOLS}; not on PATH either)")
    return str(found)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _prometheus_rule() -> dict[str, Any]:
    (rule,) = [d for d in yaml.safe_load_all((K8S / "alerts.yaml").read_text()) if d]
    return rule


def _alerts() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in _prometheus_rule()["spec"]["groups"] for r in g["rules"]}


# ------------------------------------------------------------------------------------------------ alerts


def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    """The PrometheusRule's spec is a Prometheus rules file: the operator hands it over as is."""
    promtool = _tool("promtool")
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(_prometheus_rule()["spec"], sort_keys=False))
    result = _run([promtool, "check", "rules", "alerts.rules.yaml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout, result.stdout


def test_every_alert_fires_when_it_should_and_not_otherwise(tmp_path: Path) -> None:
    """``promtool test rules`` on alerts_test.yaml, which must cover every alert the rule ships."""
    promtool = _tool("promtool")
    tests = (Path(__file__).parent / "alerts_test.yaml").read_text()
    covered = set(re.findall(r"alertname: (\w+)", tests))
    assert covered == set(_alerts()), f"alerts without a promtool test: {set(_alerts()) - covered}"
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(_prometheus_rule()["spec"], sort_keys=False))
    (tmp_path / "alerts_test.yaml").write_text(tests)
    result = _run([promtool, "test", "rules", "alerts_test.yaml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------- dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels folded into a row


def dashboard_queries(rate_interval: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, Grafana's variables replaced as Grafana would: the
    interval ones by ``rate_interval``, a template variable by its All value (every namespace)."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {"__rate_interval": rate_interval, "__interval": rate_interval, "__range": rate_interval}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            continue
        values[var["name"]] = (var.get("allValue") or ".*") if var.get("includeAll") else var["current"]["value"]

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"dashboard query uses an unknown variable ${name}"
        return values[name]

    queries = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                expr = re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, target["expr"])
                queries.append((panel.get("title", "?"), expr))
    return queries


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each panel query as a recording rule: promtool parses it with Prometheus's own PromQL parser."""
    promtool = _tool("promtool")
    queries = dashboard_queries("1m")
    assert len(queries) >= 20, queries
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", "dashboard.rules.yaml"], tmp_path)
    titled = "\n".join(f"dashboard:query_{i}  {title}: {expr}" for i, (title, expr) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{titled}"


def test_hit_ratio_panel_reads_zero_when_every_get_misses(tmp_path: Path) -> None:
    """A cold cache, or a Redis flushed or evicting everything, is when the hit ratio matters, and then no
    ``result="hit"`` series exists: ``hits / gets`` has nothing on its left and the panel said "No data"
    instead of 0 %. The panel's own query, run by ``promtool test rules`` on series with misses only."""
    promtool = _tool("promtool")
    (expr,) = [e for title, e in dashboard_queries("5m") if title == "Hit ratio by tier"]
    labels = 'application="ierf",deployment="Worker_efficientnet_lite0",replica="4ksbxxmq",namespace="prod"'
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'ray_explainer_cache_requests_total{{{labels},tier="l2",op="get",result="miss"}}',
                        "values": "0+60x10",
                    },
                    {
                        "series": f'ray_explainer_cache_requests_total{{{labels},tier="l2",op="put",result="stored"}}',
                        "values": "0+60x10",
                    },
                    {
                        "series": f'ray_explainer_cache_requests_total{{{labels},tier="l1",op="get",result="hit"}}',
                        "values": "0+30x10",
                    },
                    {
                        "series": f'ray_explainer_cache_requests_total{{{labels},tier="l1",op="get",result="miss"}}',
                        "values": "0+30x10",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "10m",
                        "exp_samples": [{"labels": '{tier="l1"}', "value": 0.5}, {"labels": '{tier="l2"}', "value": 0}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "hit_ratio_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = _run([promtool, "test", "rules", "hit_ratio_test.yaml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- Kubernetes schemas


def _kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (a dev dependency: make venv installs it)")
    return kubernetes_validate


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        (name, doc)
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def _pod_templates(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(group, spec["template"]) for group, spec in groups]


def _validate(kv: Any, doc: dict[str, Any]) -> str | None:
    """The schema's complaint about ``doc``, or None."""
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def test_builtin_kinds_validate_against_the_kubernetes_schemas_strictly() -> None:
    """Deployment, Service, ConfigMap, NetworkPolicy: strict, so an unknown or misspelt field fails (the API
    server drops it silently: a misspelt securityContext key leaves the container running as configured
    nowhere)."""
    kv = _kubernetes_validate()
    checked, errors = [], []
    for name, doc in _k8s_documents():
        if doc["kind"] in CRD_KINDS:
            continue
        error = _validate(kv, doc)
        checked.append(f"{doc['kind']}/{doc['metadata']['name']}")
        if error:
            errors.append(f"{name} {doc['kind']}/{doc['metadata']['name']}: {error}")
    assert not errors, errors
    assert {c.split("/")[0] for c in checked} >= {"Deployment", "Service", "ConfigMap", "NetworkPolicy"}, checked
    kinds = {doc["kind"] for _, doc in _k8s_documents()}
    assert kinds - CRD_KINDS - {"Deployment", "Service", "ConfigMap", "NetworkPolicy"} == set(), kinds


def test_rayservice_pod_templates_validate_as_core_pod_templates() -> None:
    """The RayService has no offline schema, but its head and worker ``template`` are core PodTemplateSpecs
    (KubeRay copies them into the pods): securityContext, env, ports and resources checked strictly."""
    kv = _kubernetes_validate()
    (service,) = [doc for _, doc in _k8s_documents() if doc["kind"] == "RayService"]
    errors = []
    for group, template in _pod_templates(service):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ierf-{group}"}, "template": template}
        error = _validate(kv, doc)
        if error:
            errors.append(f"rayservice.yaml {group} group's template: {error}")
    assert not errors, errors


# -------------------------------------------------------------------------------------------- integration


def _get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _query(base: str, expr: str) -> dict[str, Any]:
    """Prometheus's answer to an instant query; an HTTP error (400: bad query, 422: cannot evaluate) is
    returned as its JSON body, which says why."""
    try:
        return _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"{}") | {"status": "error", "http": e.code}


@contextlib.contextmanager
def _prometheus(metrics_port: int, rules: dict[str, Any]) -> Iterator[str]:
    """The real Prometheus on 127.0.0.1 scraping Ray's metrics endpoint every second and evaluating
    ``rules`` every second; stopped and its data removed however the test ends."""
    from ierf.serving.local import free_port

    binary = _tool("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="ierf-prometheus-"))
    process, log = None, None
    try:
        (workdir / "alerts.rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "alerts.rules.yaml")],
            "scrape_configs": [{"job_name": "ierf", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (workdir / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                break
            assert time.monotonic() < deadline, "prometheus not ready after 30 s"
            time.sleep(0.2)
        yield base
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if log is not None:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.integration
def test_prometheus_scraping_the_service_answers_every_panel_and_alert(live_service) -> None:
    """Prometheus itself scrapes Ray's metrics endpoint after one Explain and one bad request: each dashboard
    query evaluates without error and, but for the panels of MAY_BE_EMPTY, returns series (its selectors match
    what Ray really exports); every Serve metric the dashboard and the alerts read is exported; each alert
    rule evaluates without error, and IerfNotReporting, whose absent() fires when its selector matches
    nothing, stays inactive on the running service."""
    from ierf_client import Client, InvalidArgumentError

    with _prometheus(live_service.metrics_port, _prometheus_rule()["spec"]) as base:
        with Client(live_service.grpc_address, timeout=180) as client:
            client.wait_until_serving(timeout=120)
            # a fresh image: a cold request, so the cache's misses and Redis writes are counted now
            client.explain(np.random.default_rng(time.time_ns()).integers(0, 256, (64, 64, 3), np.uint8))
            with pytest.raises(InvalidArgumentError):
                client.predict(b"not an image")  # an error for the errors panel
        queries = dashboard_queries("10s")  # ten 1 s scrapes: rate() has samples to work with
        filled = [(title, expr) for title, expr in queries if not title.startswith(MAY_BE_EMPTY)]
        assert len(filled) >= 15, [t for t, _ in queries]
        deadline = time.monotonic() + 60
        while True:  # Ray exports each replica's samples every few seconds; then 1 s to the scrape
            empty = [(t, e) for t, e in filled if not _query(base, e).get("data", {}).get("result")]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not empty, f"panels without data after an Explain: {empty}"
        scraped = set(_get(f"{base}/api/v1/label/__name__/values")["data"])
        read = {m for _, e in queries for m in re.findall(r"\bray_serve_\w+", e)}
        read |= {m for e in _alerts().values() for m in re.findall(r"\bray_serve_\w+", e)}
        assert read - scraped == set(), (
            f"Serve metrics the dashboard or alerts read that Ray does not export: {read - scraped}"
        )

        failed = [(t, e, r) for t, e in queries if (r := _query(base, e))["status"] != "success"]
        assert not failed, f"dashboard queries Prometheus refused: {failed}"
        failed = [(a, e, r) for a, e in _alerts().items() if (r := _query(base, e))["status"] != "success"]
        assert not failed, f"alert expressions Prometheus refused: {failed}"

        def settled(rules: list[dict[str, Any]]) -> bool:
            # a scrape missed under load marks the series stale for a moment, and absent() then goes pending
            return all(r["health"] == "ok" for r in rules) and all(
                r["state"] == "inactive" for r in rules if r["name"] == "IerfNotReporting"
            )

        deadline = time.monotonic() + 15
        while True:  # the rule manager's own evaluation, every 1 s
            rules = [r for g in _get(f"{base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            if settled(rules) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {r["name"] for r in rules} == set(_alerts())
        assert settled(rules), [(r["name"], r["health"], r["state"], r.get("lastError")) for r in rules]

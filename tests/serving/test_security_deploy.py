"""deploy/k8s as a security reviewer reads it: who can reach what, and what a pod can do if taken over.

Each test parses the manifests (no cluster needed) and checks one property.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _policy(name: str) -> dict:
    (policy,) = [d for d in _docs("networkpolicy.yaml") if d["metadata"]["name"] == name]
    return policy


def test_the_dashboard_is_open_only_to_the_operators_namespace_not_to_a_label_anyone_can_set() -> None:
    """8265/52365 accept Ray jobs, i.e. run code in the Ray pods (which may write to Redis and so change
    every map served). The rule admits ``namespaceSelector: {}`` (every namespace) plus a pod label: any
    user who can create a pod in any namespace of the cluster can label it
    ``app.kubernetes.io/component: kuberay-operator`` and submit jobs. The namespace must be pinned too
    (``kubernetes.io/metadata.name``, set by the API server and not by users)."""
    rules = _policy("ierf-ray")["spec"]["ingress"]
    dashboard = [r for r in rules if {p["port"] for p in r.get("ports", [])} & {8265, 52365}]
    assert dashboard, "no rule for the dashboard ports"
    for rule in dashboard:
        for peer in rule.get("from", []):
            selector = peer.get("namespaceSelector")
            assert selector is None or selector.get("matchLabels") or selector.get("matchExpressions"), (
                f"the dashboard rule admits pods from every namespace by a label alone: {peer}"
            )


def test_the_redis_exporter_is_not_open_to_every_pod_in_the_cluster() -> None:
    """redis_exporter's ``/scrape?target=redis://…&check-keys=…`` connects wherever it is told, from inside
    the Redis pod: ``target=redis://localhost:6379`` passes the 6379 rule (same pod, no policy applies)
    and lists ierf's keys (model ids, weights digests and the sha256 of every image explained) and
    sizes, and any other address makes the pod a Redis-protocol client of the attacker's choosing. The
    rule ``- ports: [9121]`` with no ``from`` admits the whole cluster; it should name Prometheus."""
    rules = _policy("ierf-redis")["spec"]["ingress"]
    exporter = [r for r in rules if 9121 in {p["port"] for p in r.get("ports", [])}]
    assert exporter, "no rule for the exporter's port"
    for rule in exporter:
        assert rule.get("from"), f"port 9121 is open to every pod in every namespace: {rule}"


def _pod_specs() -> dict[str, dict]:
    (redis,) = [d for d in _docs("redis.yaml") if d["kind"] == "Deployment"]
    (ray,) = [d for d in _docs("rayservice.yaml") if d["kind"] == "RayService"]
    specs = {"redis": redis["spec"]["template"]["spec"]}
    for group in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        specs[f"ray-worker-{group['groupName']}"] = group["template"]["spec"]
    return specs


def test_pods_that_never_call_the_kubernetes_api_get_no_service_account_token() -> None:
    """Redis and the Ray worker pods (image decoding of anyone's uploads, Pillow, torch) never talk to the
    API server, yet get the namespace's default service account token mounted: whoever takes one over
    gets a credential for free. (The head keeps its token: the in-tree autoscaler uses it.)"""
    for name, spec in _pod_specs().items():
        assert spec.get("automountServiceAccountToken") is False, f"{name} mounts a service account token"


def test_the_readme_says_plainly_that_the_service_authenticates_no_one() -> None:
    """The service checks no caller and speaks plaintext gRPC only; the NetworkPolicy opens 9000 to every
    pod of the cluster. The README says this nowhere in words (only the .proto's header: "the service
    itself checks none"), while the CLI section speaks of "a refused token" and the SDK sends one: an
    operator can read that as authentication being there. Say it in the Service/Deploy text, with what
    to put in front (an authenticating, TLS-terminating gateway)."""
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"no authentication|does not authenticate|authenticates no|unauthenticated", readme, re.I), (
        "README never states that the service does no authentication"
    )

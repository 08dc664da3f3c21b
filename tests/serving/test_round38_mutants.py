"""Mutation round 38, SDK and dashboard: ``check_application``'s printable-ASCII range (M66), and the Grafana
panel queries (M53-M56, M60).

gRPC metadata values may hold any printable ASCII character, 0x20 (space) through 0x7E (tilde); the existing
tests checked the space end of the range only. The dashboard tests are below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ierf_client import Client
from ierf_client._core import check_application

from serving.test_deploy_tools import DASHBOARD, _panels, _run, _tool, dashboard_queries


@pytest.mark.parametrize("application", ["~", "ierf~blue", " ", "!\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~"])
def test_every_printable_ascii_character_is_a_valid_application_name(application: str) -> None:
    """M66: the tilde (0x7E, the last printable ASCII character) is sent by gRPC like any other."""
    assert check_application(application) == application
    Client("127.0.0.1:1", application=application).close()


@pytest.mark.parametrize("application", ["\x7f", "ierf\x1f", "\u00a0"])
def test_the_characters_just_outside_printable_ascii_are_refused(application: str) -> None:
    """DEL (0x7F), the unit separator (0x1F) and a no-break space (0xA0), each beside the printable range."""
    with pytest.raises(ValueError, match=r"^application must be printable ASCII"):
        check_application(application)


# --------------------------------------------------------------------------------------------- dashboard
# Round 38's dashboard mutants that no test read: a quantile other than the one the legend names (M53), a
# p50 query that no longer matches its p99 twin (M56), a legend label the query sums away (M54), the waits
# the "Time per stage" panel leaves out (M55), and a per-second panel graphing increase() (M60). The
# integration test only checks that a query returns series, which all of these still do.


def _targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel, target) for panel in _panels(dashboard["panels"]) for target in panel.get("targets", [])]


def test_each_quantile_query_computes_the_quantile_its_legend_or_title_names() -> None:
    """M53: a "p99" line computed as histogram_quantile(0.9, ...) reads as the p99 and understates the tail;
    the p50 and p99 queries of one panel are the same query but for the quantile (M56: one lost code="OK")."""
    checked = 0
    for panel, target in _targets():
        quantiles = re.findall(r"histogram_quantile\(([0-9.]+),", target["expr"])
        if not quantiles:
            continue
        named = re.findall(r"\bp(\d+)\b", target.get("legendFormat") or "") or re.findall(r"\bp(\d+)\b", panel["title"])
        assert len(named) == 1 and quantiles == [str(int(named[0]) / 100)], (panel["title"], target)
        checked += 1
    assert checked >= 7
    for panel in _panels(json.loads(DASHBOARD.read_text())["panels"]):
        shapes = {
            re.sub(r"histogram_quantile\([0-9.]+,", "histogram_quantile(Q,", t["expr"])
            for t in panel.get("targets", [])
        }
        if any("histogram_quantile" in t["expr"] for t in panel.get("targets", [])):
            assert len(shapes) == 1, (panel["title"], shapes)


def test_every_label_a_legend_shows_is_kept_by_its_query() -> None:
    """M54: a legend "{{rpc}} {{code}}" over ``sum by (rpc)`` shows an empty code and one line per RPC, all
    codes summed: INTERNAL errors then hide among the callers' INVALID_ARGUMENT."""
    for panel, target in _targets():
        shown = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat") or "")
        for group in re.findall(r"\bby \(([^)]*)\)", target["expr"]):
            kept = {label.strip() for label in group.split(",")}
            assert set(shown) <= kept, (panel["title"], target["expr"], set(shown) - kept)


def _promql_test(tmp_path: Path, title: str, series: list[tuple[str, str]], expected: list[dict[str, Any]]) -> None:
    """``promtool test rules`` of the panel ``title``'s one query on ``series`` (1 m apart), at 10m."""
    promtool = _tool("promtool")
    (expr,) = [e for t, e in dashboard_queries("5m") if t.startswith(title)]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [{"expr": expr, "eval_time": "10m", "exp_samples": expected}],
            }
        ],
    }
    (tmp_path / "panel_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = _run([promtool, "test", "rules", "panel_test.yaml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


LABELS = 'application="ierf",replica="4ksbxxmq",namespace="prod",model="efficientnet_lite0"'


def test_time_per_stage_leaves_out_the_waits_and_counts_the_work(tmp_path: Path) -> None:
    """M55: the panel's title says admission, dispatch and queue waits are left out (a request waiting is not
    busy time): a queue wait would show as worker load exactly when the workers are saturated."""
    work = [
        ("Ingress", "decode", 6),
        ("Worker_efficientnet_lite0", "forward", 30),
        ("Worker_efficientnet_lite0", "explain", 60),
    ]
    waits = [("Ingress", "admission", 120), ("Ingress", "dispatch", 120), ("Worker_efficientnet_lite0", "queue", 120)]
    series = [
        (f'ray_explainer_stage_seconds_total{{{LABELS},deployment="{d}",stage="{s}"}}', f"0+{per_minute}x10")
        for d, s, per_minute in work + waits
    ]
    expected = [{"labels": f'{{deployment="{d}",stage="{s}"}}', "value": per_minute / 60} for d, s, per_minute in work]
    _promql_test(tmp_path, "Time per stage", series, expected)


def test_the_errors_panel_graphs_errors_per_second(tmp_path: Path) -> None:
    """M60: the panel's unit is reqps; increase() over the interval would graph 300 for one error a second
    (at a 5 m interval) and change with the zoom."""
    series = [
        (
            f'ray_explainer_errors_total{{{LABELS},deployment="Ingress",rpc="Explain",code="INTERNAL",reason="none"}}',
            "0+60x10",
        )
    ]
    _promql_test(
        tmp_path, "Errors by RPC and code", series, [{"labels": '{code="INTERNAL",rpc="Explain"}', "value": 1}]
    )

"""``docs/grafana/jt808-dashboard.json`` asks only for metrics and labels the project exports.

The known names come from the metric definitions themselves: a fresh registry with the
server's :class:`~ingest.metrics.Metrics` and the rule engine's
:class:`~tools.rules_consumer.RuleMetrics`, and prometheus_client's global registry, which
holds the storage metrics (``storage/metrics.py``) and the process collector (RSS, CPU).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import storage.metrics
from ingest.metrics import Metrics
from tools.rules_consumer import RuleMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "jt808-dashboard.json"
# The sample names a metric family of each type exposes (the text format's suffixes).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
# Labels every series has once scraped, and the bucket bound of histograms.
SCRAPE_LABELS = {"job", "instance", "le"}
# PromQL words that are neither metrics nor labels.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w$])[A-Za-z_:][A-Za-z0-9_:]*")


def _known_metrics() -> dict[str, set[str]]:
    """Every sample name the project exports, with the label names it carries."""
    registry = CollectorRegistry()
    wrappers: list[Any] = [*vars(Metrics(registry)).values(), *vars(RuleMetrics(registry)).values()]
    wrappers += vars(storage.metrics).values()
    labels: dict[str, set[str]] = {}
    for wrapper in wrappers:
        if isinstance(wrapper, MetricWrapperBase):
            labels[wrapper._name] = set(wrapper._labelnames)
    known: dict[str, set[str]] = {}
    for reg in (registry, prometheus_client.REGISTRY):
        for family in reg.collect():
            for suffix in SUFFIXES[family.type]:
                known[family.name + suffix] = labels.get(family.name, set())
            for sample in family.samples:  # the process collector's, labels and all
                known.setdefault(sample.name, set()).update(sample.labels)
    return known


def _expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: {query}"
            # label_values(SELECTOR, LABEL): the label must be one SELECTOR can be grouped by
            yield f"variable {variable['name']}", f"sum by ({match.group(2)}) ({match.group(1)})"


def _names_and_labels(expr: str) -> tuple[set[str], list[tuple[str, str]]]:
    """The metric names of ``expr``, and (metric or '', label) for every label it names."""
    labels: list[tuple[str, str]] = []
    text = _STRING.sub('""', expr)
    for metric, inside in _MATCHERS.findall(text):
        labels += [(metric, m) for m in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", inside)]
    text = _MATCHERS.sub(lambda m: m.group(1) or "", text)
    for grouping in _GROUPING.findall(text):
        labels += [("", label.strip()) for label in grouping.split(",") if label.strip()]
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors: [$__rate_interval], [5m]
    names = set()
    for match in _IDENT.finditer(text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if word.lower() in KEYWORDS or rest.startswith("("):  # functions and aggregations
            continue
        names.add(word)
    return names, labels


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def test_the_parser_finds_names_and_labels() -> None:
    names, labels = _names_and_labels(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", x="a{b}"}[5m])))'
        " / on (instance) b and sum without (c) (rate(d_total[$__rate_interval])) > 0.5"
    )
    assert names == {"a_bucket", "b", "d_total"}
    assert sorted(labels) == [
        ("", "c"),
        ("", "instance"),
        ("", "le"),
        ("a_bucket", "job"),
        ("a_bucket", "x"),
    ]


def test_every_metric_and_label_of_the_dashboard_exists(dashboard: dict[str, Any]) -> None:
    known = _known_metrics()
    all_labels = set().union(*known.values()) | SCRAPE_LABELS
    used: set[str] = set()
    problems = []
    for where, expr in _expressions(dashboard):
        names, labels = _names_and_labels(expr)
        for name in names:
            used.add(name)
            if name not in known:
                problems.append(f"{where}: no metric {name}")
        for metric, label in labels:
            allowed = (known.get(metric, set()) | SCRAPE_LABELS) if metric in known else all_labels
            if label not in allowed:
                problems.append(f"{where}: no label {label} on {metric or 'any metric'}")
    assert problems == [], "\n".join(problems)
    # the figures the dashboard is for
    for name in (
        "jt808_connections_open",
        "jt808_sessions_authenticated",
        "jt808_storage_rows_total",
        "jt808_ack_latency_seconds_bucket",
        "jt808_storage_batch_write_seconds_bucket",
        "jt808_storage_spool_bytes",
        "jt808_storage_spool_replayed_records_total",
        "jt808_storage_db_up",
        "jt808_rules_lag_seconds_bucket",
        "jt808_rules_positions_judged_total",
        "jt808_rules_alert_changes_total",
        "jt808_http_requests_total",
        "jt808_http_login_failures_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert name in used, name


def test_a_wrong_name_is_caught() -> None:
    known = _known_metrics()
    names, _ = _names_and_labels('sum(rate(jt808_conections_total{job=~"$job"}[5m]))')
    assert names == {"jt808_conections_total"}
    assert not names <= set(known)
    assert "jt808_connections_total" in known
    assert known["jt808_http_requests_total"] == {"status"}


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    """The shape Grafana's import expects: a datasource variable every panel and query uses,
    unique panel ids, panels laid out on the 24-column grid without overlapping."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == source

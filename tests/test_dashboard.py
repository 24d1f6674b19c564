"""The Grafana dashboard only uses metrics the daemon exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jiaozifuse.metrics import Metrics


def test_dashboard_metrics_exist(tmp_repo) -> None:
    doc = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json")
                     .read_text())
    exported = set()
    for metric in Metrics(tmp_repo).registry.collect():
        # labelled series have no samples until first used: derive their names
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}.get(metric.type, ("",))
        exported |= {metric.name + sfx for sfx in suffixes}
    used = set()
    for panel in doc["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used |= set(re.findall(r"jiaozifuse_[a-z_]+", t["expr"]))
    missing = used - exported
    assert not missing, f"the dashboard uses metrics nobody exports: {sorted(missing)}"
    assert len(used) >= 10

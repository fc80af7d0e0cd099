"""The diffguard Grafana dashboard, built from code with grafana-foundation-sdk; ``k8s/monitoring/dashboard.json`` is
its output, shipped as a ConfigMap that Grafana's dashboard sidecar loads (k8s/monitoring/kustomization.yaml).

    python -m k8s.dashboard            # rewrite k8s/monitoring/dashboard.json
    python -m k8s.dashboard --check    # exit 1 if the JSON differs from what this module builds (the tests assert this)

The panels and their PromQL are in ``k8s/dashboard_panels.py``; this module adds the template variables and lays the
rows out. ``queries()`` lists (panel title, PromQL) for the tests and ``concrete()`` turns a query's Grafana variables
into plain PromQL ("All" selected), so promtool or a real Prometheus can run it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, VariableOption, VariableRefresh, VariableSort

from .dashboard_panels import DS, rows

OUTPUT = Path(__file__).resolve().parent / "monitoring" / "dashboard.json"
WHERE = "k8s/monitoring/dashboard.json"
UID = "diffguard-overview"  # stable: Grafana keys the dashboard (and links to it) by this

# What each template variable stands for when "All" is selected, and what promtool or a test Prometheus takes for
# Grafana's $__rate_interval (Grafana makes it at least 4x the scrape interval).
ALL = {"application": ".*", "tenant": ".*", "dest": ".*", "namespace": ".*"}
RATE_INTERVAL = "1m"


def variable(name: str, label: str, query: str) -> db.QueryVariable:
    """A multi-value variable filled from ``label_values(...)``; "All" (``.*``) is the default."""
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(ALL[name])
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def build() -> DashboardModel:
    """The dashboard model; panel ids are their position, so the output is the same on every run."""
    dash = (
        db.Dashboard("diffguard")
        .uid(UID)
        .description("diffguard moderation service and scans on Ray Serve: k8s/dashboard.py builds this dashboard.")
        .tags(["diffguard", "ray-serve", "moderation"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            variable("application", "Serve app", "label_values(ray_serve_deployment_replica_healthy, application)")
        )
        .with_variable(
            variable(
                "tenant", "Tenant", 'label_values(ray_diffguard_requests_total{application=~"$application"}, tenant)'
            )
        )
        .with_variable(variable("dest", "Scan destination", "label_values(ray_diffguard_scan_running, dest)"))
        .with_variable(variable("namespace", "GPU namespace", "label_values(DCGM_FI_DEV_GPU_UTIL, namespace)"))
    )
    for title, panels in rows():
        dash = dash.with_row(db.Row(title))
        for panel in panels:
            dash = dash.with_panel(panel)
    model = dash.build()
    for i, panel in enumerate(model.panels or [], start=1):
        panel.id_val = i
    return model


def render() -> str:
    """The dashboard JSON as committed: two-space indent, a final newline, no timestamps or version counters."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression with Grafana variables) for every query of every panel, in dashboard order."""
    return [(p.title, t.expr) for p in build().panels or [] if getattr(p, "targets", None) for t in p.targets]


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def concrete(expr: str, rate_interval: str = RATE_INTERVAL) -> str:
    """``expr`` as plain PromQL: ``$__rate_interval`` becomes ``rate_interval``, every other variable "All"."""
    values = {**ALL, "__rate_interval": rate_interval}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"query {expr!r}: unknown Grafana variable ${name}; known: {sorted(values)}")
        return values[name]

    return _VAR.sub(sub, expr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print("usage: python -m k8s.dashboard [--check]", file=sys.stderr)
        return 2
    text = render()
    current = OUTPUT.read_text() if OUTPUT.exists() else None
    if args == ["--check"]:
        if current != text:
            print(f"{WHERE}: differs from what k8s/dashboard.py builds; run `python -m k8s.dashboard`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(text)
        print(f"updated {WHERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

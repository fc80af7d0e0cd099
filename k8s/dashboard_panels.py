"""What the diffguard dashboard shows: its rows, panels and PromQL (``k8s/dashboard.py`` lays them out, adds the
template variables and writes the JSON).

Every query sums Ray's per-worker labels away (``sum by (...)``) and filters by the template variables
``$application`` and ``$tenant`` (Serve series), ``$dest`` (scan series) or ``$namespace`` (DCGM exporter series).
"""

from __future__ import annotations

from typing import TypeVar

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, ValueMap, ValueMappingResult

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")  # the dashboard's Prometheus datasource variable
APP = 'application=~"$application"'
TEN = f'{APP}, tenant=~"$tenant"'
DEST = 'dest=~"$dest"'
NS = 'namespace=~"$namespace"'
RI = "[$__rate_interval]"
P = TypeVar("P", timeseries.Panel, stat.Panel)


def rate(metric: str, selector: str) -> str:
    return f"rate({metric}{{{selector}}}{RI})"


def quantile(q: float, histogram: str, selector: str, by: str = "") -> str:
    """``histogram_quantile`` of a Ray histogram (``histogram`` without ``_bucket``), grouped by ``by`` and ``le``."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', selector)}))"


def mean(histogram: str, selector: str) -> str:
    return f"sum({rate(histogram + '_sum', selector)}) / sum({rate(histogram + '_count', selector)})"


def target(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def series(
    title: str, unit: str, description: str, *targets: prometheus.Dataquery, span: int = 12, stack: bool = False
) -> timeseries.Panel:
    """A time series panel, ``span`` of 24 columns wide; ``stack``: the series stack (shares that add up to 1)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .min(0)
        .span(span)
        .height(8)
        .fill_opacity(40 if stack else 10)
        .legend(
            cb.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if stack:
        panel = panel.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    return _with_targets(panel, targets)


def single(
    title: str,
    unit: str,
    description: str,
    *targets: prometheus.Dataquery,
    span: int = 6,
    mappings: dict[str, str] | None = None,
) -> stat.Panel:
    """A stat panel of the last value; ``mappings``: value -> text shown instead."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(span)
        .height(4)
        .color_mode(common.BigValueColorMode.NONE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if mappings:
        panel = panel.mappings([ValueMap(options={k: ValueMappingResult(text=v) for k, v in mappings.items()})])
    return _with_targets(panel, targets)


def _with_targets(panel: P, targets: tuple[prometheus.Dataquery, ...]) -> P:
    for i, t in enumerate(targets):
        panel = panel.with_target(t.ref_id(chr(ord("A") + i)))
    return panel


REQ, LAT = "ray_diffguard_requests_total", "ray_diffguard_moderation_latency_s"
SCORED, FLAGGED = "ray_diffguard_images_scored_total", "ray_diffguard_images_flagged_total"
ACTIONS, UNSCORABLE = "ray_diffguard_image_actions_total", "ray_diffguard_images_unscorable_total"
ERR5 = f'{TEN}, status=~"5.."'
PCT = (0.5, 0.95, 0.99)


def rows() -> list[tuple[str, list[timeseries.Panel | stat.Panel]]]:
    """The dashboard's rows, top to bottom: (row title, panels). Panel widths add up to 24 per line."""
    overview = [
        single("Decision requests/s", "reqps", "All routes and statuses.", target(f"sum({rate(REQ, TEN)})", "req/s")),
        single(
            "5xx share",
            "percentunit",
            "Decision requests answered 5xx: 503 when nothing could be released (checker or generator "
            "unavailable or slow, audit row not written, back pressure).",
            target(f"sum({rate(REQ, ERR5)}) / sum({rate(REQ, TEN)})", "5xx"),
        ),
        single("p99 moderation latency", "s", "The checker call, all routes.", target(quantile(0.99, LAT, TEN), "p99")),
        single(
            "Unscorable share",
            "percentunit",
            "Images read but not scorable, of all images decided.",
            target(f"sum({rate(UNSCORABLE, TEN)}) / sum({rate(SCORED, TEN)})", "unscorable"),
        ),
    ]
    requests = [
        series(
            "Requests and status by route",
            "reqps",
            "Decision requests answered, by route (generate, moderate) and HTTP status.",
            target(f"sum by (route, status) ({rate(REQ, TEN)})", "{{route}} {{status}}"),
        ),
        series(
            "Server error (5xx) share by route",
            "percentunit",
            "Share of decision requests answered 5xx.",
            target(f"sum by (route) ({rate(REQ, ERR5)}) / sum by (route) ({rate(REQ, TEN)})", "{{route}}"),
        ),
        series(
            "Latency percentiles by route",
            "s",
            "The checker call (images sent to verdicts back) p50, p95 and p99, by route.",
            *[target(quantile(q, LAT, TEN, "route"), f"p{round(q * 100)} {{{{route}}}}") for q in PCT],
        ),
        series(
            "Requests by tenant",
            "reqps",
            "Decision requests answered, by tenant.",
            target(f"sum by (tenant) ({rate(REQ, TEN)})", "{{tenant}}"),
        ),
    ]
    moderation = [
        series(
            "Images generated, scored and flagged by category",
            "ops",
            "Images/s. An image flagged by two concepts or categories counts once under each.",
            target(f"sum({rate('ray_diffguard_images_generated_total', APP)})", "generated"),
            target(f"sum({rate(SCORED, TEN)})", "scored"),
            target(f"sum by (concept) ({rate(FLAGGED, TEN)})", "flagged: {{concept}}"),
        ),
        series(
            "Flagged share by category",
            "percentunit",
            "Flagged images per concept or category, of all images scored.",
            target(
                f"sum by (concept) ({rate(FLAGGED, TEN)}) / on() group_left() sum({rate(SCORED, TEN)})", "{{concept}}"
            ),
        ),
        series(
            "Action mix",
            "percentunit",
            "Share of images decided by the action the policy took (allow, flag, blur, black, block).",
            target(
                f"sum by (action) ({rate(ACTIONS, TEN)}) / on() group_left() sum({rate(ACTIONS, TEN)})", "{{action}}"
            ),
            stack=True,
        ),
        series(
            "Unscorable share by reason",
            "percentunit",
            "Images read but not scorable (corrupt, too_large, unsupported, view_budget, detector, other), of all "
            "images decided.",
            target(
                f"sum by (reason) ({rate(UNSCORABLE, TEN)}) / on() group_left() sum({rate(SCORED, TEN)})", "{{reason}}"
            ),
            stack=True,
        ),
    ]
    batching = [
        series(
            "Checker batch size",
            "short",
            "Images per checker batch: p50, p95 and mean.",
            *[target(quantile(q, "ray_diffguard_checker_batch_size", APP), f"p{round(q * 100)}") for q in PCT[:2]],
            target(mean("ray_diffguard_checker_batch_size", APP), "mean"),
            span=8,
        ),
        series(
            "Generator batch size",
            "short",
            "Images and requests per generation call: p50 and p95.",
            *[
                target(quantile(q, f"ray_diffguard_generator_batch_{what}", APP), f"{what} p{round(q * 100)}")
                for what in ("images", "requests")
                for q in PCT[:2]
            ],
            span=8,
        ),
        series(
            "Generator queue and in-flight images",
            "short",
            "Images waiting in the generator replicas' batch queues, and images rendering now.",
            target(f"sum(ray_diffguard_generator_queue_images{{{APP}}})", "queued"),
            target(f"sum(ray_diffguard_generator_inflight_images{{{APP}}})", "rendering"),
            span=8,
        ),
    ]
    replicas = [
        series(
            "Healthy replicas by deployment",
            "short",
            "Healthy Serve replicas per deployment, and the autoscaler's target.",
            target(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}"),
            target(f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})", "{{deployment}} target"),
        ),
        series(
            "Queued and processing requests by deployment",
            "short",
            "Requests waiting for a replica (at the handles) and requests being processed by replicas.",
            target(f"sum by (deployment) (ray_serve_deployment_queued_queries{{{APP}}})", "{{deployment}} queued"),
            target(f"sum by (deployment) (ray_serve_replica_processing_queries{{{APP}}})", "{{deployment}} processing"),
        ),
    ]
    failures = [
        series(
            "Audit, keys and quota failures",
            "ops",
            "Audit rows not written (by route), keys file reloads refused, requests allowed without a quota check.",
            target(f"sum by (route) ({rate('ray_diffguard_audit_failures_total', APP)})", "audit {{route}}"),
            target(f"sum({rate('ray_diffguard_keys_reload_failures_total', APP)})", "keys reload"),
            target(f"sum by (tenant) ({rate('ray_diffguard_quota_unavailable_total', TEN)})", "quota {{tenant}}"),
            span=24,
        ),
    ]
    scan = [
        single(
            "Scan running",
            "short",
            "1 while a scan of this destination runs, 0 once it ended.",
            target(f"max by (dest) (ray_diffguard_scan_running{{{DEST}}})", "{{dest}}"),
            mappings={"0": "ended", "1": "running"},
        ),
        single(
            "Time since last scan progress",
            "s",
            "Seconds since a running scan last committed a part.",
            target(
                f"(time() - max by (dest) (ray_diffguard_scan_last_progress_timestamp_seconds{{{DEST}}}))"
                f" and on (dest) (max by (dest) (ray_diffguard_scan_running{{{DEST}}}) == 1)",
                "{{dest}}",
            ),
        ),
        single(
            "Scan objects per stage, totals",
            "short",
            "Objects listed, read, scored and flagged (withheld) by destination: every run of it on this cluster.",
            *[
                target(f"sum by (dest) (ray_diffguard_scan_objects_{stage}_total{{{DEST}}})", stage + " {{dest}}")
                for stage in ("listed", "read", "scored", "flagged")
            ],
            span=12,
        ),
        series(
            "Scan objects per stage",
            "ops",
            "Objects/s listed, read, scored and flagged, by destination.",
            *[
                target(
                    f"sum by (dest) ({rate(f'ray_diffguard_scan_objects_{stage}_total', DEST)})", stage + " {{dest}}"
                )
                for stage in ("listed", "read", "scored", "flagged")
            ],
        ),
        series(
            "Scan errors by kind",
            "ops",
            "Objects that could not be read or scored, and quarantine or tag actions that failed.",
            target(f"sum by (dest, kind) ({rate('ray_diffguard_scan_errors_total', DEST)})", "{{kind}} {{dest}}"),
            target(
                f"sum by (dest) ({rate('ray_diffguard_scan_quarantine_failures_total', DEST)})", "quarantine {{dest}}"
            ),
            span=6,
        ),
        series(
            "Scan bytes read",
            "Bps",
            "Bytes fetched per second, by destination.",
            target(f"sum by (dest) ({rate('ray_diffguard_scan_bytes_read_total', DEST)})", "{{dest}}"),
            span=6,
        ),
    ]
    used, free = (f"max by (pod, gpu) (DCGM_FI_DEV_FB_{k}{{{NS}}})" for k in ("USED", "FREE"))
    gpu = [
        series(
            "GPU utilisation by pod and GPU",
            "percent",
            "DCGM exporter: DCGM_FI_DEV_GPU_UTIL.",
            target(f"max by (pod, gpu) (DCGM_FI_DEV_GPU_UTIL{{{NS}}})", "{{pod}} gpu {{gpu}}"),
            span=8,
        ),
        series(
            "GPU memory used by pod and GPU",
            "bytes",
            "DCGM exporter: DCGM_FI_DEV_FB_USED (MiB, shown in bytes).",
            target(f"{used} * 1048576", "{{pod}} gpu {{gpu}}"),
            span=8,
        ),
        series(
            "GPU memory used share",
            "percentunit",
            "DCGM exporter: framebuffer used / (used + free).",
            target(f"{used} / ({used} + {free})", "{{pod}} gpu {{gpu}}"),
            span=8,
        ),
    ]
    return [
        ("Overview", overview),
        ("Requests and latency", requests),
        ("Moderation: scored, flagged, actions, unscorable", moderation),
        ("Batching and generator queue", batching),
        ("Replicas", replicas),
        ("Failures", failures),
        ("Scan progress", scan),
        ("GPU (DCGM exporter)", gpu),
    ]

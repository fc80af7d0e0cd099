"""Results -> text tables (stdout), Markdown tables (docs/BENCHMARKS.md is written from them) and target checks."""

from __future__ import annotations

from typing import Any


def table(headers: list[str], rows: list[list[Any]]) -> list[list[str]]:
    return [headers] + [[_fmt(v) for v in r] for r in rows]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
    return str(v)


def text(cells: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(cells: list[list[str]]) -> str:
    head, *body = cells
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def sections(results: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """(title, cells) for every section present in ``results``."""
    out = []
    for core in results.get("core", []):
        agree = core["agreement"]
        rows = []
        for r in core["rows"]:
            a = agree.get(f"{r['impl']} {r['dtype']}")
            agreement = None if a is None else f"{pct(a['calibrated']['agreement'])} / {pct(a['parity']['agreement'])}"
            rows.append(
                [
                    r["impl"],
                    r["dtype"],
                    r["batch"],
                    r["images_per_s"],
                    r["x_ref_float32"],
                    r["x_ref_same_dtype"],
                    r["gflops"],
                    pct(r["roofline"]),
                    agreement if r["impl"] != "diffusers" or r["dtype"] != "float32" else "(reference)",
                ]
            )
        peaks = core["roofline"]["peak_gflops"]
        title = (
            f"Core vs diffusers, {core['arch']} ({core['roofline']['gflop_per_image']:.1f} GFLOP/image; matmul limit "
            f"float32 {peaks['float32']['gflops']:.0f}, bfloat16 {peaks['bfloat16']['gflops']:.0f} GFLOP/s; "
            f"agreement on {agree['images']} images, calibrated / parity thresholds)"
        )
        headers = ["impl", "dtype", "batch", "images/s", "x ref f32", "x ref dtype", "GFLOP/s", "roofline", "agree"]
        out.append((title, table(headers, rows)))
    if "preprocess" in results:
        rows = [
            [r["images"], r["batch"], r["clip_image_processor"], r["diffguard"], r["x_ref"]]
            for r in results["preprocess"]
        ]
        headers = ["images", "batch", "CLIPImageProcessor/s", "diffguard/s", "x ref"]
        out.append(("Preprocessing (images/s)", table(headers, rows)))
    if "views" in results:
        v = results["views"]
        rows = [
            [
                r["corpus"],
                r["views_per_object"],
                r["objects_per_s"],
                r["views_per_s"],
                r["ms_per_object"],
                r["x_single_objects"],
            ]
            for r in v["rows"]
        ]
        headers = ["objects", "views/object", "objects/s", "views/s", "ms/object", "x single"]
        out.append(
            (
                f"Views: objects with many views vs single images ({v['model']}, {v['batch']} objects a call)",
                table(headers, rows),
            )
        )
    if "service" in results:
        s = results["service"]
        rows = [
            [
                r["variant"],
                r["clients"],
                r["images_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["mean_batch"],
                r["core_images_per_s"],
                pct(r["x_core"]),
                r.get("x_unbatched"),
                r["errors"],
            ]
            for r in s["rows"]
        ]
        headers = ["variant", "clients", "images/s", "p50 ms", "p99 ms", "batch", "core/s", "of core", "x off", "err"]
        out.append((f"Service /v1/moderate ({s['model']}, dtype {s['dtype']}, {s['image']})", table(headers, rows)))
    if "scan" in results:
        s = results["scan"]
        runs = s["runs"] + ([s["one_thread_run"]] if "one_thread_run" in s else [])
        rows = [
            [r["prefix"], r["objects"], r["scanned"], r["errors"], r["seconds"], r["scanned"] / r["seconds"]]
            for r in runs
        ]
        title = (
            f"Scan ({s['model']}, dtype {s['dtype']}, {s['image']}): core alone {s['core_images_per_s']:.1f}/s; "
            f"end to end {s['end_to_end_images_per_s']:.1f}/s ({pct(s['x_core_end_to_end'])} of core)"
        )
        if "streaming_images_per_s" in s:
            title += (
                f"; streaming {s['streaming_images_per_s']:.1f}/s ({pct(s['x_core_streaming'])} of core), "
                f"fixed cost {s['fixed_seconds']:.1f} s"
            )
        if "one_thread_end_to_end_images_per_s" in s:
            title += (
                f"; before (--threads 1, Ray's default): end to end {s['one_thread_end_to_end_images_per_s']:.1f}/s "
                f"({pct(s['x_core_one_thread_end_to_end'])} of core)"
            )
        if "one_thread_streaming_images_per_s" in s:
            title += (
                f", streaming {s['one_thread_streaming_images_per_s']:.1f}/s "
                f"({pct(s['x_core_one_thread_streaming'])} of core)"
            )
        out.append((title, table(["run", "objects", "scanned", "errors", "seconds", "images/s"], rows)))
    if "growth" in results:
        g = results["growth"]
        base = g["reruns"][0]["driver_peak_rss_mib"] if g["reruns"] else None
        rows = [
            [r["objects"], r["seconds"], r["driver_peak_rss_mib"], r["driver_peak_rss_mib"] / base] for r in g["reruns"]
        ]
        title = "Scan growth: a no-change rerun listed by an S3 Inventory report (moto SOURCE, local DEST)"
        out.append((title, table(["objects", "seconds", "driver peak MiB", "x smallest"], rows)))
        rows = [
            [r["input"], r["objects"], r["seconds"], r["images_per_s"], r["driver_peak_rss_mib"]]
            for r in g["first_runs"]
        ]
        title = "Scan first runs over real tiny images (8x8 PNG, tiny checker), end to end incl. Ray start"
        if rows:  # the quick run has none (its scan section is a first run)
            out.append((title, table(["input", "objects", "seconds", "images/s", "driver peak MiB"], rows)))
    if "generate" in results:
        g = results["generate"]
        rows = [
            [r["shapes"], r["clients"], r["off_images_s"], r["on_images_s"], r["ratio"], r["mean_batch_images_on"]]
            for r in g["rows"]
        ]
        headers = ["shapes", "clients", "off images/s", "on images/s", "x off", "mean batch (on)"]
        title = f"Generation batching across requests ({g['model']}, {g['steps']} steps; on: max 8 images per call)"
        out.append((title, table(headers, rows)))
        c = g["checker"]
        rows = [
            [m, c[m]["images_s"], c[m]["decode_ms"], c[m]["preprocess_ms"], c[m]["model_ms"]] for m in ("serial", "fed")
        ]
        title = f"Fed checker ({c['model']}, batch {c['batch']}): fed / serial {c['ratio']:.2f}x"
        out.append((title, table(["mode", "images/s", "decode ms/img", "preprocess ms/img", "model ms/img"], rows)))
    if results.get("targets"):
        rows = [[t["target"], t["measured"], "met" if t["met"] else "MISSED"] for t in results["targets"]]
        out.append(("Targets (this machine)", table(["target", "measured", ""], rows)))
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked against this run (reported, never asserted)."""
    out = []
    cores = {c["arch"]: c for c in results.get("core", [])}
    core = cores.get("ViT-L/14") or next(iter(cores.values()), None)
    if core:
        rows = {(r["impl"], r["dtype"], r["batch"]): r for r in core["rows"]}
        agree = core["agreement"]
        bf = rows.get(("diffguard", "bfloat16", 8))
        if bf:
            a = agree["diffguard bfloat16"]
            measured = (
                f"{bf['x_ref_float32']:.2f}x, agreement {pct(a['calibrated']['agreement'])} calibrated, "
                f"{pct(a['parity']['agreement'])} parity ({core['arch']})"
            )
            met = bf["x_ref_float32"] >= 2 and min(a[k]["agreement"] for k in ("calibrated", "parity")) >= 0.99
            out.append(
                {
                    "target": "bf16 core >= 2x f32 reference at batch 8, >= 99% agreement",
                    "measured": measured,
                    "met": met,
                }
            )
        f32 = [r for (i, d, _), r in rows.items() if i == "diffguard" and d == "float32"]
        a = agree["diffguard float32"]
        worst = min(r["x_ref_float32"] for r in f32)
        identical = a["calibrated"]["differ"] == 0 and a["parity"]["differ"] == 0
        out.append(
            {
                "target": "f32 core >= 1x reference, identical decisions",
                "measured": f"{worst:.2f}x at worst, {a['calibrated']['differ']} + {a['parity']['differ']} differ",
                "met": worst >= 1 and identical,
            }
        )
        for dtype in ("float32", "bfloat16"):
            big = [r for (i, d, b), r in rows.items() if i == "diffguard" and d == dtype and b >= 8]
            if big:
                worst_roof = min(r["roofline"] for r in big)
                out.append(
                    {
                        "target": f">= 75% of the {dtype} matmul roofline at batch >= 8",
                        "measured": f"{pct(worst_roof)} at worst ({core['arch']})",
                        "met": worst_roof >= 0.75,
                    }
                )
    service = results.get("service")
    if service:
        at = {(r["variant"], r["clients"]): r for r in service["rows"]}
        on, off = at.get(("batched", 32)), at.get(("unbatched", 32))
        if on:
            out.append(
                {
                    "target": "served >= 85% of the core at 32 clients",
                    "measured": f"{pct(on['x_core'])} (batch {on['mean_batch']:.1f})",
                    "met": on["x_core"] >= 0.85,
                }
            )
        if on and off:
            out.append(
                {
                    "target": "batching on >= 1.5x off at 32 clients",
                    "measured": f"{on['x_unbatched']:.2f}x",
                    "met": on["x_unbatched"] >= 1.5,
                }
            )
    growth = results.get("growth")
    if growth and len(growth["reruns"]) > 1:
        peaks = [r["driver_peak_rss_mib"] for r in growth["reruns"]]
        first, last = growth["reruns"][0], growth["reruns"][-1]
        span = f"{first['objects']:,} -> {last['objects']:,} objects"
        out.append(
            {
                "target": "scan driver peak RSS flat (within 2x) as the bucket grows",
                "measured": f"{max(peaks) / peaks[0]:.2f}x ({span})",
                "met": max(peaks) / peaks[0] <= 2,
            }
        )
        if last["objects"] >= 10**7:
            out.append(
                {
                    "target": "no-change rerun of 10^7 inventory rows < 600 s",
                    "measured": f"{last['seconds']:.0f} s",
                    "met": last["seconds"] < 600,
                }
            )
    scan = results.get("scan")
    if scan:
        x = scan.get("x_core_streaming", scan["x_core_end_to_end"])
        out.append({"target": "scan >= 85% of the core", "measured": pct(x), "met": x >= 0.85})
    return out

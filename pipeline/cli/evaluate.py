"""``diffguard evaluate`` and ``diffguard calibrate``: a policy measured and tuned on labelled images."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .options import add_checker_options, load_checker

log = logging.getLogger("diffguard")


def register(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="precision/recall/FPR of a policy on a folder of labelled images")
    ev.add_argument("labelled_dir", type=Path, nargs="?", metavar="LABELLED_DIR", help="safe/, violence/, sexual/, ...")
    _label_options(ev)
    ev.add_argument("--plots", type=Path, help="write one score-distribution PNG per category here")
    ev.add_argument("--json", action="store_true", help="one JSON object with the metrics on stdout")
    add_checker_options(ev)
    ev.set_defaults(run=cmd_evaluate)

    cal = sub.add_parser(
        "calibrate", help="per-row thresholds (concepts, detectors) meeting a false-positive rate on safe/"
    )
    cal.add_argument("labelled_dir", type=Path, nargs="?", metavar="LABELLED_DIR")
    _label_options(cal)
    cal.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate on safe/ (default 0.01)")
    cal.add_argument("--out", type=Path, required=True, help="where to write the calibrated policy (YAML)")
    cal.add_argument("--json", action="store_true", help="one JSON object with the expected metrics on stdout")
    add_checker_options(cal)
    cal.set_defaults(run=cmd_calibrate)


def _label_options(p: Any) -> None:
    p.add_argument(
        "--labels",
        metavar="DEST",
        help="review decisions under a scan's DEST as labels (confirm: its category, overturn: safe, relabel: its "
        "category), alone or with LABELLED_DIR; images are read from the scan's SOURCE",
    )
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for --labels (default $AWS_ENDPOINT_URL or AWS)")


def _print_table(report: dict[str, Any]) -> None:
    print(f"{'category':<18} {'labelled':>8} {'precision':>9} {'recall':>7} {'f1':>6} {'FPR safe':>8}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, m in report["categories"].items():
        print(
            f"{name:<18} {m['labelled']:>8} {fmt(m['precision']):>9} {fmt(m['recall']):>7} {fmt(m['f1']):>6} "
            f"{fmt(m['fpr_safe']):>8}"
        )
    print(f"\nimages: {report['images']}; any category on safe/: FPR {fmt(report['any_category']['fpr_safe'])}")
    labels = sorted(report["confusion"])
    columns = sorted({c for row in report["confusion"].values() for c in row})
    print("\nconfusion (rows: label, columns: top flagged category)")
    print(f"{'':<18}" + "".join(f"{c[:12]:>13}" for c in columns))
    for label in labels:
        print(f"{label:<18}" + "".join(f"{report['confusion'][label].get(c, 0):>13}" for c in columns))
    if report["demo"]:
        real = f"; real weights: {', '.join(report['real'])}" if report["real"] else ""
        print(f"\n(tiny demo weights in {', '.join(report['demo'])}: the numbers they decide are meaningless{real})")


def _setup(args: argparse.Namespace):
    from ..evaluate import load_labelled

    if args.policy in ("block", "blur", "black"):
        log.info("evaluating the default policy (the keyword only changes its actions)")
    if args.labelled_dir is None and args.labels is None:
        raise UsageError("labels: got neither LABELLED_DIR nor --labels DEST; allowed: either, or both")
    checker = load_checker(args)
    sets = [load_labelled(args.labelled_dir, checker)] if args.labelled_dir is not None else []
    if args.labels is not None:
        from ..review.labels import load_decision_labels, merge
        from .scan import endpoint

        sets.append(load_decision_labels(args.labels, checker, endpoint(args)))
        log.info("%d images labelled by review decisions under %s", len(sets[-1].labels), args.labels)
    return checker, sets[0] if len(sets) == 1 else merge(*sets)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import metrics, plot

    checker, data = _setup(args)
    report = metrics(checker, data)
    if args.plots:
        report["plots"] = [str(p) for p in plot(checker, data, args.plots)]
    for skipped in data.skipped:
        log.warning("skipped %s: %s", skipped["path"], skipped["error"])
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..evaluate import calibrate, metrics
    from ..policy import load_policy

    checker, data = _setup(args)
    policy = calibrate(checker, data, load_policy(args.policy), args.target_fpr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(policy.to_yaml())
    checker.set_policy(load_policy(args.out))
    report = metrics(checker, data)
    report["out"] = str(args.out)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"calibrated policy written to {args.out} (target FPR on safe/: {args.target_fpr})\n")
        print("expected on the calibration set:")
        _print_table(report)
    return 0

"""diffguard's Prometheus rules for a Prometheus without the operator: the groups of the ``PrometheusRule`` in
``k8s/monitoring/alerts.yaml`` (their single truth) written as a plain rule file.

    python -m k8s.rules > diffguard-rules.yaml    # then list it under rule_files: in prometheus.yml

``expressions()`` and ``metric_names()`` give every PromQL expression and the series they read (the names recorded by
the rules themselves left out), for the tests that check each one against what diffguard and Ray export.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

ALERTS = Path(__file__).resolve().parent / "monitoring" / "alerts.yaml"
HEADER = "# Generated from k8s/monitoring/alerts.yaml by `python -m k8s.rules`: edit that file, not this one.\n"

Rule = dict[str, Any]


def load(path: Path = ALERTS) -> dict[str, Any]:
    """The ``PrometheusRule`` resource at ``path``, checked for the shape a rule file needs."""
    resource = yaml.safe_load(path.read_text())
    kind = resource.get("kind") if isinstance(resource, dict) else None
    if kind != "PrometheusRule":
        raise ValueError(f"{path}: kind is {kind!r}; expected 'PrometheusRule'")
    spec_groups = resource.get("spec", {}).get("groups")
    if not isinstance(spec_groups, list) or not spec_groups:
        raise ValueError(f"{path}: spec.groups is {spec_groups!r}; expected a non-empty list of rule groups")
    for group in spec_groups:
        for rule in group.get("rules", []):
            if ("alert" in rule) == ("record" in rule):
                name = group.get("name")
                raise ValueError(f"{path}: group {name!r} has a rule with both or neither of alert, record: {rule}")
    return resource


def groups(path: Path = ALERTS) -> list[dict[str, Any]]:
    """``spec.groups``: what a plain rule file's ``groups:`` holds, unchanged."""
    return load(path)["spec"]["groups"]


def rules(path: Path = ALERTS) -> list[Rule]:
    """Every rule, recording and alerting, in file order."""
    return [rule for group in groups(path) for rule in group["rules"]]


def alerts(path: Path = ALERTS) -> dict[str, Rule]:
    """The alerting rules by alert name."""
    return {rule["alert"]: rule for rule in rules(path) if "alert" in rule}


def rule_file(path: Path = ALERTS) -> str:
    """A Prometheus rule file (``promtool check rules`` format) holding the PrometheusRule's groups."""
    return HEADER + yaml.safe_dump({"groups": groups(path)}, sort_keys=False, width=1000)


def expressions(path: Path = ALERTS) -> list[str]:
    """Every rule's ``expr``, in file order."""
    return [str(rule["expr"]) for rule in rules(path)]


def recorded(path: Path = ALERTS) -> set[str]:
    """The series the recording rules write."""
    return {rule["record"] for rule in rules(path) if "record" in rule}


# PromQL words that look like metric names (an aggregation, e.g. `sum by (x) (...)`, is skipped as a call).
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")  # label matchers (strings already removed)
_BRACKETS = re.compile(r"\[[^\[\]]*\]")  # range and subquery windows
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The series names one PromQL expression selects (functions, keywords and label names excluded).

    >>> sorted(metric_names('sum by (route) (rate(ray_diffguard_requests_total{status="503"}[5m])) > 0'))
    ['ray_diffguard_requests_total']
    """
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue  # a function call or an aggregation, or a keyword
        names.add(name)
    return names


def series(path: Path = ALERTS) -> set[str]:
    """Every series name the rules read, less those they record themselves."""
    return set().union(*(metric_names(expr) for expr in expressions(path))) - recorded(path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m k8s.rules > diffguard-rules.yaml", file=sys.stderr)
        return 2
    sys.stdout.write(rule_file())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

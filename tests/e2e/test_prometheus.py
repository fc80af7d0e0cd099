"""A real Prometheus (Debian's binary, loopback only) scrapes a live `diffguard serve` and a scan that joins its Ray:
every series the alerts and the dashboard name is exported, every rule evaluates and every panel query runs, and the
checker-unavailable alert goes pending, then firing, while the checker replica is SIGSTOPped under /v1/moderate load,
and resolves after SIGCONT (docs/OPERATIONS.md)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from k8s import dashboard, rules
from tests.conftest import ROOT
from tests.integration.conftest import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus; .ci/run installs it)"
    ),
]

ALERT = "DiffguardCheckerUnavailable"
# Only this alert's windows and `for:` are shortened for the live test (its expression is the shipped one): the
# shipped minutes would make the test minutes long. Scrapes and evaluations every second.
SHORT = {"windows": "30s", "for": "5s"}
CHECKER_TIMEOUT_S = 2  # the Ingress's budget for a verdict: a stopped checker turns requests into 503s this fast
EXTERNAL = re.compile(r"^(DCGM_|haproxy_)")  # other exporters' series (the DCGM exporter, Serve's HAProxy)


def _png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _serve_config(path: Path) -> Path:
    """The local config with a short checker budget and one checker replica (a second one would take the load)."""
    config = yaml.safe_load((ROOT / "deployments/configs/local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["ingress"]["checker_timeout_s"] = CHECKER_TIMEOUT_S
    for deployment in app["deployments"]:
        if deployment["name"] == "SafetyChecker":
            deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    path.write_text(yaml.safe_dump(config))
    return path


def _shortened(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shipped groups with ALERT's range windows and `for:` shortened (its expression otherwise unchanged)."""
    out = []
    for group in groups:
        kept = []
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                rule = {**rule, "expr": re.sub(r"\[\d+[smh]\]", f"[{SHORT['windows']}]", rule["expr"])}
                rule["for"] = SHORT["for"]
            kept.append(rule)
        out.append({**group, "rules": kept, "interval": "1s"})
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`diffguard serve` (its own Ray, metrics on a fixed port) and a Prometheus scraping it every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    port, metrics, prom = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp / "serve.log", "w+")  # noqa: SIM115 - read while it runs
    serve = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--config", str(_serve_config(tmp / "serve.yaml"))]
        + ["--port", str(port), "--metrics-port", str(metrics), "--num-cpus", "8"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    prometheus = None
    try:
        deadline = time.monotonic() + 300
        while "serving on" not in (tmp / "serve.log").read_text():
            assert serve.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(1)
        (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": _shortened(rules.groups())}, sort_keys=False))
        (tmp / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(tmp / "rules.yaml")],
                    "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}],
                }
            )
        )
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
            + [f"--web.listen-address=127.0.0.1:{prom}", "--log.level=warn"],
            stdout=open(tmp / "prometheus.log", "w"),  # noqa: SIM115 - the process owns it
            stderr=subprocess.STDOUT,
        )
        api = f"http://127.0.0.1:{prom}/api/v1"
        deadline = time.monotonic() + 60
        while not _ready(f"http://127.0.0.1:{prom}"):
            assert prometheus.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.5)
        yield {"base": f"http://127.0.0.1:{port}", "metrics": metrics, "api": api, "tmp": tmp, "env": env}
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=120)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _traffic(base: str) -> None:
    """A generation, clean uploads, and the unscorable kinds: corrupt, unsupported and a mix in one request."""
    r = httpx.post(f"{base}/v1/generate", json={"prompt": "a red bicycle", "seed": 1, "steps": 2}, timeout=120)
    assert r.status_code == 200, r.text
    for seed in range(3):
        r = httpx.post(f"{base}/v1/moderate", content=_png(seed), headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
    mixed = [("files", ("ok.png", _png(7), "image/png")), ("files", ("cut.png", _png(8)[:40], "image/png"))]
    r = httpx.post(f"{base}/v1/moderate", files=mixed, timeout=60)
    assert r.status_code == 200 and r.json()["results"][1]["error"], r.text


def _scan(stack: dict[str, Any]) -> None:
    """A scan that joins the service's Ray, as a RayJob's driver joins its cluster: its series go out through the
    same metrics agent that Prometheus scrapes."""
    source = stack["tmp"] / "bucket"
    source.mkdir()
    for i in range(4):
        (source / f"img{i}.png").write_bytes(_png(20 + i))
    (source / "cut.png").write_bytes(_png(30)[:40])
    (address,) = re.findall(r"RAY_ADDRESS=(\S+)", (stack["tmp"] / "serve.log").read_text())  # serve prints it
    env = {**stack["env"], "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}  # as serve says: its Ray has a token
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "scan", str(source), "--output", str(stack["tmp"] / "results"), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: something was withheld (the cut file)


def _exported(metrics_port: int) -> set[str]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _used() -> set[str]:
    """Every series name the shipped rules and dashboard query (the recording rules' own names excluded)."""
    panels = set().union(*(rules.metric_names(expr) for _, expr in dashboard.queries()))
    return (rules.series() | panels) - rules.recorded()


def test_every_series_of_the_rules_and_dashboard_is_exported_and_every_query_runs(stack):
    _traffic(stack["base"])
    _scan(stack)
    used = {n for n in _used() if not EXTERNAL.match(n)}
    assert used, "no series found in the rules and the dashboard"
    deadline, missing = time.monotonic() + 60, used
    while missing:  # Ray's agent exports every few seconds
        missing = used - _exported(stack["metrics"])
        if not missing:
            break
        assert time.monotonic() < deadline, f"named by the rules or the dashboard but never exported: {sorted(missing)}"
        time.sleep(2)
    time.sleep(3)  # a few evaluations of every rule on the scraped data
    groups = httpx.get(f"{stack['api']}/rules", timeout=10).json()["data"]["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert unhealthy == [] and sum(len(g["rules"]) for g in groups) == sum(len(g["rules"]) for g in rules.groups())
    empty = []
    for title, expr in dashboard.queries():  # the panels' queries, as Grafana sends them, against live data
        query = dashboard.concrete(expr)  # Grafana's variables: every value
        r = httpx.get(f"{stack['api']}/query", params={"query": query}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "success", (title, query, r.text)
        if not r.json()["data"]["result"]:
            empty.append((title, query))
    print("panels without data:", *empty, sep="\n  ")
    # only the GPU panels (no DCGM exporter here) and those shown while a scan runs (it ended) may be empty
    external = [t for t, q in empty if all(EXTERNAL.match(n) for n in rules.metric_names(q))]
    while_scanning = [t for t, q in empty if "scan_running" in q and "== 1" in q]
    unexplained = [t for t, _ in empty if t not in external + while_scanning]
    assert unexplained == [], unexplained


def _checker_pid() -> int:
    found = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:diffguard:SafetyChecker" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(found) == 1, f"expected one checker replica process, found {found}"
    return found[0]


def _state(api: str) -> str:
    alerts = httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
    states = {a["state"] for a in alerts if a["labels"]["alertname"] == ALERT}
    return "firing" if "firing" in states else "pending" if "pending" in states else "inactive"


def test_checker_unavailable_alert_fires_while_the_checker_is_stopped_and_resolves_after(stack):
    base, api = stack["base"], stack["api"]
    stop, answers = threading.Event(), []

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(f"{base}/v1/moderate", content=_png(1), headers={"content-type": "image/png"})
                answers.append((r.status_code, r.content))
                time.sleep(0.05)

    clients = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in clients:
        t.start()
    seen, pid = [], _checker_pid()
    try:
        deadline = time.monotonic() + 60
        while _state(api) != "inactive" or not any(code == 200 for code, _ in answers):
            assert time.monotonic() < deadline, "the alert was active before the checker stopped"
            time.sleep(1)
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while (state := _state(api)) != "firing":
            assert time.monotonic() < deadline, f"the alert never fired: {seen}"
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.5)
        seen.append("firing")
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 120
        while _state(api) != "inactive":
            assert time.monotonic() < deadline, "the alert did not resolve after SIGCONT"
            time.sleep(1)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=90)
    statuses = {code for code, _ in answers}
    print("alert states:", seen, "answers:", {c: sum(1 for code, _ in answers if code == c) for c in statuses})
    assert seen[-2:] == ["pending", "firing"], seen  # pending first: `for:` holds it before it fires
    assert statuses <= {200, 503} and 503 in statuses, statuses
    # fail closed: a 503 carries an error and no image bytes
    assert all(b"results" not in body for code, body in answers if code == 503)

"""`diffguard serve` as `make serve` runs it (README): starts, serves, and shuts down cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from deployments.auth import AuthConfigError, api_key
from deployments.run import DEFAULT_CONFIG, check_auth, load_config
from tests.conftest import ALARM, ROOT
from tests.integration.conftest import free_port


def test_serve_starts_answers_and_stops(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--num-cpus", "2"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        deadline = time.monotonic() + 300
        while "serving on" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(1)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # ready when it says so, not a bit later
        r = httpx.post(f"{base}/v1/generate", json={"prompt": "a red bicycle", "seed": 1, "steps": 2}, timeout=120)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        started = (tmp_path / "serve.log").read_text()  # the banner says what is demo and what real, from /v1/info
        assert "MEANINGLESS" in started and "real, trained weights: open_nsfw" in started
        # a real photograph gets a real score offline: open_nsfw's trained weights, marked real in the response
        r = httpx.post(f"{base}/v1/moderate", content=_photo(), headers={"Content-Type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["detector_scores"]["open_nsfw"]["nsfw"] < 0.2 and "open_nsfw" in result["real"]
        assert "stock checker" in result["demo"]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output[-3000:]
    assert "shutting down" in output
    # Start-up and Ctrl-C print no WARNING or ERROR but the tiny banner (issue 27: Serve's "Cannot deregister
    # autoscaling state", Ray's token notice, "Task ServeController.graceful_shutdown failed ... killed by ray.kill")
    # (Serve's warning that replicas took over 30 s to start is a real condition of a loaded machine, not noise.)
    real = ("tiny demo weights in use", "replicas that have taken more than")
    alarms = [line for line in output.splitlines() if ALARM.search(line) and not any(r in line for r in real)]
    assert alarms == [], "\n".join(alarms)


def _photo() -> bytes:
    """A real photograph (scikit-image's astronaut, in its wheel) as JPEG bytes."""
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (["--host", "0.0.0.0"], {}, "refusing to serve without an API key on host '0.0.0.0'"),
        ([], {"DIFFGUARD_API_KEY": " \n"}, "DIFFGUARD_API_KEY is set but empty or whitespace"),
    ],
    ids=["no-key-on-all-interfaces", "whitespace-key"],
)
def test_serve_refuses_to_start_open(extra, env, message):
    """Refused before Ray starts: nothing is deployed and no port is bound."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DIFFGUARD_API_KEY")} | env
    cmd = [sys.executable, "-m", "pipeline", "serve", "--port", str(free_port()), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "serving on" not in proc.stdout


def _schema(tmp_path, host: str, ingress: dict | None = None, ingress_env: dict | None = None):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["applications"][0]["args"]["ingress"].update(ingress or {})
    if ingress_env is not None:
        ingress_options = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "Ingress")
        ingress_options["ray_actor_options"]["runtime_env"] = {"env_vars": ingress_env}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, host=host)


def test_auth_rule_before_deploying(tmp_path):
    check_auth(_schema(tmp_path, "127.0.0.1"), {})  # loopback: a key is optional
    check_auth(_schema(tmp_path, "::1"), {})
    with pytest.raises(AuthConfigError, match="not loopback"):
        check_auth(_schema(tmp_path, "0.0.0.0"), {})
    with pytest.raises(AuthConfigError, match="not loopback"):
        check_auth(_schema(tmp_path, "my-host.example"), {})
    check_auth(_schema(tmp_path, "0.0.0.0"), {"DIFFGUARD_API_KEY": "k\n"})  # the key the replicas will get
    check_auth(_schema(tmp_path, "0.0.0.0", ingress_env={"DIFFGUARD_API_KEY": "k"}), {})  # from the config
    check_auth(_schema(tmp_path, "0.0.0.0", {"allow_unauthenticated": True}), {})  # said explicitly
    with pytest.raises(AuthConfigError, match="empty or whitespace"):
        check_auth(_schema(tmp_path, "127.0.0.1", ingress_env={"DIFFGUARD_API_KEY": "\t"}), {"DIFFGUARD_API_KEY": "k"})
    assert api_key({"DIFFGUARD_API_KEY": "  secret\n"}) == "secret" and api_key({}) is None


def test_a_keys_file_is_checked_before_deploying(tmp_path):
    """A keys file serves on any host; a malformed one, or one set beside the single key, refuses to start (exit 2
    from `diffguard serve`), naming the entry and the field."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"id": "kids-app", "sha256": "ab" * 32, "tenant": "kids"}]}))
    check_auth(_schema(tmp_path, "0.0.0.0"), {"DIFFGUARD_KEYS_FILE": str(keys)})
    keys.write_text(yaml.safe_dump({"keys": [{"id": "kids-app", "sha256": "ab" * 32, "routes": ["delete"]}]}))
    with pytest.raises(AuthConfigError, match=r"keys\[0\].*routes"):
        check_auth(_schema(tmp_path, "0.0.0.0"), {"DIFFGUARD_KEYS_FILE": str(keys)})
    with pytest.raises(AuthConfigError, match="DIFFGUARD_API_KEY"):
        check_auth(_schema(tmp_path, "0.0.0.0"), {"DIFFGUARD_KEYS_FILE": str(keys), "DIFFGUARD_API_KEY": "k"})

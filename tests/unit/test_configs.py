"""The Serve configs validate, import cheaply, and keep the batching/autoscaling invariants."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.run import load_config
from deployments.settings import AppArgs, CheckerRuntime
from pipeline.errors import DiffguardError, ImageDecodeError, InvalidInput, PayloadTooLarge, Unavailable

CONFIGS = sorted((Path(__file__).parents[2] / "deployments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_its_invariants_hold(path):
    schema = load_config(path)
    for app in schema.applications:
        assert app.import_path == "deployments.app:build_app"
        AppArgs(**app.args)  # the builder's own validation
        deployments = {d.name: d for d in app.deployments}
        assert set(deployments) == {"Ingress", "Generator", "SafetyChecker"}
        checker = deployments["SafetyChecker"]
        runtime = CheckerRuntime(**checker.user_config)
        assert checker.max_ongoing_requests >= runtime.max_batch_size * 1  # max_concurrent_batches = 1
        auto = checker.autoscaling_config
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
        assert auto["target_ongoing_requests"] == runtime.max_batch_size


def test_local_config_fits_two_cpus():
    app = load_config(CONFIGS[0].parent / "local.yaml").applications[0]
    total = 0.0
    for d in app.deployments:
        d = d.model_dump(exclude_unset=True)
        replicas = d.get("autoscaling_config", {}).get("max_replicas", 1)
        total += d["ray_actor_options"]["num_cpus"] * replicas
        assert "num_gpus" not in d["ray_actor_options"]
    assert total <= 2.0, total


def test_production_config_uses_gpus_and_real_models():
    raw = yaml.safe_load((CONFIGS[0].parent / "production.yaml").read_text())
    app = raw["applications"][0]
    assert "tiny" not in str(app["args"])
    options = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
    assert options["Generator"]["num_gpus"] == 1 and 0 < options["SafetyChecker"]["num_gpus"] < 1


def test_importing_the_app_does_not_load_torch():
    code = "import sys, deployments.app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x, import_path: 3, route_prefix: 5}]\nhttp_options: {port: nope}\n")
    with pytest.raises(InvalidInput, match="is invalid"):
        load_config(bad)


@pytest.mark.parametrize("cls", [DiffguardError, InvalidInput, ImageDecodeError, PayloadTooLarge, Unavailable])
def test_errors_pickle_across_processes(cls):
    again = pickle.loads(pickle.dumps(cls("what went wrong")))
    assert type(again) is cls and again.message == "what went wrong" and again.status_code == cls.status_code

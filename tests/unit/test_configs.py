"""The Serve configs validate, import cheaply, and keep the batching/autoscaling invariants."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.run import load_config
from deployments.settings import MAX_CONCURRENT_BATCHES, AppArgs, CheckerRuntime, GeneratorRuntime
from pipeline.errors import DiffguardError, InvalidInput

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
        assert checker.max_ongoing_requests >= runtime.max_batch_size * MAX_CONCURRENT_BATCHES  # or never full
        auto = checker.autoscaling_config
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
        assert auto["target_ongoing_requests"] == runtime.max_batch_size
        generator = deployments["Generator"]
        batching = GeneratorRuntime(**generator.user_config)
        assert batching.max_batch_images > 1  # generation batching is on
        assert generator.max_ongoing_requests >= batching.max_batch_images  # or batches of 1-image requests never fill


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_batching_comment_states_the_figures_in_force(path):
    """The configs' comment on the checker's max_ongoing_requests names the batch size and the batches in flight that
    the replica really has (issue 27: a comment said 16 x 1 while the checker runs two batches at once)."""
    stated = re.findall(r"max_batch_size x max_concurrent_batches \((\d+) x (\d+)", path.read_text())
    checker = next(d for d in load_config(path).applications[0].deployments if d.name == "SafetyChecker")
    assert stated == [(str(CheckerRuntime(**checker.user_config).max_batch_size), str(MAX_CONCURRENT_BATCHES))]


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


def test_production_audits_to_a_bucket_and_a_laptop_does_not():
    """production.yaml's Ingress writes the audit log to S3 (on Kubernetes as the workers' workload identity, and
    503s a decision it cannot record); local.yaml writes none. Both show the checker's named `policies`."""
    args = {p.stem: AppArgs(**load_config(p).applications[0].args) for p in CONFIGS}
    assert args["production"].ingress.audit_dest.startswith("s3://") and args["production"].ingress.audit_required
    assert args["local"].ingress.audit_dest is None
    for path in CONFIGS:
        checker = next(d for d in load_config(path).applications[0].deployments if d.name == "SafetyChecker")
        assert "policies" in checker.user_config and CheckerRuntime(**checker.user_config).policies == {}, path.name


def test_importing_the_app_does_not_load_torch():
    code = "import sys, deployments.app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x, import_path: 3, route_prefix: 5}]\nhttp_options: {port: nope}\n")
    with pytest.raises(InvalidInput, match="is invalid"):
        load_config(bad)


def _all_errors(cls=DiffguardError):
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_errors(sub)


ERRORS = sorted(set(_all_errors()), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_errors_pickle_across_processes(cls):
    assert cls.__module__ == "pipeline.errors", f"{cls.__name__} is defined in {cls.__module__}, not pipeline.errors"
    again = pickle.loads(pickle.dumps(cls("what went wrong")))
    assert type(again) is cls and again.message == "what went wrong" and again.status_code == cls.status_code
    assert isinstance(again, DiffguardError) and str(again) == "what went wrong"


def test_every_error_class_is_defined_in_errors_py():
    """No module under pipeline/ or deployments/ defines a subclass of a diffguard error outside errors.py."""
    import ast

    names = {c.__name__ for c in ERRORS}
    root = Path(__file__).parents[2]
    stray = []
    for path in sorted([*root.joinpath("pipeline").rglob("*.py"), *root.joinpath("deployments").rglob("*.py")]):
        if path.name == "errors.py" and path.parent.name == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & names:
                    stray.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert not stray, f"error classes outside pipeline/errors.py: {stray}"
    defined = {
        n.name for n in ast.parse((root / "pipeline" / "errors.py").read_text()).body if isinstance(n, ast.ClassDef)
    }
    assert defined == names, f"the pickle walk missed {sorted(defined - names)}"


def test_serve_checker_settings_are_derived_from_the_core_spec():
    """CheckerArgs holds the load-time fields of CheckerSpec with its defaults; CheckerRuntime its policy fields."""
    import dataclasses

    from deployments.settings import CheckerArgs
    from pipeline.spec import CheckerSpec

    spec = {f.name: f.default for f in dataclasses.fields(CheckerSpec)}
    load = {name: f.default for name, f in CheckerArgs.model_fields.items() if name not in ("threads", "factory")}
    assert load == {name: spec[name] for name in load}
    runtime = CheckerRuntime().model_dump(include={"adjustment", "concepts", "policy", "policy_fallback"})
    assert runtime == {name: spec[name] for name in runtime}
    derived = CheckerArgs(model="/models/checker", max_pixels=1000, concept_text_model="/models/text").spec()
    assert derived == CheckerSpec(
        model="/models/checker", max_pixels=1000, concept_text_model="/models/text", policy=None
    )

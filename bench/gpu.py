"""``python -m bench.gpu --out DIR [--device cuda] [--tiny]``: the GPU measurement (``make bench-gpu``).

- **core**: a CLIP ViT-L/14 vision tower (the checker's, 224 px) with random weights built from its config, bf16 and
  fp16, batch 1..256: images/s and TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``).
- **generation**: a Stable Diffusion 1.5-sized UNet, VAE and CLIP text encoder with random weights built from their
  configs, 512 px, the core ``Generator`` rendering 8 one-image requests in one call (``render_many``) vs one at a
  time, with the largest pixel difference between the two.
- **served**: the Serve app of ``deployments/configs/production.yaml`` (its Ingress, SafetyChecker and Generator
  settings: batch sizes, waits, concurrency limits, replica resources, checker dtype) on a local Ray cluster, with a
  random-weight ViT-L/14 checker (one replica, stock concepts) behind production's HTTP front (HAProxy, when
  ``haproxy`` is on PATH) and ``/v1/moderate`` driven by closed-loop clients with 512 px PNGs; at ``--tiny`` also
  ``/v1/generate`` with the tiny pipeline. SD 1.5-sized weights are not served (they would have to be written to disk
  first): generation's GPU figure is the core's, above.

``--tiny`` shrinks every model and size so CI runs the script on CPU (``--device cpu --tiny``). Writes
``DIR/gpu.json`` and ``DIR/gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
VIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn: Any, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def run_core(device: str, tiny: bool) -> list[dict[str, Any]]:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
    batches = [1, 4] if tiny else [1, 8, 32, 64, 128, 256]
    config = CLIPVisionConfig(**(VIT_TINY if tiny else VIT_L14), image_size=224)
    torch.manual_seed(0)
    base = CLIPVisionModel(config).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        base(pixel_values=torch.zeros(1, 3, 224, 224))
    flops = counter.get_total_flops()
    rows = []
    for dtype in dtypes:
        model = base.to(device=device, dtype=dtype)
        for batch in batches:
            pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            with torch.inference_mode():
                secs = _best(lambda m=model, p=pixels: m(pixel_values=p), device, 2 if tiny else 5)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "images_s": batch / secs,
                    "tflops": flops * batch / secs / 1e12,
                }
            )
    return [{"model": "ViT-L/14 vision (random)" if not tiny else "tiny ViT", "gflop_per_image": flops / 1e9}, *rows]


def sd_pipeline(device: str, dtype: torch.dtype, tiny: bool) -> Any:
    """Stable Diffusion 1.5's architecture (UNet 860M, VAE, CLIP ViT-L/14 text encoder) with random weights."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipeline.tiny import tiny_text_config, tiny_tokenizer

    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        )
        text = tiny_text_config(hidden_size=32, intermediate_size=64)
    else:  # the configs of stable-diffusion-v1-5's unet/, vae/ and text_encoder/ (diffusers' defaults are SD 1.x's)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text = tiny_text_config(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
        )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))  # byte-level, 514 tokens: the text encoder's cost does not depend on it
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def run_generation(device: str, tiny: bool) -> dict[str, Any]:
    from pipeline.generator import GenerationLimits, GenerationRequest, Generator

    dtype = torch.float32 if device == "cpu" else torch.float16
    gen = Generator(
        sd_pipeline(device, dtype, tiny), source="random SD 1.5-sized", limits=GenerationLimits(max_images=8)
    )
    steps, n = (2, 4) if tiny else (20, 8)
    requests = [GenerationRequest.parse({"prompt": f"a red bicycle {i}", "steps": steps, "seed": i}) for i in range(n)]
    gen.render_many(requests[:1])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    alone = [gen.render(r) for r in requests]
    _sync(device)
    unbatched = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = gen.render_many(requests)
    _sync(device)
    together = time.perf_counter() - t0
    diff = max(
        int(np.abs(a.images[0].astype(np.int16) - b.images[0].astype(np.int16)).max())
        for a, b in zip(alone, batched, strict=True)
    )
    return {
        "model": "SD 1.5-sized (random weights)" if not tiny else "tiny SD",
        "size": gen.native_size,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "requests": n,
        "unbatched_images_s": n / unbatched,
        "batched_images_s": n / together,
        "ratio": unbatched / together,
        "max_pixel_diff": diff,
    }


PRODUCTION = Path(__file__).resolve().parent.parent / "deployments" / "configs" / "production.yaml"


def served_config(device: str, tiny: bool, port: int, checker: str) -> dict[str, Any]:
    """The production config with a bench checker (and at ``--tiny`` the tiny generator) on this machine: one replica
    per deployment, loopback only, stock concepts, no node-pool label selectors (one unlabelled node); without CUDA
    the replicas ask for no GPU."""
    import yaml

    raw = yaml.safe_load(PRODUCTION.read_text())
    raw["http_options"].update(host="127.0.0.1", port=port)
    raw["proxy_location"] = "HeadOnly"
    (app,) = raw["applications"]
    args = app["args"]
    args["checker"].update(model=checker, device=device)
    args["checker"].pop("concept_text_model", None)
    if device == "cpu":
        args["checker"]["dtype"] = "float32"
    args["generator"] = {"model": "tiny", "device": "cpu", "dtype": "float32"} if tiny else None
    args["ingress"].pop("audit_dest", None)  # production's audit bucket is not this machine's
    deployments = []
    for d in app["deployments"]:
        if d["name"] == "Generator" and not tiny:
            continue
        d["ray_actor_options"].pop("label_selector", None)  # KubeRay's worker groups label their nodes; this one isn't
        if device == "cpu":
            d["ray_actor_options"].pop("num_gpus", None)
        if tiny:  # a 2-core CI machine: the production CPU requests would not fit
            d["ray_actor_options"]["num_cpus"] = 0.25
        if "autoscaling_config" in d:
            d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        if d["name"] == "SafetyChecker":
            d["user_config"]["policy"] = "stock"
        deployments.append(d)
    app["deployments"] = deployments
    return raw


def run_served(device: str, tiny: bool) -> dict[str, Any]:
    """Deploy ``served_config`` on a fresh local Ray, drive it, and report images/s, latency and batch sizes."""
    import os
    import shutil

    import ray
    from ray import serve

    from bench import models
    from bench.load import free_port, run_load
    from deployments.run import config_schema, deploy

    root = str(Path(__file__).resolve().parent.parent)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Production's HTTP front (k8s/base/rayservice.yaml) when this machine has haproxy; read when Ray starts, below.
    front = "haproxy" if shutil.which("haproxy") else "python-proxy (no haproxy on PATH)"
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if front == "haproxy" else "0"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # shutdown only: no 30 s drain at the end
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    checker = "tiny" if tiny else str(models.model_dir("vit-l-14"))
    port = free_port()
    raw = served_config(device, tiny, port, checker)
    clients, (warmup, measure), size = (8, (2, 4), 512) if tiny else (64, (10, 30), 512)
    bodies = models.pngs(models.images(16 if tiny else 64, seed=3, size=size))
    ray.init(address="local", include_dashboard=False, namespace="bench-gpu", log_to_driver=False)
    rows = []
    try:
        deploy(config_schema(raw), timeout_s=600)
        base = f"http://127.0.0.1:{port}"
        run_load(f"{base}/v1/moderate", bodies[:4], 2, 1, 1)  # lazy initialisation, connections
        rows.append({"route": "/v1/moderate", **run_load(f"{base}/v1/moderate", bodies, clients, warmup, measure)})
        if tiny:
            body = {"prompt": "a red bicycle", "steps": 2}
            rows.append({"route": "/v1/generate", **_generate_load(f"{base}/v1/generate", body, 8, warmup, measure)})
        info = serve.get_deployment_handle("SafetyChecker", app_name="diffguard").info.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    checker_settings = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "SafetyChecker")
    return {
        "config": "deployments/configs/production.yaml",
        "checker": f"{'tiny' if tiny else 'ViT-L/14 (random weights)'}, {raw['applications'][0]['args']['checker']}",
        "front": front,
        "checker_user_config": {
            k: checker_settings["user_config"][k] for k in ("max_batch_size", "batch_wait_timeout_s")
        },
        "image": f"{size}x{size} PNG, one per request",
        "per_image_ms": info["per_image_ms"],
        "rows": rows,
    }


def _generate_load(url: str, body: dict[str, Any], clients: int, warmup_s: float, measure_s: float) -> dict[str, Any]:
    """Closed-loop /v1/generate clients (images/s counts images, one per request here)."""
    import asyncio

    import httpx

    from bench.load import _drive, _summary

    async def drive() -> Any:
        async with httpx.AsyncClient(timeout=300) as client:

            async def send(_: bytes) -> tuple[bool, int | None]:
                try:
                    r = await client.post(url, json=body)
                    ok = r.status_code == 200
                    return ok, r.json()["generator_batch_size"] if ok else None
                except (httpx.HTTPError, ValueError, KeyError):
                    return False, None

            return await _drive(send, [b""], clients, warmup_s, measure_s)

    return _summary(clients, *asyncio.run(drive()))


def markdown(results: dict[str, Any]) -> str:
    head, *rows = results["core"]
    lines = [
        f"_{results['machine']}, {results['date']}, {results['seconds']:.0f} s_",
        "",
        f"**Core: {head['model']}, {head['gflop_per_image']:.1f} GFLOP/image**",
        "",
        "| dtype | batch | images/s | TFLOP/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['images_s']:.1f} | {r['tflops']:.2f} |" for r in rows]
    g = results["generation"]
    lines += [
        "",
        f"**Generation: {g['model']}, {g['size']} px, {g['dtype']}, {g['steps']} steps, {g['requests']} requests**",
        "",
        "| unbatched images/s | batched images/s | x unbatched | max pixel diff |",
        "| ---: | ---: | ---: | ---: |",
        f"| {g['unbatched_images_s']:.2f} | {g['batched_images_s']:.2f} | {g['ratio']:.2f} | {g['max_pixel_diff']} |",
    ]
    served = results.get("served")
    if served:
        split = served["per_image_ms"]
        lines += [
            "",
            f"**Served: {served['config']} behind {served['front']}, checker {served['checker']}, "
            f"{served['checker_user_config']}, "
            f"{served['image']}; checker ms/image decode {split['decode']}, preprocess {split['preprocess']}, "
            f"model {split['model']}**",
            "",
            "| route | clients | images/s | p50 ms | p99 ms | mean batch | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in served["rows"]:
            p50, p99, mb = (f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("p50_ms", "p99_ms", "mean_batch"))
            lines.append(
                f"| {r['route']} | {r['clients']} | {r['images_per_s']:.1f} | {p50} | {p99} | {mb} | {r['errors']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CI on CPU)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --tiny to check the script")
    from datetime import UTC, datetime

    started = time.perf_counter()
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    results: dict[str, Any] = {"machine": machine, "date": datetime.now(UTC).isoformat(timespec="seconds")}
    results["core"] = run_core(args.device, args.tiny)
    results["generation"] = run_generation(args.device, args.tiny)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the core's and the generator's tensors are gone; the replicas need the memory
    results["served"] = run_served("cuda" if args.device.startswith("cuda") else "cpu", args.tiny)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

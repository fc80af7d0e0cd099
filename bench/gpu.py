"""``python -m bench.gpu --out DIR [--device cuda] [--tiny]``: the GPU measurement (``make bench-gpu``).

- **core**: a CLIP ViT-L/14 vision tower (the checker's, 224 px) with random weights built from its config, bf16 and
  fp16, batch 1..256: images/s and TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``).
- **generation**: a Stable Diffusion 1.5-sized UNet, VAE and CLIP text encoder with random weights built from their
  configs, 512 px, the core ``Generator`` rendering 8 one-image requests in one call (``render_many``) vs one at a
  time, with the largest pixel difference between the two.

Not measured here: the served path (Serve with the production config's shapes). ``--tiny`` shrinks every model and
size so CI runs the script on CPU (``--device cpu --tiny``). Writes ``DIR/gpu.json`` and ``DIR/gpu.md``.
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
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

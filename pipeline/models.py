"""Model sources: a Hugging Face Hub id, a local ``save_pretrained`` directory, or ``tiny``.

``tiny`` models are seeded, randomly initialised miniatures built offline on first use and cached under
``$DIFFGUARD_CACHE`` (default ``~/.cache/diffguard``) ``/tiny/<version>/<component>``. They load through the very
same ``from_pretrained`` path as real weights. Their verdicts are meaningless: they exist for tests and demos.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelSourceError

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_VERSION = "1"
DEFAULT_CHECKER = "CompVis/stable-diffusion-safety-checker"
DEFAULT_TEXT_TOWER = "openai/clip-vit-large-patch14"
TINY_BANNER = (
    "tiny demo weights in use: randomly initialised models, verdicts are MEANINGLESS (for tests and demos only)"
)


def cache_root() -> Path:
    return Path(os.environ.get("DIFFGUARD_CACHE", Path.home() / ".cache" / "diffguard"))


@dataclass(frozen=True)
class Source:
    """Where one model comes from: ``path`` for a local directory (tiny included), else a hub ``repo_id``."""

    spec: str  # what the user asked for
    path: Path | None  # local directory to load from, when there is one
    demo: bool  # True for tiny weights

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else self.spec


def resolve(spec: str, component: str) -> Source:
    """``tiny`` | existing directory | hub id -> :class:`Source` (building tiny weights on first use)."""
    if spec == TINY:
        return Source(spec, tiny_path(component), demo=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any(path.iterdir()):
            raise ModelSourceError(f"model directory {path} is empty: expected files written by save_pretrained")
        return Source(spec, path.resolve(), demo=_is_tiny_dir(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise ModelSourceError(f"model directory {spec!r} does not exist (and it is not a Hugging Face Hub id)")
    return Source(spec, None, demo=False)


def _is_tiny_dir(path: Path) -> bool:
    return any(marker.exists() for marker in (path / "diffguard_tiny.json", path.parent / "diffguard_tiny.json"))


def from_pretrained(cls: Any, source: Source, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with errors turned into one clear :class:`ModelSourceError`.

    A hub id is looked up in the local cache first; only when it is not cached is the Hub contacted, after a quick
    reachability probe, so an offline machine fails in a second instead of after minutes of retries.
    """
    quiet_libraries()
    if source.path is None:
        try:
            return cls.from_pretrained(source.spec, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            reason = hub_unreachable()
            if reason:
                raise ModelSourceError(_hub_message(source, reason)) from None
    try:
        return cls.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        if source.path is not None:
            raise ModelSourceError(
                f"could not load the {what} from directory {source.path}: {_first_line(exc)}. "
                f"The directory must hold files written by save_pretrained."
            ) from None
        raise ModelSourceError(_hub_message(source, _first_line(exc), what)) from None


def _hub_message(source: Source, reason: str, what: str = "model") -> str:
    return (
        f"could not load the {what} {source.spec!r} from the Hugging Face Hub and there is no cached copy ({reason}). "
        f"On a machine with network access run `diffguard models download {source.spec} DIR`, copy DIR here and pass "
        f"DIR instead of the hub id (or use 'tiny' for offline demo weights)."
    )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (offline mode, DNS, connect), or None when a TCP connection succeeds."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"no network access to {url.hostname}: {exc.strerror or exc}"
    return None


def quiet_libraries() -> None:
    """Silence the progress bars transformers and diffusers draw while loading and saving."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword for a torch dtype: ``dtype`` where diffusers has it, else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------------------------------
# tiny models: seeded, deterministic, built offline

_TINY_BUILDERS: dict[str, Callable[[Path], None]] = {}


def tiny_builder(component: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        _TINY_BUILDERS[component] = fn
        return fn

    return register


def tiny_path(component: str) -> Path:
    """Directory of the tiny ``component`` (``checker``, ``text``, ...), built atomically on first use."""
    if component not in _TINY_BUILDERS:
        raise ModelSourceError(f"there is no tiny {component!r} model; tiny components: {sorted(_TINY_BUILDERS)}")
    target = cache_root() / "tiny" / TINY_VERSION / component
    if (target / "diffguard_tiny.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{component}-", dir=target.parent))
    try:
        build_tiny(component, tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent builders (Ray actors) race harmlessly
        except OSError:
            if not (target / "diffguard_tiny.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny(component: str, directory: Path) -> None:
    """Build the tiny ``component`` into ``directory`` (deterministic: same bytes every time)."""
    import torch

    quiet_libraries()
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _TINY_BUILDERS[component](directory)
    (directory / "diffguard_tiny.json").write_text(
        json.dumps({"component": component, "version": TINY_VERSION, "note": TINY_BANNER}, indent=2) + "\n"
    )


TINY_PROJECTION_DIM = 32


def write_byte_level_vocab(directory: Path) -> None:
    """A generated byte-level BPE vocabulary (no merges) that ``CLIPTokenizer`` accepts: 256 bytes × {mid, end}."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_tokenizer(directory: Path) -> Any:
    """Write the generated vocab and load it the way real tokenizers load (``from_pretrained``), then save it whole."""
    from transformers import CLIPTokenizer

    write_byte_level_vocab(directory)
    tok = CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)
    tok.save_pretrained(directory)
    return tok


def tiny_text_config(**overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    vocab_size = 514
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_PROJECTION_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextConfig(**{**settings, **overrides})


def random_checker(vision: dict[str, Any], projection_dim: int, probe: Any = None) -> Any:
    """A randomly initialised ``StableDiffusionSafetyChecker`` with this CLIP vision architecture (seed torch first).

    Random concept rows; thresholds at high quantiles of their cosines over ``probe`` (normalised pixels
    (B, 3, H, W); default: 64 smooth random pictures), so verdicts are mixed. Tiny weights and the benchmarks use it.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config=tiny_text_config(projection_dim=projection_dim).to_dict(),
        vision_config=vision,
        projection_dim=projection_dim,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(17, projection_dim))
        model.special_care_embeds.copy_(torch.randn(3, projection_dim))
        # Thresholds sit high in the cosine distribution of the probe pictures, so verdicts are mixed.
        if probe is None:
            mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
            std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)
            size = vision["image_size"]
            probe = (torch.nn.functional.interpolate(torch.rand(64, 3, 4, 4), size=size, mode="bilinear") - mean) / std
        embeds = torch.nn.functional.normalize(model.visual_projection(model.vision_model(probe)[1]))
        cos = embeds @ torch.nn.functional.normalize(model.concept_embeds).T
        special = embeds @ torch.nn.functional.normalize(model.special_care_embeds).T
        model.concept_embeds_weights.copy_(torch.quantile(cos, 0.97, dim=0))
        model.special_care_embeds_weights.copy_(torch.quantile(special, 0.9, dim=0))
    return model


@tiny_builder("checker")
def _build_tiny_checker(directory: Path) -> None:
    from .preprocess import processor_class

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32
    )
    random_checker(vision, TINY_PROJECTION_DIM).save_pretrained(directory)
    processor_class()().save_pretrained(directory)


@tiny_builder("text")
def _build_tiny_text(directory: Path) -> None:
    from transformers import CLIPTextModelWithProjection

    CLIPTextModelWithProjection(tiny_text_config()).eval().save_pretrained(directory)
    tiny_tokenizer(directory)


def _tiny_sd_pipeline(directory: Path, *, sd2: bool = False) -> None:
    """A tiny Stable Diffusion pipeline: UNet, VAE (2x downsampling), CLIP text encoder, byte-level tokenizer.

    ``sd2`` mirrors the 2.x architecture differences the pipeline code must handle: v-prediction, linear attention
    projections and per-block head counts.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    width = 64 if sd2 else 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(tiny_text_config(hidden_size=width, intermediate_size=2 * width))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    tok_dir = directory / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)


@tiny_builder("sd")
def _build_tiny_sd(directory: Path) -> None:
    _tiny_sd_pipeline(directory)


@tiny_builder("sd2")
def _build_tiny_sd2(directory: Path) -> None:
    _tiny_sd_pipeline(directory, sd2=True)


@tiny_builder("safeclip")
def _build_tiny_safeclip(directory: Path) -> None:
    """Stand-in for Safe-CLIP's text encoder: same shape as the tiny SD text encoder, different weights."""
    import torch
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    CLIPTextModel(tiny_text_config()).eval().save_pretrained(directory)

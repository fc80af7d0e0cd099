"""Any Hugging Face image classifier as a detector: ``AutoModelForImageClassification`` and its own image processor
(weights and preprocessing travel together), by hub id, ``ID@REVISION``, a ``save_pretrained`` directory, or
``tiny`` (a seeded random ViT, labels ``normal`` and ``nsfw``: its scores are meaningless). Its labels are its outputs;
single-label models give softmax probabilities, multi-label ones (``problem_type: multi_label_classification``)
sigmoids. Refused at load: a single-label model with fewer than two labels (its softmax is always 1.0), a regression
head, and a processor whose output shape depends on the input's size (the scan ships inputs of one fixed shape).

>>> det = HFClassifier.load("Falconsai/nsfw_image_detection")   # outputs ("normal", "nsfw")
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import models
from ..devices import weights_digest
from ..errors import ModelSourceError

_LICENCE = re.compile(r"^license:\s*(\S+)", re.MULTILINE)


class HFClassifier:
    """A ``transformers`` image classifier with its processor; see the module docstring."""

    def __init__(self, name: str, model: Any, processor: Any, source: models.Source, device: torch.device, dtype: Any):
        config = model.config
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        if len(set(labels)) != len(labels):
            raise ModelSourceError(f"image classifier {name!r} has repeated labels {labels}: outputs must be unique")
        if config.problem_type == "regression":
            raise ModelSourceError(f"image classifier {name!r} is a regression model: its outputs aren't probabilities")
        self.multi_label = config.problem_type == "multi_label_classification"
        if len(labels) < 2 and not self.multi_label:
            raise ModelSourceError(
                f"image classifier {name!r} has {len(labels)} label(s) {labels} and is single-label: the softmax of "
                "one logit is always 1.0 (a one-logit detector needs problem_type: multi_label_classification)"
            )
        self.name, self.outputs, self.demo = name, tuple(labels), source.demo
        self.source, self.transform = source, ProcessorTransform(processor)
        preprocessing = processor.to_json_string().encode()  # its config: editing preprocessor_config.json counts
        self.digest = hashlib.sha256(weights_digest(model).encode() + b"\0" + preprocessing).hexdigest()
        self.revision = source.revision or getattr(config, "_commit_hash", None)
        self.device, self.dtype = device, dtype
        self.model = model.to(device, dtype).eval()
        small, wide = (self.prepare([np.zeros(shape, np.uint8)]).shape[1:] for shape in [(8, 8, 3), (13, 29, 3)])
        if small != wide:
            raise ModelSourceError(
                f"image classifier {name!r}'s processor gives inputs of shape {tuple(small)} for an 8x8 image and "
                f"{tuple(wide)} for a 13x29 one: detectors need one input shape whatever the image's size"
            )
        self.input_shape = tuple(small)

    @classmethod
    def load(cls, ref: str, device: torch.device, dtype: torch.dtype) -> HFClassifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        source = models.resolve(ref, "classifier")
        model = models.from_pretrained(AutoModelForImageClassification, source, "image classifier")
        processor = models.from_pretrained(AutoImageProcessor, source, "image classifier's processor")
        return cls(ref, model, processor, source, device, dtype)

    def prepare(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self.transform(arrays)

    def __call__(self, inputs: np.ndarray) -> torch.Tensor:
        if len(inputs) == 0:
            return torch.empty((0, len(self.outputs)))
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device, self.dtype, non_blocking=True)
            logits = self.model(pixel_values=x).logits.float()  # (B, labels)
            probs = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
        return probs.cpu()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.location,
            "revision": self.revision,
            "sha256": self.digest,  # weights and preprocessing
            "licence": _licence(self.source),
            "outputs": list(self.outputs),
            "runtime": "torch",
            "device": str(self.device),
            "demo": self.demo,
        }


class ProcessorTransform:
    """The classifier's image processor as a detector transform (picklable: the scan's CPU stage runs it). Views are
    RGB uint8 (H, W, 3), so the channels are last whatever the sizes (a 3×W image is not read as channels-first)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, arrays: list[np.ndarray]) -> np.ndarray:
        if not arrays:
            return np.empty((0, 3, 0, 0), np.float32)
        pixels = self.processor(images=list(arrays), return_tensors="np", input_data_format="channels_last")
        pixels = pixels["pixel_values"]  # (B, C, H, W)
        return np.ascontiguousarray(pixels, dtype=np.float32)


def _licence(source: models.Source) -> str:
    """The model card's ``license:`` (README.md front matter), when the card is here; else say where to look."""
    card: Path | None = source.path / "README.md" if source.path is not None else None
    if card is None:
        try:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(source.repo_id, "README.md", revision=source.revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - no cached card: say so below
            card = None
    if card is not None and card.is_file() and (found := _LICENCE.search(card.read_text(errors="replace"))):
        return found.group(1)
    return "tiny demo weights (no licence terms)" if source.demo else "not stated here: see the model card"

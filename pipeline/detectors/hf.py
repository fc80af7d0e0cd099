"""Any Hugging Face image classifier as a detector: ``AutoModelForImageClassification`` and its own image processor
(weights and preprocessing travel together), by hub id, ``ID@REVISION``, a ``save_pretrained`` directory, or
``tiny`` (a seeded random ViT, labels ``normal`` and ``nsfw``: its scores are meaningless). Its labels are its outputs;
single-label models give softmax probabilities, multi-label ones (``problem_type: multi_label_classification``)
sigmoids.

>>> det = HFClassifier.load("Falconsai/nsfw_image_detection")   # outputs ("normal", "nsfw")
"""

from __future__ import annotations

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
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        if len(set(labels)) != len(labels):
            raise ModelSourceError(f"image classifier {name!r} has repeated labels {labels}: outputs must be unique")
        self.name, self.outputs, self.demo = name, tuple(labels), source.demo
        self.source, self.transform = source, ProcessorTransform(processor)
        self.digest = weights_digest(model)
        self.device, self.dtype = device, dtype
        self.multi_label = model.config.problem_type == "multi_label_classification"
        self.model = model.to(device, dtype).eval()
        self.input_shape = tuple(self.prepare([np.zeros((8, 8, 3), np.uint8)]).shape[1:])

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
            "revision": self.source.revision,
            "sha256": self.digest,
            "licence": _licence(self.source),
            "outputs": list(self.outputs),
            "runtime": "torch",
            "device": str(self.device),
            "demo": self.demo,
        }


class ProcessorTransform:
    """The classifier's image processor as a detector transform (picklable: the scan's CPU stage runs it)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, arrays: list[np.ndarray]) -> np.ndarray:
        if not arrays:
            return np.empty((0, 3, 0, 0), np.float32)
        pixels = self.processor(images=list(arrays), return_tensors="np")["pixel_values"]
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

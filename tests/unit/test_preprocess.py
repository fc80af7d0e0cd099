"""The batched tensor preprocessing against the PIL-based CLIPImageProcessor the diffusers pipeline uses."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.preprocess import Preprocess, processor_class
from tests.conftest import varied_images


def test_matches_clip_image_processor_within_two_grey_levels(tiny_checker_dir):
    processor = processor_class().from_pretrained(tiny_checker_dir)
    images = varied_images(48, seed=3)
    reference = processor(images, return_tensors="pt").pixel_values
    ours = Preprocess.from_processor(processor)([np.asarray(im) for im in images])
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    diff = (ours - reference).abs()
    one_level = 1 / 255 / min(processor.image_std)  # one grey level in normalised units
    print(
        f"preprocessing vs CLIPImageProcessor: max abs diff {diff.max():.4f} ({diff.max() / one_level:.2f} grey levels)"
        f", mean {diff.mean():.2e}"
    )
    assert diff.max() <= 2 * one_level + 1e-6
    assert diff.mean() < 0.01 * one_level


def test_output_size_follows_transformers():
    pre = Preprocess(shortest_edge=224, crop=(224, 224), mean=(0, 0, 0), std=(1, 1, 1))
    assert pre.output_size(300, 400) == (224, 298)
    assert pre.output_size(400, 300) == (298, 224)
    assert pre.output_size(224, 224) == (224, 224)


def test_small_images_are_padded_like_transformers():
    pre = Preprocess(shortest_edge=16, crop=(24, 24), mean=(0, 0, 0), std=(1, 1, 1))
    out = pre([np.full((16, 16, 3), 255, np.uint8)])
    assert out.shape == (1, 3, 24, 24)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 12, 12] == 1

"""A Serve app whose verdicts are known in advance, for the page's browser tests and the API fuzzing.

``ScriptedGenerator`` paints image ``k`` of a request with code ``k % 4`` in its first pixel's red channel;
``ScriptedChecker`` gives generated images the verdict that code names (0 allow, 1 flag, 2 blur, 3 block), so one
generation shows every action. Uploaded files (bytes) go to the real tiny checker: real decoding, real errors.
Everything between them (the Ingress, batching, the policy's pixels, the page) is the real thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CODES = ("allow", "flag", "blur", "block")


class ScriptedGenerator:
    def __init__(self, args: Any, limits: Any):
        self.limits = limits

    def render(self, request: Any) -> Any:
        from pipeline.generator import Rendering

        w, h = request.width or 64, request.height or 64
        y, x = np.mgrid[0:h, 0:w]
        images = []
        for k in range(request.num_images):
            hue = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 60 * k)], -1)
            image = hue.astype(np.uint8)
            image[0, 0, 0] = k % 4
            images.append(image)
        return Rendering(images, request.seed if request.seed is not None else 7, w, h)

    def info(self) -> dict[str, Any]:
        return {"model": "scripted", "fingerprint": "scripted", "demo_weights": True, "text_encoder": None}


def scripted_verdict(code: int, categories: list[str], n_concepts: int, n_special: int) -> Any:
    from pipeline import Verdict

    action = CODES[code % 4]
    scores = dict.fromkeys(categories, -0.08)
    concept = [-0.05] * n_concepts
    flagged: list[str] = []
    if action != "allow" and categories:
        hit = categories[code % len(categories)]
        scores[hit] = {"flag": 0.04, "blur": 0.07, "block": 0.15}[action]
        flagged = [hit]
    bad = [3] if action in ("blur", "block") and n_concepts > 3 else []
    for i in bad:
        concept[i] = 0.02
    return Verdict(
        nsfw=bool(bad),
        concept_scores=concept,
        special_scores=[-0.1] * n_special,
        bad_concepts=bad,
        bad_concept_names=[f"concept{i}" for i in bad],
        categories=scores,
        flagged_categories=flagged,
        action=action,
    )


class ScriptedChecker:
    """Generated arrays: the scripted verdicts; encoded uploads: the real tiny checker's."""

    def __init__(self, args: Any):
        from pipeline import SafetyChecker

        self.real = SafetyChecker.load("tiny", "cpu", "float32", max_pixels=args.max_pixels, policy=None)
        self.policy_fallback = None

    @property
    def fingerprint(self) -> str:
        return self.real.fingerprint

    def configure(self, **settings: Any) -> None:
        self.real.configure(**settings)

    def info(self) -> dict[str, Any]:
        return self.real.info()

    def views(self, items: list[Any]) -> list[Any]:
        """Generated arrays stay arrays (scripted below); uploads get the real checker's views."""
        uploads = [i for i, item in enumerate(items) if not isinstance(item, np.ndarray)]
        real = dict(zip(uploads, self.real.views([items[i] for i in uploads]), strict=True))
        return [real.get(i, item) for i, item in enumerate(items)]

    def score_views(self, objects: list[Any]) -> list[Any]:
        info = self.real.info()
        categories = sorted(info["policy"]["categories"])
        n_special = sum(c["kind"] == "special" for c in info["concepts"])
        n_concepts = len(info["concepts"]) - n_special
        uploads = [i for i, obj in enumerate(objects) if not isinstance(obj, np.ndarray)]
        real = dict(zip(uploads, self.real.score_views([objects[i] for i in uploads]), strict=True))
        return [
            real[i] if i in real else scripted_verdict(int(obj[0, 0, 0]), categories, n_concepts, n_special)
            for i, obj in enumerate(objects)
        ]

"""Moderation policy: categories of concepts with thresholds and actions, and what an action does to an image.

A policy (YAML, versioned, part of the checker's fingerprint) groups concept rows into categories. Each concept is a
text phrase (CLIP text tower), a set of example images (the checker's own image embeddings) or a reference to the
stock checker's concepts. A category's score is its highest concept margin; a category with score > 0 is flagged,
and the image's action is the strongest of the flagged categories' actions and, when the stock checker's decision
(``nsfw``) is set, ``nsfw_action``. Fail closed: an image that was read but could not be scored (undecodable, too
large, unsupported) gets ``unscorable_action`` (``block`` unless the policy says otherwise), and an image with an
error but no action (the checker never answered for it) is always blocked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from PIL import Image, ImageFilter

from .detectors import check_reference
from .errors import InvalidInput

if TYPE_CHECKING:
    from .verdict import Verdict

Action = Literal["allow", "flag", "blur", "black", "block"]
ACTIONS: tuple[str, ...] = ("allow", "flag", "blur", "black", "block")  # weakest to strongest
RANK = {a: i for i, a in enumerate(ACTIONS)}
IMAGE_POLICIES: tuple[str, ...] = ("block", "blur", "black")  # keywords: the default policy, blocking done this way
WITHHELD: tuple[str, ...] = ("blur", "black", "block")  # actions that keep an image from being shown as it is
KEYWORDS: tuple[str, ...] = ("default", "stock", *IMAGE_POLICIES)
BLUR_KEEP_PIXELS = 16  # a blurred image keeps at most this many pixels of information on its short side
DEFAULT_POLICY_FILE = Path(__file__).parent / "policies" / "default.yaml"
POLICY_VERSION = 1
OVER_VIEW_BUDGET: tuple[str, ...] = ("sample", "unscorable")  # what an object with more than max_views views gets
POLICY_FALLBACKS: tuple[str, ...] = ("stock",)  # what `policy_fallback` may name (unset: no fallback, an error)


@dataclass(frozen=True)
class ConceptSpec:
    """One row of a category: exactly one of ``text``, ``images``, ``stock``, ``special`` or ``detector``."""

    text: str | None = None  # zero-shot phrase for the CLIP text tower
    images: str | None = None  # directory of example images (relative to the policy file)
    stock: int | str | None = None  # a stock concept index, or "all"
    special: int | str | None = None  # a stock special-care index, or "all"
    threshold: float | None = None  # cosine threshold (a detector's: a probability); stock: the weights' own
    detector: str | None = None  # a trained classifier (pipeline.detectors): open_nsfw, or a Hugging Face one
    output: str | None = None  # the detector's output this row reads (optional when it has only one)

    def kind(self) -> str:
        return next(k for k in ROW_KINDS if getattr(self, k) is not None)

    def fields(self) -> dict[str, Any]:
        """The row as written (unset keys left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


ROW_KINDS: tuple[str, ...] = ("text", "images", "stock", "special", "detector")


@dataclass(frozen=True)
class Category:
    name: str
    action: Action
    concepts: tuple[ConceptSpec, ...]


@dataclass(frozen=True)
class Policy:
    """A parsed policy file. ``base_dir`` resolves relative image-set paths."""

    name: str
    categories: tuple[Category, ...]
    nsfw_action: Action = "block"
    unscorable_action: Action = "block"  # images read but not scorable (corrupt, too large, unsupported)
    over_view_budget: str = "sample"  # more views than max_views: "sample" them evenly | "unscorable" (withheld)
    max_views: int | None = None  # views scored per object (None: the checker's max_views, 64 by default)
    policy_fallback: str | None = None  # "stock": use the stock policy, loudly, if the text tower cannot load
    version: int = POLICY_VERSION
    calibrated: bool = False
    base_dir: Path = Path(".")
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. calibration metadata, kept on save

    def digest(self) -> str:
        data = {
            "name": self.name,
            "nsfw_action": self.nsfw_action,
            "unscorable_action": self.unscorable_action,
            "policy_fallback": self.policy_fallback,
            "version": self.version,
            **({"over_view_budget": self.over_view_budget} if self.over_view_budget != "sample" else {}),
            **({"max_views": self.max_views} if self.max_views is not None else {}),
            "categories": [_digested(c) for c in self.categories],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    def to_yaml(self) -> str:
        data: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "calibrated": self.calibrated,
            "nsfw_action": self.nsfw_action,
            "unscorable_action": self.unscorable_action,
            **({"over_view_budget": self.over_view_budget} if self.over_view_budget != "sample" else {}),
            **({"max_views": self.max_views} if self.max_views is not None else {}),
            **({"policy_fallback": self.policy_fallback} if self.policy_fallback else {}),
            **self.extra,
            "categories": {},
        }
        for c in self.categories:
            specs = [s.fields() for s in c.concepts]
            data["categories"][c.name] = {"action": c.action, "concepts": specs}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _digested(category: Category) -> dict[str, Any]:
    """A category as the digest reads it: detector keys only where set, so older policies keep their digest."""
    data = asdict(category)
    for spec in data["concepts"]:
        for key in ("detector", "output"):
            if spec[key] is None:
                del spec[key]
    return data


def _check_row(raw: dict[str, Any], where: str) -> ConceptSpec:
    """One row of a category as written -> :class:`ConceptSpec`, or an error naming the keys and what is allowed."""
    unknown = set(raw) - {*ROW_KINDS, "threshold", "output"}
    kinds = [k for k in ROW_KINDS if k in raw]
    if unknown or len(kinds) != 1 or ("output" in raw and kinds[0] != "detector"):
        raise InvalidInput(
            f"{where}: exactly one of {', '.join(ROW_KINDS)} (plus an optional threshold; a detector row also takes "
            f"output) is allowed; got keys {sorted(raw)}"
        )
    threshold = raw.get("threshold")
    if kinds[0] == "detector":
        check_reference(raw["detector"], where)
        if not (isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 <= threshold <= 1):
            raise InvalidInput(f"{where}: a detector row needs a threshold, a probability in [0, 1]; got {threshold!r}")
        if "output" in raw and (not isinstance(raw["output"], str) or not raw["output"]):
            raise InvalidInput(f"{where}: output must name one of the detector's outputs, got {raw['output']!r}")
    elif threshold is not None and not (isinstance(threshold, int | float) and -1 <= threshold <= 1):
        raise InvalidInput(f"{where}: threshold must be a cosine in [-1, 1], got {threshold!r}")
    if kinds[0] == "text" and threshold is None:
        raise InvalidInput(f"{where}: text concepts need a threshold")
    return ConceptSpec(**raw)


def _check_action(value: Any, where: str) -> Action:
    if value not in ACTIONS:
        raise InvalidInput(f"{where}: action must be one of {', '.join(ACTIONS)}, got {value!r}")
    return value


def check_policy_fallback(value: Any, where: str) -> str | None:
    if value is not None and value not in POLICY_FALLBACKS:
        raise InvalidInput(
            f"{where}: policy_fallback must be unset (no fallback: a policy that cannot load is an error) or one of "
            f"{', '.join(POLICY_FALLBACKS)}, got {value!r}"
        )
    return value


def parse_policy(data: Any, base_dir: Path = Path("."), source: str = "policy") -> Policy:
    """A YAML mapping -> :class:`Policy`, with errors that name the place and what is allowed."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: a policy must be a mapping with `version`, `name` and `categories`")
    if data.get("version") != POLICY_VERSION:
        raise InvalidInput(f"{source}: `version` must be {POLICY_VERSION}, got {data.get('version')!r}")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise InvalidInput(f"{source}: `categories` must be a non-empty mapping of name -> category")
    categories = []
    for name, body in cats.items():
        where = f"{source}: category {name!r}"
        if not isinstance(body, dict) or not isinstance(body.get("concepts"), list) or not body["concepts"]:
            raise InvalidInput(f"{where} needs `action` and a non-empty `concepts` list")
        specs = []
        for i, raw in enumerate(body["concepts"]):
            if not isinstance(raw, dict):
                raise InvalidInput(f"{where}, concept {i}: expected a mapping, got {raw!r}")
            specs.append(_check_row(raw, f"{where}, concept {i}"))
        categories.append(Category(str(name), _check_action(body.get("action"), where), tuple(specs)))
    known = {"version", "name", "calibrated", "nsfw_action", "unscorable_action", "policy_fallback", "categories"}
    known |= {"over_view_budget", "max_views"}
    over_view_budget = data.get("over_view_budget", "sample")
    if over_view_budget not in OVER_VIEW_BUDGET:
        raise InvalidInput(
            f"{source}: over_view_budget must be one of {', '.join(OVER_VIEW_BUDGET)}, got {over_view_budget!r}"
        )
    max_views = data.get("max_views")
    if max_views is not None and (isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1):
        raise InvalidInput(f"{source}: max_views must be a whole number >= 1 (views per object), got {max_views!r}")
    return Policy(
        name=str(data.get("name", "unnamed")),
        categories=tuple(categories),
        nsfw_action=_check_action(data.get("nsfw_action", "block"), f"{source}: nsfw_action"),
        unscorable_action=_check_action(data.get("unscorable_action", "block"), f"{source}: unscorable_action"),
        over_view_budget=over_view_budget,
        max_views=max_views,
        policy_fallback=check_policy_fallback(data.get("policy_fallback"), source),
        calibrated=bool(data.get("calibrated", False)),
        base_dir=base_dir,
        extra={k: v for k, v in data.items() if k not in known},
    )


def load_policy(spec: str | Path | Policy = "default") -> Policy:
    """A policy file path, or a keyword: ``default`` (built in), ``stock`` (the stock checker only), or
    ``block`` | ``blur`` | ``black`` (the default policy, with its blocking done that way)."""
    if isinstance(spec, Policy):
        return spec
    text = str(spec)
    if text == "stock":
        return Policy(
            name="stock",
            categories=(
                Category("sexual", "block", (ConceptSpec(stock="all"),)),
                Category("special_care", "flag", (ConceptSpec(special="all"),)),
            ),
        )
    if text in ("default", *IMAGE_POLICIES):
        policy = load_policy(DEFAULT_POLICY_FILE)
        if text == "default":
            return policy
        cats = tuple(replace(c, action=text) if c.action == "block" else c for c in policy.categories)
        return replace(policy, name=f"{policy.name}+{text}", categories=cats, nsfw_action=text)
    path = Path(text)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"policy {text!r} is neither a file nor one of {', '.join(KEYWORDS)}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read policy file {path}: {exc}") from None
    return parse_policy(data, path.parent, str(path))


def strongest(actions: list[str]) -> str:
    return max(actions, key=RANK.__getitem__, default="allow")


# --- what an action does to an image -------------------------------------------------------------------------------
def blur(image: np.ndarray) -> np.ndarray:
    """Strong, unrecoverable blur: downsample to ≤16 px on the short side, upsample, then Gaussian-blur."""
    h, w = image.shape[:2]
    scale = BLUR_KEEP_PIXELS / min(h, w)
    small = Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BOX)
    big = small.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(radius=max(2, max(h, w) / 32)))
    return np.asarray(big, dtype=np.uint8)


def image_action(verdict: Verdict) -> str:
    """The verdict's action. An error with an action (an unscorable image) takes that action; an error without one
    (never scored) is blocked; a bare verdict without a policy falls back to the stock decision."""
    if verdict.error is not None:
        return verdict.action or "block"
    if verdict.action is None:
        return "block" if verdict.nsfw else "allow"
    return verdict.action


def withheld(verdict: Verdict) -> bool:
    """An image the policy does not release as it is (blur, black or block), scored or unscorable: what a bucket
    scan's quarantine or tag acts on."""
    return image_action(verdict) in WITHHELD


def outcome(verdict: Verdict) -> dict[str, Any]:
    """A verdict as the fields every result reports (check rows, ``/v1/moderate``, the scan's rows): its scores and
    views, the action the policy takes and whether that withholds the object."""
    return {**verdict.to_dict(), "action": image_action(verdict), "flagged": withheld(verdict)}


def apply_action(image: np.ndarray, verdict: Verdict) -> tuple[str, np.ndarray | None]:
    """-> (action, pixels to release or None)."""
    action = image_action(verdict)
    if action in ("allow", "flag"):
        return action, image
    if action == "blur":
        return action, blur(image)
    if action == "black":
        return action, np.zeros_like(image)
    return "block", None

"""The checker's interface: what a Serve checker replica holds, as :class:`~pipeline.checker.SafetyChecker` implements
it and as a test's stand-in must (Ray's ``LLMServer`` takes ``engine_cls`` likewise), so that the stand-in takes the
one scoring path production takes. Typing only: cheap to import, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .verdict import Verdict


@runtime_checkable
class CheckerCore(Protocol):
    """Objects -> views (outside the model lock) -> one verdict per object (under it); live policy; identity."""

    @property
    def fingerprint(self) -> str: ...

    def views(self, items: Sequence[Any]) -> list[Any]:
        """Encoded objects or arrays -> each one's views, or its ``ImageDecodeError`` (no model work)."""
        ...

    def score_views(self, objects: Sequence[Any]) -> list[Verdict]:
        """What :meth:`views` returned -> one verdict per object, in order (errors become unscorable verdicts)."""
        ...

    def configure(self, **settings: Any) -> None: ...

    def info(self) -> dict[str, Any]: ...


def checker_core(obj: Any) -> CheckerCore:
    """``obj`` if it implements :class:`CheckerCore`, else a ``TypeError`` naming what it lacks."""
    if not isinstance(obj, CheckerCore):
        names = ("fingerprint", "views", "score_views", "configure", "info")
        missing = [name for name in names if not hasattr(obj, name)]
        raise TypeError(f"{type(obj).__name__} is not a checker: it lacks {', '.join(missing)} (see CheckerCore)")
    return obj

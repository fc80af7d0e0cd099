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
        """Encoded objects or arrays -> each one's views, or its ``ImageDecodeError`` (no model work). A
        :class:`PolicyCore` also takes ``policies=``, a policy name per item."""
        ...

    def score_views(self, objects: Sequence[Any]) -> list[Verdict]:
        """What :meth:`views` returned -> one verdict per object, in order (errors become unscorable verdicts)."""
        ...

    def configure(self, **settings: Any) -> None: ...

    def info(self) -> dict[str, Any]: ...


@runtime_checkable
class PolicyCore(CheckerCore, Protocol):
    """A core that holds named policies beside its own: ``views``, ``score_views`` and ``info`` then also take
    ``policies`` (a name per object; None entries: the own policy) or ``policy``, and each name has its identity."""

    def fingerprint_for(self, policy: str | None) -> str:
        """The fingerprint of that policy's scoring (``fingerprint`` for None); InvalidInput for an unknown name."""
        ...

    def parts_for(self, policy: str | None) -> dict[str, list[str]]:
        """Which parts of a verdict under that policy come from demo weights and which from real ones."""
        ...


def policy_core(obj: Any) -> PolicyCore | None:
    """``obj`` if it holds named policies (:class:`PolicyCore`), else None (a stand-in scoring with one policy)."""
    return obj if isinstance(obj, PolicyCore) else None


def checker_core(obj: Any) -> CheckerCore:
    """``obj`` if it implements :class:`CheckerCore`, else a ``TypeError`` naming what it lacks."""
    if not isinstance(obj, CheckerCore):
        names = ("fingerprint", "views", "score_views", "configure", "info")
        missing = [name for name in names if not hasattr(obj, name)]
        raise TypeError(f"{type(obj).__name__} is not a checker: it lacks {', '.join(missing)} (see CheckerCore)")
    return obj

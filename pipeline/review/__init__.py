"""Human review of a bucket scan: a queue over its current view, blurred thumbnails, and decisions the scan honours.

- :mod:`pipeline.decisions` (below the scan and this package): the append-only decisions table under DEST;
- :mod:`.queue`: the queue, sorted once and paged by cursor;
- :mod:`.edge`: the ASGI edge in front of every route (Host, origin, key -> reviewer, body cap, page headers);
- :mod:`.app`: the FastAPI app and its page (``diffguard review DEST``). No Ray.
"""

from ..decisions import DECISIONS, Decision, DecisionLog, current_decisions

__all__ = ["DECISIONS", "Decision", "DecisionLog", "current_decisions"]

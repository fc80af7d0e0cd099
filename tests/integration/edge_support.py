"""A checker for the edge's page test (tests/integration/test_edge_served.py): an upload whose bytes end with
``mark(code)`` gets the scripted verdict of that code (page_support's codes: 0 allow, 1 flag, 2 blur, 3 block),
whatever its pixels show; other uploads, and generated images, are scored as ``ScriptedChecker`` scores them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.integration.page_support import ScriptedChecker

MARK = b"diffguard-test-verdict:"  # after a PNG's IEND chunk: decoders ignore it


def mark(code: int) -> bytes:
    return MARK + str(code).encode()


class MarkedChecker(ScriptedChecker):
    def views(self, items: list[Any]) -> list[Any]:
        """A marked upload becomes a one-pixel array carrying its code, which ``ScriptedChecker`` scores as scripted."""
        scripted = []
        for item in items:
            if isinstance(item, bytes) and item[:-1].endswith(MARK):
                item = np.full((1, 1, 3), int(item[-1:]), np.uint8)
            scripted.append(item)
        return super().views(scripted)

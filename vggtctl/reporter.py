"""The progress hooks a long run reports through (torch-free, so the CLI starts fast)."""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger("vggtctl")


class Reporter:
    """Progress hooks; the CLI renders them with Rich. The library default shows no progress,
    but its messages (settings that differ from the root's, what the catalog left out) go to the
    `vggtctl` logger as warnings: without logging set up, Python prints those on stderr."""

    def start(self, total: int, plan: Any) -> None: ...

    def set_total(self, total: int) -> None: ...

    def update(self, encoded: int, failed: int, nbytes: int) -> None:
        """Absolute counts so far (summed over ranks on rank 0)."""

    def message(self, text: str) -> None:
        _log.warning("%s", text)

    def finish(self) -> None: ...

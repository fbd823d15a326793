"""The progress hooks a long run reports through (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from typing import Any


class Reporter:
    """Progress hooks; the CLI renders them with Rich, the library default is silent."""

    def start(self, total: int, plan: Any) -> None: ...

    def set_total(self, total: int) -> None: ...

    def update(self, encoded: int, failed: int, nbytes: int) -> None:
        """Absolute counts so far (summed over ranks on rank 0)."""

    def message(self, text: str) -> None: ...

    def finish(self) -> None: ...

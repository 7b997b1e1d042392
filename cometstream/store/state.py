"""The delivery state as the ledger stores it, and what changed in it since the last commit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["State", "StateDiff"]


@dataclass
class State:
    """The delivery state as the ledger holds it."""

    watermark: int = 0
    server_start_hash: str = ""
    running_jobs: dict[str, list[Any]] = field(default_factory=dict)
    accounts: dict[str, list[Any]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    accounts_baseline: bool = False
    #: the dedup window: (fingerprint, timestamp), oldest first
    dedup: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StateDiff:
    """What changed in the delivery state since the last commit (a value of None: removed)."""

    watermark: int
    server_start_hash: str
    accounts_baseline: bool
    dedup: list[tuple[int, int]]
    #: keys older than this left the window
    horizon: int
    max_size: int
    running_jobs: dict[str, list[Any] | None]
    accounts: dict[str, list[Any] | None]
    devices: dict[str, str | None]

"""The store: the SQLite ledger (``ledger.db`` in ``state.dir``) as plain functions and small
classes, without asyncio. :class:`cometstream.delivery.ledger.Ledger` is the one thin async
writer over it; ``cometstream dlq`` reads and changes its dead letters through the same
:class:`DeadLetters`.

- :mod:`.statedir`: ``state.dir``, its lock (one daemon per directory) and its security checks;
- :mod:`.schema`: the tables, opening a file (integrity check, format upgrades), moving a
  damaged one aside;
- :mod:`.codec`: how events are stored in chunks, sink positions as text, and the 64-bit
  fingerprint the dedup window keeps of a key;
- :mod:`.state`: the delivery state as plain data (what a load returns, what a commit writes);
- :mod:`.statedb`: the delivery state (watermark, dedup window, jobs, accounts, devices),
  written incrementally;
- :mod:`.plan`: a commit planned as pure functions (what to write, what to trim);
- :mod:`.store`: the open ledger: a commit plan applied in one transaction, reads for lagging
  sinks, what is left at shutdown;
- :mod:`.deadletters`: the events sinks refused for good (write, list, delete);
- :mod:`.migrate` with :mod:`.legacy`: the files of earlier versions, migrated at the first
  start.

Why SQLite: transactions give torn-write safety for free, WAL lets the writer append while a
lagging sink reads, ``PRAGMA quick_check`` detects a damaged file at start, and it needs no
dependency.

The store imports nothing of ``delivery/`` (which builds on it): the layers go one way.
"""

from __future__ import annotations

from .codec import Position
from .deadletters import DeadLetter, DeadLetters
from .migrate import migrate
from .plan import CommitPlan
from .schema import FILENAME, FORMAT_VERSION, connect, quarantine
from .statedir import FILE_MODE, LOCK_FILE, StateLock, check_state_dir
from .store import Store

__all__ = ["FILENAME", "FILE_MODE", "FORMAT_VERSION", "LOCK_FILE", "CommitPlan", "DeadLetter",
           "DeadLetters", "Position", "StateLock", "Store", "check_state_dir", "connect",
           "migrate", "quarantine"]

"""The pipeline, in parts with one job each (one way an event travels, top to bottom):

- ``pipeline.py``: :class:`Pipeline`, the facade: ``publish`` routes each event to every
  sink's route, the taps and ack listeners, the ledger's side (cursors, positions,
  ``lagging``...), start and drain;
- ``route.py``: :class:`Route`, routing: one sink's filter, bounded memory queue and overflow
  policy, and where its delivery stands;
- ``buffer.py``: where events wait beyond the memory queues (:class:`MemoryBuffer`: nowhere;
  :class:`DiskBuffer`: the ledger);
- ``engine.py``: the one delivery engine (a window of sends; one at a time is concurrency 1);
- ``ack.py``: acknowledgements, dead letters, positions and crash recovery;
- ``retry.py``: the one retry policy (retry, pause the sink, or dead-letter) and the failure log.

At run time a module imports only modules below it in this list, never one above (type
annotations aside). Nothing here imports the ledger: the buffer is handed one.
"""

from __future__ import annotations

from .ack import AckListener, DeadLetters
from .buffer import Buffer, DiskBuffer, MemoryBuffer
from .pipeline import BATCH_MAX, Pipeline, Tap
from .route import QUEUE_BYTES, Route

__all__ = ["BATCH_MAX", "QUEUE_BYTES", "AckListener", "Buffer", "DeadLetters", "DiskBuffer",
           "MemoryBuffer", "Pipeline", "Route", "Tap"]

"""A protocol-faithful simulated Comet Server for the demo, the tests and the benchmarks.

``Simulator`` serves the live event stream (``/api/v1/events/stream``) and the admin HTTP API
(``/api/v1/admin/...``, ``AdminAPI``) on real sockets, both from one generated world of users,
devices and jobs (``World``), with injectable faults (``Faults``);
``run_simulator`` runs one until a stop event is set (the ``cometstream simulate`` command).
"""

from __future__ import annotations

from cometstream.simulator.api import AdminAPI
from cometstream.simulator.auth import Credentials, totp_code, totp_matches
from cometstream.simulator.server import STREAM_PATH, Faults, Simulator, run_simulator
from cometstream.simulator.world import EVENT_KEYS, JOB_DETAIL_KEYS, World

__all__ = [
    "EVENT_KEYS",
    "JOB_DETAIL_KEYS",
    "STREAM_PATH",
    "AdminAPI",
    "Credentials",
    "Faults",
    "Simulator",
    "World",
    "run_simulator",
    "totp_code",
    "totp_matches",
]

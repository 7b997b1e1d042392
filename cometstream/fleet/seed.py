"""Reading the whole fleet from the admin API into a new :class:`~.model.Model`.

The calls are those Comet's exporter makes at every scrape, made here only at start, after
every reconnect and every ``[fleet] reseed_interval``:

1. ``list-users-full``: every profile (users, protected items and their last jobs, vaults,
   devices). Made while the remedial sync makes the same call after a reconnect, it is one
   request for both (:meth:`~cometstream.api.AdminClient.call`);
2. ``get-jobs-for-date-range(now - 86400, now)``: the jobs for ``recentjobs_total``;
3. ``dispatcher/list-active``: the live connections and the versions they report;
4. ``meta/version``, only when the HELLO did not give the server's version (the HELLO's
   ``Data`` is the same ``ServerMetaVersionInfo``: version and self-backups).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Final

from ..api import AdminClient
from .model import RECENT_WINDOW, Model

__all__ = ["read_fleet"]

#: users built between two turns given to the event loop
_TURN: Final = 500


async def read_fleet(api: AdminClient, *, now: int, info: Mapping[str, Any], max_series: int,
                     name_labels: bool, refused: Callable[[int], None],
                     overflowed: Callable[[int], None]) -> Model:
    """The fleet as the API shows it now; ``info`` is the server's ``ServerMetaVersionInfo``
    as the HELLO (or the last check) gave it. Raises ApiError (or TimeoutError) as the API
    does."""
    users = await api.list_users_full()
    jobs = await api.jobs_for_date_range(now - RECENT_WINDOW, now)
    live = await api.live_connections()
    if not isinstance(info.get("Version"), str) or not info.get("Version"):
        info = await api.meta_version()
    model = Model(max_series=max_series, name_labels=name_labels, refused=refused,
                  overflowed=overflowed)
    model.server_info(info)
    for i, (name, profile) in enumerate(users.items(), 1):
        model.put_user(name, profile)
        if not i % _TURN:
            await asyncio.sleep(0)  # the stream is read meanwhile (its events wait for us)
    for job in jobs:
        model.recent_job(job)
    model.replace_live(live)
    return model

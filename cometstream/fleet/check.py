"""The fleet's check: what no event tells (a job that ended without one, a device an
administrator registered that connected before it was placed), read from the admin API every
``[fleet] check_interval`` seconds by :class:`~.service.Fleet`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ..errors import ApiError
from .model import num

if TYPE_CHECKING:
    from .service import Fleet

__all__ = ["CHECK_LOOKUPS", "check_round"]

#: jobs the check looks up one by one (``get-job-properties``) in one round, at most: those
#: the server no longer lists as running (the others wait for the next round)
CHECK_LOOKUPS: Final = 20


async def check_round(fleet: Fleet) -> None:
    """One round: the server's ``meta/version`` (its version and self-backups); while
    jobs are believed running, the jobs it lists as running (``get-jobs-for-date-range``
    (0, 0)), and the final state of those it no longer lists (``get-job-properties``, at
    most :data:`CHECK_LOOKUPS`): ended without an event (cancelled from the web
    interface, abandoned); while devices an administrator registered are not placed, the
    live connections (``dispatcher/list-active``), which name their users. An answer
    older than a seed that came in meanwhile is not applied."""
    generation = fleet._generation
    info = await fleet.api.meta_version()
    model = fleet.model
    if model is None or generation != fleet._generation:
        return
    fleet.info = info
    model.server_info(info)
    if model.running:
        believed = set(model.running)
        listed = await fleet.api.jobs_for_date_range(0, 0)
        if generation != fleet._generation:
            return
        still = set()
        for running in listed:
            still.add(running.get("GUID"))
            model.recent_job(running)
        ended = [g for g in believed if g not in still and g in model.running]
        for guid in ended[:CHECK_LOOKUPS]:
            job: dict[str, Any] | None
            try:
                job = await fleet.api.job_properties(guid)
            except ApiError as exc:
                if exc.status != 400:  # (400: "Job not found": gone from the server)
                    raise
                job = None
            if generation != fleet._generation:
                return
            if job is None or job.get("GUID") != guid:
                model.forget_job(guid)
            elif guid in model.running and num(job.get("EndTime")) > 0:
                model.job_completed(job)
            fleet.checked_jobs += 1
    if model.unplaced:
        conns = await fleet.api.live_connections()
        if generation != fleet._generation:
            return
        for conn in conns.values():
            device, name = conn.get("DeviceID"), conn.get("Username")
            if isinstance(device, str) and device in model.unplaced \
                    and isinstance(name, str):
                version = conn.get("ReportedVersion")
                model.connect(name, device, version if isinstance(version, str) else None)

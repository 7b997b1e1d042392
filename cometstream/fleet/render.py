"""The fleet as Prometheus text (exposition format 0.0.4), from memory, for ``/metrics``.

Not a prometheus-client collector: the client builds a sample object per series and escapes
every label of every sample at each scrape (about 8 µs a series here), which for a fleet of
30,000 protected items (some 500,000 series) is seconds per scrape. Each entity's label text is
built once, when the entity is (:mod:`.model`), so a scrape is one pass that joins strings:
well under a microsecond a series. Each family is encoded as soon as it is complete, so the
transient text of a scrape is about one family's.

The ``cometserver_*`` families carry the names and labels of Comet's own exporter, and the
same meaning (:mod:`.model`); ``cometstream_fleet_*`` describe the fleet state itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

from .model import CATEGORIES, Model, label_value

__all__ = ["Family", "render"]

#: (name, type, help, [(label text without braces, value)]): a small family of our own
Family = tuple[str, str, str, list[tuple[str, float]]]

_HELP: Final = {
    "cometserver_users_total": "Users on the Comet Server",
    "cometserver_storagevault_size_bytes": "Last measured size of each Storage Vault",
    "cometserver_storagevault_quota_bytes": "Quota of each Storage Vault that has one",
    "cometserver_lastbackup_start_time": "Start time of the Protected Item's last completed "
                                         "backup job (Unix seconds)",
    "cometserver_lastbackup_end_time": "End time of the Protected Item's last completed backup "
                                       "job (Unix seconds)",
    "cometserver_lastbackup_file_count": "Files in the Protected Item's last completed backup job",
    "cometserver_lastbackup_file_size_bytes": "Size of the data selected for backup, as of the "
                                              "Protected Item's last completed backup job",
    "cometserver_lastbackup_upload_size_bytes": "Bytes uploaded by the Protected Item's last "
                                                "completed backup job",
    "cometserver_lastbackup_download_size_bytes": "Bytes downloaded by the Protected Item's last "
                                                  "completed backup job",
    "cometserver_lastbackup_status": "Status category of the Protected Item's last completed "
                                     "backup job (1 for its category, 0 for the others)",
    "cometserver_recentjobs_total": "Jobs that started or ended in the last 24 hours, by status "
                                    "category",
    "cometserver_device_is_online": "1 while the registered device has a live connection",
    "cometserver_device_is_current": "1 when the live-connected device runs the server's "
                                     "software version",
    "cometserver_lastsuccessfulbackup_end_time": "End time of the Protected Item's last "
                                                 "successful backup job (Unix seconds)",
    "cometserver_protected_item_info": "A Protected Item's description, engine and device "
                                       "(value 1)",
    "cometserver_device_info": "A registered device's name, platform and client version "
                               "(value 1)",
}
_START: Final = "cometserver_lastbackup_start_time{"
_END: Final = "cometserver_lastbackup_end_time{"
_FILES: Final = "cometserver_lastbackup_file_count{"
_FSIZE: Final = "cometserver_lastbackup_file_size_bytes{"
_UP: Final = "cometserver_lastbackup_upload_size_bytes{"
_DOWN: Final = "cometserver_lastbackup_download_size_bytes{"
_STATUS: Final = "cometserver_lastbackup_status{"
_SUCCESS: Final = "cometserver_lastsuccessfulbackup_end_time{"
_ITEM_INFO: Final = "cometserver_protected_item_info{"
_SIZE: Final = "cometserver_storagevault_size_bytes{"
_QUOTA: Final = "cometserver_storagevault_quota_bytes{"
_ONLINE: Final = "cometserver_device_is_online{"
_CURRENT: Final = "cometserver_device_is_current{"
_DEVICE_INFO: Final = "cometserver_device_info{"
#: per category, the tails of its five status lines: (',status="success"} 1\n', ...)
_STATUS_TAILS: Final = tuple(
    tuple(f',status="{name}"}} {1 if i == cat else 0}\n' for i, name in enumerate(CATEGORIES))
    for cat in range(len(CATEGORIES)))


def _head(name: str, type_: str = "gauge", help_: str | None = None) -> str:
    return f"# HELP {name} {help_ or _HELP[name]}\n# TYPE {name} {type_}\n"


def _family(out: list[bytes], name: str, lines: list[str]) -> None:
    """Encode one family (its lines freed by the caller right after)."""
    if lines:
        out.append((_head(name) + "".join(lines)).encode("utf-8"))


def _value(v: float) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return f"{v}"


def render(model: Model | None, now: float, own: Iterable[Family] = ()) -> bytes:
    """The exposition of ``model`` (nothing of the fleet before it is first seeded) and of the
    ``own`` families, at ``now`` (the server's clock, for the recent jobs)."""
    out: list[bytes] = []
    if model is not None:
        _fleet(out, model, now)
    for name, type_, help_, samples in own:
        text = [_head(name, type_, help_)]
        for labels, value in samples:
            text.append(f"{name}{{{labels}}} {_value(value)}\n" if labels
                        else f"{name} {_value(value)}\n")
        out.append("".join(text).encode("utf-8"))
    return b"".join(out)


def _fleet(out: list[bytes], model: Model, now: float) -> None:
    users = model.users.values()
    out.append((_head("cometserver_users_total")
                + f"cometserver_users_total {len(model.users)}\n").encode())
    counts = model.recent_counts(now)
    out.append((_head("cometserver_recentjobs_total") + "".join(
        f'cometserver_recentjobs_total{{status="{name}"}} {n}\n'
        for name, n in zip(CATEGORIES, counts, strict=True))).encode())

    sizes: list[str] = []
    quotas: list[str] = []
    for user in users:
        for v in user.vaults:
            sizes.append(f"{_SIZE}{v.labels}}} {v.size}\n")
            if v.quota is not None:
                quotas.append(f"{_QUOTA}{v.labels}}} {v.quota}\n")
    _family(out, "cometserver_storagevault_size_bytes", sizes)
    _family(out, "cometserver_storagevault_quota_bytes", quotas)
    del sizes, quotas

    # the protected items: the six figures of the last backup in one pass, then its status,
    # the last success and the info (each family encoded before the next is built)
    done = [item for user in users for item in user.items if item.fig[0] > 0]
    for prefix, name, index in ((_START, "cometserver_lastbackup_start_time", 0),
                                (_END, "cometserver_lastbackup_end_time", 1),
                                (_FILES, "cometserver_lastbackup_file_count", 2),
                                (_FSIZE, "cometserver_lastbackup_file_size_bytes", 3),
                                (_UP, "cometserver_lastbackup_upload_size_bytes", 4),
                                (_DOWN, "cometserver_lastbackup_download_size_bytes", 5)):
        _family(out, name, [f"{prefix}{i.labels}}} {i.fig[index]}\n" for i in done])
    tails = _STATUS_TAILS
    p = _STATUS
    _family(out, "cometserver_lastbackup_status", [
        f"{p}{i.labels}{t[0]}{p}{i.labels}{t[1]}{p}{i.labels}{t[2]}{p}{i.labels}{t[3]}"
        f"{p}{i.labels}{t[4]}"
        for i in done for t in (tails[i.fig[6]],)])
    del done
    _family(out, "cometserver_lastsuccessfulbackup_end_time", [
        f"{_SUCCESS}{i.labels}}} {i.fig[7]}\n"
        for user in users for i in user.items if i.fig[7]])
    _family(out, "cometserver_protected_item_info", [
        f"{_ITEM_INFO}{i.labels},{i.info}}} 1\n" for user in users for i in user.items])

    live = model.live
    online: list[str] = []
    for user in users:
        conns = live.get(user.name)
        for d in user.devices:
            online.append(f"{_ONLINE}{d.labels}}} {1 if conns and d.id in conns else 0}\n")
    _family(out, "cometserver_device_is_online", online)
    del online
    _family(out, "cometserver_device_is_current", _current(model))
    _family(out, "cometserver_device_info", [
        f"{_DEVICE_INFO}{d.labels},{d.info}}} 1\n" for user in users for d in user.devices])


def _current(model: Model) -> list[str]:
    """One line per live connection whose version is known: its user and device, named as in
    the profile (a device no profile has: no name)."""
    version = model.version
    lines = []
    for name, conns in model.live.items():
        user = model.users.get(name)
        known = {d.id: d.labels for d in user.devices} if user is not None else {}
        for dev_id, reported in conns.items():
            if reported is None:
                continue
            labels = known.get(dev_id)
            if labels is None:
                labels = f'username="{label_value(name)}",device_id="{label_value(dev_id)}"'
                if model.name_labels:
                    labels += ',device_name=""'
            lines.append(f"{_CURRENT}{labels}}} {1 if reported == version else 0}\n")
    return lines

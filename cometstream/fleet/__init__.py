"""The Comet fleet as a Prometheus scrape target: the ``cometserver_*`` metrics of Comet's own
exporter (same names, labels and meaning), served from memory and kept current by the event
stream. See docs/fleet.md.

- :mod:`.model`: the state (users, protected items, vaults, devices, live connections, recent
  jobs) and the exporter's rules;
- :mod:`.seed`: reading the whole fleet from the admin API;
- :mod:`.render`: the text exposition at scrape time;
- :mod:`.service`: :class:`Fleet`, which seeds, applies the events and renders.
"""

from __future__ import annotations

from .model import Model
from .service import Fleet

__all__ = ["Fleet", "Model"]

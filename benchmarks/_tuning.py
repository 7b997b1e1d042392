"""The interpreter settings ``cometstream run`` applies, for the benchmarks that run a daemon in
their own process (``BENCH_TUNING=all|gc|switch|none`` says which)."""

from __future__ import annotations

#: the values of BENCH_TUNING
TUNINGS = ("all", "gc", "switch", "none")


def tune(tuning: str) -> None:
    """``runtime.tune_for_daemon``'s settings (``all``, ``gc``, ``switch`` or ``none``), after
    the daemon's modules are loaded, as ``cometstream run`` has them when it applies them
    (``gc.freeze()`` then keeps them out of the collector's sight, and their import is not
    counted in what is measured)."""
    import cometstream.config
    import cometstream.daemon
    import cometstream.sinks
    import cometstream.stream  # noqa: F401
    from cometstream import runtime

    if tuning in ("all", "gc"):
        runtime.tune_gc()
    if tuning in ("all", "switch"):
        runtime.tune_switch_interval()

"""The stream path in instructions per event: the throughput benchmark's receivers run under
cachegrind, which counts every instruction the process executes. A count does not depend on
what else the machine is doing, where a rate on a shared 2-core machine swings by a third
between runs; it is what to compare when a change is worth a few percent.

    .venv/bin/python benchmarks/instructions.py [--mix comet] [--small 2000] [--large 22000]
                                                [--only naive-aiohttp,read-loop,daemon,...]

Each receiver (the same processes as ``throughput.py``: the naive aiohttp forwarder, the
daemon's read loop alone, the daemon with one file sink, without redaction, with the memory
buffer) takes the first ``--small`` events of a stream, then, from a second sender, the first
``--large`` events of the same stream (the simulator, seeded alike): the difference of the two
counts over ``--large - --small`` is the receiver's instructions per event, without its
start-up (imports, connecting, the final line count). ``vs naive`` is the naive forwarder's
count over the receiver's: the rate ratio the receiver would have if instructions were time
(they are not quite: cache misses, the writer threads' system calls and the GIL hand-offs cost
time that this does not count).

Needs valgrind (Debian: ``apt install valgrind``); a run takes a few minutes (valgrind runs a
process about 50 times slower). No figure is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from throughput import RECEIVERS, Sender  # noqa: E402 (this script's folder, added above)

DEFAULT = "naive-aiohttp,read-loop,daemon,daemon-noredact,daemon-memory"
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def count(kind: str, sender: Sender, n: int, env: dict[str, str]) -> int:
    """Instructions of one receiver process taking ``n`` events from ``sender``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no",
             f"--cachegrind-out-file={os.devnull}", sys.executable, str(HERE / "throughput.py"),
             "--receive", kind, "--url", sender.url, "--events", str(n),
             "--result", str(result), "--extra", "{}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, check=True)
        lines = json.loads(result.read_text())["lines"]
    sender.next_client()
    if lines != n + 1:  # (every event, and the HELLO)
        raise SystemExit(f"{kind}: {lines} lines written, not {n + 1}")
    found = _REFS.findall(proc.stderr)
    if not found:
        raise SystemExit(f"{kind}: no instruction count in valgrind's output")
    return int(found[-1].replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", default="comet", choices=["comet", "completions", "simulator"],
                    help="the stream: throughput.py's Comet-like mix (default), job "
                         "completions only, or the simulator's own mix")
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--large", type=int, default=22_000)
    ap.add_argument("--only", default=DEFAULT, help=f"receivers (default: {DEFAULT})")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.only.split(",")]
    unknown = [k for k in kinds if k not in RECEIVERS]
    if unknown:
        ap.error(f"unknown receiver(s) {unknown}; choose from {', '.join(RECEIVERS)}")
    if not args.large > args.small > 0:
        ap.error("--large must be more than --small, and --small more than 0")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt install valgrind)", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    small, large = Sender(args.small, 0, env, mix=args.mix), Sender(args.large, 0, env,
                                                                      mix=args.mix)
    per_event: dict[str, float] = {}
    try:
        print(f"{args.mix}: instructions per event over events {args.small + 1:,}-"
              f"{args.large:,} ({large.bytes:.0f} bytes on average)", flush=True)
        print(f"{'receiver':<22} {'instructions/event':>19} {'vs naive':>9}", flush=True)
        for kind in kinds:
            a = count(kind, small, args.small, env)
            b = count(kind, large, args.large, env)
            per_event[kind] = (b - a) / (args.large - args.small)
            naive = per_event.get("naive-aiohttp")
            ratio = f"{naive / per_event[kind]:>8.2f}x" if naive else f"{'-':>9}"
            print(f"{RECEIVERS[kind][2]:<22} {per_event[kind]:>19,.0f} {ratio}", flush=True)
    finally:
        small.stop()
        large.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

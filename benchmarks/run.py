"""Every benchmark, one command: the stream path under load, remedial sync, then the delivery
state's disk writes.

    .venv/bin/python benchmarks/run.py [--quick]

Runs ``throughput.py`` (a 100,000-event burst into the daemon with 1 file sink, without
redaction, with 4 sinks and with a 10% filter, against naive aiohttp and websockets forwarders
on the same stream; then 10,000 events paced at 1,000/s for the delivery latency) and
``resync.py`` (a remedial sync of 100,000 job completions missed during a gap) and
``diskwrite.py`` (bytes written to disk per byte delivered at 3,000 events/s with a dedup window
of ~10k and ~100k keys, and the start time with a 200,000-key window) and ``webhook.py`` (the
webhook sink against a receiver 50 ms away, serial and concurrent, and against one that fails
the first POST of each event) and ``fleet.py`` (the fleet metrics of 10,000 users with 30,000
protected items: a scrape's time and the fleet state's memory), then, if valgrind is installed,
``instructions.py`` (the stream path's receivers in instructions per event). Each starts its own
simulator (and peers, and daemon) in separate processes and prints a table; nothing is asserted.
``--quick`` runs a tenth of the sizes (a smoke test of the benchmarks themselves; diskwrite.py:
a 5 s measured interval instead of 20 s).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tenth of the sizes, one repeat")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    runs = [
        [sys.executable, str(HERE / "throughput.py"), "--events", str(100_000 // scale),
         "--repeat", "1" if args.quick else "2", "--paced", str(10_000 // scale)],
        [sys.executable, str(HERE / "resync.py"), "--jobs", str(100_000 // scale)],
        [sys.executable, str(HERE / "diskwrite.py"), *(["--quick"] if args.quick else [])],
        [sys.executable, str(HERE / "webhook.py"), *(["--quick"] if args.quick else [])],
        [sys.executable, str(HERE / "fleet.py"), "--users", str(10_000 // scale),
         "--items", str(30_000 // scale), "--scrapes", "5" if args.quick else "20"],
    ]
    if shutil.which("valgrind") is not None:
        runs.append([sys.executable, str(HERE / "instructions.py"),
                     "--small", str(2_000 // scale), "--large", str(22_000 // scale)])
    for cmd in runs:
        print(f"$ {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}",
              flush=True)
        code = subprocess.run(cmd).returncode
        if code:
            return code
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

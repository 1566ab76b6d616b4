"""A bounded pure-Python busy loop pinned to one core: the "one core busy" contention of ``bench/train_step.py``.

It pins itself with ``os.sched_setaffinity(0, {core})``, prints ``ready``, then spins (no sleeping, no I/O) until
``--seconds`` have passed or its parent process has gone (it was re-parented), whichever comes first, so it never
outlives the benchmark by more than that deadline even if the benchmark is killed. ``train_step.py`` starts it
before a scenario's warm-up and terminates it after the scenario's last round.

    python bench/busy.py --core 1 --seconds 600
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def spin(core: int, seconds: float) -> int:
    os.sched_setaffinity(0, {core})
    deadline = time.monotonic() + seconds
    parent = os.getppid()
    print(f"ready pid {os.getpid()} core {core} deadline {seconds:.0f} s", flush=True)
    x = 0
    while True:
        for _ in range(200_000):  # a few milliseconds of pure-Python work between checks
            x += 1
        if time.monotonic() >= deadline or os.getppid() != parent:
            return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--core", type=int, required=True, help="the one core to spin on")
    ap.add_argument("--seconds", type=float, required=True, help="hard deadline: exit after this many seconds")
    args = ap.parse_args()
    sys.exit(spin(args.core, args.seconds))


if __name__ == "__main__":
    main()

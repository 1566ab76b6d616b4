"""Merge the ``report.json`` of several ``lsrfx finetune`` runs (e.g. one process per seed, run in parallel) into one
report: the same summary (mean +- std over all seeds per method), table and plot as ``--seeds 0 1 2`` would give.

    python bench/merge_reports.py OUT_DIR run-seed0/report.json run-seed1/report.json run-seed2/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lsrfx.finetune.report import format_table, summarise, write_json, write_plot


def main() -> None:
    out, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    reports = [json.loads(p.read_text()) for p in paths]
    runs = sorted((r for rep in reports for r in rep["runs"]),
                  key=lambda r: (reports[0]["settings"]["methods"].index(r["method"]), r["seed"]))
    merged = {**reports[0], "command": [rep["command"] for rep in reports], "runs": runs, "summary": summarise(runs)}
    merged["settings"] = {**reports[0]["settings"], "seeds": sorted({r["seed"] for r in runs})}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", merged)
    write_plot(out / "report.png", merged)
    print(format_table(merged["summary"]))


if __name__ == "__main__":
    main()

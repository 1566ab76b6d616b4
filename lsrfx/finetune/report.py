"""``report.json`` (settings, every run, a per-method summary) and ``report.png`` (loss curves; accuracy against
trainable adapter parameters), plus the plain-text table the CLI prints."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from lsrfx.atomic_files import write_bytes_atomic


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def kept_validation(run: dict) -> dict:
    """The validation scores of the epoch whose state a run kept (tested, saved, exported): ``best_validation``;
    in reports written before best-epoch selection, the last epoch's."""
    return run.get("best_validation") or run["validation"][-1]


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method, in the order first run: accuracy mean/std over seeds (validation: the kept epoch's),
    parameters, kept and last epochs per seed, median step time."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    rows = []
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        test_mean, test_std = mean_std([r["test"]["accuracy"] for r in rs])
        val_mean, val_std = mean_std([kept_validation(r)["accuracy"] for r in rs])
        rows.append({
            "method": method,
            "seeds": [r["seed"] for r in rs],
            "options": rs[0]["options"],
            "lr": rs[0]["lr"],
            "adapter_params": rs[0]["adapter_params"],
            "head_params": rs[0]["head_params"],
            "test_accuracy_mean": test_mean,
            "test_accuracy_std": test_std,
            "validation_accuracy_mean": val_mean,
            "validation_accuracy_std": val_std,
            "best_epochs": [kept_validation(r)["epoch"] for r in rs],
            "stopped_epochs": [r.get("stopped_epoch", r["validation"][-1]["epoch"]) for r in rs],
            "step_time_ms_median": 1000 * statistics.median(r["step_time_s"] for r in rs),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
        })
    return rows


def format_table(summary: list[dict]) -> str:
    """A Markdown table of the summary (also what the CLI prints)."""
    lines = [
        "| method | adapter params | test acc (mean +- std) | val acc (kept epoch) | kept epoch | step time (ms) "
        "| seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        kept = row.get("best_epochs")
        lines.append(
            f"| {row['method']} | {row['adapter_params']:,} | "
            f"{100 * row['test_accuracy_mean']:.2f} +- {100 * row['test_accuracy_std']:.2f} | "
            f"{100 * row['validation_accuracy_mean']:.2f} +- {100 * row['validation_accuracy_std']:.2f} | "
            f"{', '.join(map(str, kept)) if kept else '-'} | {row['step_time_ms_median']:.0f} | {len(row['seeds'])} |"
        )
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    write_bytes_atomic(path, (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_plot(path: Path, report: dict) -> None:
    """Two panels: training loss (smoothed) and validation loss per run; test accuracy against adapter params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = report["runs"], report["summary"]
    colours = {row["method"]: f"C{i}" for i, row in enumerate(summary)}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        c = colours[run["method"]]
        first = run is next(r for r in runs if r["method"] == run["method"])
        losses = run["losses"]
        ax_loss.plot(range(1, len(losses) + 1), smooth(losses, 10), color=c, alpha=0.7, lw=1,
                     label=f"{run['method']} train" if first else None)
        val = run["validation"]
        ax_loss.plot([v["step"] for v in val], [v["loss"] for v in val], "o--", color=c, ms=3, lw=1,
                     label=f"{run['method']} validation" if first else None)
        kept = kept_validation(run)
        ax_loss.plot([kept["step"]], [kept["loss"]], "*", color=c, ms=10,
                     label=f"{run['method']} kept epoch" if first else None)
    ax_loss.set(xlabel="step", ylabel="cross-entropy",
                title="Loss (train: moving average of 10 steps; star: kept epoch)")
    ax_loss.legend(fontsize=8)
    for row in summary:
        c = colours[row["method"]]
        ax_acc.errorbar([row["adapter_params"]], [100 * row["test_accuracy_mean"]],
                        yerr=[100 * row["test_accuracy_std"]], fmt="o", color=c, capsize=4, ms=7)
        ax_acc.annotate(row["method"], (row["adapter_params"], 100 * row["test_accuracy_mean"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax_acc.set_xscale("log")
    n_seeds = max(len(row["seeds"]) for row in summary)
    ax_acc.set(xlabel="trainable adapter parameters (log scale)", ylabel="test accuracy (%)",
               title=f"Test accuracy vs adapter parameters (mean +- std, {n_seeds} seed(s))")
    ax_acc.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())

"""Accuracy against adapter parameters: every method at several budgets, several seeds, on the packaged task.

Each point is one ``lsrfx finetune`` run (pretrained all-MiniLM-L6-v2, q/v adapters + head, the default protocol:
best validation epoch kept, early stopping) in its own process with one thread; ``--jobs`` processes run side by
side (accuracy does not depend on timing). Budgets are matched to LoRA r = 1, 2, 4, 8 (768 r adapter parameters per
384 x 384 layer, 12 layers) within 15 %:

* LSR-Adapt at the paper's r1 = r2 = 2: 160 S per layer, so S = 5, 10, 19, 38 (plus the paper's S = 16); at that
  budget also rank 8 (r1 = 2, r2 = 4, S = 11: lsrfx's default) and rank 16 (r1 = r2 = 4, S = 8); rank 8 at
  every budget too (224 S per layer: S = 3, 7, 14, 27), plotted as a line of its own, and rank 16 at LoRA r = 8's
  (320 S per layer: S = 19) and rank 32 (r1 = 8, r2 = 4: 512 S, S = 12);
* CondLoRA: 768 r per group of 6 layers (one pair shared by the 6 query and by the 6 value layers), so r = 6, 12,
  24, 48 equal LoRA r = 1, 2, 4, 8 exactly (plus the default r = 8);
* GenLoRA: g (768) + 2 r (g + 2) per layer (basis rbf or centred; ``--genlora-basis``), so (g, r) = (1, 16),
  (2, 16), (4, 32), (8, 32) are LoRA r = 1, 2, 4, 8 + 8-13 % (plus the default g = 2, r = 32 with each basis, and
  the mixed basis at r = m = 20, g = 1, which fits under 30 % of LoRA r = 8; more RBFs inside that budget,
  g = 1 at r = 64 and 128; the default with a wider kernel, gamma 3; the budget spent on rank: g = 2 at r = 64
  and 192, g = 3 at r = 384, plotted as a line of its own);
* LSR-Adapt's paper recipe (``lsr-paper``: init "paper", alpha 16384, lr 5e-4; ``lsr-paper-lr1e-3``: lr 1e-3);
* learning-rate checks (``-lr`` points): each default at its lr / 3 and x 3 (LSR-Adapt's rank-8 default at 3e-3
  and 5e-3), and each structured point at LoRA r = 8's budget at its method's lr / 3.

Reports land in ``--out/<point>-seed<s>/report.json`` (a finished point is skipped when the script is re-run);
``--summarise`` writes ``--out/frontier.md`` (mean +- std of test and of validation accuracy per point, and the
trained dW's effective rank averaged over layers and seeds) and
``--out/frontier.png`` (test accuracy against adapter parameters, one line per method).

    python bench/frontier.py --seeds 0 1 2 --jobs 2                      # every point
    python bench/frontier.py --only lora-r8 lsr-s16 --seeds 0 1 2        # some points, in this order
    python bench/frontier.py --summarise
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OUT = Path(__file__).with_name("results") / "frontier"
# Points that are variants of a method (another basis, base or recipe), plotted on their own, not on its line.
VARIANT_TAGS = ("rbf", "mixed", "int8", "paper", "-lr", "r2x4", "r4x4", "r8x4", "gamma", "g1r64", "g1r128", "g2r64",
                "g2r192", "g3r384")
# Lines of their own: a method's other shape swept over the budgets (a point may also be on its method's line).
SHAPE_LINES = {
    "lsr rank 8 (r1 = 2, r2 = 4)": ("lsr-r2x4-s3", "lsr-r2x4-s7", "lsr-r2x4-s11", "lsr-r2x4-s14", "lsr-r2x4-s27"),
    "genlora rank (g = 2, 3)": ("genlora-centred-g2r32", "genlora-centred-g2r64", "genlora-centred-g2r192",
                                "genlora-centred-g3r384"),
}
# What a results folder keeps out of the repository: each run's adapter files, plot and log (reproducible);
# report.json per run and the folder's frontier.md / frontier.png are kept.
GITIGNORE = """# Per-run outputs kept out of the repository (reproduced by bench/frontier.py): adapter files, plots, logs.
*/report.png
*-seed*/*-seed*/
logs/
"""
RUN_FLAGS = ("lr", "quantize")  # point options that are lsrfx finetune flags, not adapter options


def points(genlora_basis: str) -> dict[str, tuple[str, dict]]:
    """Point name -> (method, options), in budget order per method. ``lr`` and ``quantize`` are run flags."""
    out: dict[str, tuple[str, dict]] = {}
    for r in (1, 2, 4, 8):
        out[f"lora-r{r}"] = ("lora", {"r": r, "alpha": float(r)})  # scale 1, as the default r = alpha = 8
    paper_rank = {"r1": 2, "r2": 2}  # LSR-Adapt's budget sweep, paper recipe and int8 point: the paper's rank 4
    for s in (5, 10, 16, 19, 38):
        out[f"lsr-s{s}"] = ("lsr", {**paper_rank, "separation_rank": s})
    # LSR-Adapt's rank r1 r2 at its default budget (S (r1 (24 + 24) + r2 (16 + 16)) per layer: 2,560 at the default)
    out["lsr-r2x4-s11"] = ("lsr", {"r1": 2, "r2": 4, "separation_rank": 11})  # rank 8, 2,464 per layer
    out["lsr-r4x4-s8"] = ("lsr", {"r1": 4, "r2": 4, "separation_rank": 8})  # rank 16, 2,560 per layer
    out["lsr-r4x4-s19"] = ("lsr", {"r1": 4, "r2": 4, "separation_rank": 19})  # rank 16 at LoRA r = 8's budget
    out["lsr-r8x4-s12"] = ("lsr", {"r1": 8, "r2": 4, "separation_rank": 12})  # rank 32 at LoRA r = 8's, exactly
    out["lsr-r2x4-s27"] = ("lsr", {"r1": 2, "r2": 4, "separation_rank": 27})  # rank 8, LoRA r=8's budget
    for s in (3, 7, 14):  # rank 8 at LoRA r = 1, 2, 4's budgets (2,688 S in all): the default's shape as a line
        out[f"lsr-r2x4-s{s}"] = ("lsr", {"r1": 2, "r2": 4, "separation_rank": s})
    # LSR-Adapt's paper recipe: N(0, 0.01^2) factors, scale 4096 (alpha 16384 at r1 = r2 = 2), lr 5e-4
    # (S = 16 written out: it was lsrfx's default when these ran, and the default has since moved to rank 8, S = 11)
    paper = {**paper_rank, "separation_rank": 16, "init": "paper", "alpha": 16384.0}
    out["lsr-paper"] = ("lsr", {**paper, "lr": 5e-4})
    out["lsr-paper-lr1e-3"] = ("lsr", {**paper, "lr": 1e-3})
    out["lsr-s16-int8"] = ("lsr", {**paper_rank, "separation_rank": 16, "quantize": "int8"})  # over torchao int8
    for r in (6, 8, 12, 24, 48):
        out[f"condlora-r{r}"] = ("condlora", {"r": r, "alpha": float(r)})
    # GenLoRA's bases at the default budget (r = 32, g = 2; mixed: r = m = 20, g = 1 fits under 30 % of LoRA r=8)
    out["genlora-rbf-g2r32"] = ("genlora", {"basis": "rbf"})
    out["genlora-centred-g2r32"] = ("genlora", {"basis": "centred"})
    out["genlora-mixed-g1r20"] = ("genlora", {"basis": "mixed", "group_size": 1, "r": 20, "alpha": 20.0})
    # More RBFs per bank inside the default budget (g = 1: 768 + 6 r per layer, so r = 64, 128 are 19 % and 25 % of
    # LoRA r = 8), and the default's bank with a wider kernel (gamma 3 instead of "nearest"'s ~11 at g = 2: ~9 % of
    # the positions within exp(-2) of no RBF at init instead of ~32 %)
    out["genlora-centred-g1r64"] = ("genlora", {"group_size": 1, "r": 64, "alpha": 64.0, "basis": "centred"})
    out["genlora-centred-g1r128"] = ("genlora", {"group_size": 1, "r": 128, "alpha": 128.0, "basis": "centred"})
    out["genlora-centred-g2r32-gamma3"] = ("genlora", {"basis": "centred", "gamma_init": 3.0})
    # The budget spent on rank instead of latent dimensions: g = 2 at r = 64 (33 % of LoRA r = 8) and r = 192
    # (LoRA r = 4's budget exactly), g = 3 at r = 384 (full rank: LoRA r = 8's budget exactly)
    for g, r in ((2, 64), (2, 192), (3, 384)):
        out[f"genlora-centred-g{g}r{r}"] = ("genlora", {"group_size": g, "r": r, "alpha": float(r), "basis": "centred"})
    for g, r in ((1, 16), (2, 16), (4, 32), (8, 32)):
        out[f"genlora-{genlora_basis}-g{g}r{r}"] = ("genlora", {"group_size": g, "r": r, "alpha": float(r),
                                                             "basis": genlora_basis})
    # The learning-rate re-check under the current protocol: each method's default at its default lr / 3 and x 3
    # (the defaults: lora 3e-3, lsr 1e-2, condlora 3e-3, genlora 1e-2; run with --out bench/results/lr_check; LSR-Adapt
    # at the paper's rank 4, its default then)
    defaults = {"lora-r8": ("lora", {}, (1e-3, 1e-2)), "lsr-s16": ("lsr", {**paper_rank, "separation_rank": 16},
                                                                   (3e-3, 3e-2)),
                "condlora-r8": ("condlora", {}, (1e-3, 1e-2)), "genlora-g2r32": ("genlora", {}, (3e-3, 3e-2)),
                # LSR-Adapt's rank-8 default (chosen after the check above, at its lr of rank 4): lr / 3 and / 2
                "lsr-r2x4-s11": ("lsr", out["lsr-r2x4-s11"][1], (3e-3, 5e-3))}
    # At LoRA r = 8's budget, each structured point also at its method's default lr / 3: a sum over more Kronecker
    # terms, a larger shared rank or more latent dimensions moves dW further per step at the same lr
    g8r32 = ("genlora", {"group_size": 8, "r": 32, "alpha": 32.0, "basis": "centred"})
    for name, (method, options), lr in (("lsr-s38", out["lsr-s38"], 3e-3), ("lsr-r2x4-s27", out["lsr-r2x4-s27"], 3e-3),
                                        ("condlora-r48", out["condlora-r48"], 1e-3),
                                        ("genlora-centred-g8r32", g8r32, 3e-3)):
        defaults[name] = (method, options, (lr,))
    for name, (method, options, lrs) in defaults.items():
        for lr in lrs:
            out[f"{name}-lr{lr:.0e}".replace("e-0", "e-")] = (method, {**options, "lr": lr})
    return out


def command(method: str, options: dict, seed: int, out: Path, epochs: int | None, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "lsrfx.cli", "finetune", "--method", method, "--seed", str(seed), "--threads", "1",
           "--no-export", "--out", str(out), "--overwrite"]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)] if key in RUN_FLAGS else ["--set", f"{method}.{key}={value}"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    return cmd + extra


def run_point(name: str, method: str, options: dict, seed: int, args: argparse.Namespace) -> str:
    out = args.out / f"{name}-seed{seed}"
    if (out / "report.json").exists():
        return f"{name} seed {seed}: already done"
    t0 = time.perf_counter()
    log = args.out / "logs" / f"{name}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(command(method, options, seed, out, args.epochs, args.extra), stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
    return f"{name} seed {seed}: {status} in {time.perf_counter() - t0:.0f} s"


def summarise(out: Path) -> None:
    rows: dict[str, list[dict]] = {}
    for report in sorted(out.glob("*-seed*/report.json")):
        data = json.loads(report.read_text())
        for run in data["runs"]:
            rows.setdefault(report.parent.name.rsplit("-seed", 1)[0], []).append(run)
    if not rows:
        raise SystemExit(f"no reports under {out}")
    lines = ["| point | method | adapter params | share of LoRA r=8 | test accuracy % (mean +- std) | "
             "val accuracy % (kept epoch) | dW eff. rank | seeds | kept epochs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    series: dict[str, list[tuple[int, float, float]]] = {}
    lora8 = 73_728
    for name, runs in sorted(rows.items(), key=lambda kv: (kv[1][0]["method"], kv[1][0]["adapter_params"])):
        test = [100 * r["test"]["accuracy"] for r in runs]
        val = [100 * best_validation(r) for r in runs]
        params = runs[0]["adapter_params"]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        lines.append(f"| {name} | {runs[0]['method']} | {params:,} | {100 * params / lora8:.1f} % | "
                     f"{statistics.mean(test):.2f} +- {sd:.2f} | {statistics.mean(val):.2f} | "
                     f"{statistics.mean(mean_effective_rank(r) for r in runs):.1f} | {len(runs)} | "
                     f"{', '.join(str(r.get('best_epoch', '?')) for r in runs)} |")
        labels = [label for label, members in SHAPE_LINES.items() if name in members]
        variant = any(tag in name for tag in VARIANT_TAGS)  # off the method's own line
        if not variant:
            labels.append(runs[0]["method"])
        for label in labels or [name]:
            series.setdefault(label, []).append((params, statistics.mean(test), sd))
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    # One colour per method, its budget line solid; a variant point takes its method's colour and a marker of its own
    from common import COLOURS as colours  # bench/ is on sys.path when run as a script
    variant_markers = iter(["x", "^", "s", "D", "v", "P", "*", "<", ">", "h", "d", "p", "X", "8"] * 4)
    shapes = set(SHAPE_LINES)
    for label, pts in sorted(series.items(), key=lambda kv: (any(t in kv[0] for t in VARIANT_TAGS), kv[0])):
        pts.sort()
        single = label not in shapes and any(tag in label for tag in VARIANT_TAGS)  # a marker of its own, no line
        colour = colours.get(label.split("-", 1)[0].split(" ", 1)[0], "tab:gray")
        style = "none" if single else "--" if label in shapes else "-"
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, label=label,
                    color=colour, marker=next(variant_markers) if single else "o",
                    linestyle=style, alpha=0.55 if single else 1, linewidth=2)
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters (log scale)")
    ax.set_ylabel("test accuracy % (mean +- std over seeds)")
    ax.set_title("all-MiniLM-L6-v2 on Debian sections: accuracy vs adapter budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    print(f"wrote {out / 'frontier.md'} and {out / 'frontier.png'}")


def mean_effective_rank(run: dict) -> float:
    """Mean over the adapted layers of the trained dW's effective rank (``delta_effective_ranks`` in the record,
    else the last column of the ``summary`` table that older records carry)."""
    ranks = run.get("delta_effective_ranks")
    if ranks:
        return statistics.mean(ranks.values())
    rows = [line.split()[-1] for line in run["summary"].splitlines()[2:] if " adapted with " not in line]
    return statistics.mean(float(v) for v in rows)


def best_validation(run: dict) -> float:
    """The kept epoch's validation accuracy (older reports without ``best_validation``: the last epoch's)."""
    best = run.get("best_validation")
    return best["accuracy"] if best else run["validation"][-1]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    ap.add_argument("--only", nargs="+", help="point names to run, in this order (default: all)")
    ap.add_argument("--genlora-basis", default="rbf", choices=["rbf", "centred"])
    ap.add_argument("--epochs", type=int, help="--epochs for every run (default: lsrfx finetune's)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summarise", action="store_true", help="only summarise the reports under --out")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more lsrfx finetune flags for every run")
    args = ap.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if args.summarise:
        summarise(args.out)
        return
    catalogue = points(args.genlora_basis)
    unknown = sorted(set(args.only or []) - set(catalogue))
    if unknown:
        raise SystemExit(f"unknown points {unknown}; known: {sorted(catalogue)}")
    todo = [(name, *catalogue[name], seed) for name in (args.only or catalogue) for seed in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    ignore = args.out / ".gitignore"
    if not ignore.exists():  # every results folder keeps the same files in the repository
        ignore.write_text(GITIGNORE)
    print(f"{len(todo)} runs, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda t: run_point(*t, args), todo):
            print(line, flush=True)
    summarise(args.out)


if __name__ == "__main__":
    main()

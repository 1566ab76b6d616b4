"""``bench/frontier.py``'s points: every one is a valid ``lsrfx finetune`` configuration, its adapter parameter count
(built on all-MiniLM-L6-v2's 12 adapted 384 x 384 layers) is the one its finished runs recorded, and the points that
stand for a LoRA budget are within the script's 15 % of it (docs/results.md's frontier table rests on this)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lsrfx.adapters import LayerSpec, make_config
from lsrfx.cli import parse_value

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"
LAYERS = [f"encoder.layer.{i}.attention.self.{name}" for i in range(6) for name in ("query", "value")]
LORA_PER_RANK = 12 * 768  # LoRA r = 1 on the 12 layers

# Point -> the LoRA rank whose budget it stands for (bench/frontier.py's docstring and docs/results.md's table)
BUDGET_POINTS = {
    **{f"lora-r{r}": r for r in (1, 2, 4, 8)},
    **{f"lsr-s{s}": r for s, r in ((5, 1), (10, 2), (19, 4), (38, 8))},
    **{f"lsr-r2x4-s{s}": r for s, r in ((3, 1), (7, 2), (14, 4), (27, 8))},
    "lsr-r4x4-s19": 8, "lsr-r8x4-s12": 8,
    **{f"condlora-r{c}": r for c, r in ((6, 1), (12, 2), (24, 4), (48, 8))},
    **{f"genlora-{basis}-g{g}r{rank}": r for basis in ("rbf", "centred")
       for (g, rank), r in (((1, 16), 1), ((2, 16), 2), ((4, 32), 4), ((8, 32), 8))},
    "genlora-centred-g2r192": 4, "genlora-centred-g3r384": 8,
}
# GenLoRA points presented as inside its default budget (under 30 % of LoRA r = 8)
GENLORA_DEFAULT_BUDGET = ["genlora-rbf-g2r32", "genlora-centred-g2r32", "genlora-mixed-g1r20", "genlora-centred-g1r64",
                          "genlora-centred-g1r128", "genlora-centred-g2r32-gamma3"]


def load_frontier():
    spec = importlib.util.spec_from_file_location("bench_frontier", BENCH / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FRONTIER = load_frontier()
POINTS = {**FRONTIER.points("rbf"), **FRONTIER.points("centred")}


def adapter_params(method: str, options: dict) -> int:
    """Trainable adapter parameters of ``method`` with the point's options as ``--set`` passes them (text parsed
    by the CLI), on the 12 layers; a tensor shared by several layers (CondLoRA's pair) counted once."""
    adapter_options = {k: parse_value(str(v)) for k, v in options.items() if k not in FRONTIER.RUN_FLAGS}
    config = make_config(method, adapter_options)
    specs = [LayerSpec(name, 384, 384, False, torch.float32, torch.device("meta")) for name in LAYERS]
    unique = {id(p): p for adapter in config.build(specs) for _, p in adapter.named_parameters()}
    return sum(p.numel() for p in unique.values())


def recorded_params(name: str) -> set[int]:
    return {json.loads(report.read_text())["runs"][0]["adapter_params"]
            for report in RESULTS.glob(f"*/{name}-seed*/report.json")}


# Points of the rbf basis's budget line that were defined but never run (no report under bench/results): every other
# point's runs are on record, so a point whose reports go missing fails below instead of passing unchecked.
NEVER_RUN = {"genlora-rbf-g1r16", "genlora-rbf-g2r16", "genlora-rbf-g4r32", "genlora-rbf-g8r32"}


@pytest.mark.parametrize("name", sorted(POINTS))
def test_point_is_valid_and_counts_what_its_runs_recorded(name):
    method, options = POINTS[name]
    params = adapter_params(method, options)
    recorded = recorded_params(name)
    if name in NEVER_RUN:
        assert not recorded, f"{name} has runs now: take it out of NEVER_RUN"
    else:
        assert recorded == {params}, f"{name}: {params} parameters here, its reports recorded {sorted(recorded)}"


@pytest.mark.parametrize("name", sorted(BUDGET_POINTS))
def test_budget_point_is_within_15_percent_of_its_lora_budget(name):
    budget = LORA_PER_RANK * BUDGET_POINTS[name]
    params = adapter_params(*POINTS[name])
    assert abs(params - budget) <= 0.15 * budget, f"{name}: {params} against LoRA r = {BUDGET_POINTS[name]}'s {budget}"


@pytest.mark.parametrize("name", GENLORA_DEFAULT_BUDGET)
def test_genlora_default_budget_points_are_under_30_percent_of_lora_r8(name):
    assert adapter_params(*POINTS[name]) < 0.30 * LORA_PER_RANK * 8

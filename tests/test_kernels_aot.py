"""The Triton kernels compiled for real GPUs (sm_80, sm_90) without one: ``triton.compile`` with a ``GPUTarget``.

Each build must produce a cubin, fit the target's shared memory per block (sm_80: 163 KB, sm_90: 227 KB) and run
its matmuls on the tensor cores it should (``mma.sync`` on sm_80; ``wgmma`` on sm_90 for row blocks >= 64, kept
in flight across K-iterations; none for exact fp32).

Coverage, to keep the suite fast (~0.7 s of CPU per build, two builds at a time): on both architectures the
largest autotune config of every (kernel, variant, dtype) (sm_80: fp16 and TF32, the two operand sizes that reach
the tensor cores; bf16 tiles match fp16's, fp32 ones TF32's), on sm_90 also the smallest config of every (kernel,
variant) in bf16 (one warpgroup, the smallest tiles that must still use ``wgmma``), and the fused kernel's largest
fp16 configs at rank block 64 on both. ``python -m lsrfx.kernels.aot`` (default ``--arch 80 90 --rank-blocks 16
64``: 606 builds) builds the whole matrix, every autotune config included. The
builds run in a subprocess: this test session imported triton with ``TRITON_INTERPRET=1``, which makes its
functions uncompilable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from lsrfx.kernels import aot  # noqa: E402

FULL_ARCH, SLICE_ARCH = 90, 80


def planned() -> dict[int, list[aot.Specialisation]]:
    """The builds this test checks, per architecture (see the module docstring)."""
    full = aot.specialisations((16,))
    largest = aot.representative(full)
    smallest = [s for s in aot.representative(s for s in reversed(full) if s.dtype == "bf16") if s not in largest]
    tile_slice = [s for s in largest if s.dtype in ("fp16", "tf32")]
    wide_rank = [s for s in aot.representative(aot.specialisations((64,)))
                 if s.dtype == "fp16" and s.rank_block == 64 and s.kernel == "fused_lowrank"]
    return {FULL_ARCH: largest + smallest + wide_rank, SLICE_ARCH: tile_slice + wide_rank}


PLAN = planned()
CASES = [(spec.id, arch) for arch, specs in PLAN.items() for spec in specs]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(arch: int, specs: list[aot.Specialisation]) -> tuple[int, list[dict]]:
    jobs = str(min(2, os.cpu_count() or 1))
    command = [sys.executable, "-m", "lsrfx.kernels.aot", "--json", "--jobs", jobs, "--arch", str(arch),
               "--only", *[spec.id for spec in specs]]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=1800, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and "summary" in lines[-1], f"no summary from {' '.join(command[:8])} ...:\n{done.stderr[-3000:]}"
    return done.returncode, lines


@pytest.fixture(scope="module")
def builds() -> dict[tuple[str, int], dict]:
    """Compile the plan once for the module: ``{(build id, arch): outcome}``; checks the CLI's summary and exit
    status against the outcomes on the way."""
    results: dict[tuple[str, int], dict] = {}
    for arch, specs in PLAN.items():
        returncode, lines = _run(arch, specs)
        *outcomes, summary = lines
        assert summary["summary"]["builds"] == len(specs) == len(outcomes)
        assert returncode == (0 if all(o["ok"] for o in outcomes) else 1)
        results |= {(o["id"], o["arch"]): o for o in outcomes}
    return results


@pytest.mark.parametrize(("build", "arch"), CASES, ids=[f"sm{arch}-{build}" for build, arch in CASES])
def test_build_compiles_fits_and_uses_tensor_cores(builds, build, arch):
    outcome = builds[(build, arch)]
    assert outcome["error"] == "", f"did not compile: {outcome['error']}"
    assert 0 <= outcome["shared"] <= aot.SHARED_LIMIT[arch]
    assert outcome["instruction"] == outcome["expected"]
    if outcome["expected_overlap"]:
        assert outcome["overlap"], "wgmma is waited for in every K-iteration (no MMA in flight across iterations)"


def test_expected_instructions_follow_the_hardware_rules():
    """The expectations themselves: what each dtype and tile can use on each architecture."""
    by_id = {spec.id: spec for spec in aot.specialisations((16,))}
    big = by_id["fused_lowrank/bf16/forward_readU/r16/128x256x64-w8-s3"]
    assert (big.expected_instruction(80), big.expected_instruction(90), big.expects_overlap(90)) == ("mma", "wgmma", True)
    small = by_id["fused_lowrank/fp16/grad_input/r16/64x64x64-w4-s5"]  # one warpgroup, 64 rows: still wgmma
    assert small.expected_instruction(90) == "wgmma" and small.expects_overlap(90) and not small.expects_overlap(80)
    rank_rows = by_id["tn_matmul/bf16/grad_A/r16/128x64-w4-s4"]  # a 16-row dot: too small for a warpgroup MMA
    assert rank_rows.expected_instruction(90) == "mma"
    exact = by_id["fused_lowrank/fp32/forward/r16/64x64x32-w4-s5"]  # TF32 not allowed: no tensor cores
    assert exact.expected_instruction(80) == exact.expected_instruction(90) == "none"
    assert by_id["fused_lowrank/tf32/forward/r16/64x64x32-w4-s5"].expected_instruction(80) == "mma"


def test_ptx_parsers():
    assert aot.tensor_core_instruction("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "wgmma"
    assert aot.tensor_core_instruction("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == "mma"
    assert aot.tensor_core_instruction("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"
    assert aot.wgmma_overlap("wgmma.wait_group.sync.aligned 1;\nwgmma.wait_group.sync.aligned 0;")
    assert not aot.wgmma_overlap("wgmma.wait_group.sync.aligned 0;")


def test_cli_exit_status_and_lines(monkeypatch, capsys):
    """One line per build and a summary; non-zero exit when a build fails, overflows or misses tensor cores."""
    spec = aot.specialisations((16,))[0]
    outcomes = [aot.Outcome(spec, 80, shared=1024, instruction=spec.expected_instruction(80), seconds=0.1)]
    monkeypatch.setattr(aot, "_interpreting", lambda: False)
    monkeypatch.setattr(aot, "compile_all", lambda specs, archs, jobs: iter(outcomes))
    assert aot.main(["--arch", "80", "--only", spec.id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("ok") and "shared    1024 B" in lines[0]
    assert lines[1].startswith("1 builds for sm_80") and "1 ok, 0 failed" in lines[1]
    for bad in (aot.Outcome(spec, 80, error="ptxas fatal"), aot.Outcome(spec, 80, shared=aot.SHARED_LIMIT[80] + 1),
                aot.Outcome(spec, 80, shared=1024, instruction="wgmma")):
        outcomes[:] = [bad]
        assert aot.main(["--arch", "80", "--only", spec.id]) == 1
        assert "ok" not in capsys.readouterr().out.splitlines()[0].rsplit(" ", 1)[-1]

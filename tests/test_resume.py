"""Checkpoint and resume: stop mid-run, continue in a fresh process from the saved files, reach the same weights.

The checkpoint is what a user's training loop writes (the Trainer guide's recipe for a loop of one's own): ``lsrfx.save_adapters`` for the
adapters (plus the ``trainable`` head) and one ``torch.save`` of the optimizer, the LR scheduler, the RNG state
(the model has dropout) and the step. The resumed process builds the *base* model, ``lsrfx.load_adapters`` adapts
and fills it (checking the base weights' fingerprints), restores the rest and trains to the end. Its final adapters
must be bit-identical (``torch.equal``) to an uninterrupted run's, on CPU, for every method. Controls show the
comparison has teeth: dropping the optimizer state or the RNG state changes the result.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lsrfx
from lsrfx.parametrization import adapter_parameters

from conftest import TINY_OPTIONS, TOY_CLASSES, TOY_WIDTH, ToyNet

STEPS, STOP_AT, SEQ = 6, 3, 5


def base_model() -> ToyNet:
    """The 'pretrained' base: the same weights in every process. With dropout, so that the forward draws random
    numbers and the RNG state is part of what a resume must restore."""
    torch.manual_seed(0)
    return ToyNet(dropout=0.2)


def adapted(method: str) -> ToyNet:
    model = base_model()
    lsrfx.adapt(model, method=method, targets=["query", "value"], trainable=("head",), **TINY_OPTIONS[method])
    return model


def trainer(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / (2 * STEPS))


@contextlib.contextmanager
def one_thread():
    """Same reduction order in every process (thread counts can change floating-point sums)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_steps(model: nn.Module, opt, sched, start: int, stop: int) -> None:
    model.train()
    for step in range(start, stop):
        g = torch.Generator().manual_seed(100 + step)  # the data of step `step`, wherever it runs
        x, y = torch.randn(6, SEQ, TOY_WIDTH, generator=g), torch.randint(0, TOY_CLASSES, (6,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def final_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    out.update({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("head.")})
    return out


def uninterrupted(method: str) -> dict[str, torch.Tensor]:
    with one_thread():
        model = adapted(method)
        torch.manual_seed(1)  # the dropout stream of the run
        run_steps(model, *trainer(model), 0, STEPS)
    return final_tensors(model)


def first_half(method: str, directory: Path) -> None:
    """Train to STOP_AT and write the checkpoint; the model is then discarded (the 'kill')."""
    with one_thread():
        model = adapted(method)
        torch.manual_seed(1)
        opt, sched = trainer(model)
        run_steps(model, opt, sched, 0, STOP_AT)
        lsrfx.save_adapters(model, directory / "adapters")
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "step": STOP_AT}, directory / "trainer.pt")


def resume(directory: Path, restore_optimizer: bool = True, restore_rng: bool = True) -> dict[str, torch.Tensor]:
    """What a resumed job does: base model, load adapters, restore trainer state, finish the run."""
    with one_thread():
        model = lsrfx.load_adapters(base_model(), directory / "adapters")
        opt, sched = trainer(model)
        state = torch.load(directory / "trainer.pt")
        if restore_optimizer:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        if restore_rng:
            torch.set_rng_state(state["rng"])
        run_steps(model, opt, sched, state["step"], STEPS)
    return final_tensors(model)


def resume_in_this_process_and_save(root: Path) -> None:
    """Entry point of the fresh process: resume every method's checkpoint, save the final tensors."""
    for method in lsrfx.METHODS:
        torch.save(resume(root / method), root / method / "final.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    for method in lsrfx.METHODS:
        (root / method).mkdir()
        first_half(method, root / method)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(root)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"resumed process failed:\n{proc.stderr[-4000:]}"
    return root


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_resume_in_fresh_process_is_bit_exact(checkpoints: Path, method: str) -> None:
    reference = uninterrupted(method)
    resumed = torch.load(checkpoints / method / "final.pt")
    assert set(resumed) == set(reference)
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), f"{method}: {name} differs after resume"
    start = final_tensors(adapted(method))
    assert any(not torch.equal(start[n], v) for n, v in reference.items()), "nothing trained"


@pytest.mark.parametrize("what", ["optimizer", "rng"])
def test_resume_without_full_state_differs(checkpoints: Path, what: str) -> None:
    """The controls: leave out the optimizer/scheduler state or the RNG state and the weights differ."""
    reference = uninterrupted("lsr")
    resumed = resume(checkpoints / "lsr", restore_optimizer=what != "optimizer", restore_rng=what != "rng")
    assert any(not torch.equal(resumed[n], v) for n, v in reference.items())


if __name__ == "__main__":
    resume_in_this_process_and_save(Path(sys.argv[1]))

"""The training loop: AdamW on the adapters (and the head, at its own learning rate), warm-up then linear decay,
a tqdm progress bar (loss, it/s, ETA), validation after every epoch, per-step wall times.

Protocol: the learning-rate schedule spans the planned ``epochs``; after every epoch the trainable state (adapters
and head) is scored on validation and, if it is the best so far (higher accuracy; on equal accuracy, lower loss),
copied to the CPU. Training stops early once the best epoch is ``patience`` epochs old (0: never), and the best
epoch's state is copied back into the model at the end, so the model that is tested and exported is the kept one.

A NaN or infinite loss, gradient norm or validation loss stops training at once with a
:class:`~lsrfx.finetune.errors.FinetuneError` naming the run, epoch and step: nothing trained after it is usable,
and running on would only fail later in a less telling place (the effective ranks' SVD, the export's check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lsrfx.finetune import defaults
from lsrfx.finetune.batches import Encoded, batches
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.evaluate import Scores, evaluate


@dataclass(frozen=True)
class TrainSettings:
    epochs: int  # planned epochs: the schedule's length (early stopping may end the loop sooner)
    batch_size: int
    lr: float  # adapter parameters
    head_lr: float  # the classification head (and any other trainable base parameter)
    weight_decay: float = defaults.WEIGHT_DECAY
    max_grad_norm: float = 1.0
    warmup: float = defaults.WARMUP_FRACTION  # share of the planned steps, in [0, 1)
    patience: int = defaults.PATIENCE  # epochs without a new best validation score before stopping; 0: never stop


@dataclass
class TrainHistory:
    """What happened during training: per-step loss and wall time, validation scores per epoch, the epoch whose
    state was kept (``best_epoch``, its scores ``best_validation``) and the last epoch trained (``stopped_epoch``)."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    best_epoch: int = 0
    best_validation: dict = field(default_factory=dict)
    stopped_epoch: int = 0

    def median_step_time(self, skip: int = 3) -> float:
        """Median step wall time after the first ``skip`` steps (compilation, warm-up)."""
        times = sorted(self.step_times[skip:] or self.step_times)
        return times[len(times) // 2] if times else float("nan")


def make_optimizer(model: nn.Module, adapter_params: list[nn.Parameter], settings: TrainSettings
                   ) -> torch.optim.Optimizer:
    """AdamW with two groups: adapter parameters at ``lr``, other trainable parameters (the head) at ``head_lr``;
    both with ``weight_decay``."""
    ids = {id(p) for p in adapter_params}
    head = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad and id(p) not in ids]
    groups = [{"params": adapter_params, "lr": settings.lr}]
    if head:
        groups.append({"params": head, "lr": settings.head_lr})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def schedule(total_steps: int, warmup: float = defaults.WARMUP_FRACTION) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup`` of the ``total_steps`` (at least one step if
    ``warmup > 0``), then linear decay to zero at ``total_steps``. ``warmup == 0``: factor 1 at step 0, then decay."""
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be in [0, 1) (got {warmup})")
    warmup_steps = max(1, int(warmup * total_steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def better(scores: Scores, best: dict | None) -> bool:
    """Whether ``scores`` beat the best so far: higher accuracy, or the same accuracy and a lower loss."""
    if best is None:
        return True
    return scores.accuracy > best["accuracy"] or (scores.accuracy == best["accuracy"] and scores.loss < best["loss"])


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Detached CPU copies of ``params``."""
    with torch.no_grad():
        return [p.detach().to("cpu", copy=True) for p in params]


def restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Copy ``saved`` back into ``params`` in place (the same tensors: compiled graphs and the optimizer still see
    them)."""
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)


def diverged(run: str, what: str, value: float, where: str, settings: TrainSettings) -> FinetuneError:
    """The error for a non-finite ``what`` (``"training loss"``, ...) at ``where`` (``"epoch 2, step 7"``)."""
    return FinetuneError(
        f"{run}: the {what} is {value} at {where}; training stopped there. A run that diverges usually has too high "
        f"a learning rate: lower --lr (now {settings.lr:g}) or --head-lr (now {settings.head_lr:g}), e.g. by 10x."
    )


def train(model: nn.Module, adapter_params: list[nn.Parameter], data: Encoded,
          validation: list[dict], settings: TrainSettings, *, seed: int, label: str = "train",
          method: str | None = None) -> TrainHistory:
    """Train ``model`` in place for up to ``settings.epochs`` epochs over ``data``, validate after each, stop early
    after ``settings.patience`` epochs without a better validation score, and leave the best epoch's trainable state
    (every parameter the optimizer updates: adapters and head) in the model. ``label`` is the progress bar's;
    ``method`` (with ``seed``) names the run in errors. A non-finite loss or gradient norm raises
    :class:`FinetuneError` before its step is applied; a non-finite validation loss raises after its epoch."""
    run = f"method {method!r}, seed {seed}" if method else f"seed {seed}"
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    optimizer = make_optimizer(model, adapter_params, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total, settings.warmup))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    history = TrainHistory()
    best: dict | None = None
    best_state: list[torch.Tensor] = []
    model.train()
    start = time.perf_counter()
    with tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, leave=True) as bar:
        for epoch in range(1, settings.epochs + 1):
            for batch in batches(data, settings.batch_size, shuffle=True, generator=generator):
                t0 = time.perf_counter()
                where = f"epoch {epoch}, step {len(history.losses) + 1}"
                loss = model(**batch).loss
                value = loss.item()
                if not math.isfinite(value):
                    raise diverged(run, "training loss", value, where, settings)
                loss.backward()
                norm = float(torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm))
                if not math.isfinite(norm):
                    raise diverged(run, "training gradient norm", norm, where, settings)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                history.step_times.append(time.perf_counter() - t0)
                history.losses.append(value)
                bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{value:.3f}", refresh=False)
                bar.update()
            scores: Scores = evaluate(model, validation)
            if not math.isfinite(scores.loss):
                raise diverged(run, "validation loss", scores.loss,
                               f"epoch {epoch} (after step {len(history.losses)})", settings)
            entry = {"epoch": epoch, "step": len(history.losses), **scores.as_dict()}
            history.validation.append(entry)
            history.stopped_epoch = epoch
            if better(scores, best):
                best, best_state = entry, snapshot(trainable)
            bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{history.losses[-1]:.3f}",
                            val_acc=f"{scores.accuracy:.3f}", best=best["epoch"])
            if settings.patience and epoch - best["epoch"] >= settings.patience and epoch < settings.epochs:
                bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", best=best["epoch"], stopped="early")
                break
    if best is None:
        raise ValueError(f"epochs must be >= 1 (got {settings.epochs})")
    restore(trainable, best_state)
    history.best_epoch, history.best_validation = best["epoch"], dict(best)
    history.train_seconds = time.perf_counter() - start
    return history

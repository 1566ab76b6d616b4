"""The training loop: AdamW on the adapters (and the head, at its own learning rate), warm-up then linear decay,
a tqdm progress bar (loss, it/s, ETA), validation after every epoch, per-step wall times."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lsrfx.finetune.batches import Encoded, batches
from lsrfx.finetune.evaluate import Scores, evaluate

WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float  # adapter parameters
    head_lr: float  # the classification head (and any other trainable base parameter)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


@dataclass
class TrainHistory:
    """What happened during training: per-step loss and wall time, validation scores per epoch."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0

    def median_step_time(self, skip: int = 3) -> float:
        """Median step wall time after the first ``skip`` steps (compilation, warm-up)."""
        times = sorted(self.step_times[skip:] or self.step_times)
        return times[len(times) // 2] if times else float("nan")


def make_optimizer(model: nn.Module, adapter_params: list[nn.Parameter], settings: TrainSettings
                   ) -> torch.optim.Optimizer:
    """AdamW with two groups: adapter parameters at ``lr``, other trainable parameters (the head) at ``head_lr``."""
    ids = {id(p) for p in adapter_params}
    head = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad and id(p) not in ids]
    groups = [{"params": adapter_params, "lr": settings.lr}]
    if head:
        groups.append({"params": head, "lr": settings.head_lr})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def schedule(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``WARMUP_FRACTION`` of the steps, then linear decay to zero."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def train(model: nn.Module, adapter_params: list[nn.Parameter], data: Encoded,
          validation: list[dict], settings: TrainSettings, *, seed: int, label: str = "train") -> TrainHistory:
    """Train ``model`` in place for ``settings.epochs`` epochs over ``data``; validate after each epoch."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    optimizer = make_optimizer(model, adapter_params, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    history = TrainHistory()
    model.train()
    start = time.perf_counter()
    with tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, leave=True) as bar:
        for epoch in range(1, settings.epochs + 1):
            for batch in batches(data, settings.batch_size, shuffle=True, generator=generator):
                t0 = time.perf_counter()
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()
                history.step_times.append(time.perf_counter() - t0)
                history.losses.append(value)
                bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{value:.3f}", refresh=False)
                bar.update()
            scores: Scores = evaluate(model, validation)
            history.validation.append({"epoch": epoch, "step": len(history.losses), **scores.as_dict()})
            bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{history.losses[-1]:.3f}",
                            val_acc=f"{scores.accuracy:.3f}")
    history.train_seconds = time.perf_counter() - start
    return history

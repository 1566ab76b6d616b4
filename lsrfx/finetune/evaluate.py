"""Loss and accuracy of a classifier over a list of batches."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, Tensor]]) -> Scores:
    """Mean cross-entropy and accuracy over ``batches`` (model put back in its previous train/eval mode)."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            n += len(labels)
    finally:
        model.train(was_training)
    return Scores(total_loss / max(n, 1), correct / max(n, 1), n)

"""Tokenise a split once and cut it into padded batches.

Batches are padded to the longest text in the batch rounded up to a multiple of ``PAD_MULTIPLE``, so a compiled
model sees only a few sequence lengths (Dynamo marks the dimension dynamic after the first change) while short
texts do not pay for the longest one; training batches are bucketed by length (see :func:`batches`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lsrfx.finetune.data import Split

PAD_MULTIPLE = 8
BUCKET_BATCHES = 16


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: per-example token ids (no padding) and labels."""

    ids: list[list[int]]
    labels: Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    """Token ids of every text, truncated to ``max_length`` tokens (special tokens included)."""
    ids = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(list(ids), torch.tensor(split.labels, dtype=torch.long), pad_id)


def collate(data: Encoded, index: list[int]) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` for the examples at ``index``."""
    longest = max(len(data.ids[i]) for i in index)
    length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(index), length), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), length), dtype=torch.long)
    for row, i in enumerate(index):
        seq = data.ids[i]
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": data.labels[index]}


def batches(data: Encoded, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None) -> list[dict[str, Tensor]]:
    """The whole split as a list of batches.

    With ``shuffle``: a random order, then within each window of ``BUCKET_BATCHES`` batches the examples are sorted
    by length and the batches shuffled again, so batches hold texts of similar length (less padding, faster steps)
    while their composition stays random.
    """
    n = len(data)
    if not shuffle:
        order = list(range(n))
        return [collate(data, order[i : i + batch_size]) for i in range(0, n, batch_size)]
    order = torch.randperm(n, generator=generator).tolist()
    window = batch_size * BUCKET_BATCHES
    chunks: list[list[int]] = []
    for start in range(0, n, window):
        part = sorted(order[start : start + window], key=lambda i: len(data.ids[i]))
        chunks += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [collate(data, chunks[i]) for i in torch.randperm(len(chunks), generator=generator).tolist()]

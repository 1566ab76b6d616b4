"""``lsrfx inspect``: adapt a model and return ``lsrfx.explain``'s account of the rewritten graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import lsrfx
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.model import check_model_dir, default_model_dir, first_line, offline


def build_model(model_dir: Path | None, model_type: str | None, layers: int | None) -> nn.Module:
    """The base model of a local directory, or of a named ``transformers`` model type with random weights."""
    offline()
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if model_type is not None:
        try:
            config = AutoConfig.for_model(model_type)
        except ValueError as exc:
            raise FinetuneError(f"unknown transformers model type {model_type!r} (try bert, roberta, gpt2): "
                                f"{first_line(exc)}") from exc
        if layers is not None:
            for attr in ("num_hidden_layers", "n_layer", "num_layers"):
                if hasattr(config, attr):
                    setattr(config, attr, layers)
        model = AutoModel.from_config(config)
    else:
        if layers is not None:
            raise FinetuneError("--layers only applies with --config.")
        path = check_model_dir(Path(model_dir) if model_dir else default_model_dir())
        try:
            model = AutoModel.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise FinetuneError(f"cannot load a model from {str(path)!r}: {first_line(exc)}") from exc
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def inspect_model(*, model_dir: Path | None = None, model_type: str | None = None, layers: int | None = None,
                  method: str = "lsr", targets: list[str] | None = None, options: dict[str, Any] | None = None,
                  seq_len: int = 16, batch: int = 2) -> str:
    """``lsrfx.summary`` and ``lsrfx.explain`` of the adapted model on random token ids (``explain`` captures the
    Dynamo graphs itself and shows them before and after the lsrfx pass)."""
    if seq_len < 1 or batch < 1:
        raise FinetuneError(f"--seq-len and --batch must be >= 1 (got {seq_len}, {batch}).")
    model = build_model(model_dir, model_type, layers)
    vocab = int(getattr(model.config, "vocab_size", 1000))
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    model = lsrfx.adapt(model, method=method, targets=targets, **(options or {}))
    return lsrfx.summary(model) + "\n\n" + lsrfx.explain(model, input_ids)

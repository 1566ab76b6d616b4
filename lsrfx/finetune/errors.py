"""The error ``lsrfx finetune`` / ``lsrfx inspect`` raise for bad input; the CLI prints it as one line."""

from lsrfx.errors import LsrfxError


class FinetuneError(LsrfxError):
    """Bad input to the fine-tuning job (model directory, data file, options, output directory)."""

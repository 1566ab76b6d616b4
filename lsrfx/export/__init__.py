"""Shipping a fine-tune: ``merge_and_export`` to ONNX, and ``save_adapters`` / ``load_adapters`` for the small
adapter files, in lsrfx's format or peft's LoRA format (:mod:`.peft_format`, ``docs/guides/interop.md``). The example
inputs export falls back on are recorded by :mod:`lsrfx.recorder`, a layer below, so the core API carries no export
state."""

from lsrfx.export.adapters_io import load_adapters, save_adapters
from lsrfx.export.onnx import ExportReport, merge_and_export

__all__ = ["ExportReport", "load_adapters", "merge_and_export", "save_adapters"]

"""One fine-tuning job: for each method and seed, adapt the frozen encoder, train adapters + head, evaluate on
validation then test, save the adapters and export a merged ONNX model; then write ``report.json``/``report.png``."""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lsrfx
from lsrfx.adapters import make_config
from lsrfx.api import adapt_state
from lsrfx.diagnostics import delta_effective_ranks
from lsrfx.finetune import defaults
from lsrfx.finetune.batches import batches, encode
from lsrfx.finetune.data import TextData, default_data_path, load_data
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.evaluate import evaluate
from lsrfx.finetune.model import check_model_dir, default_model_dir, head_name, load_classifier, load_tokenizer
from lsrfx.finetune.outdir import check_out_dir, staged_output
from lsrfx.finetune.report import format_table, summarise, write_json, write_plot
from lsrfx.finetune.train import TrainSettings, train
from lsrfx.parametrization import adapter_parameters
from lsrfx.quantized_base import storage_bytes
from lsrfx.utils import unwrap

EVAL_BATCH_SIZE = 128
QUANTIZE = ("none", "int8")  # --quantize choices


@dataclass
class FinetuneSettings:
    """Everything ``lsrfx finetune`` takes; ``None`` means the default."""

    out: Path
    methods: list[str] = field(default_factory=lambda: [defaults.DEFAULT_METHOD])
    seeds: list[int] = field(default_factory=lambda: [0])
    model_dir: Path | None = None
    data_path: Path | None = None
    targets: list[str] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method
    epochs: int = defaults.EPOCHS  # planned: the schedule's length; early stopping may end a run sooner
    patience: int = defaults.PATIENCE  # 0: no early stopping
    warmup: float = defaults.WARMUP_FRACTION  # share of the planned steps
    weight_decay: float = defaults.WEIGHT_DECAY
    batch_size: int = defaults.BATCH_SIZE
    lr: float | None = None  # adapter learning rate; None: the per-method default
    head_lr: float = defaults.HEAD_LR
    max_length: int = defaults.MAX_LENGTH
    validation_fraction: float = defaults.VALIDATION_FRACTION
    quantize: str = "none"  # "int8": the encoder's linear layers quantized (torchao int8 weight-only) before adapt
    compile: bool = defaults.COMPILE
    export: bool = True
    overwrite: bool = False
    command: str = ""

    def adapter_lr(self, method: str) -> float:
        """``--lr`` if given, else the method's own default (``defaults.ADAPTER_LR``; a method without one is an
        error, never another method's rate)."""
        if self.lr is not None:
            return self.lr
        if method not in defaults.ADAPTER_LR:
            raise FinetuneError(
                f"method {method!r} has no default adapter learning rate (lsrfx/finetune/defaults.py ADAPTER_LR "
                f"has {sorted(defaults.ADAPTER_LR)}); pass --lr, or add its rate chosen on the validation split."
            )
        return defaults.ADAPTER_LR[method]


def check_settings(s: FinetuneSettings) -> None:
    """Reject bad methods, options and numbers before any heavy work."""
    for method in s.methods:
        make_config(method, s.options.get(method, {}))
        s.adapter_lr(method)
    for name, value, low in (("--epochs", s.epochs, 1), ("--batch-size", s.batch_size, 1),
                             ("--max-length", s.max_length, 4), ("--patience", s.patience, 0)):
        if value < low:
            raise FinetuneError(f"{name} must be >= {low} (got {value}).")
    for name, value in (("--lr", s.lr), ("--head-lr", s.head_lr)):
        if value is not None and not value > 0:
            raise FinetuneError(f"{name} must be > 0 (got {value}).")
    if not 0 <= s.warmup < 1:
        raise FinetuneError(f"--warmup must be in [0, 1): a share of the planned training steps (got {s.warmup}).")
    if not (s.weight_decay >= 0 and math.isfinite(s.weight_decay)):
        raise FinetuneError(f"--weight-decay must be >= 0 (got {s.weight_decay}).")
    if not 0 < s.validation_fraction < 1:
        raise FinetuneError(f"--validation-fraction must be between 0 and 1 (got {s.validation_fraction}).")
    if s.quantize not in QUANTIZE:
        raise FinetuneError(f"--quantize must be one of {sorted(QUANTIZE)} (got {s.quantize!r}).")
    if s.quantize != "none":
        try:
            import torchao.quantization  # noqa: F401
        except ImportError as exc:
            raise FinetuneError(f"--quantize {s.quantize} needs torchao: pip install 'lsrfx[quant]' "
                                f"({exc}).") from exc
    if len(set(s.seeds)) != len(s.seeds):
        raise FinetuneError(f"--seeds repeats a seed: {s.seeds}.")


def run_finetune(s: FinetuneSettings, log=print) -> dict:
    """Run every (method, seed), write the outputs into ``s.out`` (all or nothing) and return the report."""
    check_settings(s)
    model_dir = check_model_dir(Path(s.model_dir) if s.model_dir else default_model_dir())
    data_path = Path(s.data_path) if s.data_path else default_data_path()
    check_out_dir(Path(s.out), s.overwrite, {"the --model directory": model_dir, "the --data file": data_path})
    first = load_data(data_path, validation_fraction=s.validation_fraction, seed=s.seeds[0])
    tokenizer = load_tokenizer(model_dir)
    with staged_output(Path(s.out), s.overwrite) as stage:
        runs = []
        for method in s.methods:
            for seed in s.seeds:
                data = first if seed == s.seeds[0] else load_data(
                    data_path, validation_fraction=s.validation_fraction, seed=seed)
                run_dir = stage / f"{method}-seed{seed}"
                run_dir.mkdir()
                runs.append(run_one(s, method, seed, data, tokenizer, model_dir, run_dir, log))
        summary = summarise(runs)
        report = {
            "lsrfx_version": lsrfx.__version__,
            "command": s.command,
            "model": str(model_dir),
            "data": str(data_path),
            "labels": first.label_names,
            "splits": {"train": len(first.train), "validation": len(first.validation), "test": len(first.test)},
            "settings": {
                "methods": s.methods, "seeds": s.seeds, "targets": s.targets or list(defaults.DEFAULT_TARGETS),
                "epochs": s.epochs, "patience": s.patience, "warmup": s.warmup, "weight_decay": s.weight_decay,
                "selection": "best validation accuracy (ties: lower validation loss)",
                "batch_size": s.batch_size, "head_lr": s.head_lr, "max_length": s.max_length,
                "validation_fraction": s.validation_fraction, "quantize": s.quantize, "compile": s.compile,
                "export": s.export,
            },
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "platform": platform.platform()},
            "summary": summary,
            "runs": runs,
        }
        write_json(stage / "report.json", report)
        write_plot(stage / "report.png", report)
    log("\n" + format_table(summary))
    log(f"\nwrote {Path(s.out) / 'report.json'} and {Path(s.out) / 'report.png'}")
    return report


def run_one(s: FinetuneSettings, method: str, seed: int, data: TextData, tokenizer, model_dir: Path,
            run_dir: Path, log) -> dict:
    """Train and evaluate one method with one seed; save adapters and the exported model into ``run_dir``."""
    torch.manual_seed(seed)
    model = load_classifier(model_dir, data.label_names)
    head = head_name(model)
    if s.quantize != "none":
        quantize_encoder(model, s.quantize, head)
    if s.compile:
        model = torch.compile(model)
    options = s.options.get(method, {})
    model = lsrfx.adapt(model, method=method, targets=s.targets or list(defaults.DEFAULT_TARGETS),
                        trainable=(head,), **options)
    config = adapt_state(model).config
    n_adapter, n_base = lsrfx.count_parameters(model)
    n_head = sum(p.numel() for n, p in unwrap(model).named_parameters() if p.requires_grad and n.startswith(head))
    log(f"\n== {method} (seed {seed}): {n_adapter:,} adapter parameters + {n_head:,} head parameters "
        f"(lr {s.adapter_lr(method):g}, head lr {s.head_lr:g}, {'compiled' if s.compile else 'eager'})")

    train_data = encode(tokenizer, data.train, s.max_length)
    val_batches = batches(encode(tokenizer, data.validation, s.max_length), EVAL_BATCH_SIZE)
    test_batches = batches(encode(tokenizer, data.test, s.max_length), EVAL_BATCH_SIZE)
    settings = TrainSettings(s.epochs, s.batch_size, s.adapter_lr(method), s.head_lr, weight_decay=s.weight_decay,
                             warmup=s.warmup, patience=s.patience)
    params = list(adapter_parameters(unwrap(model)).values())
    history = train(model, params, train_data, val_batches, settings, seed=seed, label=f"{method} s{seed}",
                    method=method)
    test = evaluate(model, test_batches)  # the kept (best validation) epoch's state, restored by train
    stopped = (f", stopped early after epoch {history.stopped_epoch}" if history.stopped_epoch < s.epochs else "")
    log(f"   kept epoch {history.best_epoch} of {s.epochs}{stopped}: validation accuracy "
        f"{history.best_validation['accuracy']:.4f}, test accuracy {test.accuracy:.4f}, "
        f"median step {1000 * history.median_step_time():.0f} ms")

    record = {
        "method": method,
        "seed": seed,
        "options": config.options(),
        "lr": settings.lr,
        "adapter_params": n_adapter,
        "head_params": n_head,
        "base_params": n_base,
        "compiled": s.compile,
        "quantize": s.quantize,
        "model_bytes": storage_bytes(unwrap(model)),  # quantized tensors by their int8 data and scales
        "first_step_s": history.step_times[0],
        "step_time_s": history.median_step_time(),
        "train_seconds": history.train_seconds,
        "losses": history.losses,
        "validation": history.validation,  # every epoch trained
        "best_epoch": history.best_epoch,  # the epoch whose state was kept, tested, saved and exported
        "best_validation": history.best_validation,  # that epoch's entry of "validation"
        "stopped_epoch": history.stopped_epoch,  # the last epoch trained (< settings.epochs: stopped early)
        "test": test.as_dict(),
        "summary": lsrfx.summary(model),
        "delta_effective_ranks": delta_effective_ranks(unwrap(model)),  # per adapted layer, of the kept dW
    }
    record.update(save_and_export(model, run_dir, s.export, log))
    return record


def quantize_encoder(model: torch.nn.Module, scheme: str, head: str) -> None:
    """Quantize the frozen encoder in place (QLoRA-style): every linear layer but the classification head, and the
    embedding tables (MiniLM's word embeddings are half of its weights; torchao's int8 tensor serves lookups)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    configs = {"int8": Int8WeightOnlyConfig}
    quantize_(model, configs[scheme](), filter_fn=lambda m, name: isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
              and not name.startswith(head))


def save_and_export(model, run_dir: Path, export: bool, log) -> dict:
    """Save the adapters (safetensors) and, if asked, merge and export to ONNX, verified in onnxruntime."""
    lsrfx.save_adapters(model, run_dir / "adapters")
    out: dict[str, Any] = {"adapters_dir": f"{run_dir.name}/adapters"}
    if export:
        t0 = time.perf_counter()
        rep = lsrfx.merge_and_export(model, run_dir / "model.onnx", verify=True)
        out["export"] = {**dataclasses.asdict(rep), "path": f"{run_dir.name}/{rep.path.name}",
                         "seconds": time.perf_counter() - t0}
        log(f"   exported {run_dir.name}/{rep.path.name}: {rep.size / 1e6:.1f} MB, opset {rep.opset}, "
            f"{rep.node_count} nodes, max abs diff vs PyTorch {rep.max_diff:.1e}")
    return out


def command_line() -> str:
    return " ".join(["lsrfx", *sys.argv[1:]])

"""Default settings of ``lsrfx finetune``: small and fast enough for a 2-core CPU, chosen on the validation split."""

from __future__ import annotations

DEFAULT_METHOD = "lsr"
DEFAULT_TARGETS = ("query", "value")
# Planned epochs (the learning-rate schedule's length): enough for the slower-converging methods; the epoch with the
# best validation score is kept and PATIENCE ends a run whose score has stopped improving, so a longer plan costs no
# accuracy. 6 keeps the default run (LSR, seed 0, eager, ONNX export) within a few minutes on a 2-core CPU
# (docs/results.md, "The default run", has the timing).
EPOCHS = 6
PATIENCE = 3  # epochs without a better validation score before stopping (0: never stop early)
WARMUP_FRACTION = 0.1  # share of the planned steps with a linear warm-up, then linear decay to 0
WEIGHT_DECAY = 0.01  # AdamW, adapters and head alike
BATCH_SIZE = 32
MAX_LENGTH = 64  # the default data set's longest text is 30 tokens
VALIDATION_FRACTION = 0.15
# Eager by default: on a small CPU the first compiled step's compilation outweighs what compiled steps save on this
# task (docs/results.md, "Compile time"); --compile turns it on.
COMPILE = False
HEAD_LR = 5e-3

# Adapter learning rate per method (override with --lr), the best of {1e-3, 3e-3, 1e-2} on the validation split
# (seed 0, 4 epochs, head lr 5e-3; bench/finetune_sweep.py; docs/results.md has the numbers).
ADAPTER_LR: dict[str, float] = {
    "lora": 3e-3,
    "lsr": 1e-2,
    "condlora": 3e-3,
    "genlora": 1e-2,
}

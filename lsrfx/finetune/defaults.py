"""Default settings of ``lsrfx finetune``: small and fast enough for a 2-core CPU, chosen on the validation split."""

from __future__ import annotations

DEFAULT_METHOD = "lsr"
DEFAULT_TARGETS = ("query", "value")
EPOCHS = 4
BATCH_SIZE = 32
MAX_LENGTH = 64  # the default data set's longest text is 30 tokens
VALIDATION_FRACTION = 0.15
# Eager by default: on the 2-core CPU, torch.compile took 286 s (first step, machine shared) and the median step was
# no faster (1079 ms compiled vs 1068 ms eager); --compile turns it on.
COMPILE = False
HEAD_LR = 5e-3

# Adapter learning rate per method (override with --lr), the best of {1e-3, 3e-3, 1e-2} on the validation split
# (seed 0, 4 epochs, head lr 5e-3; bench/finetune_sweep.py, numbers in the README).
ADAPTER_LR: dict[str, float] = {
    "lora": 3e-3,
    "lsr": 1e-2,
    "condlora": 3e-3,
    "genlora": 1e-2,
}

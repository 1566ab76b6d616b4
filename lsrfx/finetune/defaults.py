"""Default settings of ``lsrfx finetune``: small and fast enough for a 2-core CPU, chosen on the validation split."""

from __future__ import annotations

DEFAULT_METHOD = "lsr"
DEFAULT_TARGETS = ("query", "value")
# Planned epochs (the learning-rate schedule's length): more than the 4 used before, so that the slower-converging
# methods get there too; the epoch with the best validation score is kept and PATIENCE ends a run whose score has
# stopped improving, so a longer plan costs no accuracy. 6, to keep the default run (LSR, seed 0, eager, ONNX export)
# under 3 minutes on a 2-core CPU: 54 steps/epoch at batch 32 (1,698 training texts), so 324 steps; measured
# (`time lsrfx finetune`, 2026-11-22, 2 threads, load average 0.4 before, LSR-Adapt rank 8): 102 s wall = 85 s
# training (median step 221 ms, plus ~2 s of validation per epoch) + ~16 s loading, test and ONNX export. At the
# 316 ms steps of a machine with one other job that is ~130 s; 8 epochs would be ~170 s, too close to the limit
# (1 thread on a busy machine).
EPOCHS = 6
PATIENCE = 3  # epochs without a better validation score before stopping (0: never stop early)
WARMUP_FRACTION = 0.1  # share of the planned steps with a linear warm-up, then linear decay to 0
WEIGHT_DECAY = 0.01  # AdamW, adapters and head alike
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

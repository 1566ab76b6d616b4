"""Test-session setup shared by every test file.

TRITON_INTERPRET=1 must be set before triton is first imported: it makes Triton kernels run on CPU tensors (eager
only), which is how the kernels are checked on a machine without a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

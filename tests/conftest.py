"""Test-session setup and the tiny models and per-method options every test file shares.

TRITON_INTERPRET=1 must be set before triton is first imported: it makes Triton kernels run on CPU tensors (eager
only), which is how the kernels are checked on a machine without a GPU.

Test files import what they share from here (``from conftest import TINY_OPTIONS, tiny_bert``; pytest puts
``tests/`` on ``sys.path``). Adding an adapter method to the tests is one entry in ``tests/references.py`` (its tiny
options and its independent reference); ``tests/test_adapters.py`` checks that its keys are exactly
``lsrfx.METHODS``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from typing import TYPE_CHECKING, Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from references import REFERENCES  # noqa: E402

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

# Small options for every registered method, used wherever a test runs "each method": the ``tiny_options`` of each
# method's entry in tests/references.py (where their constraints are listed).
TINY_OPTIONS: dict[str, dict[str, Any]] = {method: ref.tiny_options for method, ref in REFERENCES.items()}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo state and lsrfx's counters for a test that compiles (earlier compiles must not count against
    Dynamo's recompile limit or in the counters); a module opts in with
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def uncached_compile(fresh_dynamo):
    """Compile for real: Inductor's and AOTAutograd's caches off, so the pass runs (and counts) on every compile."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def tiny_mlp(d_in: int = 12, d_hidden: int = 10, d_out: int = 8) -> nn.Sequential:
    """``Linear(d_in, d_hidden), Tanh, Linear(d_hidden, d_out)``: the adapted layers are named ``"0"`` and ``"2"``."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def tiny_bert(**config_overrides: Any) -> BertForSequenceClassification:
    """A random-weight BERT classifier in eval mode: 2 layers, hidden 32 (``query`` / ``value`` 32 x 32),
    intermediate 48, 2 heads, vocabulary 100, 32 positions, 3 labels, no dropout. ``.bert`` is the bare encoder
    (``BertModel`` with pooler). ``config_overrides`` replace any of these ``BertConfig`` fields."""
    from transformers import BertConfig, BertForSequenceClassification

    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  max_position_embeddings=32, num_labels=3, problem_type="single_label_classification",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(BertConfig(**{**config, **config_overrides})).eval()


def tiny_gpt2(**config_overrides: Any) -> GPT2LMHeadModel:
    """A random-weight GPT-2 language model in eval mode: 2 layers, hidden 32 (``c_attn`` is a ``Conv1D`` 32 -> 96),
    2 heads, vocabulary 100, 32 positions, no dropout, no KV cache. ``.transformer`` is the bare ``GPT2Model``.
    ``config_overrides`` replace any of these ``GPT2Config`` fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(GPT2Config(**{**config, **config_overrides})).eval()


def tiny_llama(**config_overrides: Any) -> LlamaForCausalLM:
    """A random-weight Llama causal LM in eval mode: 2 layers, hidden 32 (all seven projections ``q k v o gate up
    down``; ``k_proj``/``v_proj`` 32 -> 16 with 2 key/value heads of 4 query heads, as grouped-query attention),
    intermediate 48, vocabulary 100, 64 positions, untied head, eager attention. ``config_overrides`` replace any of
    these ``LlamaConfig`` fields (e.g. ``tie_word_embeddings=True``, ``num_hidden_layers=12``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(LlamaConfig(**{**config, **config_overrides})).eval()


TOY_WIDTH, TOY_CLASSES = 32, 3


class ToyBlock(nn.Module):
    """An attention-shaped residual block on ``TOY_WIDTH`` features: ``query`` / ``value`` (the adapter targets),
    ``out``, optional dropout on the residual branch, then LayerNorm."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.query, self.value = nn.Linear(TOY_WIDTH, TOY_WIDTH), nn.Linear(TOY_WIDTH, TOY_WIDTH)
        self.out = nn.Linear(TOY_WIDTH, TOY_WIDTH)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = nn.LayerNorm(TOY_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.out(torch.tanh(self.query(x)) * self.value(x))))


class ToyNet(nn.Module):
    """Two ``ToyBlock``s and a ``head`` on the sequence mean: ``(batch, seq, TOY_WIDTH) -> (batch, TOY_CLASSES)``.

    ``dropout``: each block's residual dropout (0: none, the forward is deterministic); ``ckpt``: wrap each block
    in ``torch.utils.checkpoint`` (non-reentrant).
    """

    def __init__(self, dropout: float = 0.0, ckpt: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(dropout), ToyBlock(dropout)])
        self.head = nn.Linear(TOY_WIDTH, TOY_CLASSES)
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        return self.head(x.mean(1))

"""Adding a fifth method takes four things (docs/architecture.md's checklist): the method's file (its config and
adapter), one entry in ``lsrfx.METHODS``, one entry in ``tests/references.py`` and its default learning rate in
``lsrfx/finetune/defaults.py``. This test registers a toy method that way, and nothing else, and runs it through
what users do: adapt, train eagerly and compiled (the pass fuses it), save and load, export to peft, serve it as a
named set per row, and pick it and its options in the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import lsrfx
from lsrfx.adapters.base import Adapter, LayerSpec, RankConfig
from lsrfx.finetune import defaults
from lsrfx.parametrization import adapted_layers, base_weight

from conftest import tiny_bert
from references import REFERENCES, Reference, reference_delta


class ScaledLoRAAdapter(Adapter):
    def __init__(self, spec: LayerSpec, config: ScaledLoRAConfig) -> None:
        super().__init__(spec)
        self.rank = config.r
        self.scale = config.alpha / config.r
        shapes = {"A": (config.r, spec.d_in), "gain": (config.r,), "B": (spec.d_out, config.r)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=spec.adapter_dtype,
                                                                   device=spec.device)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.ones_(self.gain)
        nn.init.zeros_(self.B)

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        return self.gain[:, None] * self.A, self.B


@dataclass
class ScaledLoRAConfig(RankConfig):
    """A toy method: LoRA with a trainable per-rank gain, ``dW = scale * B diag(g) A``."""

    method = "scaledlora"

    def build_one(self, spec: LayerSpec) -> Adapter:
        return ScaledLoRAAdapter(spec, self)


def _reference(p: dict[str, Tensor], w0: Tensor, adapter: nn.Module) -> tuple[Tensor, Tensor]:
    return torch.diag(p["gain"]) @ p["A"], p["B"]


@pytest.fixture
def registered(monkeypatch):
    """The four entries of the checklist, and nothing else."""
    monkeypatch.setitem(lsrfx.METHODS, "scaledlora", ScaledLoRAConfig)
    monkeypatch.setitem(REFERENCES, "scaledlora", Reference(dict(r=4, alpha=8.0), _reference, "B"))
    monkeypatch.setitem(defaults.ADAPTER_LR, "scaledlora", 3e-3)
    return "scaledlora"


def bert() -> nn.Module:
    torch.manual_seed(0)
    return tiny_bert()


def trained(method: str, trainable: tuple[str, ...] = ("classifier",)) -> nn.Module:
    model = lsrfx.adapt(bert(), method=method, targets=["query", "value"], trainable=trainable,
                        **REFERENCES[method].tiny_options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))


def hidden(model: nn.Module, **kwargs) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, output_hidden_states=True, **kwargs).hidden_states[-1]


def test_a_registered_method_runs_everywhere(registered: str, tmp_path) -> None:
    from peft import PeftModel

    method = registered
    model = trained(method)
    for _, module, param in adapted_layers(model):  # the update equals the independent reference
        delta = module.weight.detach().double() - base_weight(module).double()
        assert (delta - reference_delta(method, param.adapter, base_weight(module))).abs().max() < 1e-6

    report = lsrfx.explain(model, input_ids=IDS)
    assert "fused ops: 4 of 4" in report  # the compile pass fuses it as any dense-factor method

    lsrfx.save_adapters(model, tmp_path / "lsrfx")
    assert torch.equal(hidden(lsrfx.load_adapters(bert(), tmp_path / "lsrfx")), hidden(model))
    lsrfx.save_adapters(model, tmp_path / "peft", format="peft")
    peft = PeftModel.from_pretrained(bert(), tmp_path / "peft")
    assert (hidden(peft) - hidden(model)).abs().max() < 1e-5

    lsrfx.save_adapters(trained(method, trainable=()), tmp_path / "set")  # a named set carries adapters only
    served = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    lsrfx.load_adapters(served, tmp_path / "set", name="toy")
    rows = hidden(served, adapter_names=["toy", None])
    assert (rows[0] - hidden(lsrfx.load_adapters(bert(), tmp_path / "set"))[0]).abs().max() < 1e-5
    assert (rows[1] - hidden(bert())[1]).abs().max() < 1e-5


def test_the_cli_offers_a_registered_method_and_its_options(registered: str) -> None:
    from lsrfx.cli import adapter_option_flags, build_parser
    from lsrfx.finetune.run import FinetuneSettings

    flags = {f.field: f for f in adapter_option_flags()}
    assert "scaledlora" in flags["r"].methods and "scaledlora" in flags["alpha"].methods
    args = build_parser(["finetune"]).parse_args(["finetune", "--method", "scaledlora", "--rank", "4"])
    assert args.method == ["scaledlora"] or args.method == "scaledlora"
    assert FinetuneSettings(out=".", methods=["scaledlora"]).adapter_lr("scaledlora") == 3e-3

"""``save_adapters`` / ``load_adapters``: exact round trips, CondLoRA's shared tensors once, fingerprints that stop
adapters from landing on another base model, trainable heads, and the bad inputs (nothing changes on failure)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from torch import nn

import lsrfx
from lsrfx.adapters.lsr import LSRConfig
from lsrfx.api import adapt_state
from lsrfx.parametrization import adapted_layers, adapter_parameters

from conftest import TINY_OPTIONS, tiny_bert


def bert(seed: int = 0, **config_overrides) -> tf.BertForSequenceClassification:
    """The shared tiny BERT with the weights of ``seed``: the same base model each time it is built."""
    torch.manual_seed(seed)
    return tiny_bert(**config_overrides)


def perturb(model: nn.Module) -> None:
    """Stand-in for training: every adapter tensor (and trainable head) gets new values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_round_trip_into_a_fresh_base_is_exact(method: str, tmp_path) -> None:
    trained = lsrfx.adapt(bert(), method=method, targets=["query", "value"], trainable=["classifier"],
                          **TINY_OPTIONS[method])
    perturb(trained)
    lsrfx.save_adapters(trained, tmp_path)

    fresh = bert()  # the base as built: its head lacks the training, so load must restore the head too
    assert not torch.equal(logits(fresh, IDS), logits(trained, IDS))
    assert lsrfx.load_adapters(fresh, tmp_path) is fresh
    assert torch.equal(logits(fresh, IDS), logits(trained, IDS))
    assert [n for n, _, _ in adapted_layers(fresh)] == [n for n, _, _ in adapted_layers(trained)]
    trainable = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in trained.named_parameters() if p.requires_grad)


def test_condlora_shared_pairs_are_stored_once_and_shared_after_loading(tmp_path) -> None:
    trained = lsrfx.adapt(bert(num_hidden_layers=3), method="condlora", r=2, targets=["query", "value"])
    perturb(trained)
    lsrfx.save_adapters(trained, tmp_path)
    with safe_open(str(tmp_path / "adapters.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 4  # 2 groups (query, value) x (C_A, C_B), although 6 layers use them

    fresh = bert(num_hidden_layers=3)
    lsrfx.load_adapters(fresh, tmp_path)
    queries = [fresh.bert.encoder.layer[i].attention.self.query for i in range(3)]
    pairs = {id(q.parametrizations.weight[0].adapter.pair) for q in queries}
    assert len(pairs) == 1  # still one shared pair: training the loaded model updates all layers together
    assert torch.equal(logits(fresh, IDS), logits(trained, IDS))


def test_files_are_small_and_config_is_readable(tmp_path) -> None:
    # A wider BERT (intermediate 2 x hidden) than the shared one, so that the base dwarfs the adapter file.
    model = lsrfx.adapt(bert(hidden_size=128, intermediate_size=256), method="lsr", targets=["query", "value"])
    lsrfx.save_adapters(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "lsr" and config["options"]["separation_rank"] == LSRConfig().separation_rank
    assert (config["options"]["r1"], config["options"]["r2"]) == (LSRConfig().r1, LSRConfig().r2)
    assert config["targets"] == ["query", "value"] and config["lsrfx_version"] == lsrfx.__version__
    assert sorted(config["layers"]) == sorted(n for n, _, _ in adapted_layers(model))
    assert all(len(fp["sha256"]) == 64 for fp in config["layers"].values())
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "adapter" not in n)
    assert (tmp_path / "adapters.safetensors").stat().st_size < 0.03 * base_bytes


def test_different_base_model_fails_clearly_and_leaves_it_untouched(tmp_path) -> None:
    trained = lsrfx.adapt(bert(seed=0), method="lora", r=2)
    lsrfx.save_adapters(trained, tmp_path)
    other = bert(seed=1)  # same architecture, different weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lsrfx.LsrfxError, match=r"base weight of layer 'bert\.encoder\.layer\.0\.attention\.self"
                                               r"\.query' differs .*\(values\)"):
        lsrfx.load_adapters(other, tmp_path)
    assert adapt_state(other) is None and not list(adapted_layers(other))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert all(p.requires_grad for p in other.parameters())

    with pytest.raises(lsrfx.LsrfxError, match=r"shape/dtype \[16, 16\] float32 vs saved \[32, 32\] float32"):
        lsrfx.load_adapters(bert(hidden_size=16), tmp_path)
    with pytest.raises(lsrfx.LsrfxError, match="does not have"):
        lsrfx.load_adapters(nn.Sequential(nn.Linear(16, 16)), tmp_path)


def test_loading_into_an_adapted_model_replaces_values_or_refuses_a_mismatch(tmp_path) -> None:
    trained = lsrfx.adapt(bert(), method="lora", r=2)
    perturb(trained)
    lsrfx.save_adapters(trained, tmp_path)

    same = lsrfx.adapt(bert(), method="lora", r=2)
    params = dict(adapter_parameters(same))
    lsrfx.load_adapters(same, tmp_path)
    assert all(p is dict(adapter_parameters(same))[n] for n, p in params.items())  # values copied in place
    assert torch.equal(logits(same, IDS), logits(trained, IDS))

    other = lsrfx.adapt(bert(), method="lora", r=4)
    with pytest.raises(lsrfx.LsrfxError, match="saved adapters use LoRAConfig\\(r=2"):
        lsrfx.load_adapters(other, tmp_path)


def test_repeated_swaps_hash_each_base_weight_once_until_it_changes(tmp_path, monkeypatch) -> None:
    """A served model checks the same base weights at every hot-swap: their fingerprints are kept, and hashed again
    when W0 changes (an in-place write bumps its version), so a changed base is still refused."""
    from lsrfx.export import adapters_io

    trained = lsrfx.adapt(bert(), method="lora", r=2)
    perturb(trained)
    lsrfx.save_adapters(trained, tmp_path)
    served = lsrfx.adapt(bert(), method="lora", r=2)
    hashed = [0]
    fingerprint = adapters_io.fingerprint

    def counted_fingerprint(weight: torch.Tensor) -> dict:
        hashed[0] += 1
        return fingerprint(weight)

    monkeypatch.setattr(adapters_io, "fingerprint", counted_fingerprint)
    lsrfx.load_adapters(served, tmp_path)
    layers = len(list(adapted_layers(served)))
    assert hashed[0] == layers
    lsrfx.load_adapters(served, tmp_path)
    assert hashed[0] == layers  # nothing changed: nothing hashed again
    name, module, _ = next(adapted_layers(served))
    with torch.no_grad():
        module.parametrizations.weight.original[0, 0] += 1.0
    with pytest.raises(lsrfx.LsrfxError, match=f"base weight of layer '{name}' differs .*\\(values\\)"):
        lsrfx.load_adapters(served, tmp_path)


def test_bad_directories(tmp_path) -> None:
    with pytest.raises(lsrfx.LsrfxError, match="no lsrfx adapters to save"):
        lsrfx.save_adapters(bert(), tmp_path / "a")
    with pytest.raises(lsrfx.LsrfxError, match="cannot read"):
        lsrfx.load_adapters(bert(), tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"format": "something else"}')
    with pytest.raises(lsrfx.LsrfxError, match="not an lsrfx adapter config"):
        lsrfx.load_adapters(bert(), tmp_path / "bad")

"""adapt on a torch.compile'd BERT: still compiled, only adapter (and `trainable`) parameters move, loss falls."""

from __future__ import annotations

import torch

import lsrfx

from conftest import tiny_bert


def test_adapt_compiled_bert_trains_only_adapters() -> None:
    model = tiny_bert(num_labels=2).train()  # two labels: the rule below is a parity
    compiled = lsrfx.adapt(torch.compile(model), method="lsr", trainable=("classifier",))
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW((p for p in compiled.parameters() if p.requires_grad), lr=1e-2)
    ids = torch.randint(0, 100, (8, 12))
    labels = (ids[:, 0] % 2).long()  # a learnable rule
    losses = []
    for _ in range(6):
        loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".adapter." in n for n in changed) and {"classifier.weight", "classifier.bias"} <= changed
    # The compiled model really ran the adapted forward: it agrees with the eager module.
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)

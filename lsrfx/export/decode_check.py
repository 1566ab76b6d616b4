"""Verifying a ``with_past`` graph (:mod:`lsrfx.export.decoder`): greedy generation in onnxruntime with the cache
against PyTorch ``generate`` on the adapted model.

The prompt: two rows of the example inputs' ``input_ids`` (random tokens when there are none), at least
:data:`PROMPT_MIN` and at most :data:`PROMPT_MAX` tokens (cycled or cut on the left), the second row left-padded
over its first third (pad token, ``attention_mask`` 0), so batching, padding and position ids are exercised.

PyTorch: ``generate`` on the adapted model (before merging), greedy, :data:`NEW_TOKENS` new tokens with
``min_new_tokens`` equal to that, so end-of-sequence is suppressed and every row runs every step; its raw logits of
each step are kept, and the prompt's logits come from one forward call with the same position ids.

onnxruntime: the prompt from an empty past (past length 0), then one token per call, feeding ``present.*`` back as
``past_key_values.*``, with the feeding recipe of :mod:`lsrfx.export.decoder`; each step picks the arg max of the
logits with end-of-sequence suppressed, as ``generate`` does. Checked: the prompt's logits at real positions
(padded positions hold garbage in both and are skipped), every step's logits, and every chosen token. The logits
tolerance is :mod:`lsrfx.export.verify`'s. A step where the two runtimes choose different tokens fails, unless
PyTorch's top two scores are within that tolerance of each other (a tie at float precision): then onnxruntime
continues with PyTorch's token and the report counts the tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lsrfx.errors import LsrfxError
from lsrfx.export import inputs as inp
from lsrfx.export import verify as ver
from lsrfx.export.decoder import DecoderSpec
from lsrfx.recorder import Inputs

NEW_TOKENS = 16
PROMPT_MIN, PROMPT_MAX = 6, 32


@dataclass(frozen=True)
class Reference:
    """PyTorch's side of the check: the prompt, its logits, and ``generate``'s tokens and raw logits per step."""

    input_ids: Tensor  # (2, prompt)
    attention_mask: Tensor  # (2, prompt), row 1 left-padded
    position_ids: Tensor  # (2, prompt)
    prompt_logits: Tensor  # (2, prompt, vocab)
    tokens: Tensor  # (2, NEW_TOKENS)
    step_logits: Tensor  # (2, NEW_TOKENS, vocab): the logits each new token was chosen from

    @property
    def padding(self) -> int:
        return int((self.attention_mask[1] == 0).sum())


def prompt(found: Inputs | None, spec: DecoderSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of the verification prompt (see the module docstring)."""
    ids = None
    if found is not None:
        args, kwargs = found
        given = kwargs.get("input_ids", args[0] if args else None)
        if (isinstance(given, Tensor) and given.dim() == 2 and given.numel() and not given.is_floating_point()
                and 0 <= int(given.min()) and int(given.max()) < spec.vocab_size):
            ids = given.detach().to(device, torch.long)
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, spec.vocab_size, (2, PROMPT_MIN + 2), generator=g).to(device)
    ids = inp.resize(ids, 0, 2)
    longest = PROMPT_MAX if spec.context_length is None else max(PROMPT_MIN, min(PROMPT_MAX,
                                                                                spec.context_length - NEW_TOKENS))
    if ids.shape[1] > longest:
        ids = ids[:, -longest:]
    if ids.shape[1] < PROMPT_MIN:
        ids = inp.resize(ids, 1, PROMPT_MIN)
    ids = ids.clone()
    mask = torch.ones_like(ids)
    pad = ids.shape[1] // 3
    mask[1, :pad] = 0
    ids[1, :pad] = spec.pad_token_id
    return ids, mask


def prompt_positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded prompt, as ``generate`` makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def reference(model: nn.Module, spec: DecoderSpec, ids: Tensor, mask: Tensor) -> Reference:
    """Run the adapted model: one forward on the prompt, then greedy ``generate`` (see the module docstring)."""
    from transformers import GenerationConfig

    positions = prompt_positions(mask)
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=spec.pad_token_id, bos_token_id=spec.bos_token_id,
        eos_token_id=list(spec.eos_token_ids) or None, output_logits=True, return_dict_in_generate=True,
    )
    try:
        with torch.no_grad():
            prompt_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    except Exception as exc:
        raise LsrfxError(
            f"{spec.architecture}.generate fails on the verification prompt (2 rows of {ids.shape[1]} tokens, the "
            f"second left-padded): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; with_past "
            "verification compares onnxruntime with generate. Pass verify=False to write the file unchecked."
        ) from exc
    tokens = out.sequences[:, ids.shape[1]:]
    if tokens.shape[1] != NEW_TOKENS or len(out.logits) != NEW_TOKENS:
        raise LsrfxError(f"{spec.architecture}.generate returned {tokens.shape[1]} new tokens where {NEW_TOKENS} were "
                         "asked (min_new_tokens = max_new_tokens); pass verify=False to write the file unchecked.")
    return Reference(ids, mask, positions, prompt_logits, tokens, torch.stack(list(out.logits), dim=1))


def _scores(logits: np.ndarray, spec: DecoderSpec) -> np.ndarray:
    """Logits as greedy generation ranks them while ``min_new_tokens`` is unmet: end-of-sequence excluded."""
    scores = logits.astype(np.float64, copy=True)
    if spec.eos_token_ids:
        scores[:, list(spec.eos_token_ids)] = -np.inf
    return scores


def check(sess, spec: DecoderSpec, ref: Reference, what: str) -> tuple[float, str]:
    """Run greedy generation with the cache in ``sess`` and compare it with ``ref``. Returns the largest logits
    difference and a sentence saying what was checked; raises :class:`LsrfxError` on a difference."""
    ids, mask, positions = ref.input_ids, ref.attention_mask, ref.position_ids
    outs = ver.run(sess, [ids, mask, positions, *spec.empty_past(ids.shape[0], ids.device)])
    worst = ver.max_difference(outs[:1], [ref.prompt_logits], f"{what}, prompt from an empty past",
                               mask=mask)
    logits, past = outs[0][:, -1], outs[1:]
    tolerance = ver.ATOL.get(spec.dtype, 1e-4)
    ties = 0
    for step in range(NEW_TOKENS):
        if step:
            worst = max(worst, ver.max_difference(
                [logits], [ref.step_logits[:, step]], f"{what}, new token {step + 1} of {NEW_TOKENS} with the cache"))
        want = ref.tokens[:, step].cpu().numpy()
        scores = _scores(logits, spec)
        chosen = scores.argmax(-1)
        for row in np.flatnonzero(chosen != want):
            theirs = _scores(ver.to_numpy(ref.step_logits[:, step]), spec)[row]
            margin = theirs[want[row]] - np.sort(theirs)[-2]
            if margin > tolerance * max(1.0, float(np.abs(theirs[np.isfinite(theirs)]).max())):
                raise LsrfxError(
                    f"{what}: greedy generation with the cache chose token {int(chosen[row])} in onnxruntime and "
                    f"{int(want[row])} in PyTorch generate at new token {step + 1} of row {row + 1} (PyTorch's "
                    f"margin {margin:.3g}); the file was not written."
                )
            ties += 1
        if step + 1 == NEW_TOKENS:
            break
        token = ref.tokens[:, step:step + 1]  # equal to onnxruntime's choice except at ties
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        outs = ver.run(sess, [token, mask, positions, *[torch.from_numpy(p) for p in past]])
        logits, past = outs[0][:, -1], outs[1:]
    tie_note = f" ({ties} ties at float precision followed PyTorch's token)" if ties else ""
    return worst, (
        f"greedy generation with the cache in onnxruntime equals PyTorch generate: 2 rows (the second left-padded by "
        f"{ref.padding}), a {ids.shape[1]}-token prompt from an empty past, {NEW_TOKENS} new tokens one at a time"
        f"{tie_note}; logits compared at real positions"
    )

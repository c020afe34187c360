"""Sampling on top of `EngramLM.forward(..., state=...)`: prefill once, then one token per step.

Prompts of different lengths are left-padded and marked with `valid`; the model counts
positions, n-grams and conv history per sequence, so each row decodes as if it were alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .transformer import EngramLM


def sample_next(logits_BV: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else top-k / nucleus (top-p) sampling."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: EngramLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
    seed: int | None = None, pad_id: int = 0, sync_every: int = 8,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens (stopping at `eos_id`, included).

    Returns only the new tokens, one list per prompt. Seeded sampling is reproducible;
    temperature 0 is greedy. Prompt plus new tokens must fit `config.max_seq_len`.

    Tokens stay on the device until the end: the host looks at them only every `sync_every`
    steps (whether every row has reached `eos_id`; never without an `eos_id`), so a GPU is
    not stalled once per token. Rows that finish early keep decoding until that check;
    what follows their first `eos_id` is dropped.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 1; got {temperature}, {top_p}, {top_k}")
    if max_new_tokens < 0 or sync_every < 1:
        raise ValueError(f"need max_new_tokens >= 0 and sync_every >= 1, got {max_new_tokens}, {sync_every}")
    device = model.embed.weight.device
    B, S = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[b, S - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[b, S - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    fed = S + max(max_new_tokens - 1, 0)  # the last sampled token is returned, never fed back
    model.check_inputs(ids, valid=valid, new_positions=fed - S)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    state = model.new_state(B, device, max_len=fed)
    padded = any(len(p) < S for p in prompts)  # known on the host: no padding, no masks while decoding
    logits = model(ids, state, valid=valid if padded else None).logits[:, -1]
    tokens_BN = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for step in range(max_new_tokens):
        token_B = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tokens_BN[:, step] = token_B
        n = step + 1
        if eos_id is not None:
            done_B |= token_B == eos_id
            if n % sync_every == 0 and bool(done_B.all()):  # the only sync inside the loop
                break
        if n == max_new_tokens:
            break
        logits = model(token_B.unsqueeze(1), state).logits[:, -1]
    model.train(was_training)
    new = tokens_BN[:, :n].tolist()
    if eos_id is not None:
        new = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in new]
    return new

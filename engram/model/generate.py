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
    seed: int | None = None, pad_id: int = 0, sync_every: int = 8, draft: str | None = None,
    draft_tokens: int = 8,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens (stopping at `eos_id`, included).

    Returns only the new tokens, one list per prompt. Seeded sampling is reproducible;
    temperature 0 is greedy. Prompt plus new tokens must fit `config.max_seq_len`.

    Tokens stay on the device until the end: the host looks at them only every `sync_every`
    steps (whether every row has reached `eos_id`; never without an `eos_id`), so a GPU is
    not stalled once per token. Rows that finish early keep decoding until that check;
    what follows their first `eos_id` is dropped.

    `draft="prompt_lookup"`: speculative decoding with drafts looked up in the context (see
    `speculative_generate`); greedy only, and its output is plain greedy's.
    """
    if draft is not None:
        if draft != "prompt_lookup":
            raise ValueError(f"draft must be None or 'prompt_lookup', got {draft!r}")
        if temperature != 0:
            raise ValueError("draft='prompt_lookup' verifies drafts greedily: pass temperature=0")
        return speculative_generate(model, prompts, max_new_tokens, eos_id=eos_id, draft_tokens=draft_tokens)[0]
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


def prompt_lookup(context: Sequence[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """A draft continuation from the context itself: the tokens that followed the latest earlier
    occurrence of the context's last n tokens (n = max_ngram down to 1); [] when none recurs."""
    if max_tokens < 1:
        return []
    ctx = list(context)
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start:start + n] == tail:
                return ctx[start + n:start + n + max_tokens]
    return []


@torch.no_grad()
def speculative_generate(model: EngramLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         eos_id: int | None = None, draft_tokens: int = 8, max_ngram: int = 3
                         ) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy decoding that verifies a prompt-lookup draft of up to `draft_tokens` tokens per
    forward: the longest prefix of the draft that greedy decoding would have produced is kept, the
    rest is rolled back (`DecodeState.rollback`: KV cache, n-gram and conv history), and the
    model's own next token follows. The output is plain greedy's (up to float ties between a
    chunked and a one-token forward). Rows are decoded one at a time: acceptance differs per row,
    and speculation is a batch-1 latency tool. Returns (new tokens per prompt, counts: forwards,
    drafted, accepted, new_tokens)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0 or draft_tokens < 1:
        raise ValueError(f"need max_new_tokens >= 0 and draft_tokens >= 1, got {max_new_tokens}, {draft_tokens}")
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    stats = {"forwards": 0, "drafted": 0, "accepted": 0, "new_tokens": 0}
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        model.check_inputs(ids, new_positions=max(max_new_tokens - 1, 0))
        cap = min(model.config.max_seq_len, len(prompt) + max_new_tokens + draft_tokens)
        state = model.new_state(1, device, max_len=cap).track_rollback()
        nxt = int(model(ids, state).logits[0, -1].argmax())
        stats["forwards"] += 1
        out: list[int] = []
        while len(out) < max_new_tokens:
            out.append(nxt)
            if nxt == eos_id or len(out) == max_new_tokens:
                break
            # accepted draft tokens and the model's token after them must fit max_new_tokens and the cache
            room = min(max_new_tokens - len(out) - 1, state.capacity - state.written - 1)
            guess = prompt_lookup(list(prompt) + out, min(draft_tokens, room), max_ngram)
            logits = model(torch.tensor([[nxt] + guess], device=device), state).logits[0]
            pred = logits.argmax(-1).tolist()  # pred[i]: greedy's token after the chunk's first i + 1
            stats["forwards"] += 1
            a = 0
            while a < len(guess) and pred[a] == guess[a] and guess[a] != eos_id:
                a += 1
            stats["drafted"] += len(guess)
            stats["accepted"] += a
            out += guess[:a]
            if len(guess) > a:
                state.rollback(len(guess) - a)
            nxt = pred[a]
        if eos_id is not None and eos_id in out:
            out = out[:out.index(eos_id) + 1]
        stats["new_tokens"] += len(out)
        outputs.append(out)
    model.train(was_training)
    return outputs, stats

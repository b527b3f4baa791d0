"""Generation with the KV cache: greedy, or temperature + top-p sampling; used by chat.py and eval.py."""
from __future__ import annotations

import torch

from router_context import new_context, read_in_context
from tokenizer import ENDOFTEXT, IM_END, Tokenizer


@torch.inference_mode()
def generate(model, prompt, tokenizer: Tokenizer | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = IM_END, pad_id: int = ENDOFTEXT,
             attention_mask=None, seed: int | None = None, stream=None):
    """Decode with the preallocated KV cache. Greedy when ``temperature == 0``, else temperature + top-p.

    ``prompt``: a string (needs ``tokenizer``), a list of ids, or a (B, T) LongTensor (left-padded, with
    ``attention_mask``). Returns the new tokens (B, n) (finished rows padded with ``pad_id``), or a
    string when the prompt was a string. ``stream(token_id)`` is called on each new token of row 0.
    """
    as_text = isinstance(prompt, str)
    if as_text:
        prompt = tokenizer.encode(prompt)
    device = model.lm_head.weight.device
    ids = prompt if torch.is_tensor(prompt) else torch.tensor([list(prompt)], dtype=torch.long)
    ids = ids.to(device)
    B, T = ids.shape
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, T + max_new_tokens)
    ctx = new_context(model, B)  # context routers' memory of the past, kept beside the KV cache (None: none)
    mask = attention_mask.to(device) if attention_mask is not None else None
    with read_in_context(model, ctx, weight=mask):  # why weight: a context mean must skip the left padding
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, -1)
            if top_p < 1.0:
                p, idx = probs.sort(-1, descending=True)
                drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0.0))
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        if stream is not None and not done[0]:
            stream(int(nxt[0]))
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):  # one host sync per step: the price of stopping early
                break
        if step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        with read_in_context(model, ctx):
            logits = model(nxt[:, None], attention_mask=mask, cache=cache, last_only=True)[:, -1]
    new = torch.stack(out, dim=1) if out else ids.new_zeros(B, 0)
    if as_text:
        return tokenizer.decode([t for t in new[0].tolist() if t not in (eos_id, pad_id)])
    return new

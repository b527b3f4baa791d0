"""The context routers' memory of the past, carried beside the KV cache: what a forward that is not whole
right-padded sequences (left padding, KV-cache decoding, scoring's prefix cache and candidate trees) must give
every site so that its context mean m_t (``LoRAMoELinear.context_mean``, the equation in ``lora_moe.py``) is
right. ``new_context`` makes one, ``read_in_context`` hands it to the sites for one forward and updates it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from lora_moe import sites


@dataclass
class SequenceContext:
    """What the context routers have read of each of B rows before a forward: ``sums`` (S, B, E), per site the
    sum of c = W_c x over the real tokens read so far, and ``count`` (B, 1), how many (the same at every site)."""
    sums: torch.Tensor
    count: torch.Tensor

    def repeat(self, batch: int) -> "SequenceContext":
        """``batch`` rows that each start where this 1-row context is: a shared prefix (as ``KVCache.repeat``)."""
        return SequenceContext(self.sums.expand(-1, batch, -1).clone(), self.count.expand(batch, -1).clone())


def new_context(model: nn.Module, batch: int) -> SequenceContext | None:
    """An empty context for ``batch`` rows, or None when the model has no context routers (nothing to carry)."""
    found = [m for _, m in sites(model)]
    if not found or found[0].router_ctx is None:
        return None
    dev = found[0].router_ctx.device
    return SequenceContext(torch.zeros(len(found), batch, found[0].E, device=dev), torch.zeros(batch, 1, device=dev))


@contextlib.contextmanager
def read_in_context(model: nn.Module, ctx: SequenceContext | None, weight=None, tree=None):
    """``with read_in_context(model, ctx, weight, tree): model(...)``: each token's context mean covers what
    ``ctx`` holds plus the tokens of this forward it sees; afterwards ``ctx`` holds this forward's real tokens
    too (not after a tree forward: its nodes are alternatives, never a past). ``weight`` (B, T): 1 real token,
    0 padding (None: all real); ``tree`` (B, T, T) bool: which of this forward's tokens each token sees (None:
    causal). ``ctx`` None (token routers): nothing to do.

    why it must wrap every forward that is not whole right-padded sequences: without it a site sees neither
    the padding nor the past, and its mean is silently wrong (tests/test_context_router.py checks each caller)."""
    if ctx is None:
        yield
        return
    found = [m for _, m in sites(model)]
    written = {}
    for i, m in enumerate(found):
        m.context = (ctx, i, weight, tree, written)
    try:
        yield
        if tree is None and written:
            ctx.sums = torch.stack([written[i][0] for i in range(len(found))])
            ctx.count = written[0][1]
    finally:
        for m in found:
            m.context = None

"""The expert memory queue: a bounded FIFO of past contrastive keys and their expert ids, for every site at once.

It supplies the contrastive loss with negatives from past batches without a large batch (``--queue``).
Memory is S * K * (d + 1) numbers (S sites, K entries, d = key size) whatever the number of steps. Every site
enqueues the same number of keys each step, so one write pointer serves all sites, and reading or writing all
of them is one tensor op, not a loop. The queue holds buffers, so it rides along in ``state_dict`` and a
checkpoint restores contents and write pointer exactly; it is kept identical on every rank (the losses enqueue
keys gathered from all ranks).

(This file is ``expert_queue.py``, never ``queue.py``: a top-level ``queue.py`` would shadow the standard
library module that torch imports, and ``import torch`` would fail from the project root.)
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ExpertQueue(nn.Module):
    """Every site's ring buffer: ``keys`` (S, K, d) fp32, ``labels`` (S, K) expert ids (-1 = empty), ``ptr``."""

    def __init__(self, num_sites: int, size: int = 1024, dim: int = 64):
        super().__init__()
        self.register_buffer("keys", torch.zeros(num_sites, size, dim))
        self.register_buffer("labels", torch.full((num_sites, size), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor):
        """Write the newest keys (S, n, d) with labels (S, n) over the oldest (FIFO); n may exceed K. A label
        of -1 marks a slot that holds nothing (e.g. a padded row): it is never read as a key."""
        keys, labels = keys.detach().float(), labels.detach().long()
        if keys.shape[1] > self.size:  # only the newest K can survive anyway
            keys, labels = keys[:, -self.size:], labels[:, -self.size:]
        n = keys.shape[1]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # no host sync: ptr stays on device
        self.keys[:, idx] = keys
        self.labels[:, idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)

    def contents(self):
        """A copy of (keys (S, K, d), labels (S, K)): every slot, empty ones labelled -1 (the losses mask them
        out; why not drop them: a data-dependent shape would make the host wait for the device). why a copy: the
        loss's backward needs the keys it read, and ``enqueue`` overwrites the buffers in place before that."""
        return self.keys.clone(), self.labels.clone()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

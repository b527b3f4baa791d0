"""The expert memory queue: a bounded FIFO of past projection vectors and their expert ids, per MoE site.

It supplies the contrastive loss with many negatives without a large batch. Memory is K * (d + 1) numbers
per site whatever the number of steps. The queues are buffers, so they ride along in ``state_dict`` and
a checkpoint restores contents and write pointer exactly.

(This file is ``expert_queue.py``, never ``queue.py``: a top-level ``queue.py`` would shadow the standard
library module that torch imports, and ``import torch`` would fail from the project root.)
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ExpertQueue(nn.Module):
    """One site's ring buffer: ``keys`` (K, d) fp32, ``labels`` (K,) expert ids (-1 = empty), ``ptr``."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor):
        """Write the newest vectors over the oldest (FIFO). keys (n, d), labels (n,). n may exceed K."""
        keys, labels = keys.detach().float(), labels.detach().long()
        if keys.shape[0] > self.size:  # only the newest K can survive anyway
            keys, labels = keys[-self.size:], labels[-self.size:]
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # no host sync: ptr stays on device
        self.keys[idx] = keys
        self.labels[idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)

    def contents(self):
        """Filled entries, oldest first: (keys (m, d), labels (m,))."""
        order = (self.ptr + torch.arange(self.size, device=self.keys.device)) % self.size
        keys, labels = self.keys[order], self.labels[order]
        keep = labels >= 0
        return keys[keep], labels[keep]


class ExpertQueues(nn.Module):
    """One ExpertQueue per MoE site, in the model's site order."""

    def __init__(self, num_sites: int, size: int = 1024, dim: int = 64):
        super().__init__()
        self.queues = nn.ModuleList(ExpertQueue(size, dim) for _ in range(num_sites))

    def __getitem__(self, i) -> ExpertQueue:
        return self.queues[i]

    def __len__(self):
        return len(self.queues)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

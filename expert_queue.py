"""The expert memory queue: a bounded FIFO of past fused views, the contrastive term's negatives beyond the batch.

Its whole life (``--queue K``, off by default):
- what goes in: the fused view phi_s of every sequence of every micro-batch of every rank, with its top expert
  as a label (``push``; a row without real tokens goes in as an empty slot, label -1);
- when: after the optimizer step (train.py's ``train_step``, its one call site), so every micro-step of a step
  reads the same queue and a step's pieces can be split over ranks and micro-steps freely;
- what for: ``negatives()`` is read by ``contrastive.logits_of``, whose rule keeps only the entries whose top
  expert differs from that of the anchor's own sequence.

Memory is S * K * (E + 1) numbers (S sites, K entries), whatever the number of steps: the large batch it stands
in for is never held. Every site enqueues the same number of views each step, so one write pointer serves all
sites, and reading or writing all of them is one tensor op. The queue holds buffers, so it rides along in
``state_dict`` and a checkpoint restores contents and write pointer exactly; it is identical on every rank.

(This file is ``expert_queue.py``, never ``queue.py``: a top-level ``queue.py`` would shadow the standard
library module that torch imports, and ``import torch`` would fail from the project root.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel import all_gather_varlen


class ExpertQueue(nn.Module):
    """Every site's ring buffer: ``keys`` (S, K, E) fp32, ``labels`` (S, K) top experts (-1 = empty), ``ptr``."""

    def __init__(self, num_sites: int, size: int = 1024, dim: int = 8):
        super().__init__()
        self.register_buffer("keys", torch.zeros(num_sites, size, dim))
        self.register_buffer("labels", torch.full((num_sites, size), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    def negatives(self):
        """A copy of (keys (S, K, E), labels (S, K)): every slot, empty ones labelled -1 (the loss masks them out;
        why not drop them: a data-dependent shape would make the host wait for the device). why a copy: the
        loss's backward needs the keys it read, and ``enqueue`` overwrites the buffers in place before that."""
        return self.keys.clone(), self.labels.clone()

    @torch.no_grad()
    def push(self, fused: list):
        """Enqueue a step's ``contrastive.FusedViews``, one per micro-step, each with every rank's rows: in
        micro-step order, ranks in rank order within each (the order of the step's pieces)."""
        keys, labels = [], []
        for f in fused:
            k = all_gather_varlen(f.phi.transpose(0, 1).contiguous()).transpose(0, 1)  # (S, B, E) -> (S, B_all, E)
            keys.append(k)
            labels.append(k.argmax(-1).masked_fill(~all_gather_varlen(f.present)[None], -1))  # (S, B_all)
        self.enqueue(torch.cat(keys, 1), torch.cat(labels, 1))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor):
        """Write the newest keys (S, n, E) with labels (S, n) over the oldest (FIFO); n may exceed K."""
        keys, labels = keys.detach().float(), labels.detach().long()
        if keys.shape[1] > self.size:  # only the newest K can survive anyway
            keys, labels = keys[:, -self.size:], labels[:, -self.size:]
        n = keys.shape[1]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # no host sync: ptr stays on device
        self.keys[:, idx] = keys
        self.labels[:, idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

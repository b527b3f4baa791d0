"""Expert contrastive learning: routed view vs fused view of each token, InfoNCE against other experts.

For each MoE site and each sampled valid token t, with per-expert low-rank activations u_e = A_e x
(rank r; nonzero from step 0, unlike B_e A_e x, which is 0 at init):

    routed view  z_r = P( sum_{e in top-k} g_e u_e )     what the router chose (renormalized top-k gates)
    fused view   z_f = P( sum_e p_e u_e )                all experts fused by the full softmax p

P is a small projection head per site (Linear-GELU-Linear, L2-normalized output). InfoNCE with temperature
tau: the anchor is z_r(t), its positive z_f(t); negatives are the fused views of in-batch tokens whose top-1
expert differs from t's, and expert-memory-queue entries whose expert id differs from t's top-1 expert.
Same-expert entries are masked out, never counted as negatives. The queue stores fused views (the keys),
labelled by top-1 expert, MoCo-style.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from expert_queue import ExpertQueues, all_gather_varlen, distributed
from lora_moe import sites


class ProjectionHead(nn.Module):
    def __init__(self, rank: int, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(rank, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, v):
        return F.normalize(self.net(v), dim=-1)


def make_heads(model, dim: int = 64) -> nn.ModuleList:
    """One projection head per adapted site, on the adapters' device."""
    s = sites(model)
    dev = s[0][1].lora_A.device
    return nn.ModuleList(ProjectionHead(m.r, dim) for _, m in s).to(dev)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice (all_reduce: works on gloo too).

    With it, DDP's gradient average equals the gradient of one process holding the concatenated batch."""

    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
        parts = [x.new_empty((max(sizes), *x.shape[1:])) for _ in sizes]
        dist.all_gather(parts, torch.cat([x, pad]).contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)
        start = sum(ctx.sizes[:ctx.rank])
        return g[start:start + ctx.sizes[ctx.rank]], None


def gather_keys(z: torch.Tensor, labels: torch.Tensor):
    """Every rank's keys (with gradient) and labels in rank order, and where this rank's keys start."""
    if not distributed():
        return z, labels, 0
    n = torch.tensor([z.shape[0]], device=z.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    return _GatherWithGrad.apply(z, sizes), all_gather_varlen(labels), sum(sizes[:dist.get_rank()])


def site_views(m, head, tokens_per_site: int, generator=None):
    """One site's (z_r, z_f, top-1 labels) for at most ``tokens_per_site`` valid tokens."""
    if m.u is None:
        raise RuntimeError("no expert activations recorded: call lora_moe.set_record_u(model, True) before forward")
    E, k = m.E, m.top_k
    u, probs, idx = m.u.reshape(-1, E, m.r), m.probs.reshape(-1, E), m.topk_idx.reshape(-1, k)
    if m.token_mask is not None:
        keep = m.token_mask.reshape(-1).to(u.device)
        u, probs, idx = u[keep], probs[keep], idx[keep]
    if u.shape[0] > tokens_per_site:  # sample to bound the cost: O(tokens_per_site * (tokens_per_site + K))
        pick = torch.randperm(u.shape[0], generator=generator, device="cpu")[:tokens_per_site].to(u.device)
        u, probs, idx = u[pick], probs[pick], idx[pick]
    top_p = probs.gather(-1, idx)
    gates = torch.zeros_like(probs).scatter(-1, idx, top_p / top_p.sum(-1, keepdim=True))
    routed = (gates.unsqueeze(-1) * u).sum(1)  # (n, E, r) -> (n, r)
    fused = (probs.unsqueeze(-1) * u).sum(1)
    return head(routed), head(fused), idx[:, 0]


def info_nce(z_r, labels, keys, key_labels, q_keys=None, q_labels=None, temperature: float = 0.07,
             offset: int = 0):
    """Mean InfoNCE of anchors z_r (n, d) against keys (N, d) (anchor i's positive is keys[offset + i]).

    Negatives: keys and queue entries whose expert label differs from the anchor's. Logits column 0 is the
    positive; masked negatives are -inf, so an anchor with no negatives contributes exactly 0.
    """
    n = z_r.shape[0]
    if n == 0:
        return z_r.sum() * 0.0
    rows = torch.arange(n, device=z_r.device)
    sim = z_r @ keys.T / temperature  # (n, N)
    pos = sim[rows, offset + rows]
    neg = sim.masked_fill(labels[:, None] == key_labels[None, :], float("-inf"))  # also masks the positive
    cols = [pos[:, None], neg]
    if q_keys is not None and q_keys.shape[0]:
        qs = (z_r @ q_keys.T / temperature).masked_fill(labels[:, None] == q_labels[None, :], float("-inf"))
        cols.append(qs)
    logits = torch.cat(cols, dim=1)
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=z_r.device))


def contrastive_loss(model, heads, queues: ExpertQueues | None = None, tokens_per_site: int = 256,
                     temperature: float = 0.07, generator=None, enqueue: bool = True):
    """Mean over sites of the expert-contrastive InfoNCE. ``queues=None``: in-batch negatives only.

    Under torchrun the keys are all-gathered (with gradient) before the loss, so every rank sees the
    global batch's negatives and enqueues the same keys: the queues stay identical on all ranks.
    """
    losses = []
    for i, (_, m) in enumerate(sites(model)):
        z_r, z_f, labels = site_views(m, heads[i], tokens_per_site, generator)
        keys, key_labels, offset = gather_keys(z_f, labels)
        q_keys, q_labels = queues[i].contents() if queues is not None else (None, None)
        losses.append(info_nce(z_r, labels, keys, key_labels, q_keys, q_labels, temperature, offset))
        if queues is not None and enqueue:
            queues[i].enqueue(keys.detach(), key_labels)  # after the loss: this step's keys are not negatives twice
    return torch.stack(losses).mean()

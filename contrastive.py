"""Expert contrastive learning: routed view vs fused view of each token, InfoNCE against other experts.

For each site (adapted projection) and each sampled real token t, with every expert's low-rank activation
u_e = A_e x (rank r; nonzero from step 0, unlike B_e A_e x, which is 0 at init):

    routed view  z_r = H( sum_e g_e u_e )     g: the router's renormalized top-k gates (0 = not chosen)
    fused view   z_f = H( sum_e p_e u_e )     p: the full softmax over all E experts

H is a small projection head per site (Linear-GELU-Linear, L2-normalized output). With temperature tau,
labels y = each token's top-1 expert, and N(t) = {in-batch fused views z_f(s) and queue keys q with
label != y(t)}, the loss per site (``info_nce``) is

    L_cl = - mean_t log [ exp(z_r(t).z_f(t)/tau) / ( exp(z_r(t).z_f(t)/tau) + sum_{n in N(t)} exp(z_r(t).n/tau) ) ]

averaged over sites. Same-expert entries are masked out, never counted as negatives. The queue stores fused
views (the keys), labelled by top-1 expert, MoCo-style (expert_queue.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from expert_queue import ExpertQueues
from lora_moe import RouterRecord, sites
from parallel import all_gather_varlen, all_gather_with_grad


class ProjectionHead(nn.Module):
    """H: expert rank space (r) -> a unit vector of ``dim``."""

    def __init__(self, rank: int, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(rank, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, v):
        return F.normalize(self.net(v), dim=-1)


def make_heads(model, dim: int = 64) -> nn.ModuleList:
    """One projection head per site, on the adapters' device."""
    s = sites(model)
    dev = s[0][1].lora_A.device
    return nn.ModuleList(ProjectionHead(m.r, dim) for _, m in s).to(dev)


def site_views(rec: RouterRecord, head, tokens_per_site: int, generator=None):
    """One site's (z_r, z_f, top-1 labels) for at most ``tokens_per_site`` of the record's (real) tokens."""
    if rec.expert_acts is None:
        raise RuntimeError("no expert activations recorded: call lora_moe.record_expert_acts(model, True) first")
    u, probs, gates, idx = rec.expert_acts, rec.probs, rec.gates, rec.topk_idx  # (N, E, r), (N, E), (N, E), (N, k)
    if u.shape[0] > tokens_per_site:  # sample to bound the cost: O(tokens_per_site * (tokens_per_site + K))
        pick = torch.randperm(u.shape[0], generator=generator, device="cpu")[:tokens_per_site].to(u.device)
        u, probs, gates, idx = u[pick], probs[pick], gates[pick], idx[pick]
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


def contrastive_loss(records: list[RouterRecord], heads, queues: ExpertQueues | None = None,
                     tokens_per_site: int = 256, temperature: float = 0.07, generator=None, enqueue: bool = True):
    """Mean over sites of the expert-contrastive InfoNCE. ``queues=None``: in-batch negatives only.

    Under torchrun the keys are all-gathered (with gradient) before the loss, so every rank sees the
    global batch's negatives and enqueues the same keys: the queues stay identical on all ranks.
    """
    losses = []
    for i, rec in enumerate(records):
        z_r, z_f, labels = site_views(rec, heads[i], tokens_per_site, generator)
        keys, offset = all_gather_with_grad(z_f)
        key_labels = all_gather_varlen(labels)
        q_keys, q_labels = queues[i].contents() if queues is not None else (None, None)
        losses.append(info_nce(z_r, labels, keys, key_labels, q_keys, q_labels, temperature, offset))
        if queues is not None and enqueue:
            queues[i].enqueue(keys.detach(), key_labels)  # after the loss: this step's keys are not negatives twice
    return torch.stack(losses).mean()

"""Expert contrastive learning: two readings of "routed expert view vs fused expert view", InfoNCE.

For each site (adapted projection) and each sampled real token t, with every expert's low-rank activation
u_e = A_e x (rank r; nonzero from step 0, unlike B_e A_e x, which is 0 at init), p the router's full
softmax, g its renormalized top-k gates, e* = top-1 expert, H a small projection head per site
(Linear-GELU-Linear, L2-normalized output) and tau the temperature:

``--cl-views mixture`` (``info_nce``): the routed view z_r = H(sum_e g_e u_e) is the anchor, the fused view
z_f = H(sum_e p_e u_e) of the same token its positive; negatives N(t) are the fused views of other tokens
and queue keys whose top-1 expert differs from e*(t):

    L = - mean_t log [ exp(z_r.z_f/tau) / ( exp(z_r.z_f/tau) + sum_{n in N(t)} exp(z_r.n/tau) ) ]

``--cl-views expert`` (``expert_info_nce``): the fused view z_f = H(sum_e p_e u_e) is the anchor, the chosen
expert's own view z_e* = H(u_e*) its positive; negatives are the same token's other experts' views
H(u_e), e != e*, and queue keys (past chosen-expert views) whose expert differs from e*:

    L = - mean_t log [ exp(z_f.z_e*/tau) / ( sum_e exp(z_f.z_e/tau) + sum_{q: y_q != e*} exp(z_f.q/tau) ) ]

Its gradient moves p toward e* (z_f approaches z_e* only by weighting u_e* more: a sharper router) and
pushes the experts' views apart (distinct experts), the paper's stated aim; the mixture reading's positive
pair are two mixtures of the same u_e, which agree best when routing is one-hot *or* the experts are alike.

Keys (the positives, in-batch negatives and what is enqueued) come from H itself, with gradient, or with
``--queue-momentum m > 0`` from an exponential-moving-average copy of H, without gradient, as in MoCo
(``ContrastiveHeads``): keys in the queue then age slowly instead of coming from a head that keeps moving.
Both losses are averaged over sites; same-expert entries are masked, never counted as negatives.
"""
from __future__ import annotations

import copy

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


class ContrastiveHeads(nn.Module):
    """The projection heads H, one per site (``query``), and with momentum m > 0 their EMA copy (``key``):
    after every optimizer step key <- m * key + (1 - m) * query (``update_keys``). Memory: one more head per
    site (for Qwen3-4B, 252 x 4.7k parameters = 4.7 MB)."""

    def __init__(self, ranks: list[int], dim: int = 64, momentum: float = 0.0):
        super().__init__()
        self.query = nn.ModuleList(ProjectionHead(r, dim) for r in ranks)
        self.momentum = momentum
        self.key = copy.deepcopy(self.query).requires_grad_(False) if momentum > 0 else None

    def keys(self, i: int, v):
        """Site i's key view of v: the query head (with gradient) or, with momentum, the EMA head (without)."""
        if self.key is None:
            return self.query[i](v)
        with torch.no_grad():
            return self.key[i](v)

    @torch.no_grad()
    def update_keys(self):
        if self.key is not None:
            for k, q in zip(self.key.parameters(), self.query.parameters()):
                k.lerp_(q, 1.0 - self.momentum)


def make_heads(model, dim: int = 64, momentum: float = 0.0) -> ContrastiveHeads:
    """Projection heads for every site, on the adapters' device."""
    s = sites(model)
    return ContrastiveHeads([m.r for _, m in s], dim, momentum).to(s[0][1].lora_A.device)


def sample_tokens(rec: RouterRecord, n: int, generator=None) -> RouterRecord:
    """At most ``n`` of the record's tokens, uniformly. why: the loss costs O(n * (n + K)) per site."""
    if rec.expert_acts is None:
        raise RuntimeError("no expert activations recorded: call lora_moe.record_expert_acts(model, True) first")
    if rec.expert_acts.shape[0] <= n:
        return rec
    pick = torch.randperm(rec.expert_acts.shape[0], generator=generator, device="cpu")[:n].to(rec.probs.device)
    return RouterRecord(rec.logits[pick], rec.probs[pick], rec.topk_idx[pick], rec.gates[pick],
                        rec.expert_acts[pick])


def site_views(rec: RouterRecord, heads: ContrastiveHeads, i: int):
    """The mixture reading's views of one site's tokens: (z_r query, z_f key, top-1 labels)."""
    u = rec.expert_acts  # (n, E, r)
    routed = (rec.gates.unsqueeze(-1) * u).sum(1)  # (n, E, r) -> (n, r)
    fused = (rec.probs.unsqueeze(-1) * u).sum(1)
    return heads.query[i](routed), heads.keys(i, fused), rec.topk_idx[:, 0]


def expert_views(rec: RouterRecord, heads: ContrastiveHeads, i: int):
    """The expert reading's views: (z_f (n, d) anchor, every expert's own view z_e (n, E, d), top-1 labels)."""
    u = rec.expert_acts  # (n, E, r)
    fused = (rec.probs.unsqueeze(-1) * u).sum(1)  # (n, r): the router's probabilities carry the gradient
    return heads.query[i](fused), heads.keys(i, u), rec.topk_idx[:, 0]


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


def expert_info_nce(z_f, z_e, labels, q_keys=None, q_labels=None, temperature: float = 0.07):
    """Mean InfoNCE of anchors z_f (n, d): positive z_e[t, labels[t]], negatives the token's other experts'
    views z_e[t, e != labels[t]] and queue keys with another label. Logits column 0 is the positive."""
    n = z_f.shape[0]
    if n == 0:
        return z_f.sum() * 0.0
    sim = (z_e @ z_f.unsqueeze(-1)).squeeze(-1) / temperature  # (n, E, d) @ (n, d, 1) -> (n, E)
    pos = sim.gather(1, labels[:, None])  # (n, 1)
    own = torch.zeros_like(sim, dtype=torch.bool).scatter(1, labels[:, None], True)
    cols = [pos, sim.masked_fill(own, float("-inf"))]
    if q_keys is not None and q_keys.shape[0]:
        qs = z_f @ q_keys.T / temperature  # (n, K)
        cols.append(qs.masked_fill(labels[:, None] == q_labels[None, :], float("-inf")))
    return F.cross_entropy(torch.cat(cols, dim=1), torch.zeros(n, dtype=torch.long, device=z_f.device))


def contrastive_loss(records: list[RouterRecord], heads: ContrastiveHeads, queues: ExpertQueues | None = None,
                     tokens_per_site: int = 256, temperature: float = 0.07, generator=None, enqueue: bool = True,
                     views: str = "mixture"):
    """Mean over sites of the expert-contrastive InfoNCE (``views``: "mixture" or "expert", as above).
    ``queues=None``: no memory queue.

    Under torchrun the keys are all-gathered (with gradient when they have one) before the loss, so every
    rank sees the global batch's negatives and enqueues the same keys: the queues stay identical on all ranks.
    """
    losses = []
    for i, rec in enumerate(records):
        rec = sample_tokens(rec, tokens_per_site, generator)
        q_keys, q_labels = queues[i].contents() if queues is not None else (None, None)
        if views == "expert":
            z_f, z_e, labels = expert_views(rec, heads, i)
            losses.append(expert_info_nce(z_f, z_e, labels, q_keys, q_labels, temperature))
            new_keys = z_e[torch.arange(len(labels), device=labels.device), labels]  # the chosen experts' views
            keys, key_labels = all_gather_varlen(new_keys.detach()), all_gather_varlen(labels)
        else:
            z_r, z_f, labels = site_views(rec, heads, i)
            keys, offset = all_gather_with_grad(z_f)  # with momentum z_f has no gradient, and neither has this
            key_labels = all_gather_varlen(labels)
            losses.append(info_nce(z_r, labels, keys, key_labels, q_keys, q_labels, temperature, offset))
        if queues is not None and enqueue:
            queues[i].enqueue(keys.detach(), key_labels)  # after the loss: no key is a negative twice
    return torch.stack(losses).mean()

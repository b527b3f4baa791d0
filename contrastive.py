"""Expert contrastive learning: three readings of "routed expert view vs fused expert view", InfoNCE.

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

``--cl-views sequence`` (``sequence_info_nce``, the default: docs/ablation.md): the views are routings, not
heads' outputs. A token's routed view is its centred routing rho_t = c(p_t), c(v) = (v - 1/E) / |v - 1/E|
(``routing_view``); a sequence's fused view is that of its real tokens' mean routing phi_s = c(mean_{t in s}
p_t). The positive of token t is its own sequence's phi_s(t); the negatives are every other sequence's phi
(all ranks) and the queue's past phi:

    L = - mean_t log [ exp(rho_t.phi_s(t)/tau) / ( sum_{s'} exp(rho_t.phi_s'/tau) + sum_q exp(rho_t.q/tau) ) ]

why routings: any view made from u_e = A_e x can tell sequences apart by their content alone (x carries the
domain), so the other two readings are solved without moving the router; here only the router can lower
the loss, by routing the tokens of one sequence alike and other sequences elsewhere. why no same-expert
mask here: the views *are* the expert choice, and with the mask one expert for every token would leave no
negatives (loss 0): the mask would reward collapse. No projection heads, no momentum; the queue holds
E-dimensional phi.

Keys (the positives, in-batch negatives and what is enqueued) come from H itself, with gradient, or with
``--queue-momentum m > 0`` from an exponential-moving-average copy of H, without gradient, as in MoCo
(``ContrastiveHeads``): keys in the queue then age slowly instead of coming from a head that keeps moving.
Every reading is averaged over sites; in the two head readings same-expert entries are masked, never
counted as negatives.
"""
from __future__ import annotations

import copy
from dataclasses import fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from expert_queue import ExpertQueues
from lora_moe import RouterRecord, sites
from parallel import all_gather_varlen, all_gather_with_grad

CL_VIEWS = ("mixture", "expert", "sequence")  # --cl-views: the readings above


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
    if rec.probs.shape[0] <= n:
        return rec
    pick = torch.randperm(rec.probs.shape[0], generator=generator, device="cpu")[:n].to(rec.probs.device)
    return RouterRecord(*(None if t is None else t[pick] for t in (getattr(rec, f.name) for f in fields(rec))))


def expert_acts(rec: RouterRecord) -> torch.Tensor:
    """(n, E, r) every expert's A_e x (the mixture and expert readings need them)."""
    if rec.expert_acts is None:
        raise RuntimeError("no expert activations recorded: call lora_moe.record_expert_acts(model, True) first")
    return rec.expert_acts


def site_views(rec: RouterRecord, heads: ContrastiveHeads, i: int):
    """The mixture reading's views of one site's tokens: (z_r query, z_f key, top-1 labels)."""
    u = expert_acts(rec)  # (n, E, r)
    routed = (rec.gates.unsqueeze(-1) * u).sum(1)  # (n, E, r) -> (n, r)
    fused = (rec.probs.unsqueeze(-1) * u).sum(1)
    return heads.query[i](routed), heads.keys(i, fused), rec.topk_idx[:, 0]


def expert_views(rec: RouterRecord, heads: ContrastiveHeads, i: int):
    """The expert reading's views: (z_f (n, d) anchor, every expert's own view z_e (n, E, d), top-1 labels)."""
    u = expert_acts(rec)  # (n, E, r)
    fused = (rec.probs.unsqueeze(-1) * u).sum(1)  # (n, r): the router's probabilities carry the gradient
    return heads.query[i](fused), heads.keys(i, u), rec.topk_idx[:, 0]


def routing_view(p):
    """A routing p (..., E) as a unit vector: p minus the uniform routing, normalized. why centred: routings are
    non-negative, so two diffuse routers' p have cosine ~1 whatever they prefer; their deviations from
    uniform point where they prefer."""
    return F.normalize(p - 1.0 / p.shape[-1], dim=-1)


def sequence_views(rec: RouterRecord):
    """The sequence reading's fused views over all of the record's tokens: (phi (S, E) one per sequence
    present, its top expert (S,), each token's index into phi (N,))."""
    if rec.seq is None:
        raise RuntimeError("the sequence reading needs the tokens' sequences: records from RouterRecord.valid")
    present, which = torch.unique(rec.seq, return_inverse=True)  # which: (N,) in 0..S-1
    total = rec.probs.new_zeros(len(present), rec.probs.shape[-1]).index_add(0, which, rec.probs)  # (S, E)
    count = torch.bincount(which, minlength=len(present)).to(total.dtype)  # (S,) tokens per sequence
    phi = routing_view(total / count[:, None])  # (S, E): each sequence's mean routing, centred
    return phi, phi.argmax(-1), which


def sequence_info_nce(rho, seq, phi, q_keys=None, temperature: float = 0.07):
    """Mean InfoNCE of routed views rho (n, E) against fused sequence views phi (S, E): token t's positive is
    phi[seq[t]], its negatives every other row of phi and every queue entry. Logits column 0 is the positive."""
    n = rho.shape[0]
    if n == 0:
        return rho.sum() * 0.0
    sim = rho @ phi.T / temperature  # (n, S)
    pos = sim.gather(1, seq[:, None])  # (n, 1)
    own = torch.zeros_like(sim, dtype=torch.bool).scatter(1, seq[:, None], True)
    cols = [pos, sim.masked_fill(own, float("-inf"))]
    if q_keys is not None and q_keys.shape[0]:
        cols.append(rho @ q_keys.T / temperature)
    return F.cross_entropy(torch.cat(cols, dim=1), torch.zeros(n, dtype=torch.long, device=rho.device))


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
    """Mean over sites of the expert-contrastive InfoNCE (``views``: "mixture", "expert" or "sequence", as
    above). ``queues=None``: no memory queue; ``heads`` is unused (None) by the sequence reading.

    Under torchrun the keys are all-gathered (with gradient when they have one) before the loss, so every
    rank sees the global batch's negatives and enqueues the same keys: the queues stay identical on all ranks.
    """
    losses = []
    for i, rec in enumerate(records):
        q_keys, q_labels = queues[i].contents() if queues is not None else (None, None)
        if views == "sequence":
            phi, phi_labels, which = sequence_views(rec)  # over every real token, before sampling
            keys, offset = all_gather_with_grad(phi)  # every rank's sequences: (S_all, E)
            key_labels = all_gather_varlen(phi_labels)
            rec = sample_tokens(replace(rec, seq=which), tokens_per_site, generator)  # anchors; seq indexes phi
            losses.append(sequence_info_nce(routing_view(rec.probs), rec.seq + offset, keys, q_keys, temperature))
        elif views == "expert":
            rec = sample_tokens(rec, tokens_per_site, generator)
            z_f, z_e, labels = expert_views(rec, heads, i)
            losses.append(expert_info_nce(z_f, z_e, labels, q_keys, q_labels, temperature))
            new_keys = z_e[torch.arange(len(labels), device=labels.device), labels]  # the chosen experts' views
            keys, key_labels = all_gather_varlen(new_keys.detach()), all_gather_varlen(labels)
        else:
            rec = sample_tokens(rec, tokens_per_site, generator)
            z_r, z_f, labels = site_views(rec, heads, i)
            keys, offset = all_gather_with_grad(z_f)  # with momentum z_f has no gradient, and neither has this
            key_labels = all_gather_varlen(labels)
            losses.append(info_nce(z_r, labels, keys, key_labels, q_keys, q_labels, temperature, offset))
        if queues is not None and enqueue:
            queues[i].enqueue(keys.detach(), key_labels)  # after the loss: no key is a negative twice
    return torch.stack(losses).mean()

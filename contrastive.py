"""Expert contrastive learning: the routed expert view against the fused expert view, InfoNCE.

The views are routings. For each site and each sampled real token t, with p_t the router's full softmax over E
experts and c(v) = (v - 1/E) / |v - 1/E| the centred unit routing (``routing_view``):

    routed view  rho_t = c(p_t)                                   (``contrastive_loss``: ``at_anchors``)
    fused view   phi_s = c(mean_{t in s} p_t), s a sequence, over its real tokens       (``fused_views``)

The positive of t is its own sequence's phi_s(t); the negatives every other sequence's phi in the same
micro-batch and, with the expert memory queue, the queue's past phi q whose top expert differs from that of
phi_s(t) (Q(t)). With s_i = rho_t . phi_i / tau, s+ the positive's score, N the negatives:

    InfoNCE        L_t = -log [ e^{s+} / ( e^{s+} + sum_{i in N} e^{s_i} ) ]                  (``info_nce``)
    debiased       the sum becomes N g,  g = max((mean_i e^{s_i} - tau+ e^{s+}) / (1 - tau+), e^{-1/tau})
                   (Chuang et al. 2020; tau+ the expected share of negatives of t's own kind)  (``debiased_nce``)
    L_cl = mean over sites of the mean over sampled real tokens of L_t                        (``contrastive_loss``)

why routings: any view made from the experts' activations can tell sequences apart by content alone (x carries
the domain), so it is solved without moving the router; here only the router can lower the loss, by routing
one sequence's tokens alike and other sequences elsewhere. why centred: routings are non-negative, so two
diffuse routers' p have cosine ~1 whatever they prefer. why no same-expert mask in the batch: the views *are*
the expert choice; with the mask, one expert for every token would leave no negatives (loss 0) and reward
collapse. why the mask on the queue: a past sequence routed like the anchor's own is most likely of its kind
(docs/results.md, the queue). why the micro-batch's own sequences only, never gathered: the loss of a step then
depends only on its pieces of --batch-size sequences, not on how they are spread over ranks and micro-steps
(1 process x accumulation k == k ranks x 1, tested). All sites at once: a few batched tensor ops over the
stacked records, tokens weighted (no boolean indexing, no host sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_moe import RouterRecord

NEG_INF = float("-inf")


@dataclass
class FusedViews:
    """One micro-batch's fused views, what the queue stores: phi (S, B, E), present (B,) the row has real tokens."""
    phi: torch.Tensor
    present: torch.Tensor


@dataclass
class Contrastive:
    """``contrastive_loss``'s result: L_cl (a scalar with gradient) and the micro-batch's fused views (detached)."""
    loss: torch.Tensor
    fused: FusedViews


def routing_view(p):
    """A routing p (..., E) as a unit vector: p minus the uniform routing, normalized."""
    return F.normalize(p - 1.0 / p.shape[-1], dim=-1)


def fused_views(probs, weight) -> FusedViews:
    """Every site's fused view of every sequence: probs (S, B, T, E), token weights (B, T) -> phi (S, B, E)."""
    count = weight.sum(1)  # (B,) real tokens per sequence
    mean = (probs * weight[None, :, :, None]).sum(2) / count.clamp(min=1)[None, :, None]  # (S, B, T, E) -> (S, B, E)
    return FusedViews(routing_view(mean), count > 0)


def sample_positions(weight, num_sites: int, n: int, generator=None):
    """For each site, at most ``n`` of the real tokens of ``weight`` (B, T), uniformly without replacement:
    (positions (S, n') into B*T, their weights (S, n')), n' = min(n, B*T). why: the loss costs O(n * (B + K))
    per site. Static shapes: the top-n of uniform scores, padding scored below every real token, so with fewer
    than n real tokens every one is taken and the rest are padding with weight 0."""
    w = weight.reshape(-1)  # (B*T,)
    if n >= w.shape[0]:
        pick = torch.arange(w.shape[0], device=w.device).expand(num_sites, -1)
    else:
        scores = torch.rand(num_sites, w.shape[0], generator=generator, device=w.device)
        pick = scores.masked_fill(w[None] == 0, -1.0).topk(n, dim=1).indices  # (S, n)
    return pick, w[pick]


def at_anchors(t, pick):
    """Each site's rows of t (S, B, T, E) at the sampled positions pick (S, n) into B*T: (S, n, E)."""
    S, B, T, E = t.shape
    return t.reshape(S, B * T, E).gather(1, pick[..., None].expand(-1, -1, E))


def logits_of(rho, seq, fused: FusedViews, negatives=None, *, temperature: float):
    """Every anchor's InfoNCE logits (S, n, 1 + B [+ K]): column 0 its positive phi[:, seq[t]], then every other
    present sequence of the micro-batch and, with ``negatives`` = the queue's (keys (S, K, E), labels (S, K):
    top expert, -1 = empty), every filled entry whose top expert is not that of t's own sequence; -inf where
    not a negative. rho (S, n, E) routed views, seq (S, n) each anchor's sequence."""
    phi, present = fused.phi, fused.present
    sim = rho @ phi.transpose(1, 2) / temperature  # (S, n, B)
    pos = sim.gather(2, seq[..., None])  # (S, n, 1)
    own = torch.zeros_like(sim, dtype=torch.bool).scatter(2, seq[..., None], True)
    cols = [pos, sim.masked_fill(own | ~present[None, None, :], NEG_INF)]
    if negatives is not None:  # the queue's rule: an entry routed like the anchor's own sequence is not a negative
        q_keys, q_labels = negatives
        top = phi.argmax(-1).gather(1, seq)  # (S, n): the top expert of each anchor's own sequence
        alike = (q_labels[:, None, :] == top[..., None]) | (q_labels[:, None, :] < 0)  # (S, n, K)
        cols.append((rho @ q_keys.transpose(1, 2) / temperature).masked_fill(alike, NEG_INF))
    return torch.cat(cols, dim=2)


def info_nce(logits):
    """-log softmax of column 0 (the positive): InfoNCE per anchor, logits (..., 1 + N) -> (...)."""
    return logits.logsumexp(-1) - logits[..., 0]


def debiased_nce(logits, tau_plus: float, temperature: float):
    """Chuang et al. (2020)'s debiased loss per anchor from InfoNCE logits (..., 1 + N) (the formula at the top):
    a share tau+ of the negatives is, on average, of the anchor's own kind (two sequences of one domain); their
    expected part, tau+ e^{s+}, leaves the negatives' mean. At collapse g = e^{s+} and the loss is log(1 + N),
    as InfoNCE's. why exp without a max shift: every score is a cosine / tau, at most 1/tau (config.validate
    keeps tau >= 0.02)."""
    pos, negs = logits[..., 0], logits[..., 1:]
    n = torch.isfinite(negs).sum(-1).to(logits.dtype)  # negatives per anchor
    neg_mean = negs.exp().sum(-1) / n.clamp(min=1)
    g = ((neg_mean - tau_plus * pos.exp()) / (1 - tau_plus)).clamp(min=math.exp(-1 / temperature))
    return torch.log(pos.exp() + n * g) - pos


def contrastive_loss(rec: RouterRecord, weight, negatives=None, *, tokens_per_site: int, temperature: float,
                     debias: float, generator=None) -> Contrastive:
    """L_cl over one forward's stacked record (S, B, T, ...) (``lora_moe.record_routing`` + ``stack_records``) and
    token weights (B, T) (1 real, 0 padding): the mean over sites of the mean over at most ``tokens_per_site``
    sampled real tokens. ``negatives``: the expert memory queue's (``ExpertQueue.negatives``) or None;
    ``debias``: tau+ (0 = plain InfoNCE); ``generator``: the token sampling's."""
    S, B, T, E = rec.probs.shape
    fused = fused_views(rec.probs, weight)  # phi (S, B, E)
    pick, w = sample_positions(weight, S, tokens_per_site, generator)  # (S, n)
    rho = routing_view(at_anchors(rec.probs, pick))  # (S, n, E)
    logits = logits_of(rho, pick // T, fused, negatives, temperature=temperature)
    per_token = debiased_nce(logits, debias, temperature) if debias > 0 else info_nce(logits)  # (S, n)
    loss = ((per_token * w).sum(1) / w.sum(1).clamp(min=1)).mean()  # weighted mean over tokens, mean over sites
    return Contrastive(loss, FusedViews(fused.phi.detach(), fused.present))

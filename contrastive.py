"""Expert contrastive learning: "routed expert view vs fused expert view", InfoNCE; three readings.

``--cl-views sequence`` (the default; ``sequence_loss``): the views are routings. For each site and each
sampled real token t, with p_t the router's full softmax over E experts and c(v) = (v - 1/E) / |v - 1/E| the
centred unit routing (``routing_view``): the routed view is rho_t = c(p_t); a sequence's fused view is
phi_s = c(mean_{t in s} p_t) over its real tokens. The positive of t is its own sequence's phi_s(t); the
negatives every other sequence's phi in the same micro-batch (this rank's --batch-size sequences: the loss does
not depend on how a step is split over ranks and micro-steps) and, with ``--queue``, the queue's past phi q
whose top expert differs from that of phi_s(t) (Q(t)):

    L = - mean_t log [ exp(rho_t.phi_s(t)/tau) / ( sum_{s'} exp(rho_t.phi_s'/tau) + sum_{q in Q(t)} exp(rho_t.q/tau) ) ]

With ``--cl-debias tau+`` (``debiased_nce``; Chuang et al. 2020) the N negatives' sum is replaced by N g, an
estimate of what it would be without the negatives of the anchor's own kind, tau+ their expected share:
g = max((mean_i exp(s_i) - tau+ exp(s+)) / (1 - tau+), exp(-1/tau)), s = the scores above (/tau), s+ the positive.

why routings: any view made from the experts' activations u_e = A_e x can tell sequences apart by their
content alone (x carries the domain), so the two head readings below are solved without moving the router;
here only the router can lower the loss, by routing one sequence's tokens alike and other sequences
elsewhere. why centred: routings are non-negative, so two diffuse routers' p have cosine ~1 whatever they
prefer. why no same-expert mask in the batch: the views *are* the expert choice; with the mask, one expert for every
token would leave no negatives (loss 0) and reward collapse. why one on the queue: a past sequence routed like
the anchor's own is most likely of its kind, and pushing it away cost the fit (docs/ablation.md, round 4); the
in-batch negatives stay, so collapse still costs. All sites at once: a few batched tensor ops over the
stacked records, tokens weighted (no boolean indexing, no host sync).

``--cl-views assign`` (``assign_loss``): the same in-batch InfoNCE (the queue never supplies negatives) plus a
code term, as in SwAV: the fused views of the micro-batch's sequences and, with ``--queue``, of the queue's K
past ones get balanced soft codes c = Sinkhorn(phi / epsilon) (every expert an equal share of the B + K rows;
epsilon = 0.05, 3 iterations), and each token's full routing p_t is trained toward its own sequence's code:

    L = InfoNCE (above, no queue) - mean_t sum_e c_{s(t), e} log p_{t, e}
    c = Sinkhorn([phi_batch; phi_queue] / epsilon)

why: the sequence reading sees only the direction of p - 1/E, not its size, so routers satisfy it while
staying diffuse (entropy 1.84-1.88 of 2.08), and its queue pushes apart sequences that belong together; here
the queue only says which experts are already taken, so a micro-batch of 4 sequences can still be spread over
8 experts. Measured (docs/ablation.md, round 5): routing
twice as domain-specific, a worse fit at 300 steps; so it is an ablation arm, not the default.

The two *head readings* follow the abstract's per-token pair more literally; in our ablation neither moved the
router (docs/ablation.md). H is a small projection head per site (Linear-GELU-Linear, unit output), g the
renormalized top-k gates, e* the top-1 expert; queue keys and in-batch keys with the anchor's expert are
masked, never counted as negatives:

``--cl-views mixture`` (``mixture_loss``): anchor z_r = H(sum_e g_e u_e), positive z_f = H(sum_e p_e u_e) of
the same token, negatives the other tokens' z_f and the queue:

    L = - mean_t log [ exp(z_r.z_f/tau) / ( exp(z_r.z_f/tau) + sum_{n in N(t)} exp(z_r.n/tau) ) ]

``--cl-views expert`` (``expert_loss``): anchor z_f = H(sum_e p_e u_e), positive the chosen expert's own view
z_e* = H(u_e*), negatives the token's other experts' views H(u_e) and the queue (past chosen-expert views).

With ``--queue-momentum m > 0`` the keys (positives, in-batch negatives, what is enqueued) come from an EMA
copy of H, without gradient, as in MoCo: ``ContrastiveHeads.update_keys`` after every optimizer step.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from expert_queue import ExpertQueue
from lora_moe import RouterRecord, sites
from parallel import all_gather_varlen, all_gather_with_grad

CL_VIEWS = ("sequence", "assign", "mixture", "expert")  # --cl-views: the readings above, the default first
ROUTING_VIEWS = ("sequence", "assign")  # the readings whose views are routings: no heads, queue entries of E numbers
SINKHORN_EPSILON, SINKHORN_ITERS = 0.05, 3  # the assign reading's Sinkhorn-Knopp, as in SwAV
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# The sequence reading (default)


def routing_view(p):
    """A routing p (..., E) as a unit vector: p minus the uniform routing, normalized."""
    return F.normalize(p - 1.0 / p.shape[-1], dim=-1)


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


def sequence_views(probs, weight):
    """(phi (S, B, E): every site's fused view of every sequence, present (B,): the sequence has real tokens)."""
    count = weight.sum(1)  # (B,) real tokens per sequence
    mean = (probs * weight[None, :, :, None]).sum(2) / count.clamp(min=1)[None, :, None]  # (S, B, T, E) -> (S, B, E)
    return routing_view(mean), count > 0


def sequence_info_nce(rho, seq, phi, present, q_keys=None, q_labels=None, *, temperature: float, debias: float):
    """Per site and anchor, InfoNCE of routed views rho (S, n, E) against fused views phi (S, B, E): anchor t's
    positive is phi[:, seq[t]], its negatives every other present row of phi and every filled queue entry
    (q_keys (S, K, E), q_labels (S, K): its top expert, -1 = empty) whose top expert is not that of t's own
    sequence; ``debias`` > 0: ``debiased_nce`` with tau+ = debias. Returns the loss of every anchor, (S, n)."""
    sim = rho @ phi.transpose(1, 2) / temperature  # (S, n, B)
    pos = sim.gather(2, seq[..., None])  # (S, n, 1)
    own = torch.zeros_like(sim, dtype=torch.bool).scatter(2, seq[..., None], True)
    cols = [pos, sim.masked_fill(own | ~present[None, None, :], NEG_INF)]
    if q_keys is not None:
        top = phi.argmax(-1).gather(1, seq)  # (S, n): the top expert of each anchor's own sequence
        alike = (q_labels[:, None, :] == top[..., None]) | (q_labels[:, None, :] < 0)  # (S, n, K)
        cols.append((rho @ q_keys.transpose(1, 2) / temperature).masked_fill(alike, NEG_INF))
    logits = torch.cat(cols, dim=2)
    if debias > 0:
        return debiased_nce(logits, debias, temperature)
    return logits.logsumexp(2) - logits[..., 0]  # cross-entropy with the positive in column 0


def debiased_nce(logits, tau_plus: float, temperature: float):
    """Chuang et al. (2020)'s debiased loss, one positive, from InfoNCE logits (..., 1 + N): the positive's score
    in column 0, then the negatives' (-inf: not one). A share tau+ of the negatives is, on average, of the
    anchor's own kind (two sequences of one domain); their expected part, tau+ exp(s+), leaves the negatives'
    mean. At collapse g = exp(s+) and the loss is log(1 + N), as InfoNCE's. why exp without a max shift: every
    score is a cosine / tau, at most 1/tau (config.validate keeps tau >= 0.02)."""
    pos, negs = logits[..., 0], logits[..., 1:]
    n = torch.isfinite(negs).sum(-1).to(logits.dtype)  # negatives per anchor
    neg_mean = negs.exp().sum(-1) / n.clamp(min=1)
    g = ((neg_mean - tau_plus * pos.exp()) / (1 - tau_plus)).clamp(min=math.exp(-1 / temperature))
    return torch.log(pos.exp() + n * g) - pos


def sequence_loss(rec: RouterRecord, weight, queue: ExpertQueue | None, tokens_per_site: int,
                  temperature: float, debias: float, generator=None):
    """The sequence reading over a stacked record (S, B, T, ...) and token weights (B, T): mean over sites of
    the mean over sampled real tokens (the formula at the top). Returns (loss, (keys (S, B_all, E), labels
    (S, B_all)): this micro-step's phi of every rank, for the queue, or None without one).

    The in-batch negatives are this micro-batch's own sequences on this rank, never gathered. why: then the
    loss of a step depends only on its pieces of --batch-size sequences, not on how they are spread over ranks
    and micro-steps (1 process x accumulation k == k ranks x 1, tested); the queue is what adds more negatives."""
    S, B, T, E = rec.probs.shape
    phi, present = sequence_views(rec.probs, weight)  # (S, B, E), (B,)
    pick, w = sample_positions(weight, S, tokens_per_site, generator)  # (S, n)
    rho = routing_view(at_anchors(rec.probs, pick))  # (S, n, E)
    q_keys, q_labels = queue.contents() if queue is not None else (None, None)
    per_token = sequence_info_nce(rho, pick // T, phi, present, q_keys, q_labels, temperature=temperature,
                                  debias=debias)
    return token_mean(per_token, w), queue_entries(phi, present) if queue is not None else None


def at_anchors(t, pick):
    """Each site's rows of t (S, B, T, E) at the sampled positions pick (S, n) into B*T: (S, n, E)."""
    S, B, T, E = t.shape
    return t.reshape(S, B * T, E).gather(1, pick[..., None].expand(-1, -1, E))


def token_mean(per_token, w):
    """Mean over sites of the weighted mean over each site's sampled tokens: per_token and w (S, n)."""
    return ((per_token * w).sum(1) / w.sum(1).clamp(min=1)).mean()


def queue_entries(phi, present):
    """What a routing reading enqueues: every rank's fused views (S, B_all, E) and their top experts (S, B_all),
    -1 for a row without real tokens (an empty slot)."""
    keys = all_gather_varlen(phi.detach().transpose(0, 1).contiguous()).transpose(0, 1)  # (S, B_all, E)
    labels = keys.argmax(-1).masked_fill(~all_gather_varlen(present)[None], -1)  # absent rows stay empty
    return keys, labels


# ----------------------------------------------------------------------------------------------------------
# The assign reading: the queue balances the sequences' codes, it never supplies negatives (SwAV)


def sinkhorn(scores, valid, epsilon: float = SINKHORN_EPSILON, iters: int = SINKHORN_ITERS):
    """Balanced soft assignment of rows to experts, per site (SwAV's Sinkhorn-Knopp): scores (S, N, E), valid
    (S, N) the rows to assign. Returns Q (S, N, E): each valid row a distribution over the E experts, every
    expert given an equal share of the valid rows (exactly in the limit; after SwAV's 3 iterations, roughly);
    invalid rows 0. Called on detached views: the codes are targets."""
    E = scores.shape[-1]
    v = valid.to(scores.dtype)[..., None]  # (S, N, 1)
    n = v.sum(1, keepdim=True).clamp(min=1)  # (S, 1, 1) valid rows per site, on device (no host sync)
    q = ((scores - scores.amax((1, 2), keepdim=True)) / epsilon).exp() * v
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True).clamp(min=1e-30) / E  # every expert's column sums to 1/E
        q = q / q.sum(2, keepdim=True).clamp(min=1e-30) / n * v  # every valid row sums to 1/n
    return q * n


def assign_loss(rec: RouterRecord, weight, queue: ExpertQueue | None, tokens_per_site: int, temperature: float,
                debias: float, generator=None):
    """The assign reading over a stacked record (S, B, T, ...) and token weights (B, T) (the formula at the top):
    the sequence reading's InfoNCE against this micro-batch's sequences only, plus the code term: the fused
    views of these sequences and of the queue's past ones get balanced codes c = Sinkhorn(phi / epsilon), and
    every sampled token's routing p_t is trained toward its own sequence's code (cross-entropy; no gradient
    through c). Returns (loss, the queue's new entries as in ``sequence_loss``, or None without a queue)."""
    S, B, T, E = rec.probs.shape
    phi, present = sequence_views(rec.probs, weight)  # (S, B, E), (B,)
    pick, w = sample_positions(weight, S, tokens_per_site, generator)  # (S, n)
    nce = sequence_info_nce(routing_view(at_anchors(rec.probs, pick)), pick // T, phi, present,
                            temperature=temperature, debias=debias)
    rows, valid = phi.detach(), present.expand(S, -1)
    if queue is not None:  # why the queue here: 4 sequences cannot be spread evenly over 8 experts; 4 + K can
        q_keys, q_labels = queue.contents()
        rows, valid = torch.cat([rows, q_keys], 1), torch.cat([valid, q_labels >= 0], 1)  # (S, B + K, ...)
    code = sinkhorn(rows, valid)[:, :B]  # (S, B, E)
    target = code.gather(1, (pick // T)[..., None].expand(-1, -1, E))  # (S, n, E): each anchor's sequence code
    per_token = nce - (target * at_anchors(rec.logits, pick).log_softmax(-1)).sum(-1)  # (S, n)
    return token_mean(per_token, w), queue_entries(phi, present) if queue is not None else None


# ----------------------------------------------------------------------------------------------------------
# The head readings (mixture, expert): per site, over real tokens


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
        """The MoCo step, called after every optimizer step: the EMA key heads follow the query heads."""
        if self.key is not None:
            for k, q in zip(self.key.parameters(), self.query.parameters()):
                k.lerp_(q, 1.0 - self.momentum)


def make_heads(model, dim: int = 64, momentum: float = 0.0) -> ContrastiveHeads:
    """Projection heads for every site, on the adapters' device."""
    s = sites(model)
    return ContrastiveHeads([m.r for _, m in s], dim, momentum).to(s[0][1].lora_A.device)


def real_tokens(rec: RouterRecord, i: int, weight, n: int, generator=None):
    """Site i's (probs (N, E), top-1 (N,), gates (N, E), acts (N, E, r)) over at most ``n`` of its real tokens,
    uniformly. (Boolean indexing: the head readings are ablation arms; the default path has no such sync.)"""
    if rec.expert_acts is None:
        raise RuntimeError("the head readings need every expert's A_e x: record_routing(model, expert_acts=True)")
    keep = weight.reshape(-1) > 0
    site = (rec.probs[i], rec.topk_idx[i, ..., 0], rec.gates[i], rec.expert_acts[i])
    flat = [t.reshape(-1, *t.shape[2:])[keep] for t in site]  # (B, T, ...) -> (N, ...)
    if flat[0].shape[0] > n:
        pick = torch.randperm(flat[0].shape[0], generator=generator, device=flat[0].device)[:n]
        flat = [t[pick] for t in flat]
    return flat


def info_nce(z_r, labels, keys, key_labels, q_keys=None, q_labels=None, *, temperature: float, offset: int = 0):
    """Mean InfoNCE of anchors z_r (n, d) against keys (N, d) (anchor i's positive is keys[offset + i]).

    Negatives: keys and queue entries whose expert label differs from the anchor's (label -1: an empty queue
    slot, never read). Logits column 0 is the positive; masked negatives are -inf, so an anchor with no
    negatives contributes exactly 0."""
    n = z_r.shape[0]
    if n == 0:
        return z_r.sum() * 0.0
    rows = torch.arange(n, device=z_r.device)
    sim = z_r @ keys.T / temperature  # (n, N)
    pos = sim[rows, offset + rows]
    neg = sim.masked_fill(labels[:, None] == key_labels[None, :], NEG_INF)  # also masks the positive
    cols = [pos[:, None], neg]
    if q_keys is not None:
        drop = (labels[:, None] == q_labels[None, :]) | (q_labels[None, :] < 0)
        cols.append((z_r @ q_keys.T / temperature).masked_fill(drop, NEG_INF))
    return F.cross_entropy(torch.cat(cols, dim=1), torch.zeros(n, dtype=torch.long, device=z_r.device))


def expert_info_nce(z_f, z_e, labels, q_keys=None, q_labels=None, *, temperature: float):
    """Mean InfoNCE of anchors z_f (n, d): positive z_e[t, labels[t]], negatives the token's other experts'
    views z_e[t, e != labels[t]] and queue keys with another label. Logits column 0 is the positive."""
    n = z_f.shape[0]
    if n == 0:
        return z_f.sum() * 0.0
    sim = (z_e @ z_f.unsqueeze(-1)).squeeze(-1) / temperature  # (n, E, d) @ (n, d, 1) -> (n, E)
    pos = sim.gather(1, labels[:, None])  # (n, 1)
    own = torch.zeros_like(sim, dtype=torch.bool).scatter(1, labels[:, None], True)
    cols = [pos, sim.masked_fill(own, NEG_INF)]
    if q_keys is not None:
        drop = (labels[:, None] == q_labels[None, :]) | (q_labels[None, :] < 0)
        cols.append((z_f @ q_keys.T / temperature).masked_fill(drop, NEG_INF))
    return F.cross_entropy(torch.cat(cols, dim=1), torch.zeros(n, dtype=torch.long, device=z_f.device))


def head_loss(views: str, rec: RouterRecord, weight, heads: ContrastiveHeads, queue: ExpertQueue | None,
              tokens_per_site: int, temperature: float, generator=None):
    """The mixture or expert reading: per site, over at most ``tokens_per_site`` real tokens; mean over sites.
    Keys are gathered from every rank (with gradient where they have one). Returns (loss, the keys and labels
    of every rank for the queue, or None without one)."""
    losses, new_keys, new_labels = [], [], []
    all_q_keys, all_q_labels = queue.contents() if queue is not None else (None, None)
    for i in range(rec.probs.shape[0]):
        p, top1, g, u = real_tokens(rec, i, weight, tokens_per_site, generator)  # u: (n, E, r)
        q_keys, q_labels = (all_q_keys[i], all_q_labels[i]) if queue is not None else (None, None)
        if views == "mixture":
            z_r, z_f = heads.query[i]((g.unsqueeze(-1) * u).sum(1)), heads.keys(i, (p.unsqueeze(-1) * u).sum(1))
            keys, offset = all_gather_with_grad(z_f)  # with momentum z_f has no gradient, and neither has this
            key_labels = all_gather_varlen(top1)
            losses.append(info_nce(z_r, top1, keys, key_labels, q_keys, q_labels, temperature=temperature,
                                   offset=offset))
        else:  # expert: the router's probabilities carry the gradient through the fused anchor
            z_f, z_e = heads.query[i]((p.unsqueeze(-1) * u).sum(1)), heads.keys(i, u)  # (n, d), (n, E, d)
            losses.append(expert_info_nce(z_f, z_e, top1, q_keys, q_labels, temperature=temperature))
            keys = all_gather_varlen(z_e[torch.arange(len(top1), device=top1.device), top1].detach())
            key_labels = all_gather_varlen(top1)
        new_keys.append(keys.detach())
        new_labels.append(key_labels)
    return torch.stack(losses).mean(), (torch.stack(new_keys), torch.stack(new_labels)) if queue is not None else None


# ----------------------------------------------------------------------------------------------------------


def contrastive_loss(rec: RouterRecord, weight, views: str, heads: ContrastiveHeads | None,
                     queue: ExpertQueue | None, tokens_per_site: int = 256, *, temperature: float, debias: float,
                     generator=None):
    """(L_cl, new queue entries): L_cl the mean over sites of the reading ``views`` (the formulas above), over
    one forward's stacked record (S, B, T, ...) (``lora_moe.record_routing`` + ``stack_records``) and token
    weights (B, T) (1 real, 0 padding). ``queue``: None = no memory queue, else read here; the entries this
    micro-step adds, (keys (S, n, d), labels (S, n)) of every rank, are returned, not written: train.py enqueues
    a step's entries after its optimizer step, so every micro-step of a step reads the same queue. ``heads``: the
    head readings' projection heads (None for the sequence reading). ``debias``: --cl-debias's tau+, read by the
    routing readings (0 = plain InfoNCE; the head readings mask same-expert negatives instead)."""
    if views == "sequence":
        return sequence_loss(rec, weight, queue, tokens_per_site, temperature, debias, generator)
    if views == "assign":
        return assign_loss(rec, weight, queue, tokens_per_site, temperature, debias, generator)
    return head_loss(views, rec, weight, heads, queue, tokens_per_site, temperature, generator)

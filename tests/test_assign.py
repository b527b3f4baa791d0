"""The assign reading: the sequence reading's in-batch InfoNCE plus balanced Sinkhorn codes of the sequences'
fused views (the queue's past ones included, never as negatives), every token's routing trained toward its own
sequence's code."""
import numpy as np
import torch
import torch.nn.functional as F

from conftest import forward_records, tiny_adapted
from contrastive import contrastive_loss, sinkhorn
from expert_queue import ExpertQueue
from lora_moe import sites
from test_contrastive import reference_sequence_info_nce


def swav_sinkhorn(scores: np.ndarray, eps: float = 0.05, iters: int = 3) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp (Caron et al. 2020, ``distributed_sinkhorn``, one process), in float64:
    scores (N, K) -> codes (N, K), each row summing to 1."""
    q = np.exp(scores / eps).T  # (K, N)
    q /= q.sum()
    K, N = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdims=True)
        q /= K
        q /= q.sum(0, keepdims=True)
        q /= N
    return (q * N).T


def test_sinkhorn_equals_swav_and_ignores_invalid_rows():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(2, 9, 8, generator=g), dim=-1)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False  # e.g. empty queue slots
    got = sinkhorn(scores, valid)
    assert torch.allclose(got[0], torch.tensor(swav_sinkhorn(scores[0].double().numpy())).float(), atol=1e-5)
    assert torch.allclose(got[1, :6], torch.tensor(swav_sinkhorn(scores[1, :6].double().numpy())).float(), atol=1e-5)
    assert torch.equal(got[1, 6:], torch.zeros(3, 8))
    many = sinkhorn(scores, valid, iters=200)  # converged: every expert an equal share of the valid rows
    assert torch.allclose(many[0].sum(0), torch.full((8,), 9 / 8), atol=1e-3)
    assert torch.allclose(many[1].sum(0), torch.full((8,), 6 / 8), atol=1e-3)


def reference_assign(p, seq, q_keys, tau=0.1, eps=0.05):
    """The assign reading at one site, by hand: p (N, E) real tokens' routings (with gradient), seq (N,) their
    sequence; in-batch InfoNCE (no queue) + the code term, codes from the detached fused views of the sequences
    and the queue's filled keys."""
    E = p.shape[1]
    seqs = sorted(set(seq.tolist()))
    phi = torch.stack([F.normalize(p[seq == s].detach().mean(0) - 1 / E, dim=0) for s in seqs])
    rows = torch.cat([phi, q_keys]).double().numpy()
    code = torch.tensor(swav_sinkhorn(rows, eps)[:len(seqs)]).float()
    target = code[torch.tensor([seqs.index(s) for s in seq.tolist()])]
    nce = reference_sequence_info_nce(p, seq, torch.zeros(0, E), torch.zeros(0, dtype=torch.long), tau)
    return nce - (target * p.log()).sum(1).mean()


def test_assign_reading_equals_the_formula_end_to_end():
    """contrastive_loss(views="assign") over a real forward with padding and a half-filled queue = the formula
    by hand, loss and router gradient alike (the codes are targets: no gradient through them; the queue is no
    negative); it returns one fused view per sequence to enqueue."""
    model = tiny_adapted()
    S = len(sites(model))
    queue = ExpertQueue(S, size=10, dim=4)
    g = torch.Generator().manual_seed(3)
    keys = F.normalize(torch.rand(S, 5, 4, generator=g) - 0.25, dim=-1)
    queue.enqueue(keys, torch.randint(0, 4, (S, 5), generator=g))
    ids = torch.randint(0, 64, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding: neither an anchor nor part of its sequence's fused view
    routers = [m.router.weight for _, m in sites(model)]

    rec, _ = forward_records(model, ids)
    got, new = contrastive_loss(rec, mask.float(), "assign", None, queue, tokens_per_site=1000,
                                temperature=0.1, debias=0.0)
    got_grad = torch.autograd.grad(got, routers)
    rec, _ = forward_records(model, ids)
    keep, seq = mask.reshape(-1), torch.arange(3)[:, None].expand(3, 6).reshape(-1)[mask.reshape(-1)]
    q_keys = [queue.keys[i][queue.labels[i] >= 0] for i in range(S)]
    want = torch.stack([reference_assign(rec.probs[i].reshape(18, 4)[keep], seq, q_keys[i]) for i in range(S)]).mean()
    want_grad = torch.autograd.grad(want, routers)
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got_grad, want_grad))
    keys, labels = new
    assert keys.shape == (S, 3, 4) and torch.equal(labels, keys.argmax(-1))


def test_assign_reading_reads_only_filled_queue_slots():
    """An empty queue gives the in-batch loss exactly; filled entries change the codes (the queue is read)."""
    model = tiny_adapted()
    S = len(sites(model))
    rec, w = forward_records(model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)))
    queue = ExpertQueue(S, size=16, dim=4)
    in_batch, none = contrastive_loss(rec, w, "assign", None, None, temperature=0.07, debias=0.0)
    empty, (keys, labels) = contrastive_loss(rec, w, "assign", None, queue, temperature=0.07, debias=0.0)
    assert none is None and torch.allclose(empty, in_batch, atol=1e-6)
    queue.enqueue(F.normalize(torch.randn(S, 8, 4), dim=-1), torch.zeros(S, 8, dtype=torch.long))
    assert not torch.allclose(contrastive_loss(rec, w, "assign", None, queue,
                                               temperature=0.07, debias=0.0)[0], in_batch, atol=1e-3)


def test_assign_reading_sharpens_routing_toward_one_expert_per_sequence():
    """Routers only, gradient descent on the assign reading with a queue of past sequences: every token's
    top expert becomes its sequence's far more often, and routing sharpens."""
    model = tiny_adapted(E=4, k=1)
    S = len(sites(model))
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([m.router.weight for _, m in sites(model)], lr=2.0)
    queue = ExpertQueue(S, size=16, dim=4)

    def agreement_and_entropy():
        with torch.no_grad():
            rec, _ = forward_records(model, ids)
            own = rec.probs.mean(2).argmax(-1)  # (S, B): each sequence's top expert
            agree = (rec.probs.argmax(-1) == own[..., None]).float().mean().item()
            return agree, -(rec.probs * rec.probs.log()).sum(-1).mean().item()

    a0, h0 = agreement_and_entropy()
    for _ in range(40):
        opt.zero_grad()
        loss, entries = contrastive_loss(*forward_records(model, ids), "assign", None, queue,
                                         temperature=0.07, debias=0.0)
        loss.backward()
        opt.step()
        queue.enqueue(*entries)
    a1, h1 = agreement_and_entropy()
    assert a1 > a0 + 0.3 and h1 < h0 - 0.2  # 0.42 -> 0.79, 1.31 -> 1.05

"""The expert contrastive term (contrastive.py): the formula by hand, debiasing, padding, what it teaches the
routers, and its independence of how a step is split over ranks and micro-steps."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import forward_records, tiny_adapted
from contrastive import contrastive_loss, debiased_nce, fused_views, routing_view
from expert_queue import ExpertQueue
from lora_moe import sites
from test_expert_queue import filled

HERE = os.path.dirname(os.path.abspath(__file__))


def reference_sequence_info_nce(p, seq, qk, ql, tau, tau_plus=0.0):
    """Hand-written from the formula, one token at a time: rho_t = (p_t - 1/E) / |p_t - 1/E|, phi_s = the same
    of the mean of p over sequence s; positive phi_seq(t), then every other sequence's phi, then every queue
    entry (keys qk, labels ql) whose label is not the top expert of phi_seq(t). tau_plus > 0: Chuang et al.'s
    debiased loss, -log(e+ / (e+ + N g)), g = max((mean of the N negatives' e - tau+ e+) / (1 - tau+), e^(-1/tau))."""
    E = p.shape[1]
    seqs = sorted(set(seq.tolist()))
    phi = {s: F.normalize(p[seq == s].mean(0) - 1 / E, dim=0) for s in seqs}
    losses = []
    for t in range(p.shape[0]):
        rho = (p[t] - 1 / E) / (p[t] - 1 / E).norm()
        cols = [rho @ phi[int(seq[t])] / tau] + [rho @ phi[s] / tau for s in seqs if s != int(seq[t])]
        cols += [rho @ qk[j] / tau for j in range(qk.shape[0]) if ql[j] != phi[int(seq[t])].argmax()]
        logits = torch.stack(cols)
        if tau_plus == 0:
            losses.append(-(logits[0] - logits.logsumexp(0)))
            continue
        e_pos, e_neg = logits[0].exp(), logits[1:].exp()
        g = max((e_neg.mean() - tau_plus * e_pos) / (1 - tau_plus), torch.tensor(1 / tau).neg().exp())
        losses.append(-torch.log(e_pos / (e_pos + len(e_neg) * g)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("debias", [0.0, 0.3])
def test_contrastive_loss_equals_the_formula_end_to_end(debias):
    """contrastive_loss over a real forward with padding and context routers = the formula by hand from p alone
    (over real tokens, sequences numbered by batch row), with a queue, plain and debiased (--cl-debias); a push
    enqueues one phi per sequence."""
    model = tiny_adapted(router="context")
    S = len(sites(model))
    queue = ExpertQueue(S, size=10, dim=4)
    g = torch.Generator().manual_seed(3)
    queue.enqueue(F.normalize(torch.rand(S, 5, 4, generator=g), dim=-1), torch.randint(0, 4, (S, 5), generator=g))
    ids = torch.randint(0, 64, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding (right, as train.py pads): neither an anchor nor part of its sequence's phi
    rec, _ = forward_records(model, ids)  # right padding needs no attention mask
    weight = mask.float()
    keep, seq = mask.reshape(-1), torch.arange(3)[:, None].expand(3, 6).reshape(-1)[mask.reshape(-1)]
    probs = [rec.probs[i].reshape(18, 4)[keep] for i in range(S)]
    want = torch.stack([reference_sequence_info_nce(p, seq, *filled(queue, i), 0.1, debias)
                        for i, p in enumerate(probs)]).mean()
    got = contrastive_loss(rec, weight, queue.negatives(), tokens_per_site=1000, temperature=0.1, debias=debias)
    assert torch.allclose(got.loss, want, atol=1e-5)
    queue.push([got.fused])
    keys, labels = filled(queue, 0)
    assert keys.shape == (8, 4) and torch.allclose(keys[-3:].norm(dim=-1), torch.ones(3))
    phi1 = F.normalize(probs[0][seq == 1].mean(0) - 0.25, dim=0)
    assert torch.allclose(keys[-2], phi1, atol=1e-6) and labels[-2] == phi1.argmax()


def test_debiased_loss_at_collapse_and_without_debias():
    """debiased_nce: every negative scored as the positive gives log(1 + N), as InfoNCE (collapse still costs);
    negatives far below the positive no longer count (the clamp: loss ~ 0); tau+ -> 0 is InfoNCE."""
    tau = 0.2
    same = torch.full((2, 1 + 3), 0.9 / tau)
    assert torch.allclose(debiased_nce(same, 0.125, tau), torch.full((2,), math.log(4)), atol=1e-5)
    far = torch.tensor([[1 / tau, 0.3 / tau, 0.3 / tau, float("-inf")]])  # 2 negatives at cos 0.3, one masked
    assert float(debiased_nce(far, 0.125, tau)) < 1e-3 < float(far.logsumexp(1) - far[:, 0])
    x = torch.randn(5, 1 + 4) / tau
    assert torch.allclose(debiased_nce(x, 1e-9, tau), x.logsumexp(1) - x[:, 0], atol=1e-5)
    # the clamp by hand: when mean e^s - tau+ e^s+ < 0, g is e^(-1/tau) exactly
    s_pos, negs = 1 / tau, [0.1 / tau, -0.5 / tau]
    assert sum(math.exp(v) for v in negs) / 2 - 0.125 * math.exp(s_pos) < 0
    want = math.log(math.exp(s_pos) + 2 * math.exp(-1 / tau)) - s_pos
    assert float(debiased_nce(torch.tensor([[s_pos, *negs]], dtype=torch.float64), 0.125, tau)) == pytest.approx(want, rel=1e-9)


def test_a_sequence_without_real_tokens_is_no_negative():
    """A micro-batch row that is all padding has no fused view: the loss equals the loss of the batch without it."""
    model = tiny_adapted()
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1] = False  # row 1: padding only
    kw = dict(tokens_per_site=1000, temperature=0.2, debias=0.0)
    rec, w = forward_records(model, ids, mask)
    with_empty = contrastive_loss(rec, w, **kw).loss
    rec2, w2 = forward_records(model, ids[[0, 2]])
    assert torch.allclose(with_empty, contrastive_loss(rec2, w2, **kw).loss, atol=1e-6)


def test_sequence_reading_routes_each_sequence_alike_and_sequences_apart():
    """Gradient descent on the sequence reading alone, routers only: a token's routing moves toward its own
    sequence's mean routing and away from the other sequences' (the gap of the two cosines widens)."""
    model = tiny_adapted(E=4, k=1)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    routers = [m.router.weight for _, m in sites(model)]
    opt = torch.optim.SGD(routers, lr=2.0)

    def within_and_between():
        with torch.no_grad():
            rec, weight = forward_records(model, ids)
            phi = fused_views(rec.probs, weight).phi  # (S, B, E)
            sim = routing_view(rec.probs).flatten(1, 2) @ phi.transpose(1, 2)  # (S, B*T, B)
            own = (torch.arange(4)[:, None].expand(4, 12).reshape(-1)[:, None] == torch.arange(4)).expand_as(sim)
        return sim[own].mean().item(), sim[~own].mean().item()

    (w0, b0) = within_and_between()
    for _ in range(30):
        opt.zero_grad()
        contrastive_loss(*forward_records(model, ids), tokens_per_site=1000, temperature=0.1,
                         debias=0.0).loss.backward()
        opt.step()
    w1, b1 = within_and_between()
    assert w1 >= w0 and (w1 - b1) > (w0 - b0) + 0.15


def test_gradients_reach_the_routers_but_not_the_queue():
    model = tiny_adapted(router="context")
    queue = ExpertQueue(len(sites(model)), size=32, dim=4)
    ids = torch.randint(0, 64, (2, 10))
    kw = dict(tokens_per_site=256, temperature=0.1, debias=0.125)
    queue.push([contrastive_loss(*forward_records(model, ids), **kw).fused])
    with torch.no_grad():
        for _, m in sites(model):
            m.router_ctx.normal_(0, 0.1)
    contrastive_loss(*forward_records(model, ids), queue.negatives(), **kw).loss.backward()
    for _, m in sites(model):
        assert m.router.weight.grad.abs().sum() > 0 and m.router_ctx.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in queue.buffers())


def test_padding_never_enters_and_sampling_bounds_tokens():
    """Padding is neither an anchor nor in its sequence's view, so changing the padded tokens' ids changes
    nothing; with 5 tokens sampled per site the loss is another estimate of the same quantity."""
    model = tiny_adapted()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    kw = dict(temperature=0.07, debias=0.0)
    full = contrastive_loss(*forward_records(model, ids, mask), tokens_per_site=1000, **kw).loss
    other = ids.clone()
    other[0, :4] = (other[0, :4] + 5) % 64
    assert torch.allclose(contrastive_loss(*forward_records(model, other, mask), tokens_per_site=1000, **kw).loss, full)
    rec, w = forward_records(model, ids, mask)
    assert not torch.allclose(contrastive_loss(rec, torch.ones_like(w), tokens_per_site=1000, **kw).loss, full)
    few = contrastive_loss(*forward_records(model, ids, mask), tokens_per_site=5, generator=torch.Generator().manual_seed(0),
                           **kw).loss
    assert torch.isfinite(few) and not torch.allclose(few, full)


def test_two_process_gloo_equals_one_process(tmp_path):
    """2 ranks x 2 sequences == 1 process x 2 micro-steps of 2 (the negatives are the micro-batch's own sequences
    and the queue, so a step's loss does not depend on ranks vs accumulation); the queue identical on both
    ranks and equal to the 1-process queue (a step's views are pushed after it, in the order of the pieces)."""
    sys.path.insert(0, HERE)
    import dist_contrastive

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",  # meanwhile:
                              "--master_port=29531", os.path.join(HERE, "dist_contrastive.py"), str(tmp_path)], env=env)
    single_losses, single_q = dist_contrastive.run(micro=2)
    assert ranks.wait(timeout=300) == 0
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # why a looser bound after 4 steps: the view normalizes p - 1/E, whose norm is ~0.03 for near-uniform
    # routers, so float reordering (one batch of 4 vs 2 + 2) grows ~30x per step at this lr (measured: 2e-7 at
    # step 1, 4e-5 in the loss and 1.8e-4 in the queue at step 4); step 1 stays tight
    for k in single_q:
        assert torch.equal(r0["queues"][k], r1["queues"][k]), k  # identical on both ranks
        assert torch.allclose(r0["queues"][k].float(), single_q[k].float(), atol=1e-3), k
    assert torch.allclose(torch.tensor(r0["losses"][0]), torch.tensor(single_losses[0]), rtol=1e-6, atol=1e-6)
    assert torch.allclose(torch.tensor(r0["losses"]), torch.tensor(single_losses), atol=1e-3)
    assert single_losses[-1][1] != single_losses[0][1]  # the steps really changed something

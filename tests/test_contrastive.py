"""Expert contrastive loss and the expert memory queue."""
import functools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import forward_records, tiny_adapted
from contrastive import ROUTING_VIEWS, contrastive_loss, debiased_nce, info_nce, make_heads
from expert_queue import ExpertQueue
from lora_moe import sites

HERE = os.path.dirname(os.path.abspath(__file__))


def filled(q: ExpertQueue, site: int = 0):
    """One site's filled entries, oldest first: (keys (m, d), labels (m,))."""
    order = (q.ptr + torch.arange(q.size)) % q.size
    keys, labels = q.keys[site, order], q.labels[site, order]
    return keys[labels >= 0], labels[labels >= 0]


def test_ring_buffer_fifo_and_wraparound():
    q = ExpertQueue(2, size=5, dim=2)
    assert filled(q)[0].shape == (0, 2)
    v = lambda a, b: (torch.arange(a, b).float()[None, :, None].repeat(2, 1, 2),  # noqa: E731
                      torch.arange(a, b)[None].repeat(2, 1))
    q.enqueue(*v(0, 3))
    assert filled(q)[1].tolist() == [0, 1, 2] and int(q.ptr) == 3
    q.enqueue(*v(3, 6))  # 3 more into 5 slots: wraps, 0 is evicted
    assert filled(q)[1].tolist() == [1, 2, 3, 4, 5] and int(q.ptr) == 1
    assert torch.equal(filled(q, 1)[0][:, 0], torch.tensor([1.0, 2, 3, 4, 5]))
    q.enqueue(*v(6, 18))  # a batch larger than K: only the newest 5 survive
    assert filled(q)[1].tolist() == [13, 14, 15, 16, 17]
    size = sum(b.numel() for b in q.buffers())
    for i in range(200):
        q.enqueue(*v(i, i + 7))
    assert sum(b.numel() for b in q.buffers()) == size == 2 * 5 * (2 + 1) + 1  # S*K*(d+1) + the pointer
    keys, labels = q.contents()
    keys += 1  # a copy: what a loss read cannot change under it
    assert not torch.equal(keys, q.keys)


def test_queue_state_dict_roundtrip():
    q = ExpertQueue(3, size=7, dim=4)
    q.enqueue(torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5)))
    fresh = ExpertQueue(3, size=7, dim=4)
    fresh.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q.buffers(), fresh.buffers()))
    assert q.nbytes() == 3 * (7 * 4 * 4 + 7 * 8) + 8


def reference_info_nce(z_r, labels, keys, key_labels, qk, ql, tau):
    """Hand-written, one anchor at a time: positive first, then every different-expert key, then queue."""
    losses = []
    for i in range(z_r.shape[0]):
        cols = [z_r[i] @ keys[i] / tau]
        cols += [z_r[i] @ keys[j] / tau for j in range(keys.shape[0]) if key_labels[j] != labels[i]]
        cols += [z_r[i] @ qk[j] / tau for j in range(qk.shape[0]) if ql[j] != labels[i]]
        logits = torch.stack(cols)
        losses.append(-(logits[0] - logits.logsumexp(0)))
    return torch.stack(losses).mean()


def test_info_nce_equals_hand_reference():
    g = torch.Generator().manual_seed(0)
    z_r = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    keys = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    qk = F.normalize(torch.randn(9, 8, generator=g), dim=-1)
    ql = torch.tensor([0, 0, 1, 2, 3, 3, 1, 0, 2])
    got = info_nce(z_r, labels, keys, labels, qk, ql, temperature=0.07)
    assert torch.allclose(got, reference_info_nce(z_r, labels, keys, labels, qk, ql, 0.07), atol=1e-5)
    # same-expert keys are masked: a loss that counted them would be larger
    unmasked = F.cross_entropy(torch.cat([z_r @ keys.T, z_r @ qk.T], 1) / 0.07, torch.arange(6))
    assert not torch.allclose(got, unmasked, atol=1e-3)


def test_info_nce_finite_edge_cases():
    z = F.normalize(torch.randn(4, 8), dim=-1)
    one = torch.zeros(4, dtype=torch.long)  # every token on one expert, empty queue: no negatives
    assert info_nce(z, one, z, one, None, None, temperature=0.07).item() == 0.0
    empty_q = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert torch.isfinite(info_nce(z, torch.arange(4), z, torch.arange(4), *empty_q, temperature=0.07))


def test_gradients_reach_heads_routers_and_A_but_not_the_queue():
    model = tiny_adapted()
    heads = make_heads(model, dim=16)
    queue = ExpertQueue(len(sites(model)), size=32, dim=16)
    ids = torch.randint(0, 64, (2, 10))
    _, new = contrastive_loss(*forward_records(model, ids, expert_acts=True), "mixture", heads, queue,
                              temperature=0.1, debias=0.0)
    queue.enqueue(*new)
    loss, new = contrastive_loss(*forward_records(model, ids, expert_acts=True), "mixture", heads, queue,
                                 temperature=0.1, debias=0.0)
    queue.enqueue(*new)
    loss.backward()
    for _, m in sites(model):
        assert m.router.weight.grad.abs().sum() > 0
        assert m.lora_A.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert not any(b.requires_grad for b in queue.buffers())
    assert int((queue.labels >= 0).sum()) == 32 * len(sites(model))  # 2 steps x 20 tokens fill K=32


@pytest.mark.parametrize("views", ["mixture", "sequence"])
def test_padding_never_enters_and_sampling_bounds_tokens(views):
    """Head readings: one key per real token is enqueued (16 = 20 - 4 padding), at most tokens_per_site. Sequence
    reading: padding is neither an anchor nor in its sequence's view, so changing the padded tokens' ids
    changes nothing; with 5 tokens sampled per site the loss is another estimate of the same quantity."""
    model = tiny_adapted()
    heads = make_heads(model, dim=16)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    dim = 16 if views == "mixture" else 4
    queue = ExpertQueue(len(sites(model)), size=100, dim=dim)
    acts = views == "mixture"
    full, new = contrastive_loss(*forward_records(model, ids, mask, acts), views, heads, queue,
                                 temperature=0.07, debias=0.0)
    queue.enqueue(*new)
    if views == "mixture":
        assert int((queue.labels >= 0).sum()) == 16 * len(sites(model))
    else:
        assert int((queue.labels >= 0).sum()) == 2 * len(sites(model))  # one fused view per sequence
        other = ids.clone()
        other[0, :4] = (other[0, :4] + 5) % 64
        in_batch = functools.partial(contrastive_loss, views=views, heads=None, queue=None, temperature=0.07,
                                     debias=0.0)
        again = in_batch(*forward_records(model, other, mask))[0]
        assert torch.allclose(again, in_batch(*forward_records(model, ids, mask))[0])
        rec, w = forward_records(model, ids, mask)
        assert not torch.allclose(in_batch(rec, torch.ones_like(w))[0], again)
    queue = ExpertQueue(len(sites(model)), size=100, dim=dim)
    gen = torch.Generator().manual_seed(0)
    few, new = contrastive_loss(*forward_records(model, ids, mask, acts), views, heads, queue, tokens_per_site=5,
                                temperature=0.07, debias=0.0, generator=gen)
    queue.enqueue(*new)
    if views == "mixture":
        assert int((queue.labels >= 0).sum()) == 5 * len(sites(model))
    assert torch.isfinite(few) and not torch.allclose(few, full)


@pytest.mark.parametrize("views, momentum", [("mixture", 0.0), ("expert", 0.9), ("sequence", 0.0), ("assign", 0.0)])
def test_two_process_gloo_equals_one_process(tmp_path, views, momentum):
    """2 ranks x 2 sequences == 1 process: x 4 for the head readings (their keys are gathered over ranks), x 2
    micro-steps of 2 for the routing readings (their negatives and codes are the micro-batch's own sequences
    and the queue, so a step's loss does not depend on ranks vs accumulation); queues identical on both ranks
    and equal to the 1-process queue (a step's entries are written after it, in the order of the pieces)."""
    routing = views in ROUTING_VIEWS
    sys.path.insert(0, HERE)
    import dist_contrastive

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",  # meanwhile:
                              "--master_port=29531", os.path.join(HERE, "dist_contrastive.py"), str(tmp_path), views,
                              str(momentum)], env=env)
    single_losses, single_q = dist_contrastive.run(views=views, momentum=momentum,
                                                   micro=2 if routing else 1)
    assert ranks.wait(timeout=300) == 0
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # why a looser bound after 4 steps for the sequence reading: it normalizes p - 1/E, whose norm is ~0.03 for
    # near-uniform routers, so float reordering (one batch of 4 vs 2 + 2) grows ~30x per step at this lr
    # (measured: 2e-7 at step 1, 4e-5 in the loss and 1.8e-4 in the queue at step 4); step 1 stays tight
    tol = 1e-3 if routing else 1e-5
    for k in single_q:
        assert torch.equal(r0["queues"][k], r1["queues"][k]), k  # identical on both ranks
        assert torch.allclose(r0["queues"][k].float(), single_q[k].float(), atol=tol), k
    assert torch.allclose(torch.tensor(r0["losses"][0]), torch.tensor(single_losses[0]), rtol=1e-6, atol=1e-6)
    assert torch.allclose(torch.tensor(r0["losses"]), torch.tensor(single_losses), atol=tol)
    assert single_losses[-1][1] != single_losses[0][1]  # the steps really changed something


def reference_expert_info_nce(z_f, z_e, labels, qk, ql, tau):
    """Hand-written from the formula, one token at a time: positive z_e[t, e*], then the token's other
    experts' views, then queue keys of other experts."""
    losses = []
    for t in range(z_f.shape[0]):
        e_star = int(labels[t])
        cols = [z_f[t] @ z_e[t, e_star] / tau]
        cols += [z_f[t] @ z_e[t, e] / tau for e in range(z_e.shape[1]) if e != e_star]
        cols += [z_f[t] @ qk[j] / tau for j in range(qk.shape[0]) if ql[j] != e_star]
        logits = torch.stack(cols)
        losses.append(-(logits[0] - logits.logsumexp(0)))
    return torch.stack(losses).mean()


def test_expert_info_nce_equals_hand_reference():
    from contrastive import expert_info_nce

    g = torch.Generator().manual_seed(0)
    z_f = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    z_e = F.normalize(torch.randn(5, 4, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 3, 1, 1, 2])
    qk = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    ql = torch.tensor([0, 1, 1, 2, 3, 3, 0])
    got = expert_info_nce(z_f, z_e, labels, qk, ql, temperature=0.1)
    assert torch.allclose(got, reference_expert_info_nce(z_f, z_e, labels, qk, ql, 0.1), atol=1e-5)


@pytest.mark.parametrize("views, momentum", [("mixture", 0.0), ("mixture", 0.9), ("expert", 0.0), ("expert", 0.9)])
def test_contrastive_loss_equals_the_formula_end_to_end(views, momentum):
    """contrastive_loss over a real forward = the docstring's formula computed by hand from u_e, p, g and the
    heads (the EMA key heads for the keys when momentum > 0), with a queue holding other labels."""
    model = tiny_adapted()
    heads = make_heads(model, dim=16, momentum=momentum)
    if momentum:
        with torch.no_grad():  # key heads != query heads, so using the wrong one shows
            for p in heads.key.parameters():
                p.add_(0.1 * torch.randn_like(p))
    S = len(sites(model))
    queue = ExpertQueue(S, size=10, dim=16)
    g = torch.Generator().manual_seed(3)  # 8 entries of other labels, 2 slots left empty
    queue.enqueue(F.normalize(torch.randn(S, 8, 16, generator=g), dim=-1), torch.randint(0, 4, (S, 8), generator=g))
    rec, weight = forward_records(model, torch.randint(0, 64, (2, 6)), expert_acts=True)
    got, _ = contrastive_loss(rec, weight, views, heads, queue, tokens_per_site=1000, temperature=0.1, debias=0.0)
    key_head = heads.key if momentum else heads.query
    want = []
    for i in range(S):
        u, p, gates, top1 = (rec.expert_acts[i].reshape(12, 4, 4), rec.probs[i].reshape(12, 4),
                             rec.gates[i].reshape(12, 4), rec.topk_idx[i, ..., 0].reshape(12))
        qk, ql = filled(queue, i)
        fused = (p[:, :, None] * u).sum(1)
        if views == "expert":
            want.append(reference_expert_info_nce(heads.query[i](fused), key_head[i](u), top1, qk, ql, 0.1))
        else:
            z_r, z_f = heads.query[i]((gates[:, :, None] * u).sum(1)), key_head[i](fused)
            want.append(reference_info_nce(z_r, top1, z_f, top1, qk, ql, 0.1))
    assert torch.allclose(got, torch.stack(want).mean(), atol=1e-5)


def test_expert_reading_sharpens_the_router_toward_its_choice():
    """Gradient descent on the expert reading alone, routers only: the top-1 probability rises."""
    model = tiny_adapted(E=4, k=1)
    heads = make_heads(model, dim=16)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    routers = [m.router.weight for _, m in sites(model)]
    opt = torch.optim.SGD(routers, lr=0.5)

    def top1_prob():
        return forward_records(model, ids)[0].probs.max(-1).values.mean()

    before = top1_prob().item()
    for _ in range(20):
        opt.zero_grad()
        contrastive_loss(*forward_records(model, ids, expert_acts=True), "expert", heads, None,
                         temperature=0.1, debias=0.0)[0].backward()
        opt.step()
    assert top1_prob().item() > before + 0.05


def test_momentum_update_of_the_key_heads():
    model = tiny_adapted()
    heads = make_heads(model, dim=16, momentum=0.9)
    assert all(not p.requires_grad for p in heads.key.parameters())
    old = [p.clone() for p in heads.key.parameters()]
    with torch.no_grad():
        for p in heads.query.parameters():
            p.add_(1.0)
    heads.update_keys()
    for k, o, q in zip(heads.key.parameters(), old, heads.query.parameters()):
        assert torch.allclose(k, 0.9 * o + 0.1 * q, atol=1e-6)
    assert make_heads(model, dim=16).key is None  # momentum 0: no copy, keys from the heads themselves


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
def test_sequence_reading_equals_the_formula_end_to_end(debias):
    """contrastive_loss(views="sequence") over a real forward with padding = the formula by hand from p alone
    (over real tokens, sequences numbered by batch row), with a queue, plain and debiased (--cl-debias); it
    enqueues one phi per sequence."""
    model = tiny_adapted()
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
    got, new = contrastive_loss(rec, weight, "sequence", None, queue, tokens_per_site=1000, temperature=0.1,
                                debias=debias)
    assert torch.allclose(got, want, atol=1e-5)
    queue.enqueue(*new)
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


def test_sequence_reading_routes_each_sequence_alike_and_sequences_apart():
    """Gradient descent on the sequence reading alone, routers only: a token's routing moves toward its own
    sequence's mean routing and away from the other sequences' (the gap of the two cosines widens)."""
    from contrastive import routing_view, sequence_views

    model = tiny_adapted(E=4, k=1)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    routers = [m.router.weight for _, m in sites(model)]
    opt = torch.optim.SGD(routers, lr=2.0)

    def within_and_between():
        with torch.no_grad():
            rec, weight = forward_records(model, ids)
            phi, _ = sequence_views(rec.probs, weight)  # (S, B, E)
            sim = routing_view(rec.probs).flatten(1, 2) @ phi.transpose(1, 2)  # (S, B*T, B)
            own = (torch.arange(4)[:, None].expand(4, 12).reshape(-1)[:, None] == torch.arange(4)).expand_as(sim)
        return sim[own].mean().item(), sim[~own].mean().item()

    (w0, b0) = within_and_between()
    for _ in range(30):
        opt.zero_grad()
        contrastive_loss(*forward_records(model, ids), "sequence", None, None,
                         temperature=0.1, debias=0.0)[0].backward()
        opt.step()
    w1, b1 = within_and_between()
    assert w1 >= w0 and (w1 - b1) > (w0 - b0) + 0.15


def test_the_loss_reads_the_queue_and_returns_what_to_enqueue():
    """The loss does not write the queue: with an empty one it equals the in-batch-only loss, and the queue is
    still empty after it; the returned entries (one key per real token, every site), once enqueued, are
    negatives of the next call (train.py writes them after the optimizer step)."""
    from conftest import forward_records
    from contrastive import contrastive_loss, make_heads
    from expert_queue import ExpertQueue
    from lora_moe import sites

    model = tiny_adapted()
    heads = make_heads(model, dim=16)
    rec, w = forward_records(model, torch.randint(0, 64, (2, 10)), expert_acts=True)
    queue = ExpertQueue(len(sites(model)), size=64, dim=16)
    with_queue, (keys, labels) = contrastive_loss(rec, w, "mixture", heads, queue, temperature=0.1, debias=0.0)
    in_batch, none = contrastive_loss(rec, w, "mixture", heads, None, temperature=0.1, debias=0.0)
    assert torch.allclose(with_queue, in_batch) and none is None
    assert int((queue.labels >= 0).sum()) == 0 and keys.shape == (len(sites(model)), 20, 16)
    queue.enqueue(keys, labels)
    assert not torch.allclose(contrastive_loss(rec, w, "mixture", heads, queue,
                                               temperature=0.1, debias=0.0)[0], in_batch)

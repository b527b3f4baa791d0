"""Expert contrastive loss and the expert memory queue."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from contrastive import contrastive_loss, info_nce, make_heads
from expert_queue import ExpertQueue, ExpertQueues
from lora_moe import LoRAMoEConfig, add_lora_moe, record_expert_acts, router_records, sites
from model import Qwen3, Qwen3Config, init_weights

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ring_buffer_fifo_and_wraparound():
    q = ExpertQueue(size=5, dim=2)
    assert q.contents()[0].shape == (0, 2)
    v = lambda a, b: (torch.arange(a, b).float()[:, None].repeat(1, 2), torch.arange(a, b))  # noqa: E731
    q.enqueue(*v(0, 3))
    assert q.contents()[1].tolist() == [0, 1, 2] and int(q.ptr) == 3
    q.enqueue(*v(3, 6))  # 3 more into 5 slots: wraps, 0 is evicted
    assert q.contents()[1].tolist() == [1, 2, 3, 4, 5] and int(q.ptr) == 1
    assert torch.equal(q.contents()[0][:, 0], torch.tensor([1.0, 2, 3, 4, 5]))
    q.enqueue(*v(6, 18))  # a batch larger than K: only the newest 5 survive
    assert q.contents()[1].tolist() == [13, 14, 15, 16, 17]
    size = sum(b.numel() for b in q.buffers())
    for i in range(200):
        q.enqueue(*v(i, i + 7))
    assert sum(b.numel() for b in q.buffers()) == size == 5 * (2 + 1) + 1  # K*(d+1) + the pointer


def test_queue_state_dict_roundtrip():
    qs = ExpertQueues(3, size=7, dim=4)
    for i in range(3):
        qs[i].enqueue(torch.randn(5 + i, 4), torch.randint(0, 4, (5 + i,)))
    fresh = ExpertQueues(3, size=7, dim=4)
    fresh.load_state_dict(qs.state_dict())
    for a, b in zip(qs.queues, fresh.queues):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.labels, b.labels) and torch.equal(a.ptr, b.ptr)
    assert qs.nbytes() == 3 * (7 * 4 * 4 + 7 * 8 + 8)


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
    assert info_nce(z, one, z, one, None, None).item() == 0.0
    empty_q = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert torch.isfinite(info_nce(z, torch.arange(4), z, torch.arange(4), *empty_q))


def tiny_adapted(E=4, k=2):
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = init_weights(Qwen3(cfg), seed=0)
    torch.manual_seed(0)
    add_lora_moe(model, LoRAMoEConfig(num_experts=E, rank=4, top_k=k, dropout=0.0), verbose=False)
    record_expert_acts(model, True)
    return model


def test_gradients_reach_heads_routers_and_A_but_not_the_queue():
    model = tiny_adapted()
    heads = make_heads(model, dim=16)
    queues = ExpertQueues(len(sites(model)), size=32, dim=16)
    ids = torch.randint(0, 64, (2, 10))
    model(ids)
    contrastive_loss(router_records(model), heads, queues, temperature=0.1)  # fills the queues
    model(ids)
    loss = contrastive_loss(router_records(model), heads, queues, temperature=0.1)
    loss.backward()
    for _, m in sites(model):
        assert m.router.weight.grad.abs().sum() > 0
        assert m.lora_A.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert not any(b.requires_grad for b in queues.buffers())
    assert all(int((q.labels >= 0).sum()) == 32 for q in queues.queues)  # 2 steps x 20 tokens fill K=32


def test_padding_never_enters_and_sampling_bounds_tokens():
    model = tiny_adapted()
    heads = make_heads(model, dim=16)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    queues = ExpertQueues(len(sites(model)), size=100, dim=16)
    model(ids, attention_mask=mask.long())
    contrastive_loss(router_records(model, mask), heads, queues)
    assert all(int((q.labels >= 0).sum()) == 16 for q in queues.queues)  # 20 tokens - 4 padding
    queues = ExpertQueues(len(sites(model)), size=100, dim=16)
    contrastive_loss(router_records(model, mask), heads, queues, tokens_per_site=5)
    assert all(int((q.labels >= 0).sum()) == 5 for q in queues.queues)


def test_two_process_gloo_equals_one_process(tmp_path):
    sys.path.insert(0, HERE)
    import dist_contrastive

    single_losses, single_q = dist_contrastive.run()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    os.path.join(HERE, "dist_contrastive.py"), str(tmp_path)], check=True, env=env, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in single_q:
        assert torch.equal(r0["queues"][k], r1["queues"][k]), k  # identical on both ranks
        assert torch.allclose(r0["queues"][k].float(), single_q[k].float(), atol=1e-5), k
    assert torch.allclose(torch.tensor(r0["losses"]), torch.tensor(single_losses), atol=1e-5)
    assert single_losses[-1][1] != single_losses[0][1]  # the steps really changed something

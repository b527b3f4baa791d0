"""The expert memory queue: a bounded FIFO of fused views (what goes in, when, and how it is read)."""
import torch
import torch.nn.functional as F

from conftest import forward_records, tiny_adapted
from contrastive import FusedViews, contrastive_loss
from expert_queue import ExpertQueue
from lora_moe import sites


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
    keys, labels = q.negatives()
    keys += 1  # a copy: what a loss read cannot change under it
    assert not torch.equal(keys, q.keys)


def test_queue_state_dict_roundtrip():
    q = ExpertQueue(3, size=7, dim=4)
    q.enqueue(torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5)))
    fresh = ExpertQueue(3, size=7, dim=4)
    fresh.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q.buffers(), fresh.buffers()))
    assert q.nbytes() == 3 * (7 * 4 * 4 + 7 * 8) + 8


def test_push_writes_a_steps_fused_views_in_order_with_their_top_expert():
    """A step's micro-steps go in oldest first; each row's label is its top expert, -1 for a row without real
    tokens (an empty slot, never read)."""
    q = ExpertQueue(2, size=8, dim=4)
    g = torch.Generator().manual_seed(0)
    a = FusedViews(F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1), torch.tensor([True, False, True]))
    b = FusedViews(F.normalize(torch.randn(2, 2, 4, generator=g), dim=-1), torch.tensor([True, True]))
    q.push([a, b])
    assert int(q.ptr) == 5
    assert torch.equal(q.keys[:, :5], torch.cat([a.phi, b.phi], 1))
    want = torch.cat([a.phi.argmax(-1), b.phi.argmax(-1)], 1)
    want[:, 1] = -1
    assert torch.equal(q.labels[:, :5], want) and (q.labels[:, 5:] == -1).all()


def test_the_loss_reads_the_queue_and_never_writes_it():
    """With an empty queue the loss equals the in-batch loss and the queue stays empty; once the micro-batch's
    fused views are pushed (train.py: after the optimizer step), they are negatives of the next call."""
    model = tiny_adapted()
    rec, w = forward_records(model, torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1)))
    queue = ExpertQueue(len(sites(model)), size=64, dim=4)
    kw = dict(tokens_per_site=1000, temperature=0.1, debias=0.0)
    with_queue = contrastive_loss(rec, w, queue.negatives(), **kw)
    in_batch = contrastive_loss(rec, w, None, **kw)
    assert torch.equal(with_queue.loss, in_batch.loss)
    assert int((queue.labels >= 0).sum()) == 0 and with_queue.fused.phi.shape == (len(sites(model)), 3, 4)
    assert not with_queue.fused.phi.requires_grad
    queue.push([FusedViews(-with_queue.fused.phi, with_queue.fused.present)])  # routed unlike the batch
    assert not torch.allclose(contrastive_loss(rec, w, queue.negatives(), **kw).loss, in_batch.loss)

"""Run by tests/test_contrastive.py: `torchrun --nproc_per_node=2 tests/dist_contrastive.py OUT` (gloo, CPU),
or imported and run in one process on the whole batch (the head readings: one micro-step, they gather over ranks;
the routing readings: two micro-steps, they compare within a micro-batch). Trains LM + contrastive (with the
queue) for a few steps with plain SGD, all-reducing gradients by hand, and saves losses and queues."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contrastive import ROUTING_VIEWS, contrastive_loss, make_heads  # noqa: E402
from expert_queue import ExpertQueue  # noqa: E402
from lora_moe import LoRAMoEConfig, add_lora_moe, record_routing, sites, stack_records  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from tiny_qwen import init_weights  # noqa: E402

STEPS, B, T = 4, 4, 6


def build(momentum=0.0, views="mixture"):
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = init_weights(Qwen3(cfg), seed=0)
    torch.manual_seed(0)
    add_lora_moe(model, LoRAMoEConfig(num_experts=4, rank=4, top_k=2, dropout=0.0), verbose=False)
    with torch.no_grad():
        for _, m in sites(model):
            m.lora_B.normal_(0, 0.05)
    if views in ROUTING_VIEWS:  # routings, no heads; the queue holds E = 4 dims; 6 > 4 per step
        return model, None, ExpertQueue(len(sites(model)), size=6, dim=4)
    heads = make_heads(model, dim=16, momentum=momentum)
    queues = ExpertQueue(len(sites(model)), size=40, dim=16)  # 40: the 2 ranks' 48 keys per step wrap it
    return model, heads, queues


def run(rank=0, world=1, views="mixture", momentum=0.0, micro=1):
    """Each rank its share of every step's batch, as ``micro`` micro-steps (gradients accumulated, the loss a
    mean over them); the queue's new entries are written after the step, as train.py does."""
    model, heads, queues = build(momentum, views)
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.query.parameters()) if heads else [])
    data = torch.randint(0, 64, (STEPS, B, T), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(STEPS):
        lm, cl, new = 0.0, 0.0, []
        for ids in data[step].chunk(world)[rank].chunk(micro):
            with record_routing(model, expert_acts=views not in ROUTING_VIEWS) as recs:
                logits = model(ids)
            lm_j = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)) / micro
            cl_j, entries = contrastive_loss(stack_records(recs), torch.ones(ids.shape), views, heads, queues,
                                             tokens_per_site=10_000, temperature=0.1, debias=0.0)
            (lm_j + 0.5 * cl_j / micro).backward()
            lm, cl, new = lm + lm_j.detach(), cl + cl_j.detach() / micro, new + [entries]
        with torch.no_grad():
            for p in params:
                if world > 1:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                p -= 0.5 * p.grad
                p.grad = None
            queues.enqueue(torch.cat([k for k, _ in new], 1), torch.cat([lab for _, lab in new], 1))
            if heads is not None:
                heads.update_keys()
            if world > 1:
                for t in (lm, cl):
                    dist.all_reduce(t)
                    t /= world
        losses.append([lm.item(), cl.item()])
    head_state = {f"heads.{k}": v for k, v in heads.state_dict().items()} if heads is not None else {}
    return losses, {**queues.state_dict(), **head_state}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    losses, q = run(r, w, sys.argv[2], float(sys.argv[3]))
    torch.save({"losses": losses, "queues": q}, os.path.join(sys.argv[1], f"rank{r}.pt"))
    dist.destroy_process_group()

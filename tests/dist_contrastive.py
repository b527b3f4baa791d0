"""Run by tests/test_contrastive.py: `torchrun --nproc_per_node=2 tests/dist_contrastive.py OUT` (gloo, CPU),
or imported and run in one process as 2 micro-steps per step. Trains LM + contrastive (with the expert memory
queue) for a few steps with plain SGD, all-reducing gradients by hand, and saves losses and the queue."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contrastive import contrastive_loss  # noqa: E402
from expert_queue import ExpertQueue  # noqa: E402
from lora_moe import LoRAMoEConfig, add_lora_moe, record_routing, sites, stack_records  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from tiny_qwen import init_weights  # noqa: E402

STEPS, B, T = 4, 4, 6


def build():
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = init_weights(Qwen3(cfg), seed=0)
    torch.manual_seed(0)
    add_lora_moe(model, LoRAMoEConfig(num_experts=4, rank=4, top_k=2, dropout=0.0), verbose=False)
    with torch.no_grad():
        for _, m in sites(model):
            m.lora_B.normal_(0, 0.05)
            m.router_ctx.normal_(0, 0.1)
    return model, ExpertQueue(len(sites(model)), size=6, dim=4)  # 6 slots, 4 sequences a step: it wraps


def run(rank=0, world=1, micro=1):
    """Each rank its share of every step's batch, as ``micro`` micro-steps (gradients accumulated, the loss a
    mean over them); the queue's new entries are pushed after the step, as train.py does."""
    model, queue = build()
    params = [p for p in model.parameters() if p.requires_grad]
    data = torch.randint(0, 64, (STEPS, B, T), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(STEPS):
        lm, cl, fused = 0.0, 0.0, []
        negatives = queue.negatives()
        for ids in data[step].chunk(world)[rank].chunk(micro):
            with record_routing(model) as recs:
                logits = model(ids)
            lm_j = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)) / micro
            c = contrastive_loss(stack_records(recs), torch.ones(ids.shape), negatives, tokens_per_site=10_000,
                                 temperature=0.1, debias=0.0)
            (lm_j + 0.5 * c.loss / micro).backward()
            lm, cl, fused = lm + lm_j.detach(), cl + c.loss.detach() / micro, fused + [c.fused]
        with torch.no_grad():
            for p in params:
                if world > 1:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                p -= 0.5 * p.grad
                p.grad = None
            queue.push(fused)
            if world > 1:
                for t in (lm, cl):
                    dist.all_reduce(t)
                    t /= world
        losses.append([lm.item(), cl.item()])
    return losses, queue.state_dict()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    losses, q = run(r, w)
    torch.save({"losses": losses, "queues": q}, os.path.join(sys.argv[1], f"rank{r}.pt"))
    dist.destroy_process_group()

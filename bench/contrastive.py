"""Cost of the expert contrastive loss: a training step with all three losses vs LM + balance only.

    python bench/contrastive.py [--layers 4] [--batch 2] [--seq 512] [--steps 2]

Same model and batch as bench/adapters.py (Qwen3-0.6B shape cut to 4 layers, LoRA-MoE E=8 r=8 top-2 on
all 7 projections, 2 x 512 tokens, fp32 CPU). The two main arms run in fresh processes for clean peak RSS;
the sweep over tokens_per_site and K runs in one process (time only).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from common import make_checkpoint, peak_rss_mb, run_isolated, table


ARMS = {  # name -> (contrastive on, reading, key-head momentum); the head readings with the queue (K = 1024)
    "base": (False, "mixture", 0.0), "full": (True, "mixture", 0.0),
    "full+momentum": (True, "mixture", 0.99), "expert+momentum": (True, "expert", 0.99),
    "sequence": (True, "sequence", 0.0)}  # train.py's default: routings only, no heads, no queue


def setup(path, layers, momentum=0.0):
    from contrastive import make_heads
    from lora_moe import LoRAMoEConfig, add_lora_moe, record_expert_acts, sites
    from model import load_model

    torch.manual_seed(0)
    model = add_lora_moe(load_model(path), LoRAMoEConfig(num_experts=8, rank=8, alpha=16, top_k=2, dropout=0.0), verbose=False)
    model.train()
    record_expert_acts(model, True)
    return model, make_heads(model, 64, momentum), len(sites(model))


def step_fn(model, heads, ids, cl_on, K=1024, tps=256, views="mixture"):
    from contrastive import contrastive_loss
    from expert_queue import ExpertQueues
    from lora_moe import balance_loss, record_expert_acts, router_records, sites

    seq = views == "sequence"
    record_expert_acts(model, cl_on and not seq)
    queues = None if seq else ExpertQueues(len(sites(model)), size=K, dim=64)
    heads = None if seq else heads
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.query.parameters()) if heads else [])

    def step():
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        records = router_records(model)
        loss = loss + 0.01 * balance_loss(records)
        if cl_on:
            loss = loss + 0.1 * contrastive_loss(records, heads, queues, tokens_per_site=tps, temperature=0.07,
                                                 views=views)
        loss.backward()
        for p in params:
            p.grad = None
        if heads is not None:
            heads.update_keys()
    return step, queues


def timed(step, steps):
    step()  # warmup (also fills the queue once)
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    ids = torch.randint(0, 151936, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    if a.arm in ARMS:
        cl_on, views, momentum = ARMS[a.arm]
        model, heads, _ = setup(path, a.layers, momentum)
        step, queues = step_fn(model, heads, ids, cl_on, views=views)
        t = timed(step, a.steps)
        print(json.dumps({"time": t, "peak_mb": peak_rss_mb(), "queue_bytes": queues.nbytes() if queues else 0}))
        return
    res = {}
    for arm in ARMS:
        code = (f"import sys; sys.argv={[__file__, '--arm', arm, '--layers', str(a.layers), '--batch', str(a.batch), '--seq', str(a.seq), '--steps', str(a.steps), '--dir', a.dir]!r}\n"
                f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')")
        res[arm] = json.loads(run_isolated(code).strip().splitlines()[-1])
        print(f"  {arm}: {res[arm]['time']:.2f} s/step, peak {res[arm]['peak_mb']:.0f} MB", file=sys.stderr)
    b = res["base"]
    print(f"Qwen3-0.6B shape, {a.layers} layers, LoRA-MoE E=8 r=8 top-2, batch {a.batch}x{a.seq}, fp32 CPU, "
          f"{torch.get_num_threads()} threads; contrastive arms: K=1024, 256 tokens/site")
    rows = [[arm, f"{r['time']:.2f}", f"{r['time'] / b['time']:.3f}x", f"{r['peak_mb']:.0f}",
             f"{r['peak_mb'] / b['peak_mb']:.3f}x", f"{r['queue_bytes'] / 2**20:.1f} MiB" if r["queue_bytes"] and ARMS[arm][0] else "-"]
            for arm, r in res.items()]
    print(table(rows, ["arm (LM + balance + ...)", "s/step", "time vs base", "peak RSS MB", "memory vs base", "queue"]))
    # how the contrastive cost grows with tokens_per_site and K: the loss's own forward + backward, timed on
    # one recorded forward with its inputs detached (the model's step time is the same in every row)
    from contrastive import contrastive_loss
    from expert_queue import ExpertQueues
    from lora_moe import record_expert_acts, router_records

    model, heads, n_sites = setup(path, a.layers)
    record_expert_acts(model, True)
    with torch.no_grad():
        model(ids)
    records = router_records(model)
    for rec in records:  # leaves: the backward stops at the loss's inputs
        rec.expert_acts, rec.probs = rec.expert_acts.detach().requires_grad_(), rec.probs.detach().requires_grad_()
    rows = []
    for tps, K in [(64, 1024), (256, 1024), (1024, 1024), (256, 256), (256, 4096)]:
        queues = ExpertQueues(n_sites, size=K, dim=64)
        for _ in range(K // (a.batch * a.seq) + 1):  # fill the queue first: a full queue is the steady state
            contrastive_loss(records, heads, queues, tokens_per_site=a.batch * a.seq)

        def cl_step():
            contrastive_loss(records, heads, queues, tokens_per_site=tps).backward()

        t = timed(cl_step, 3)
        rows.append([tps, K, f"{t * 1000:.0f}", f"{t / b['time']:.1%}", f"{queues.nbytes() / 2**20:.1f} MiB"])
    print(table(rows, ["tokens/site", "K", "contrastive fwd+bwd ms", "of the LM+balance step", "queue bytes"]))

if __name__ == "__main__":
    main()

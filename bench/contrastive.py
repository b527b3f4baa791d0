"""Cost of the expert contrastive loss: a training step with all three losses vs LM + balance only.

    python bench/contrastive.py [--layers 4] [--batch 2] [--seq 512] [--steps 2] [--reps 3]

Same model and batch as bench/adapters.py (Qwen3-0.6B shape cut to 4 layers, LoRA-MoE E=8 r=8 top-2 on
all 7 projections, 2 x 512 tokens, fp32 CPU). Every arm runs in a fresh process (clean peak RSS), ``--reps``
times, the arms interleaved (base, seq, ..., base, seq, ...) so that machine drift hits them alike; each
ratio is the median over repetitions of (arm / base of the same repetition), printed with its min-max.
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

ARMS = {  # name -> (contrastive on, queue, debias tau+)
    "base": (False, False, 0.0),
    "sequence": (True, False, 0.0),  # in-batch negatives only, plain InfoNCE
    "sequence+debias": (True, False, 0.125),  # train.py's default
    "sequence+queue": (True, True, 0.0),
    "sequence+debias+queue": (True, True, 0.125),
}


def step_fn(path, ids, cl_on, queue_on, debias, K=1024, tps=256):
    """One training step (LM + 0.01 balance [+ L_cl]) of a fresh adapted model, SGD."""
    from contrastive import contrastive_loss
    from expert_queue import ExpertQueue
    from lora_moe import LoRAMoEConfig, add_lora_moe, balance_loss, record_routing, sites, stack_records
    from model import load_model

    torch.manual_seed(0)
    model = add_lora_moe(load_model(path), LoRAMoEConfig(num_experts=8, rank=8, alpha=16, top_k=2, dropout=0.0),
                         verbose=False).train()
    queue = ExpertQueue(len(sites(model)), K, 8) if cl_on and queue_on else None
    params = [p for p in model.parameters() if p.requires_grad]
    weight = torch.ones(ids.shape)
    gen = torch.Generator().manual_seed(0)

    def step():
        with record_routing(model) as recs:
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        rec = stack_records(recs)
        loss = loss + 0.01 * balance_loss(rec, weight)
        cl = None
        if cl_on:
            cl = contrastive_loss(rec, weight, queue.negatives() if queue is not None else None, tokens_per_site=tps,
                                  temperature=0.2, debias=debias, generator=gen)
            loss = loss + cl.loss
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 1e-4 * p.grad
                p.grad = None
        if queue is not None:
            queue.push([cl.fused])

    return step, queue


def run_arm(a, arm, path, ids):
    step, queue = step_fn(path, ids, *ARMS[arm])
    step()  # warmup (also fills the queue once)
    ts = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return {"time": sorted(ts)[len(ts) // 2], "peak_mb": peak_rss_mb(), "queue_bytes": queue.nbytes() if queue else 0}


def median_spread(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2], xs[0], xs[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every arm (>= 3)")
    ap.add_argument("--arms", default=",".join(ARMS), help="arms to run (base is always run: the ratios' reference)")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    ids = torch.randint(0, 151936, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    if a.arm in ARMS:
        print(json.dumps(run_arm(a, a.arm, path, ids)))
        return
    unknown = set(a.arms.split(",")) - set(ARMS)
    if unknown:
        sys.exit(f"--arms: unknown {', '.join(sorted(unknown))}; valid: {', '.join(ARMS)}")
    res = {arm: [] for arm in ARMS if arm == "base" or arm in a.arms.split(",")}
    for rep in range(a.reps):
        for arm in res:
            argv = [__file__, "--arm", arm, "--layers", str(a.layers), "--batch", str(a.batch), "--seq", str(a.seq),
                    "--steps", str(a.steps), "--dir", a.dir]
            code = (f"import sys; sys.argv={argv!r}\n"
                    f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')")
            res[arm].append(json.loads(run_isolated(code).strip().splitlines()[-1]))
            print(f"  rep {rep} {arm}: {res[arm][-1]['time']:.2f} s/step, peak {res[arm][-1]['peak_mb']:.0f} MB",
                  file=sys.stderr)
    print(f"Qwen3-0.6B shape, {a.layers} layers, LoRA-MoE E=8 r=8 top-2, batch {a.batch}x{a.seq}, fp32 CPU, "
          f"{torch.get_num_threads()} threads; 256 tokens/site, K=1024; median (min-max) of {a.reps} interleaved reps")
    rows = []
    for arm, rs in res.items():
        t = median_spread([r["time"] / b["time"] for r, b in zip(rs, res["base"])])
        m = median_spread([r["peak_mb"] / b["peak_mb"] for r, b in zip(rs, res["base"])])
        rows.append([arm, f"{median_spread([r['time'] for r in rs])[0]:.2f}", f"{t[0]:.3f}x ({t[1]:.3f}-{t[2]:.3f})",
                     f"{median_spread([r['peak_mb'] for r in rs])[0]:.0f}", f"{m[0]:.3f}x ({m[1]:.3f}-{m[2]:.3f})",
                     f"{rs[0]['queue_bytes'] / 2**20:.2f} MiB" if rs[0]["queue_bytes"] else "-"])
    print(table(rows, ["arm (LM + balance + ...)", "s/step", "time vs base", "peak RSS MB", "memory vs base",
                       "queue"]))


if __name__ == "__main__":
    main()

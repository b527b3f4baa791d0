"""What ``--compile`` buys: the default objective's forward + backward with every decoder layer compiled
(``train.compile_layers``, inductor) vs eager, same model, weights and batch, in one process.

    python bench/compile_step.py [--layers 4] [--batch 2] [--seq 512] [--steps 3] [--reps 3]

Qwen3-0.6B's shape cut to ``--layers`` layers, LoRA-MoE E=8 r=8 top-2 on all 7 projections, fp32 CPU, the
default objective (LM on every token + balance + sequence contrastive). Compiling is timed on its own (the
first compiled step); then ``--reps`` interleaved repetitions of ``--steps`` steps of each, after one warm-up,
each side first in every other pair (``common.interleaved``); the ratio is the median of the per-repetition
ratios eager / compiled, with its min-max. A fixed batch shape: with varying lengths dynamo compiles once more
for a dynamic length (not timed here).
"""
import argparse
import os
import tempfile
import time

import torch

from common import interleaved, make_checkpoint, peak_rss_mb, ratio, table


def make_step(path, ids, compiled: bool):
    from config import TrainConfig
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import load_model
    from objective import HybridLoss
    from train import compile_layers

    torch.manual_seed(0)
    model = add_lora_moe(load_model(path), LoRAMoEConfig(num_experts=8, rank=8, alpha=16, top_k=2, dropout=0.0),
                         verbose=False).train()
    if compiled:
        compile_layers(model)
    objective = HybridLoss(model, TrainConfig(dropout=0.0))
    labels, mask = ids.clone(), torch.ones_like(ids, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)

    def step():
        micro = objective(ids, labels, mask, float(ids.numel()), 1, None, gen)
        micro.loss.backward()
        return micro.parts

    return model, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (>= 3)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    ids = torch.randint(0, 151936, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    eager_model, eager = make_step(path, ids, compiled=False)
    comp_model, comp = make_step(path, ids, compiled=True)
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    pc = comp()  # compiles
    compile_s = time.perf_counter() - t
    pe = eager()
    same = torch.allclose(pe, pc, rtol=1e-4)  # every term of MicroStep.parts
    grads = max((x.grad - y.grad).abs().max().item() / (x.grad.abs().max().item() + 1e-12)
                for x, y in zip(eager_model.parameters(), comp_model.parameters()) if x.requires_grad)
    steps = lambda fn: lambda: [fn() for _ in range(a.steps)]  # noqa: E731
    t_c, t_e, ratios = interleaved(steps(comp), steps(eager), a.reps)  # ratios: eager time / compiled time
    print(f"Qwen3-0.6B shape, {a.layers} layers, E=8 r=8 top-2, batch {a.batch}x{a.seq}, fp32 CPU, "
          f"{torch.get_num_threads()} threads; default objective; median (min-max) of {a.reps} interleaved reps")
    print(table([["eager", f"{t_e / a.steps:.2f}", "1.00x", ""],
                 ["--compile (inductor, per layer)", f"{t_c / a.steps:.2f}", ratio(ratios), f"{compile_s:.0f}"]],
                ["arm", "s/step (fwd+bwd)", "speed vs eager", "compile s"]))
    print(f"loss parts equal (rtol 1e-4): {same}; largest adapter-gradient difference / its scale: {grads:.1e}; "
          f"peak RSS {rss0:.0f} MB before compiling, {peak_rss_mb():.0f} MB after")


if __name__ == "__main__":
    main()

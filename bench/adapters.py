"""One training step (forward + backward, frozen fp32 base, CPU) with adapters on all 7 projections.

    python bench/adapters.py [--layers 4] [--batch 2] [--seq 512] [--steps 2]

Arms, each in a fresh process so that peak RSS is its own:
  a) peft LoRA r=16 on transformers' Qwen3      b) ours, E=1, r=16 (plain LoRA through LoRAMoELinear)
  c) ours, LoRA-MoE E=8, r=8, top-2            d) the same LoRA-MoE computed by a per-expert loop
The loss is the same full-vocabulary cross-entropy in every arm, so the arms differ only in the adapters.
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

ARMS = {"a": "peft LoRA r=16 (transformers)", "b": "ours E=1 r=16", "c": "ours LoRA-MoE E=8 r=8 top-2",
        "d": "naive expert-loop LoRA-MoE E=8 r=8 top-2"}


def build(arm, path):
    if arm == "a":
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen3ForCausalLM

        hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
        m = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        return lambda ids: m(ids).logits, m
    from common import reference_forward
    from lora_moe import LoRAMoEConfig, LoRAMoELinear, add_lora_moe
    from model import load_model

    m = load_model(path)
    E, r, k = (1, 16, 1) if arm == "b" else (8, 8, 2)
    add_lora_moe(m, LoRAMoEConfig(num_experts=E, rank=r, alpha=2 * r, top_k=k, dropout=0.0), verbose=False)
    if arm == "d":
        LoRAMoELinear.forward = reference_forward
    return lambda ids: m(ids), m


def run_arm(arm, path, B, T, steps):
    torch.manual_seed(0)
    fwd, model = build(arm, path)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 151936, (B, T))

    def step():
        logits = fwd(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        for p in params:
            p.grad = None

    step()  # warmup
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return {"time": sorted(ts)[len(ts) // 2], "peak_mb": peak_rss_mb(), "trainable": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm (median), after one warmup")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    if a.arm:
        print(json.dumps(run_arm(a.arm, path, a.batch, a.seq, a.steps)))
        return
    res = {}
    for arm in ARMS:
        code = (f"import sys; sys.argv={[__file__, '--arm', arm, '--layers', str(a.layers), '--batch', str(a.batch), '--seq', str(a.seq), '--steps', str(a.steps), '--dir', a.dir]!r}\n"
                f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')")
        res[arm] = json.loads(run_isolated(code).strip().splitlines()[-1])
        print(f"  {arm}) {ARMS[arm]}: {res[arm]['time']:.2f} s/step, peak RSS {res[arm]['peak_mb']:.0f} MB", file=sys.stderr)
    rows = [[f"{k}) {ARMS[k]}", f"{v['trainable'] / 1e6:.2f}M", f"{v['time']:.2f}", f"{v['peak_mb']:.0f}"] for k, v in res.items()]
    print(f"Qwen3-0.6B shape, {a.layers} layers, fp32 CPU, {torch.get_num_threads()} threads, batch {a.batch}x{a.seq}, "
          f"all 7 targets, one forward+backward")
    print(table(rows, ["arm", "trainable", "s/step", "peak RSS MB"]))
    c, aa, d = res["c"], res["a"], res["d"]
    print(f"c/a: time {c['time'] / aa['time']:.2f}x, peak memory {c['peak_mb'] / aa['peak_mb']:.2f}x   "
          f"c/d: time {c['time'] / d['time']:.2f}x, peak memory {c['peak_mb'] / d['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()

"""Tokens/s and peak memory of train.py's step vs a minimal transformers + peft LoRA loop.

    python bench/train_step.py [--layers 4] [--batch 2] [--max-len 512] [--steps 4] [--reps 3]

Same random Qwen3-0.6B-shaped base (cut to --layers, real Qwen vocabulary), same bundled data, same
batches (train.py's length-bucketed order), fp32 CPU, AdamW. Arms, each in a fresh process:
  peft  : transformers Qwen3ForCausalLM + peft LoRA r=16 on all 7 projections, loss = model(labels=...).loss
  lora  : train.py, plain-LoRA baseline (--num-experts 1 --top-k 1 --rank 16: no router, no routing terms)
  full  : train.py, full SparseDoctor with its defaults (E=8, r=8, top-2, context routers, balance + contrastive,
          sequence reading)
  token : full with --router token (the paper's token routers, which read x_t alone)
Tokens/s counts real (non-padding) tokens; the first step is warmup and not counted. The arms run ``--reps``
times, interleaved (peft, lora, full, peft, ...); each ratio is the median of the per-repetition ratios to
peft, with their min-max.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from common import ROOT, make_checkpoint, peak_rss_mb, run_isolated, table

ARMS = {"peft": "transformers + peft LoRA r=16", "lora": "train.py plain LoRA (E=1, r=16)",
        "full": "train.py SparseDoctor (E=8, r=8, top-2, all losses)",
        "token": "the same with --router token"}


def run_arm(arm, path, a):
    from train import TrainConfig, train

    if arm in ("lora", "full", "token"):
        kw = {"lora": dict(num_experts=1, top_k=1, rank=16, alpha=32), "full": {}, "token": dict(router="token")}[arm]
        cfg = TrainConfig(model=path, out=tempfile.mkdtemp(), steps=a.steps, batch_size=a.batch, max_len=a.max_len,
                          dropout=0.0, save_every=10**9, **kw)
        hist = train(cfg)
        rates = [h["tokens_per_s"] for h in hist[1:]]
        return {"tokens_per_s": sum(rates) / len(rates), "peak_mb": peak_rss_mb()}
    from tokenizer import load_tokenizer
    from data import batch_order, collate, encode_all, read_jsonl
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    tok = load_tokenizer(path)
    items, _ = encode_all(read_jsonl(os.path.join(ROOT, "samples", "med_sample.jsonl")), tok, a.max_len)
    order = batch_order([len(i[0]) for i in items], a.batch, 0, 0)
    torch.manual_seed(0)
    model = get_peft_model(Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rates = []
    for step in range(a.steps):
        ids, labels, mask = collate([items[i] for i in order[step]], tok.pad_id)
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            rates.append(int(mask.sum()) / (time.perf_counter() - t))
    return {"tokens_per_s": sum(rates) / len(rates), "peak_mb": peak_rss_mb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every arm (>= 3)")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    from tiny_qwen import write_qwen_tokenizer

    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        write_qwen_tokenizer(path)
    if a.arm:
        print(json.dumps(run_arm(a.arm, path, a)))
        return
    res = {arm: [] for arm in ARMS}
    for rep in range(a.reps):
        for arm in ARMS:
            argv = [__file__, "--arm", arm, "--layers", str(a.layers), "--batch", str(a.batch), "--max-len",
                    str(a.max_len), "--steps", str(a.steps), "--dir", a.dir]
            out = run_isolated(f"import sys; sys.argv={argv!r}\nimport runpy; runpy.run_path("
                               f"{os.path.abspath(__file__)!r}, run_name='__main__')")
            res[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  rep {rep} {arm}: {res[arm][-1]['tokens_per_s']:.0f} tok/s, peak {res[arm][-1]['peak_mb']:.0f} MB",
                  file=sys.stderr)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2], xs[0], xs[-1]

    rows = []
    for k, rs in res.items():
        t = med([r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(rs, res["peft"])])
        m = med([r["peak_mb"] / p["peak_mb"] for r, p in zip(rs, res["peft"])])
        rows.append([ARMS[k], f"{med([r['tokens_per_s'] for r in rs])[0]:.0f}", f"{t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f})",
                     f"{med([r['peak_mb'] for r in rs])[0]:.0f}", f"{m[0]:.2f}x ({m[1]:.2f}-{m[2]:.2f})"])
    print(f"Qwen3-0.6B shape, {a.layers} layers, fp32 CPU, {torch.get_num_threads()} threads; bundled med_sample, "
          f"batch {a.batch}, max_len {a.max_len}, {a.steps - 1} timed steps; median (min-max) of {a.reps} reps")
    print(table(rows, ["arm", "tokens/s", "vs peft", "peak RSS MB", "vs peft"]))


if __name__ == "__main__":
    main()

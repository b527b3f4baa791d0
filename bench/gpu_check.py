"""The GPU check: what CPU tests cannot show, on one CUDA GPU in a few minutes (skips cleanly on CPU).

    python bench/gpu_check.py [--out gpu_check]          # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry-run-cpu              # every check on the CPU, to test this script

1. bf16 on CUDA vs fp32: our Qwen3 (a random Qwen3-0.6B shape cut to 4 layers) in bf16 on the GPU against
   the same weights in fp32 on the GPU, and against transformers' own bf16 forward when it is installed.
2. 20 training steps of the demo (train.py, bf16 base, fp32 adapters, all three losses): finite, falling;
   again with the expert memory queue (--queue 1024).
3. With 2+ GPUs: torchrun --nproc_per_node=2 train.py on NCCL, the same 20 steps, losses compared with (2).
4. eval.py on the bundled CMExam sample: shared-prefix trie scoring vs the plain path on the GPU, same answers.
5. Timing: prefill tokens/s of our model and of transformers (same weights, bf16, one run) and decode tokens/s.
6. Training on a Qwen3-1.7B shape (28 layers, random, bf16 base): tokens/s, MFU, peak memory and the host
   syncs per step (``torch.cuda.set_sync_debug_mode("warn")``) of train.py (defaults; plain LoRA; defaults
   with --compile) vs transformers + peft LoRA r=16 on the same batches (``train_comparison``; alone:
   ``--only-train``; on the CPU ``--dry-run-cpu`` shrinks the shape to 2 small layers).
Writes a JSON report to --out/report.json and prints one PASS/FAIL line per check.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from safetensors import safe_open

from common import ROOT, make_checkpoint, timeit

RESULTS = {}


def check(name, ok, **info):
    RESULTS[name] = {"ok": bool(ok), **info}
    print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(info)}", flush=True)


def load_transformers(path, device):
    """transformers' own Qwen3 of the same weights in bf16, or None when transformers is not installed."""
    try:
        from transformers import Qwen3ForCausalLM
    except ImportError:
        return None
    return Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()


def bf16_parity(path, device, hf):
    from model import load_model

    ids = torch.randint(0, 151936, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        ref = load_model(path, dtype=torch.float32, device=device)(ids).float()
        ours = load_model(path, dtype=torch.bfloat16, device=device)(ids).float()
    rel = ((ours - ref).norm() / ref.norm()).item()
    info = {"rel_err_vs_fp32": rel}
    if hf is None:
        info["transformers"] = "not installed"
    else:
        with torch.inference_mode():
            info["max_abs_vs_transformers_bf16"] = (hf(ids).logits.float() - ours).abs().max().item()
    check("bf16 forward", rel < 2e-2 and info.get("max_abs_vs_transformers_bf16", 0) < 0.25, **info)


def train_steps(out, nproc=1, extra=()):
    data = os.path.join(ROOT, "samples", "med_sample.jsonl")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + ["train.py", "--data", data, "--out", out, "--steps", "20",
                      "--batch-size", str(8 // nproc), "--max-len", "256", "--lr", "5e-3", "--overwrite", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode:
        return None, r.stderr[-2000:], time.perf_counter() - t
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))], "", time.perf_counter() - t


QWEN3_17B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                 max_position_embeddings=40960, tie_word_embeddings=True)


def count_syncs(fn):
    """(fn's result, how many times it made the host wait for the GPU), from the sync debug mode's warnings."""
    if not torch.cuda.is_available():
        return fn(), None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in seen)


def peft_arm(path, device, batches):
    """transformers + peft LoRA r=16 on all 7 projections, AdamW: [(seconds, real tokens, syncs)] per step."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters, as ours
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device == "cuda")
    out = []
    for ids, labels, mask in batches:
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        t = time.perf_counter()

        def step():
            model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        _, syncs = count_syncs(step)
        if device == "cuda":
            torch.cuda.synchronize()  # for the timing, outside the count
        out.append((time.perf_counter() - t, int(mask.sum()), syncs))
    return out


def ours_arm(path, out, steps, batch, max_len, extra: dict):
    """train.py in this process: [(seconds, real tokens, syncs)] per step. Time from train.train's own log;
    syncs from train.train_step alone on the same model and batches, after 2 warm-up steps (train.train also
    loads and saves, which read from the GPU by design)."""
    import parallel
    from objective import HybridLoss
    from tokenizer import load_tokenizer
    from data import Batches
    from train import TrainConfig, build_model, build_state, load_data, train, train_step

    cfg = TrainConfig(model=path, out=out, steps=steps, batch_size=batch, max_len=max_len, dropout=0.0,
                      save_every=10 ** 9, overwrite=True, **extra)  # the base is bfloat16 on CUDA
    hist = train(cfg)
    _, _, device = parallel.setup()
    tok = load_tokenizer(path)
    batches = Batches(load_data(cfg, tok, lambda *a: None), cfg, tok.pad_id, 0, 1)
    model, queue, gen = build_model(cfg, path, device, 0, verbose=False)
    state = build_state(HybridLoss(model, cfg), queue, gen, cfg, device)
    syncs = []
    for step in range(3):
        syncs.append(count_syncs(lambda: train_step(state, batches(step)))[1])
    return [(h["step_time"], h["tokens_per_s"] * h["step_time"], syncs[-1]) for h in hist]


def train_comparison(device, out_dir, dry: bool):
    """Check 6: tokens/s, MFU, peak memory and syncs per step, ours vs transformers + peft, same batches."""
    from data import Batches, encode_all, read_jsonl
    from tiny_qwen import write_qwen_tokenizer
    from tokenizer import load_tokenizer
    from train import TrainConfig

    shape = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32) if dry else {}
    path = make_checkpoint(os.path.join(tempfile.gettempdir(), "sparsedoctor_gpu_17b" + ("_dry" if dry else "")),
                           **{**QWEN3_17B, **shape})
    write_qwen_tokenizer(path)
    steps, batch, max_len = (3, 2, 128) if dry else (12, 16, 512)
    tok = load_tokenizer(path)
    items, _ = encode_all(read_jsonl(os.path.join(ROOT, "samples", "med_sample.jsonl")), tok, max_len)
    cfg = TrainConfig(model=path, steps=steps, batch_size=batch, max_len=max_len)
    order = Batches(items, cfg, tok.pad_id, 0, 1)
    batches = [b for s in range(steps) for b in order(s)]  # train.py's batches
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:  # shapes only, nothing loaded
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "embed" not in k)
    flops_per_token = 4 * n  # frozen base: forward 2N + input gradients 2N (no weight gradients)
    peak = 989e12 if device == "cuda" else None  # H100/H200 dense bf16; MFU only on a GPU
    arms = {"transformers + peft LoRA r=16": lambda: peft_arm(path, device, batches),
            "train.py defaults": lambda: ours_arm(path, os.path.join(out_dir, "t_def"), steps, batch, max_len, {}),
            "train.py plain LoRA": lambda: ours_arm(path, os.path.join(out_dir, "t_lora"), steps, batch, max_len,
                                                     dict(num_experts=1, top_k=1, rank=16, alpha=32)),
            "train.py defaults --compile": lambda: ours_arm(path, os.path.join(out_dir, "t_comp"), steps, batch,
                                                             max_len, dict(compile=True))}
    rows = {}
    for name, fn in arms.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_step = fn()[2:]  # the first two steps warm up (and compile)
        secs, toks = sum(s for s, _, _ in per_step), sum(t for _, t, _ in per_step)
        rows[name] = {"tokens_per_s": round(toks / secs), "syncs_per_step": per_step[-1][2],
                      "mfu": None if peak is None else round(toks / secs * flops_per_token / peak, 3),
                      "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20) if device == "cuda" else None}
        print(f"  {name}: {rows[name]}", flush=True)
    ref = rows["transformers + peft LoRA r=16"]["tokens_per_s"]
    ratio = rows["train.py defaults"]["tokens_per_s"] / ref
    check("training vs transformers + peft (Qwen3-1.7B shape, bf16)", ratio >= 0.8, defaults_vs_peft=round(ratio, 3),
          shape="dry-run" if dry else "Qwen3-1.7B", batch=f"{batch}x<={max_len}", arms=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run every check on the CPU (to test this script)")
    ap.add_argument("--only-train", action="store_true", help="only check 6, the training comparison")
    a = ap.parse_args()
    device = "cpu" if a.dry_run_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU check is skipped (run it on a machine with one)")
        return
    os.makedirs(a.out, exist_ok=True)
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}", flush=True)
    if a.only_train:
        train_comparison(device, a.out, a.dry_run_cpu)
        json.dump(RESULTS, open(os.path.join(a.out, "report.json"), "w"), indent=1)
        return
    path = make_checkpoint(os.path.join(tempfile.gettempdir(), "sparsedoctor_gpu_4l"), num_hidden_layers=4)
    hf = load_transformers(path, device)  # once: the parity check and the prefill reference
    bf16_parity(path, device, hf)

    one, err, secs = train_steps(os.path.join(a.out, "run1"))
    ok = one is not None and all(torch.isfinite(torch.tensor([h["lm"], h["balance"], h["contrastive"]])).all() for h in one)
    check("train 20 steps bf16", ok and one[-1]["lm"] < one[0]["lm"], seconds=round(secs, 1), error=err,
          lm=[round(one[0]["lm"], 4), round(one[-1]["lm"], 4)] if one else None)
    exp, err, secs = train_steps(os.path.join(a.out, "run_queue"), extra=["--queue", "1024"])
    ok = exp is not None and all(torch.isfinite(torch.tensor([h["lm"], h["contrastive"]])).all() for h in exp)
    check("train 20 steps bf16, expert memory queue", ok and exp[-1]["lm"] < exp[0]["lm"],
          seconds=round(secs, 1), error=err, lm=[round(exp[0]["lm"], 4), round(exp[-1]["lm"], 4)] if exp else None)
    if device == "cuda" and torch.cuda.device_count() >= 2 and one:
        two, err, secs = train_steps(os.path.join(a.out, "run2"), nproc=2)
        diff = max(abs(x["lm"] - y["lm"]) / abs(x["lm"]) for x, y in zip(one, two)) if two else None
        check("2-process NCCL = 1 process", two is not None and diff < 2e-2, max_rel_lm_diff=diff, error=err)
    else:
        print("SKIP 2-process NCCL: one GPU")

    import benchmarks as bm
    import scoring as sc
    from model import load_model
    from tiny_qwen import write_qwen_tokenizer
    from tokenizer import load_tokenizer

    write_qwen_tokenizer(path)
    model, tok = load_model(path, dtype=torch.bfloat16, device=device), load_tokenizer(path)
    items = bm.load_cmexam(os.path.join(ROOT, "samples", "benchmarks", "cmexam"), "val")[0]
    prompts = [bm.build_prompt("cmexam", it, [], chat=False) for it in items]
    fast = sc.score_logits(model, tok, prompts, items, 16, chat=False)[0]
    slow = sc.score_logits_full(model, tok, prompts, items, 16, chat=False)[0]
    agree = sum(x == y for x, y in zip(fast, slow)) / len(items)
    check("eval trie scoring = plain path (bf16)", agree >= 0.95, agreement=agree)

    from generate import generate

    ids = torch.randint(0, 151936, (8, 512), device=device)
    with torch.inference_mode():  # timeit: median of 5 after a warm-up, CUDA-synchronized
        ours = ids.numel() / timeit(lambda: model(ids, last_only=True), reps=5)
        timing = {"prefill_tok_s": round(ours)}
        if hf is not None:
            ref = ids.numel() / timeit(lambda: hf(ids, logits_to_keep=1), reps=5)
            timing.update(transformers_prefill_tok_s=round(ref), prefill_ratio=round(ours / ref, 3))
    timing["decode_tok_s"] = round(128 / timeit(lambda: generate(model, ids[:1, :64], max_new_tokens=128, eos_id=None),
                                                reps=1), 1)
    if device == "cuda":
        timing["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    check("timing bf16 (8 x 512 prefill; batch-1 decode)", True, **timing)
    train_comparison(device, a.out, a.dry_run_cpu)
    json.dump(RESULTS, open(os.path.join(a.out, "report.json"), "w"), indent=1)
    print("ALL PASS" if all(r["ok"] for r in RESULTS.values()) else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()

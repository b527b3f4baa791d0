"""The GPU check: what CPU tests cannot show, on one CUDA GPU in a few minutes (skips cleanly on CPU).

    python bench/gpu_check.py [--out gpu_check]          # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry-run-cpu              # every check on the CPU, to test this script

1. bf16 on CUDA vs fp32: our Qwen3 (a random Qwen3-0.6B shape cut to 4 layers) in bf16 on the GPU against
   the same weights in fp32 on the GPU, and against transformers' own bf16 forward when it is installed.
2. 20 training steps of the demo (train.py, bf16 base, fp32 adapters, all three losses): finite, falling;
   again with the expert reading and momentum key heads (--cl-views expert --queue-momentum 0.99).
3. With 2+ GPUs: torchrun --nproc_per_node=2 train.py on NCCL, the same 20 steps, losses compared with (2).
4. eval.py on the bundled CMExam sample: shared-prefix trie scoring vs the plain path on the GPU, same answers.
5. Timing: prefill tokens/s of our model and of transformers (same weights, bf16, one run) and decode tokens/s.
Writes a JSON report to --out/report.json and prints one PASS/FAIL line per check.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

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
    data = os.path.join(ROOT, "data", "med_sample.jsonl")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + ["train.py", "--data", data, "--out", out, "--steps", "20", "--dtype", "bfloat16",
                      "--batch-size", str(8 // nproc), "--max-len", "256", "--lr", "5e-3", "--no-progress", "--overwrite", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode:
        return None, r.stderr[-2000:], time.perf_counter() - t
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))], "", time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run every check on the CPU (to test this script)")
    a = ap.parse_args()
    device = "cpu" if a.dry_run_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU check is skipped (run it on a machine with one)")
        return
    os.makedirs(a.out, exist_ok=True)
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}", flush=True)
    path = make_checkpoint(os.path.join(tempfile.gettempdir(), "sparsedoctor_gpu_4l"), num_hidden_layers=4)
    hf = load_transformers(path, device)  # once: the parity check and the prefill reference
    bf16_parity(path, device, hf)

    one, err, secs = train_steps(os.path.join(a.out, "run1"))
    ok = one is not None and all(torch.isfinite(torch.tensor([h["lm"], h["balance"], h["contrastive"]])).all() for h in one)
    check("train 20 steps bf16", ok and one[-1]["lm"] < one[0]["lm"], seconds=round(secs, 1), error=err,
          lm=[round(one[0]["lm"], 4), round(one[-1]["lm"], 4)] if one else None)
    exp, err, secs = train_steps(os.path.join(a.out, "run_expert"), extra=["--cl-views", "expert", "--queue-momentum", "0.99"])
    ok = exp is not None and all(torch.isfinite(torch.tensor([h["lm"], h["contrastive"]])).all() for h in exp)
    check("train 20 steps bf16, expert reading + momentum keys", ok and exp[-1]["lm"] < exp[0]["lm"],
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
    items = bm.load_cmexam(os.path.join(ROOT, "data", "bench_sample", "cmexam"), "val")[0]
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
    json.dump(RESULTS, open(os.path.join(a.out, "report.json"), "w"), indent=1)
    print("ALL PASS" if all(r["ok"] for r in RESULTS.values()) else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()

"""Forward speed of our Qwen3 vs transformers' Qwen3ForCausalLM, same random weights, fp32 CPU, one run.

    python bench/forward.py [--layers 4] [--batch 4] [--seq 512] [--new 128] [--reps 5]

Prefill = a generation prefill: the full prompt through every layer, logits for the last position only
(what generate needs). Decode = batch 1, ``--new`` greedy tokens with each side's KV cache. Each is timed
``--reps`` times, ours and transformers' interleaved, each first in every other pair (after one warm-up
each); the ratio printed is the median of the per-repetition ratios, with their min-max.
"""
import argparse
import os
import tempfile

import torch

from common import QWEN3_06B_4L, interleaved, make_checkpoint, matmul_peak_gflops, ratio, run_isolated, table


def flops_per_prefill(cfg, B, T):
    h, q, kv, I, L, V = (cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"],
                         cfg["num_key_value_heads"] * cfg["head_dim"], cfg["intermediate_size"],
                         cfg["num_hidden_layers"], cfg["vocab_size"])
    per_token = L * 2 * (h * (q + 2 * kv) + q * h + 3 * h * I)
    attn = L * 2 * 2 * q * T * (T + 1) / 2  # QK^T and AV over the causal half
    return B * (T * per_token + attn + 2 * h * V)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 3)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = {**QWEN3_06B_4L, "num_hidden_layers": a.layers}
    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)

    # load time + peak RSS of our loader, in a fresh process (baseline: the same process importing torch only)
    base = float(run_isolated("import torch\nfrom common import peak_rss_mb\nprint(peak_rss_mb())"))
    out = run_isolated(f"import time, torch\nfrom common import peak_rss_mb\nfrom model import load_model\n"
                       f"t=time.perf_counter()\nm=load_model({path!r})\nt=time.perf_counter()-t\nr=peak_rss_mb()\n"
                       f"m(torch.zeros(1, 1, dtype=torch.long))\nprint(t, r, peak_rss_mb())")
    # safetensors maps the file: pages become resident when first used, so also measure after a forward
    load_s, load_rss, fwd_rss = map(float, out.split())
    weights_mb = os.path.getsize(os.path.join(path, "model.safetensors")) / 2 ** 20

    from generate import generate
    from model import load_model
    from transformers import Qwen3ForCausalLM

    ours = load_model(path)
    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq))
    prompt = ids[:1, :32]
    with torch.no_grad():
        assert (ours(ids[:1, :64]) - hf(ids[:1, :64]).logits).abs().max() < 1e-4  # same model, or no comparison
        pre = interleaved(lambda: ours(ids, last_only=True), lambda: hf(ids, logits_to_keep=1), a.reps)
        dec = interleaved(lambda: generate(ours, prompt, max_new_tokens=a.new, eos_id=None),
                          lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                              max_new_tokens=a.new, min_new_tokens=a.new, pad_token_id=0), a.reps)
    (t_ours, t_hf, pre_r), (d_ours, d_hf, dec_r) = pre, dec
    peak = matmul_peak_gflops()
    fl = flops_per_prefill(cfg, a.batch, a.seq)
    ntok = a.batch * a.seq
    rows = [
        ["prefill tok/s", f"{ntok / t_ours:,.0f}", f"{ntok / t_hf:,.0f}", ratio(pre_r)],
        ["prefill GFLOP/s (share of torch.mm peak)", f"{fl / t_ours / 1e9:.0f} ({fl / t_ours / 1e9 / peak:.0%})",
         f"{fl / t_hf / 1e9:.0f} ({fl / t_hf / 1e9 / peak:.0%})", ""],
        ["decode tok/s (batch 1)", f"{a.new / d_ours:.1f}", f"{a.new / d_hf:.1f}", ratio(dec_r)],
    ]
    print(f"Qwen3-0.6B shape, {a.layers} layers, fp32, {torch.get_num_threads()} threads; prefill {a.batch}x{a.seq}, "
          f"decode {a.new} tokens; torch.mm peak {peak:.0f} GFLOP/s")
    print(table(rows, ["", "ours", "transformers", "ours/transformers"]))
    print(f"our load: {load_s:.2f} s; {weights_mb:.0f} MB of weights; python+torch alone {base:.0f} MB; peak RSS "
          f"{load_rss:.0f} MB after load, {fwd_rss:.0f} MB after a first forward "
          f"(= {(fwd_rss - base) / weights_mb:.2f}x the weights above baseline)")


if __name__ == "__main__":
    main()

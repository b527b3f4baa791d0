"""Questions/s of eval.py's batched logits scoring vs a plain one-question-at-a-time transformers loop.

    python bench/eval_speed.py [--n 64] [--batch-size 16] [--layers 4]

Same random Qwen3-0.6B-shaped checkpoint (cut to --layers, real Qwen vocabulary), same CMExam val
questions and prompts (0-shot, raw), fp32 CPU, one run. The two must also agree on every prediction.
"""
import argparse
import os
import shutil
import tempfile
import time

import torch

from common import ROOT, make_checkpoint, peak_rss_mb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared", "benchmarks"))
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()
    import eval as ev
    from tokenizer import load_tokenizer
    from model import load_model
    from tiny_qwen import write_qwen_tokenizer
    from transformers import Qwen3ForCausalLM

    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        write_qwen_tokenizer(path)
    data = tempfile.mkdtemp()
    shutil.copy(os.path.join(a.shared, "cmexam", "val_full.csv"), os.path.join(data, "val.csv"))
    items = [it for it in ev.load_cmexam(data, "val")[0] if not it.multi][:a.n]
    prompts = [ev.build_prompt("cmexam", it, [], chat=False) for it in items]
    tok = load_tokenizer(path)
    letters = ev.letter_token_ids(tok)

    ours = load_model(path)
    ev.score_logits(ours, tok, prompts[:a.batch_size], items[:a.batch_size], a.batch_size, chat=False)  # warmup
    t = time.perf_counter()
    preds, _ = ev.score_logits(ours, tok, prompts, items, a.batch_size, chat=False)
    t_ours = time.perf_counter() - t
    del ours

    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def hf_one(p, it):
        with torch.no_grad():
            logits = hf(torch.tensor([tok.encode(p)])).logits[0, -1]
        opts = list(it.options)
        return opts[int(logits[[letters[c] for c in opts]].argmax())]

    hf_one(prompts[0], items[0])  # warmup
    t = time.perf_counter()
    ref = [hf_one(p, it) for p, it in zip(prompts, items)]
    t_hf = time.perf_counter() - t
    agree = sum(x == y for x, y in zip(preds, ref)) / len(ref)
    mean_len = sum(len(tok.encode(p)) for p in prompts) / len(prompts)
    print(f"Qwen3-0.6B shape, {a.layers} layers, fp32 CPU, {torch.get_num_threads()} threads; {len(items)} CMExam val "
          f"questions, mean prompt {mean_len:.0f} tokens")
    print(f"eval.py --mode logits (batch {a.batch_size}): {len(items) / t_ours:.2f} questions/s")
    print(f"transformers, one question at a time:      {len(items) / t_hf:.2f} questions/s")
    print(f"ratio: {t_hf / t_ours:.2f}x; predictions agree on {agree:.0%}; peak RSS {peak_rss_mb():.0f} MB (both models)")


if __name__ == "__main__":
    main()

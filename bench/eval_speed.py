"""Evaluation speed, each comparison measured side by side in one run on the same model and questions.

    python bench/eval_speed.py [--layers 4] [--batch-size 16] [--n-map 16] [--n 64]

1. 0-shot CMExam, every question scored by subset MAP (31 candidates for 5 options): the shared-prefix
   trie scorer (scoring.score_logits) vs the per-candidate full-forward path (scoring.score_logits_full);
   and its efficiency: the tokens it must read (each prompt once + the fed trie tokens) per second against
   model.py's plain prefill of the same prompts (batched, left-padded, last position's logits).
2. 5-shot CMMLU-Med (the 35 shared dev questions, each reworded --variants times, with the dev files as the
   exemplar pool):
   one prefill per subject vs every prompt read whole; predictions must agree.
3. Single-answer letter scoring (CMExam val items with one gold letter, scored by letter argmax) vs a
   one-question-at-a-time transformers loop; predictions must agree.
Random Qwen3-0.6B-shaped checkpoint cut to --layers, real Qwen vocabulary, fp32 CPU.
"""
import argparse
import csv
import dataclasses
import os
import shutil
import tempfile
import time

import torch

from common import ROOT, make_checkpoint, peak_rss_mb  # noqa: I001 (puts the project root on sys.path)
import benchmarks as bm
import scoring as sc
from data import left_pad
from model import load_model
from tiny_qwen import write_qwen_tokenizer
from tokenizer import load_tokenizer


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cmmlu_test_copy(shared, variants: int):
    """dev = the shared dev files; test = each dev question reworded ``variants`` times (so all 5 dev items are
    exemplars, and a subject has 5 x variants questions; the real test has 145-273 a subject)."""
    root = tempfile.mkdtemp()
    shutil.copytree(os.path.join(shared, "cmmlu", "dev"), os.path.join(root, "dev"))
    os.makedirs(os.path.join(root, "test"))
    for f in os.listdir(os.path.join(root, "dev")):
        rows = list(csv.reader(open(os.path.join(root, "dev", f), encoding="utf-8")))
        with open(os.path.join(root, "test", f), "w", encoding="utf-8", newline="") as out:
            csv.writer(out).writerows(rows[:1] + [r[:1] + [r[1] + f"（测试{v}）"] + r[2:]
                                                  for v in range(variants) for r in rows[1:]])
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="single-answer questions (part 3)")
    ap.add_argument("--n-map", type=int, default=16, help="CMExam questions for the subset-MAP comparison (part 1)")
    ap.add_argument("--variants", type=int, default=4, help="rewordings of each CMMLU dev question (part 2)")
    ap.add_argument("--parts", default="1,2,3", help="which comparisons to run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared", "benchmarks"))
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_bench_qwen3_06b"))
    a = ap.parse_args()

    path = make_checkpoint(a.dir + f"_{a.layers}l", num_hidden_layers=a.layers)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        write_qwen_tokenizer(path)
    data = tempfile.mkdtemp()
    shutil.copy(os.path.join(a.shared, "cmexam", "val_full.csv"), os.path.join(data, "val.csv"))
    cmexam = bm.load_cmexam(data, "val")[0]
    tok, ours = load_tokenizer(path), load_model(path)
    print(f"Qwen3-0.6B shape, {a.layers} layers, fp32 CPU, {torch.get_num_threads()} threads, batch {a.batch_size}")

    parts = set(a.parts.split(","))
    if "1" in parts:
        part_map(a, tok, ours, cmexam)
    if "2" in parts:
        part_shots(a, tok, ours)
    if "3" in parts:
        part_single(a, tok, ours, cmexam, path)
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")


def part_map(a, tok, ours, cmexam):
    B = a.batch_size
    items = cmexam[:a.n_map]
    prompts = [bm.build_prompt("cmexam", it, [], chat=False) for it in items]
    sc.score_logits(ours, tok, prompts[:2], items[:2], B, chat=False)  # warmup
    (fast, _), t_fast = timed(lambda: sc.score_logits(ours, tok, prompts, items, B, chat=False))
    (slow, _), t_slow = timed(lambda: sc.score_logits_full(ours, tok, prompts, items, B, chat=False))
    enc = [tok.encode(p + r) for p, r in prompts]
    term = sc.terminator_ids(tok, chat=False)
    fed = sum(len(sc.candidate_trie(sc.candidate_ids(tok, it, term))[0]) for it in items)
    must_read = sum(map(len, enc)) + fed

    def plain_prefill():
        with torch.inference_mode():
            for i in range(0, len(enc), B):
                ids, mask = left_pad(enc[i:i + B], tok.pad_id)
                ours(ids, attention_mask=mask, last_only=True)

    plain_prefill()
    _, t_plain = timed(plain_prefill)
    plain_tps = sum(map(len, enc)) / t_plain
    print(f"\n1. 0-shot CMExam, subset MAP for all {len(items)} questions (mean prompt "
          f"{sum(map(len, enc)) / len(enc):.0f} tokens, {fed / len(items):.0f} trie tokens per question)")
    print(f"   per-candidate full forwards: {len(items) / t_slow:.2f} q/s; shared-prefix trie: {len(items) / t_fast:.2f} q/s"
          f" -> {t_slow / t_fast:.2f}x; predictions agree {sum(x == y for x, y in zip(fast, slow)) / len(items):.0%}")
    print(f"   tokens read/s {must_read / t_fast:.0f} vs model.py plain prefill {plain_tps:.0f} tok/s -> "
          f"{must_read / t_fast / plain_tps:.2f}x")



def part_shots(a, tok, ours):
    B = a.batch_size
    d = cmmlu_test_copy(a.shared, a.variants)
    citems, pool = bm.load_cmmlu(d, "test", list(bm.CMMLU_MED))[0], bm.shot_pool("cmmlu-med", d, "test")
    cprompts = [bm.build_prompt("cmmlu-med", it, bm.pick_shots("cmmlu-med", it, pool, 5), False) for it in citems]
    whole = [("", p + r) for p, r in cprompts]
    (shared_preds, _), t_shared = timed(lambda: sc.score_logits(ours, tok, cprompts, citems, B, chat=False))
    (whole_preds, _), t_whole = timed(lambda: sc.score_logits(ours, tok, whole, citems, B, chat=False))
    mean_len = sum(len(tok.encode(p + r)) for p, r in cprompts) / len(cprompts)
    print(f"\n2. 5-shot CMMLU-Med, {len(citems)} questions, mean prompt {mean_len:.0f} tokens, 7 shared prefixes")
    print(f"   whole prompts: {len(citems) / t_whole:.2f} q/s; shared prefix: {len(citems) / t_shared:.2f} q/s -> "
          f"{t_whole / t_shared:.2f}x; predictions agree {sum(x == y for x, y in zip(shared_preds, whole_preds)) / len(citems):.0%}")



def part_single(a, tok, ours, cmexam, path):
    B = a.batch_size
    single = [dataclasses.replace(it, pick_many=False) for it in cmexam if not it.multi][:a.n]
    sprompts = [bm.build_prompt("cmexam", it, [], chat=False) for it in single]
    sc.score_logits(ours, tok, sprompts[:B], single[:B], B, chat=False)  # warmup
    (preds, _), t_ours = timed(lambda: sc.score_logits(ours, tok, sprompts, single, B, chat=False))
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    letters = sc.letter_token_ids(tok)

    def hf_one(p, it):
        with torch.no_grad():
            logits = hf(torch.tensor([tok.encode(p)])).logits[0, -1]
        opts = list(it.options)
        return opts[int(logits[[letters[c] for c in opts]].argmax())]

    hf_one("".join(sprompts[0]), single[0])  # warmup
    ref, t_hf = timed(lambda: [hf_one(p + r, it) for (p, r), it in zip(sprompts, single)])
    print(f"\n3. single-answer letter scoring, {len(single)} CMExam val questions")
    print(f"   transformers one at a time: {len(single) / t_hf:.2f} q/s; eval.py: {len(single) / t_ours:.2f} q/s -> "
          f"{t_hf / t_ours:.2f}x; predictions agree {sum(x == y for x, y in zip(preds, ref)) / len(ref):.0%}")


if __name__ == "__main__":
    main()

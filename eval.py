"""Medical benchmark evaluation: CMExam, CMB (CMB-Exam) and CMMLU-Med; paired comparison of two runs.

    python eval.py cmexam --model DIR --data-dir CMExam/data --split test
    python eval.py cmb --model DIR --adapter runs/sparsedoctor/latest --data-dir CMB/data
    python eval.py cmmlu-med --model DIR --data-dir CMMLU/data --shots 5
    python eval.py cmexam                        # no --data-dir: bundled sample + demo model (not scores!)
    python eval.py compare runs/eval/base/predictions.jsonl runs/eval/sd/predictions.jsonl

Predictions depend on the question only (benchmarks.py says how for each benchmark); scoring.py scores
them (--mode logits: letter argmax or the exact MAP over option subsets; --mode generate: greedy decoding
and letter extraction). summary.json reports micro accuracy with its 95% Wilson interval, macro accuracy
(the mean of per-subject accuracies) and breakdowns; ``compare`` gives the paired difference of two runs
with a 95% paired-bootstrap interval and an exact McNemar p-value, overall and per subject.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np

import cli
import parallel
from benchmarks import BENCHMARKS, HERE, EvalDataError, build_prompt, load, pick_shots, shot_pool
from adapter_io import load_adapter
from model import load_model, resolve_dtype
from outputs import check_output, one_writer, refuse_inputs, write_atomically
from scoring import score_generate, score_logits
from tiny_qwen import model_dir_or_demo
from tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------------------------------
# Metrics


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round((centre - half) / (1 + z * z / n), 4), round((centre + half) / (1 + z * z / n), 4)]


def summarize(bench: str, records: list[dict]) -> dict:
    """Micro accuracy (+ 95% interval), macro = mean of per-subject accuracies, and breakdowns."""
    def acc(rs):
        return round(sum(r["correct"] for r in rs) / len(rs), 4) if rs else None

    by_subject = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    per_subject = {s: {"n": len(rs), "accuracy": acc(rs)} for s, rs in sorted(by_subject.items())}
    single, multi = [r for r in records if not r["multi"]], [r for r in records if r["multi"]]
    return {
        "benchmark": bench, "n": len(records),
        "accuracy_micro": acc(records),
        "accuracy_micro_ci95": wilson_interval(sum(r["correct"] for r in records), len(records)),
        "accuracy_macro": round(sum(v["accuracy"] for v in per_subject.values()) / len(per_subject), 4)
        if per_subject else None,
        # by the gold answer's arity: reporting only, the predictions never saw it
        "single_answer": {"n": len(single), "accuracy": acc(single)},
        "multi_answer": {"n": len(multi), "accuracy": acc(multi)},
        "unparsable": sum(r["predicted"] is None for r in records),
        "per_subject": per_subject,
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only A right, c: only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """B - A accuracy on the same questions: the difference, its 95% paired-bootstrap interval, McNemar."""
    rng = np.random.default_rng(seed)
    d = b.astype(float) - a.astype(float)
    boots = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return {"n": len(d), "accuracy_a": round(float(a.mean()), 4), "accuracy_b": round(float(b.mean()), 4),
            "difference": round(float(d.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": round(mcnemar_exact(only_a, only_b), 6)}


def read_predictions(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"{path}: cannot read predictions ({e})") from None
    need = {"id", "subject", "gold", "correct"}
    if not rows or not all(isinstance(r, dict) and need <= r.keys() for r in rows):
        raise EvalDataError(f"{path}: not an eval.py predictions.jsonl (lines need id, subject, gold, correct)")
    by_id = {r["id"]: r for r in rows}
    if len(by_id) < len(rows):
        dup = next(i for i in by_id if sum(r["id"] == i for r in rows) > 1)
        raise EvalDataError(f"{path}: {len(rows) - len(by_id)} duplicate question ids (e.g. {dup!r}): "
                            "not one run's predictions")
    return by_id


def compare(path_a: str, path_b: str) -> dict:
    """Paired comparison of two runs over the same questions, overall and per subject."""
    a, b = read_predictions(path_a), read_predictions(path_b)
    if a.keys() != b.keys():
        raise EvalDataError(f"{path_a} and {path_b} do not hold the same questions "
                            f"({len(a.keys() - b.keys())} only in A, {len(b.keys() - a.keys())} only in B)")
    differ = [i for i in a if a[i]["gold"] != b[i]["gold"]]
    if differ:
        raise EvalDataError(f"the two runs disagree on the gold answer of {len(differ)} questions, "
                            f"e.g. {differ[0]}")
    ids = sorted(a)
    def paired(keys):
        return paired_difference(np.array([a[i]["correct"] for i in keys]),
                                 np.array([b[i]["correct"] for i in keys]))

    out = {"overall": paired(ids)}
    for s in sorted({a[i]["subject"] for i in ids}):
        out[s] = paired([i for i in ids if a[i]["subject"] == s])
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluating one benchmark


def resolve_data(args, rank: int):
    """(data dir, split): the user's, or the bundled sample (loudly not a benchmark score)."""
    if args.data_dir is not None:
        return args.data_dir, args.split
    b = BENCHMARKS[args.benchmark]
    folder, sample_split = b.sample
    split = sample_split if args.split == "test" else args.split
    if rank == 0:
        print("=" * 78 + f"\nNO --data-dir: scoring the small bundled {split} sample. THESE ARE NOT BENCHMARK "
              "NUMBERS.\n" + (f"({b.sample_note})\n" if b.sample_note else "") + "=" * 78, file=sys.stderr)
    return os.path.join(HERE, "samples", "benchmarks", folder), split


def load_questions(args, data_dir: str, split: str):
    """(items, few-shot prompts as (prefix, rest), shots, rows skipped) for every question of the split."""
    bench = args.benchmark
    known = BENCHMARKS[bench].subjects
    subjects = args.subjects.split(",") if args.subjects else list(known)
    unknown = [s for s in subjects if s not in known]
    if known and unknown:
        raise EvalDataError(f"unknown {bench} subject(s) {unknown}: valid are {list(known)}")
    twice = sorted({s for s in subjects if subjects.count(s) > 1})
    if twice:  # why: a subject named twice would count its questions twice
        raise EvalDataError(f"--subjects names {', '.join(twice)} more than once")
    items, skipped = load(bench, data_dir, split, subjects)
    items = items[:args.limit] if args.limit else items
    if not items:
        raise EvalDataError(f"{bench} {split} under {data_dir}: no questions to score")
    shots = BENCHMARKS[bench].default_shots if args.shots is None else args.shots
    pool = shot_pool(bench, data_dir, split, subjects) if shots > 0 else []
    return items, shots, pool, skipped


def evaluate(args) -> dict:
    rank, world, device = parallel.setup()
    parallel.broadcast_outcome(lambda: check_out(args.out, args.overwrite))  # before any work or output
    data_dir, split = resolve_data(args, rank)
    # why the adapter only: eval writes two files of its own names, never a benchmark file's, but a dir of files
    # hashed by a manifest must not get new ones (checked before the lock file is made)
    parallel.broadcast_outcome(lambda: refuse_inputs([args.out], [args.adapter] if args.adapter else []))
    questions = load_questions(args, data_dir, split)  # why before the lock: a bad file leaves no --out behind
    with one_writer(args.out):  # why a lock: two evals into one --out would each replace the other's results
        # why again: another eval may have written there since the first check; the lock makes this one final
        parallel.broadcast_outcome(lambda: check_out(args.out, args.overwrite))
        return score(args, data_dir, split, questions, rank, world, device)


def score(args, data_dir: str, split: str, questions: tuple, rank: int, world: int, device) -> dict:
    bench = args.benchmark
    items, shots, pool, skipped = questions
    model_dir = model_dir_or_demo(args.model)
    model = load_model(model_dir, dtype=resolve_dtype(args.dtype, device), device=device)
    tok = load_tokenizer(model_dir)
    chat = args.chat or args.adapter is not None
    if args.adapter:
        load_adapter(model, args.adapter)
        model.eval()

    mine = items[rank::world]  # questions shared over ranks
    prompts = [build_prompt(bench, it, pick_shots(bench, it, pool, shots), chat) for it in mine]
    if args.mode == "logits":
        preds, probs = score_logits(model, tok, prompts, mine, args.batch_size, chat)
    else:
        preds, probs = score_generate(model, tok, prompts, mine, args.batch_size)
    records = [{"id": it.id, "subject": it.subject,
                "prompt_sha1": hashlib.sha1((p + r).encode()).hexdigest()[:12],
                "options": it.options, "pick_many": it.pick_many, "gold": it.answer, "predicted": pr,
                "multi": it.multi, "correct": pr is not None and set(pr) == set(it.answer), "letter_probs": pb}
               for it, (p, r), pr, pb in zip(mine, prompts, preds, probs)]
    records = [r for part in parallel.all_gather_objects(records) for r in part]
    summary = summarize(bench, records)
    summary.update(split=split, shots=shots, mode=args.mode, chat=chat, model=model_dir, adapter=args.adapter,
                   data_dir=data_dir, skipped_rows_without_answer=skipped)
    if rank == 0:
        write_results(args.out, records, summary)
    return summary


RESULT_FILES = ("predictions.jsonl", "summary.json")  # all that eval.py writes into --out


def check_out(out: str, overwrite: bool):
    """An eval dir holds one run's results: another run's are replaced only with --overwrite (before any work),
    and only when they are recognisably eval.py's (outputs.py's rule)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvalDataError(f"--out {out} is a file, not a directory")
    held = [n for n in RESULT_FILES if os.path.lexists(os.path.join(out, n))]
    if held and not overwrite:
        raise EvalDataError(f"{out} holds earlier results ({', '.join(held)}): choose another --out, or "
                            "--overwrite replaces them")
    for name in held:
        check_output(os.path.join(out, name), overwrite, is_result)


def is_result(path: str) -> bool:
    """Whether a file is what write_results writes (a summary with its scores, or a predictions line per question)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith("summary.json"):
                s = json.load(f)
                return isinstance(s, dict) and {"benchmark", "n", "accuracy_micro"} <= s.keys()
            return all({"id", "predicted", "gold"} <= json.loads(line).keys() for line in f if line.strip())
    except (OSError, ValueError, AttributeError):
        return False


def write_results(out: str, records: list[dict], summary: dict):
    """predictions.jsonl and summary.json, each written whole or not at all (outputs.write_atomically), the
    summary last: a summary never describes predictions that are not there."""
    os.makedirs(out, exist_ok=True)
    write_atomically(os.path.join(out, "predictions.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(records, key=lambda r: r["id"])))
    write_atomically(os.path.join(out, "summary.json"), json.dumps(summary, ensure_ascii=False, indent=2))
    s = summary
    chat = ", chat" if s["chat"] else ""
    print(f"{s['benchmark']} {s['split']} ({s['n']} questions, {s['shots']}-shot, {s['mode']}{chat}): "
          f"micro {s['accuracy_micro']} (95% CI {s['accuracy_micro_ci95']}), macro {s['accuracy_macro']}, "
          f"gold single {s['single_answer']['accuracy']}, gold multi {s['multi_answer']['accuracy']}; "
          f"{s['unparsable']} unparsable -> {out}/summary.json")


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark", help=f"one of {', '.join(BENCHMARKS)} (or 'compare A B')")
    ap.add_argument("--model", default=None, help="Qwen3 HF checkpoint dir (default: the tiny random demo model)")
    ap.add_argument("--adapter", default=None, help="a SparseDoctor adapter/checkpoint dir (implies --chat)")
    ap.add_argument("--data-dir", default=None, help="folder with the official files (default: bundled sample)")
    ap.add_argument("--split", default="test", choices=["test", "val", "dev", "train"],
                    help="cmexam: test/val/train, cmb: test/val, cmmlu-med: test/dev")
    ap.add_argument("--shots", type=cli.at_least(0), default=None,
                    help="few-shot exemplars (default: 0 CMExam/CMB, 5 CMMLU-Med)")
    ap.add_argument("--mode", default="logits", choices=["logits", "generate"])
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the Qwen3 chat template (thinking off)")
    ap.add_argument("--subjects", default=None,
                    help=f"CMMLU-Med subjects, comma-separated (default: {','.join(BENCHMARKS['cmmlu-med'].subjects)})")
    ap.add_argument("--limit", type=cli.at_least(1), default=None, help="only the first N questions (N >= 1)")
    ap.add_argument("--batch-size", type=cli.at_least(1), default=8)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="output dir (default: runs/eval/<benchmark>)")
    ap.add_argument("--overwrite", action="store_true", help="replace the results an --out already holds")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = ap.parse_args(argv)
    if args.benchmark not in BENCHMARKS:
        ap.error(f"unknown benchmark {args.benchmark!r}: valid names are {', '.join(BENCHMARKS)}")
    if args.data_dir is not None and args.split not in BENCHMARKS[args.benchmark].splits:
        ap.error(f"--split {args.split}: {args.benchmark} has {', '.join(BENCHMARKS[args.benchmark].splits)}")
    args.out = args.out or os.path.join("runs", "eval", args.benchmark)
    return args


def compare_main(argv):
    ap = cli.Parser(prog="eval.py compare", description="Paired comparison of two eval runs (B - A).")
    ap.add_argument("a", help="predictions.jsonl of run A (e.g. the base model)")
    ap.add_argument("b", help="predictions.jsonl of run B (e.g. with the adapter)")
    a = ap.parse_args(argv)
    res = compare(a.a, a.b)
    print(f"{'subject':32s} {'n':>6s} {'acc A':>7s} {'acc B':>7s} {'B - A':>7s} {'95% CI':>18s} "
          f"{'McNemar p':>10s}")
    for name, r in res.items():
        print(f"{name:32s} {r['n']:6d} {r['accuracy_a']:7.4f} {r['accuracy_b']:7.4f} {r['difference']:+7.4f} "
              f"{'[%+.4f, %+.4f]' % tuple(r['ci95']):>18s} {r['mcnemar_p']:10.4g}")
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["compare"]:
            cli.run(lambda: compare_main(argv[1:]), "--debug" in argv)
        else:
            args = parse_args(argv)
            cli.run(lambda: evaluate(args), args.debug)  # user mistakes: one line, exit 2
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()

"""Decontamination's precision and recall on a planted set, and what it removes from real exam questions, for
prepare.py now and at an earlier commit, in one run on the same files.

    python bench/decontam.py [--full ../shared/benchmarks/cmexam/val_full.csv] [--before fdf2b2e] [--n-plant 100]

The benchmark: the first half of CMExam val (the full file from shared/, else the bundled sample), as val.csv.
The planted training set, fixed before any run (seed 0):
  true copies  (positive)  --n-plant benchmark questions with their options, as ``prepare.py export`` writes them
  near copies  (positive)  --n-plant more, re-punctuated, full-width digits and letters, spaces, a prefix
  short, bare  (negative)  each benchmark question shorter than n characters, inside a sentence of its own
  boilerplate  (negative)  each n-gram that FREQUENT or more benchmark questions share, inside a new question
Precision and recall count these examples. The second half of val (other questions of the same exams, sharing
their phrases) is run too: what is removed there is either a repeated exam question or a false alarm, so it is
reported as a count with the most common evidence, not scored.
"""
import argparse
import collections
import csv
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

from common import ROOT, table

sys.path.insert(0, ROOT)
from benchmarks import load, options_text  # noqa: E402
from prepare import normalize  # noqa: E402

WIDE = {c: chr(ord(c) + 0xFEE0) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}


def line(user: str, answer: str = "答案：A") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]},
                      ensure_ascii=False) + "\n"


def near(q: str, rng) -> str:
    """A re-typed copy: full-width digits and letters, punctuation swapped, spaces, a prefix."""
    q = "".join(WIDE.get(c, c) for c in q).replace("，", "; ").replace("、", " / ").replace("。", " ")
    return rng.choice(["请回答：", "题目：", "【单选】"]) + q


def planted(items, frequent: list[str], n: int, n_plant: int) -> list[tuple[str, bool]]:
    """[(jsonl line, is a copy)] as the docstring above says."""
    rng = random.Random(0)
    pool = rng.sample(items, min(2 * n_plant, len(items)))
    out = [(line(f"{it.question}\n{options_text(it)}"), True) for it in pool[:n_plant]]
    out += [(line(near(it.question, rng) + "\n" + options_text(it).replace("\n", "  ")), True)
            for it in pool[n_plant:]]
    out += [(line(f"关于{it.question}，请结合临床实际谈谈你的看法。"), False)
            for it in items if 0 < len(normalize(it.question)) < n]
    out += [(line(f"{g}，零售企业应当怎样向患者交代注意事项？"), False) for g in frequent]
    return out


def module_at(rev: str, tmp: str):
    """prepare.py as it was at ``rev`` (git show), imported under another name."""
    path = os.path.join(tmp, f"prepare_{rev}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(subprocess.run(["git", "show", f"{rev}:prepare.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout)
    spec = importlib.util.spec_from_file_location(f"prepare_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def removed_lines(mod, data: str, bench_dir: str, out: str) -> tuple[set, list]:
    mod.decontaminate(data, [("cmexam", bench_dir)], out)
    matches = [json.loads(m) for m in open(out + ".matches.jsonl", encoding="utf-8")]
    return {m["line"] for m in matches}, matches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full = os.path.join(ROOT, "..", "shared", "benchmarks", "cmexam", "val_full.csv")
    ap.add_argument("--full", default=full if os.path.exists(full) else None, help="CMExam val.csv, full")
    ap.add_argument("--before", default="fdf2b2e", help="the commit whose prepare.py to compare with")
    ap.add_argument("--n-plant", type=int, default=100)
    a = ap.parse_args()
    import prepare

    tmp = tempfile.mkdtemp()
    src = a.full or os.path.join(ROOT, "samples", "benchmarks", "cmexam", "val.csv")
    os.makedirs(os.path.join(tmp, "A"))
    shutil.copy(src, os.path.join(tmp, "A", "val.csv"))
    items, _ = load("cmexam", os.path.join(tmp, "A"), "val")
    half = len(items) // 2
    bench, other = items[:half], items[half:]
    with open(os.path.join(tmp, "A", "val.csv"), "w", encoding="utf-8", newline="") as f:  # the first half
        w = csv.writer(f)
        w.writerow(["Question", "Options", "Answer"])
        for it in bench:
            w.writerow([it.question, "\n".join(f"{k} {v}" for k, v in it.options.items()), it.answer])
    n = 13
    frequent = sorted(prepare.benchmark_index([("cmexam", os.path.join(tmp, "A"))], n).frequent)
    plant = planted(bench, frequent, n, a.n_plant)
    with open(os.path.join(tmp, "plant.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(x for x, _ in plant)
    with open(os.path.join(tmp, "other.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(line(f"{it.question}\n{options_text(it)}") for it in other)
    rows = []
    for name, mod in ((f"prepare.py at {a.before}", module_at(a.before, tmp)), ("prepare.py now", prepare)):
        hit, _ = removed_lines(mod, os.path.join(tmp, "plant.jsonl"), os.path.join(tmp, "A"),
                               os.path.join(tmp, "plant.clean.jsonl"))
        tp = sum(1 for i, (_, pos) in enumerate(plant, 1) if pos and i in hit)
        fp = sum(1 for i, (_, pos) in enumerate(plant, 1) if not pos and i in hit)
        positives = sum(pos for _, pos in plant)
        gone, matches = removed_lines(mod, os.path.join(tmp, "other.jsonl"), os.path.join(tmp, "A"),
                                      os.path.join(tmp, "other.clean.jsonl"))
        evidence = collections.Counter(m.get("evidence", m.get("ngram")) for m in matches).most_common(3)
        rows.append([name, f"{tp / max(tp + fp, 1):.3f}", f"{tp / positives:.3f}", f"{tp}/{positives}",
                     f"{fp}/{len(plant) - positives}", f"{len(gone)}/{len(other)}",
                     ", ".join(f"{g} x{c}" for g, c in evidence)])
    print(f"benchmark: {len(bench)} questions of {os.path.basename(src)} ({len(frequent)} frequent {n}-grams, "
          f"{sum(0 < len(normalize(i.question)) < n for i in bench)} questions shorter than {n}); planted: "
          f"{len(plant)} examples; the other half: {len(other)} questions")
    print(table(rows, ["rule", "precision", "recall", "copies found", "false alarms", "other half removed",
                       "most common evidence there"]))


if __name__ == "__main__":
    main()

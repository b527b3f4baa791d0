"""Training data from what users bring: a benchmark's training split as chat jsonl, and a training jsonl checked
against the benchmarks' own files (decontamination), so that a score is not on questions trained on.

    python prepare.py export cmexam --data-dir CMExam/data --split train --out cmexam_train.jsonl
    python prepare.py decontaminate med.jsonl --bench cmexam=CMExam/data --bench cmmlu-med=CMMLU/data \\
        --out med.clean.jsonl [--n 13]

``export``: one chat example per question (benchmarks.py's loaders): the question and its options as the user
turn, the answer letters and, where the file has one (CMExam's Explanation, CMB's explanation), the
explanation as the assistant turn.

``decontaminate``: every training example (all its turns) and every question of every split of the named
benchmarks are normalised (NFKC, so full-width characters become half-width; lower case; only letters and
digits kept, so punctuation and spaces do not matter) and cut into character n-grams (n = 13, as the GPT-3
paper and lm-evaluation-harness use, on characters since Chinese has no spaces); an example that shares one
*distinctive* n-gram with a question (one that fewer than FREQUENT questions share) touches it; a question
with none (shorter than n, or all boilerplate) touches an example only as a whole prompt or together with its
options. Writes the examples that touch nothing to ``--out`` (byte for byte), the matched pairs with both
texts to ``OUT.matches.jsonl`` and a stamp
``OUT.decontam.json`` (the clean file's sha256 and what it was checked against) that train.py looks for: a
``--data`` without a matching stamp gets one warning line.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass

import cli
from benchmarks import BENCHMARKS, EvalDataError, load, options_text
from data import DataError, parse_line
from outputs import OutputLock, check_output, refuse_inputs, write_atomically

STAMP = ".decontam.json"  # beside the clean file: OUT + STAMP


def normalize(text: str) -> str:
    """NFKC, lower case, letters and digits only: the text that n-grams are cut from."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).lower() if unicodedata.category(c)[0] in "LN")


def ngrams(text: str, n: int):
    """The distinct n-grams of ``text``, a set in text order. why ordered: the evidence a match reports is then
    the leftmost shared n-gram, the same in every run (a set's order follows the per-process string hash)."""
    return dict.fromkeys(text[i:i + n] for i in range(len(text) - n + 1)).keys()


# ----------------------------------------------------------------------------------------------------------
# export


def export(bench: str, data_dir: str, split: str, out: str) -> int:
    items, _ = load(bench, data_dir, split)
    why = BENCHMARKS[bench].explanations(data_dir, split)  # answer-side text: the loaders never read it
    lines = []
    for it in items:
        answer = f"答案：{it.answer}" + (f"\n解析：{why[it.id]}" if why.get(it.id) else "")
        msgs = [{"role": "user", "content": f"{it.question}\n{options_text(it)}"},
                {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    write_atomically(out, "".join(lines).encode("utf-8"))
    print(f"{bench} {split}: {len(lines)} examples ({sum(bool(why.get(i.id)) for i in items)} with an explanation) "
          f"-> {out}")
    return len(lines)


# ----------------------------------------------------------------------------------------------------------
# decontaminate


FREQUENT = 4  # an n-gram in this many benchmark questions or more is boilerplate: not evidence on its own
SHOWN = 1000  # characters of a training example shown in the matches file


@dataclass
class BenchIndex:
    """What decontamination matches against. ``grams``: each distinctive n-gram -> the questions holding it;
    ``frequent``: the n-grams in FREQUENT or more questions -> how many; ``whole``: the questions with no
    distinctive n-gram (shorter than n, or all boilerplate), as (question, question + options) normalised, which
    match only as a whole prompt or together with their options; ``texts``: each question's own text."""
    grams: dict
    frequent: dict
    whole: list
    texts: dict
    read: list


def benchmark_index(specs: list[tuple[str, str]], n: int) -> BenchIndex:
    """Every question of every split of the named benchmarks, indexed (``BenchIndex``)."""
    questions, read = [], []
    for bench, data_dir in specs:
        for split in BENCHMARKS[bench].splits:
            try:
                items, _ = load(bench, data_dir, split, answers=False)  # questions need no answers
            except EvalDataError as e:
                if "not found" in str(e):  # a split the user does not have: say so, go on
                    print(f"{bench} {split}: not found under {data_dir}, not checked")
                    continue
                raise
            read.append(f"{bench} {split}")
            questions += [((bench, split, it.id), it) for it in items]
        if not any(r.startswith(bench + " ") for r in read):  # why each: a typo'd dir must not pass as checked
            raise EvalDataError(f"--bench {bench}={data_dir}: no file of {bench} found there (expected the official "
                                f"files from {BENCHMARKS[bench].source}): nothing to check against")
    normal = {key: normalize(it.question) for key, it in questions}
    grams_of = {key: ngrams(q, n) for key, q in normal.items()}
    count = collections.Counter(g for gs in grams_of.values() for g in gs)  # in how many questions
    index = BenchIndex({}, {g: c for g, c in count.items() if c >= FREQUENT}, [],
                       {key: it.question for key, it in questions}, read)
    for key, it in questions:
        distinctive = [g for g in grams_of[key] if count[g] < FREQUENT]
        for g in distinctive:
            index.grams.setdefault(g, []).append(key)
        q = normal[key]
        if not distinctive and q:  # why not as a bare substring: 2-4 characters (子宫, 正确的是) are everywhere
            index.whole.append((q, q + normalize(options_text(it)), key))
    return index


def touches(turns: list[str], index: BenchIndex, n: int) -> tuple[dict, set]:
    """A training example's turns -> ({question key: the evidence}, the frequent n-grams it shares)."""
    text = normalize(" ".join(turns))
    whole = {normalize(t) for t in turns}
    hits, frequent = {}, set()
    for g in ngrams(text, n):
        for key in index.grams.get(g, ()):
            hits.setdefault(key, g)
        if g in index.frequent:
            frequent.add(g)
    for q, with_options, key in index.whole:
        if with_options in text:
            hits.setdefault(key, with_options)
        elif q in whole:
            hits.setdefault(key, q)
    return hits, frequent


def decontaminate(path: str, specs: list[tuple[str, str]], out: str, n: int = 13) -> dict:
    """Check ``path`` against the benchmarks ``specs`` [(name, data dir)]; write the clean file, the matches
    (both texts) and the stamp; report the frequent n-grams that removed nothing; return {"bench split":
    training examples touching it}."""
    index = benchmark_index(specs, n)
    keep, matches, touched, boiler = [], [], {s: set() for s in index.read}, collections.Counter()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                turns = [m["content"] for m in parse_line(raw.lstrip(b"\xef\xbb\xbf"))]
            except DataError:
                keep.append(raw)  # not ours to judge: train.py reports it with its line number
                continue
            hits, frequent = touches(turns, index, n)
            for (bench, split, qid), g in sorted(hits.items()):
                matches.append({"line": line_no, "benchmark": bench, "split": split, "id": qid, "evidence": g,
                                "question": index.texts[(bench, split, qid)],
                                "training": "\n".join(turns)[:SHOWN]})
                touched[f"{bench} {split}"].add(line_no)
            if not hits:
                keep.append(raw)
                boiler.update(frequent)
    clean = b"".join(keep)
    write_atomically(out, clean)
    write_atomically(out + ".matches.jsonl", "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in matches))
    stamp = {"sha256": hashlib.sha256(clean).hexdigest(), "source": os.path.abspath(path), "n": n,
             "checked_against": index.read}
    write_atomically(out + STAMP, json.dumps(stamp, indent=1).encode("utf-8"))
    counts = {s: len(lines) for s, lines in touched.items()}
    for s, c in counts.items():
        print(f"{s}: {c} training examples touch it")
    if boiler:
        print(f"not counted, kept: examples sharing only n-grams found in >= {FREQUENT} benchmark questions each; "
              "most shared: " + ", ".join(f"{g} ({c} examples, {index.frequent[g]} questions)"
                                          for g, c in boiler.most_common(5)))
    removed = len({m["line"] for m in matches})
    print(f"{removed} examples removed, {len(keep)} lines kept -> {out} (pairs: {out}.matches.jsonl)")
    return counts


def is_export(path: str) -> bool:
    """Whether a file is recognisably what ``export`` writes: chat lines whose assistant turn starts 答案："""
    try:
        with open(path, encoding="utf-8") as f:
            return all(json.loads(line)["messages"][1]["content"].startswith("答案：") for line in f if line.strip())
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


def side_files(out: str) -> list[str]:
    """Everything decontaminate writes for ``--out OUT``."""
    return [out, out + ".matches.jsonl", out + STAMP]


def outputs_and_inputs(a) -> tuple[list[str], list[str]]:
    if a.command == "export":
        return [a.out], [a.data_dir]
    return side_files(a.out), [a.data, a.data + STAMP] + [d for _, d in a.bench]


def run(a):
    """outputs.py's rule for this command, before any work: never over an input (the training file, a benchmark
    dir; checked before the lock file is made beside --out), an existing output replaced only with --overwrite
    and only when it is recognisably ours (all three of decontaminate's when the clean file's stamp matches)."""
    outs, ins = outputs_and_inputs(a)
    refuse_inputs(outs, ins)
    with OutputLock(a.out, is_dir=False):
        if a.command == "export":
            ours = is_export
        else:  # why once: the clean file's sha256 decides for all three files
            stamped = os.path.lexists(a.out) and checked(a.out)
            ours = lambda _: stamped  # noqa: E731
        for path in outs:
            check_output(path, a.overwrite, ours)
        if a.command == "export":
            return export(a.benchmark, a.data_dir, a.split, a.out)
        return decontaminate(a.data, a.bench, a.out, a.n)


def checked(path: str) -> bool:
    """Whether ``path`` is a file ``decontaminate`` wrote (its stamp beside it, the sha256 matching)."""
    try:
        with open(path + STAMP, encoding="utf-8") as f:
            want = json.load(f)["sha256"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == want
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------------------------------------


def bench_spec(s: str) -> tuple[str, str]:
    name, _, data_dir = s.partition("=")
    if name not in BENCHMARKS or not data_dir:
        raise argparse.ArgumentTypeError(f"{s!r}: expected NAME=DIR with NAME one of {', '.join(BENCHMARKS)}")
    return name, data_dir


def main(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a benchmark split as chat jsonl")
    ex.add_argument("benchmark", choices=BENCHMARKS)
    ex.add_argument("--data-dir", required=True, help="folder with the benchmark's official files")
    ex.add_argument("--split", default="train", help="cmexam: train/val/test, cmb: val/test, cmmlu-med: dev/test")
    ex.add_argument("--out", required=True, help="the jsonl to write")
    de = sub.add_parser("decontaminate", help="drop training examples that share an n-gram with a benchmark")
    de.add_argument("data", help="training jsonl")
    de.add_argument("--bench", type=bench_spec, action="append", required=True,
                    help="NAME=DIR, a benchmark and its official files; repeat for several")
    de.add_argument("--out", required=True, help="the clean jsonl to write (never the input itself); beside it "
                    "OUT.matches.jsonl and OUT.decontam.json")
    de.add_argument("--n", type=cli.at_least(4), default=13, help="n-gram length in characters (default: 13)")
    for p in (ex, de):
        p.add_argument("--overwrite", action="store_true", help="replace an --out this command wrote before")
    a = ap.parse_args(argv)
    if a.command == "export" and a.split not in BENCHMARKS[a.benchmark].splits:
        ap.error(f"--split {a.split}: {a.benchmark} has {', '.join(BENCHMARKS[a.benchmark].splits)}")
    if a.command == "decontaminate" and not os.path.isfile(a.data):
        ap.error(f"{a.data}: not a regular file")
    return cli.run(lambda: run(a), False)


if __name__ == "__main__":
    main()

"""The three medical benchmarks: one ``Benchmark`` record each (its files, splits, subjects, prompt and scoring
kind, at the end of this file), the loaders of their official files, few-shot pools and prompts. Adding a
benchmark means one record and its loader here.

Nothing that decides a prediction may read the gold answer. Each ``Item`` separates what the question
files say (question, options, ``pick_many``, metadata) from the answer (``answer``, and ``multi``, the gold
arity, used only to break down the report):

- CMExam publishes no question type, so every CMExam question is posed and scored the same way: the prompt
  says there may be one or more correct options, and the prediction is the best non-empty option subset.
- CMB's question files carry ``question_type`` (单项选择题 / 多项选择题): its prompt and rule follow it.
- CMMLU is single-answer by construction: one letter of A-D.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from tokenizer import apply_chat_template, render_turns

HERE = os.path.dirname(os.path.abspath(__file__))
# CMMLU-Med as defined by Apollo's XMedBench; names as in CMMLU's own subject table
CMMLU_MED = {"anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medicine": "大学医学",
             "genetics": "遗传学", "nutrition": "营养学", "traditional_chinese_medicine": "中医中药",
             "virology": "病毒学"}


@dataclass
class Item:
    id: str
    subject: str          # per-subject breakdown key: CMMLU subject, CMB exam_class, CMExam department
    question: str
    options: dict         # letter -> text, in letter order
    pick_many: bool       # from the question side only: the answer may be any non-empty subset of options
    answer: str           # gold letters, sorted (scoring compares with it; nothing before that reads it)
    multi: bool           # gold arity > 1: for the report's breakdown only
    meta: dict = field(default_factory=dict)


class EvalDataError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Loaders for the official files


def find_file(data_dir: str, name: str, bench: str) -> str:
    """``name`` (a path tail like 'dev/anatomy.csv') under ``data_dir`` at any depth, or a clear error. why it
    refuses two: which one a walk finds first is the filesystem's order, so a stray backup copy would be read
    half of the time."""
    found = []
    for root, _, files in os.walk(data_dir):
        path = os.path.join(root, os.path.basename(name))
        if os.path.basename(name) in files and path.replace(os.sep, "/").endswith(name):
            if not os.path.isfile(path):  # why: a device or fifo named like the file would be read without end
                raise EvalDataError(f"{path} is not a regular file")
            found.append(path)
    if len(found) > 1:
        raise EvalDataError(f"{bench}: {len(found)} files named {name} under {data_dir} ({', '.join(sorted(found))}): "
                            "point --data-dir at the folder of the one to read")
    if found:
        return found[0]
    raise EvalDataError(f"{bench}: {name} not found under {data_dir}. Expected the official files from "
                        f"{BENCHMARKS[bench].source}; --data-dir may point at the folder holding them or at the repo's "
                        "data/.")


def read_csv(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: tolerate a BOM; csv handles CRLF
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: not a UTF-8 CSV file ({e})") from None
    for n, r in enumerate(rows):
        if None in r or None in r.values():  # DictReader's marks of a row with more / fewer fields than the header
            raise EvalDataError(f"{path}: row {n + 2} has {'more' if None in r else 'fewer'} fields than the "
                                "header (a truncated or damaged file?)")
    return rows


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"{path}: not a valid UTF-8 JSON file ({e})") from None


CMEXAM_FILES = {"test": "test_with_annotations.csv", "val": "val.csv", "train": "train.csv"}


def load_cmexam(data_dir: str, split: str, subjects=None, answers=True) -> tuple[list[Item], int]:
    path = find_file(data_dir, CMEXAM_FILES[split], "cmexam")
    items, skipped = [], 0
    for n, r in enumerate(read_csv(path)):
        row = n + 2  # header is line 1
        if not {"Question", "Options", "Answer"} <= r.keys():
            raise EvalDataError(f"{path}: header must have Question,Options,Answer; got {list(r)}")
        answer = (r["Answer"] or "").strip()
        if not answer:  # one val row has no answer: skip, counted
            skipped += 1
            continue
        options = {}
        for line in (r["Options"] or "").strip().splitlines():  # "A 原发病": letter, space, text
            m = re.match(r"\s*([A-F])\s+(.*)", line)
            if not m:
                raise EvalDataError(f"{path}: row {row}: option line {line!r} is not 'LETTER text'")
            options[m.group(1)] = m.group(2).strip()
        if not set(answer) <= options.keys():
            raise EvalDataError(f"{path}: row {row}: answer {answer!r} not among options {sorted(options)}")
        items.append(Item(f"cmexam-{split}-{n}", r.get("Clinical Department") or "all", r["Question"].strip(),
                          options, True, "".join(sorted(set(answer))), len(set(answer)) > 1))
    return items, skipped


def cmb_rows(data_dir: str, split: str, answers: bool = True) -> tuple[str, list]:
    """CMB's question records (test: joined with the separate answer file on ``id``, unless ``answers`` is off)."""
    if split == "val":
        qpath = find_file(data_dir, "CMB-val-merge.json", "cmb")
        return qpath, read_json(qpath)
    qpath = find_file(data_dir, "CMB-test-choice-question-merge.json", "cmb")
    if not answers:
        return qpath, read_json(qpath)
    apath = find_file(data_dir, "CMB-test-choice-answer.json", "cmb")
    rows, answers = read_json(qpath), read_json(apath)
    if not isinstance(answers, list) or \
            not all(isinstance(a, dict) and {"id", "answer"} <= a.keys() for a in answers):
        raise EvalDataError(f"{apath}: expected a JSON array of {{'id', 'answer'}} records")
    ids = [str(a["id"]) for a in answers]
    if len(set(ids)) < len(ids):
        raise EvalDataError(f"{apath}: answer id {next(i for i in ids if ids.count(i) > 1)!r} appears more than once")
    answers = {str(a["id"]): a["answer"] for a in answers}
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict):
            if str(r.get("id")) not in answers:
                raise EvalDataError(f"{apath}: no answer for question id {r.get('id')!r}")
            r["answer"] = answers[str(r["id"])]
    return qpath, rows


def load_cmb(data_dir: str, split: str, subjects=None, answers=True) -> tuple[list[Item], int]:
    qpath, rows = cmb_rows(data_dir, split, answers)
    if not isinstance(rows, list):
        raise EvalDataError(f"{qpath}: expected a JSON array of question records")
    items, seen = [], set()
    for n, r in enumerate(rows):
        if not answers and isinstance(r, dict):
            r = {**r, "answer": r.get("answer") if isinstance(r.get("answer"), str) else ""}
        fields_ = {"exam_type", "exam_class", "question", "question_type", "option", "answer"}
        missing = fields_ - set(r if isinstance(r, dict) else {})
        if missing:
            raise EvalDataError(f"{qpath}: record {n}: missing {sorted(missing)}")
        opts = r["option"]
        options_ok = isinstance(opts, dict) and all(isinstance(v, (str, type(None))) for v in opts.values())
        if not options_ok or not all(isinstance(r[k], str) for k in fields_ - {"option"}):
            raise EvalDataError(f"{qpath}: record {n}: 'option' must be a letter -> text object and the other "
                                "fields strings")
        options = {k: v.strip() for k, v in sorted(r["option"].items()) if v and v.strip()}  # drop unused keys
        answer = "".join(sorted(set(r["answer"].strip())))  # compare as letter sets: some are unsorted
        if answers and (not answer or not set(answer) <= options.keys()):
            raise EvalDataError(f"{qpath}: record {n}: answer {r['answer']!r} not among options "
                                f"{sorted(options)}")
        if str(r.get("id", n)) in seen:  # why: a duplicate id would be scored against another question's gold
            raise EvalDataError(f"{qpath}: question id {r.get('id', n)!r} appears more than once")
        seen.add(str(r.get("id", n)))
        items.append(Item(f"cmb-{split}-{r.get('id', n)}", r["exam_class"], r["question"].strip(), options,
                          r["question_type"] == "多项选择题", answer, len(answer) > 1,
                          {k: r[k] for k in ("exam_type", "exam_class", "question_type")}))
    return items, 0


def load_cmmlu(data_dir: str, split: str, subjects=None, answers=True) -> tuple[list[Item], int]:
    items = []
    for subject in subjects or list(CMMLU_MED):
        path = find_file(data_dir, f"{split}/{subject}.csv", "cmmlu-med")
        for n, r in enumerate(read_csv(path)):
            if not {"Question", "A", "B", "C", "D", "Answer"} <= r.keys():
                raise EvalDataError(f"{path}: header must be ',Question,A,B,C,D,Answer'; got {list(r)}")
            answer = (r["Answer"] or "").strip()
            if answer not in ("A", "B", "C", "D"):
                raise EvalDataError(f"{path}: row {n + 2}: answer {r['Answer']!r} is not one of A-D")
            items.append(Item(f"cmmlu-{subject}-{split}-{n}", subject, r["Question"].strip(),
                              {k: (r[k] or "").strip() for k in "ABCD"}, False, answer, False))
    return items, 0


def explanations_cmexam(data_dir: str, split: str) -> dict:
    rows = read_csv(find_file(data_dir, CMEXAM_FILES[split], "cmexam"))
    return {f"cmexam-{split}-{n}": (r.get("Explanation") or "").strip() for n, r in enumerate(rows)}


def explanations_cmb(data_dir: str, split: str) -> dict:
    _, rows = cmb_rows(data_dir, split)
    return {f"cmb-{split}-{r.get('id', n)}": str(r.get("explanation") or "").strip()
            for n, r in enumerate(rows) if isinstance(r, dict)}


def load(bench, data_dir, split, subjects=None, answers=True) -> tuple[list[Item], int]:
    """(items, rows skipped for having no answer) of one benchmark split (``subjects``: CMMLU-Med's, default
    all). ``answers=False``: the questions alone (decontamination), so CMB's test questions need no answer file
    (CMExam's and CMMLU's answers are in the questions' own files)."""
    b = BENCHMARKS[bench]
    if split not in b.splits:
        raise EvalDataError(f"{bench} has no {split!r} split: valid are {', '.join(b.splits)}")
    return b.loader(data_dir, split, subjects, answers)


def shot_pool(bench, data_dir, split, subjects=None) -> list[Item]:
    """Few-shot exemplars come from the dev/val split (CMMLU dev, CMB val, CMExam val or, for val, train)."""
    return load(bench, data_dir, BENCHMARKS[bench].shot_split[split], subjects)[0]


def pick_shots(bench, item: Item, pool: list[Item], k: int) -> list[Item]:
    """The first k pool items of the item's group (``Benchmark.same_group``: the same subject for CMMLU, exam
    type and class for CMB, any for CMExam); never the item itself nor a pool item with the same question text."""
    if k <= 0:
        return []
    same = [p for p in pool if BENCHMARKS[bench].same_group(item, p)]
    return [p for p in same if p.id != item.id and p.question != item.question][:k]


# ----------------------------------------------------------------------------------------------------------
# Prompts: (shared prefix, question part); the prompt is their concatenation


def options_text(item: Item) -> str:
    return "\n".join(f"{k}. {v}" for k, v in item.options.items())


def question_cmmlu(item: Item) -> str:  # CMMLU's official per-question format
    return f"题目：{item.question}\n{options_text(item)}"


def question_cmb(item: Item) -> str:  # CMB's official answer-only (no-CoT) template; question_type: a question field
    m = item.meta
    return (f"以下是中国{m['exam_type']}中{m['exam_class']}考试的一道{m['question_type']}，"
            f"不需要做任何分析和解释，直接输出答案选项。\n{item.question}\n{options_text(item)}")


def question_cmexam(item: Item) -> str:
    """CMExam publishes no prompt and no question type: ours mirrors CMB's and is the same for every question."""
    return ("以下是中国医学考试的一道选择题，正确答案可能有一个或多个，"
            f"不需要做任何分析和解释，直接输出答案选项。\n"
            f"{item.question}\n{options_text(item)}")


def question_text(bench: str, item: Item) -> str:
    """The question part of a prompt, without the answer cue."""
    return BENCHMARKS[bench].question(item)


def cmmlu_header(item: Item) -> str:
    return f"以下是关于{CMMLU_MED[item.subject]}的单项选择题，请直接给出正确答案的选项。\n\n"


def build_prompt(bench: str, item: Item, shots: list[Item], chat: bool) -> tuple[str, str]:
    """(prefix, rest): the part shared by every question with the same shots, and the question's own part.

    Raw: header (CMMLU) + shots '...{cue}{X}\\n\\n' | question + cue. Chat (Qwen3 template, thinking off):
    shots as
    user/assistant turns | the question's user turn + the generation prompt."""
    head = BENCHMARKS[bench].header(item)
    if chat:
        turns = []
        for s in shots:
            turns += [{"role": "user", "content": question_text(bench, s)},
                      {"role": "assistant", "content": s.answer}]
        turns.append({"role": "user", "content": question_text(bench, item)})
        turns[0] = {**turns[0], "content": head + turns[0]["content"]}
        prefix = "".join(render_turns(turns)[:-1])
        return prefix, apply_chat_template(turns, add_generation_prompt=True, enable_thinking=False)[len(prefix):]
    cue = BENCHMARKS[bench].answer_cue
    body = "".join(f"{question_text(bench, s)}\n{cue}{s.answer}\n\n" for s in shots)
    if not shots:  # no shared part: the header (if any) goes with the question
        return "", f"{head}{question_text(bench, item)}\n{cue}"
    return f"{head}{body}", f"{question_text(bench, item)}\n{cue}"


# ----------------------------------------------------------------------------------------------------------
# The records


@dataclass(frozen=True)
class Benchmark:
    """One benchmark, everything about it in one place. Its scoring kind is each ``Item.pick_many``, which its
    loader sets from the question files only: always (CMExam: subset MAP), by question type (CMB), never (CMMLU)."""
    name: str
    source: str              # where its official files come from (named when one is missing)
    splits: tuple            # the splits it has, the usual evaluation split first
    shot_split: dict         # evaluation split -> the split its few-shot exemplars come from
    default_shots: int
    sample: tuple            # (folder under samples/benchmarks/, split) of the bundled sample
    answer_cue: str          # what the prompt ends with, before the answer letters
    loader: Callable         # (data_dir, split, subjects) -> (items, rows skipped)
    question: Callable       # item -> the question part of its prompt
    same_group: Callable     # (item, pool item) -> the pool item may be its exemplar
    header: Callable = lambda item: ""  # text before the exemplars (CMMLU's subject line)
    explanations: Callable = lambda data_dir, split: {}  # answer-side text, for prepare.py export only
    subjects: tuple = ()     # selectable subjects (CMMLU-Med); empty: none
    sample_note: str = ""    # printed when the bundled sample is scored


BENCHMARKS = {b.name: b for b in (
    Benchmark(name="cmexam", source="github williamliujl/CMExam (data/train.csv, val.csv, test_with_annotations.csv)",
              splits=("test", "val", "train"), shot_split={"test": "val", "val": "train", "train": "val"},
              default_shots=0, sample=("cmexam", "val"), answer_cue="答案：", loader=load_cmexam,
              question=question_cmexam, same_group=lambda item, p: True, explanations=explanations_cmexam),
    Benchmark(name="cmb",
              source="github FreedomIntelligence/CMB (data/CMB.zip -> CMB-Exam/..., data/CMB-test-choice-answer.json)",
              splits=("test", "val"), shot_split={"test": "val", "val": "val"}, default_shots=0,
              sample=("cmb", "val"), answer_cue="答案：", loader=load_cmb, question=question_cmb,
              same_group=lambda item, p: (p.meta["exam_type"], p.subject) == (item.meta["exam_type"], item.subject),
              explanations=explanations_cmb,
              sample_note="the CMB sample is written by us in CMB's format, not CMB items"),
    Benchmark(name="cmmlu-med", source="github haonan-li/CMMLU (data/dev/<subject>.csv, data/test/<subject>.csv)",
              splits=("test", "dev"), shot_split={"test": "dev", "dev": "dev"}, default_shots=5,
              sample=("cmmlu", "dev"), answer_cue="答案是：", loader=load_cmmlu, question=question_cmmlu,
              same_group=lambda item, p: p.subject == item.subject, header=cmmlu_header, subjects=tuple(CMMLU_MED)),
)}

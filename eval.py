"""Medical benchmark evaluation: CMExam, CMB (CMB-Exam) and CMMLU-Med.

    python eval.py cmexam --model DIR --data-dir CMExam/data --split test
    python eval.py cmb --model DIR --adapter runs/sparsedoctor/latest --data-dir CMB/data
    python eval.py cmmlu-med --model DIR --data-dir CMMLU/data --shots 5
    python eval.py cmexam                        # no --data-dir: bundled dev/val sample + demo model (not scores!)

Scoring (--mode logits, default): one forward per batch; the next-token logits at the answer position,
restricted to the question's option letters; argmax. A multi-answer question is scored by the most
probable *answer string*: every non-empty subset of the options, written as sorted letters and followed
by the answer terminator, is scored by its total log-probability, and the best one is the prediction
(exact MAP over well-formed answers). Both are compared with the gold answer as letter sets.
--mode generate: greedy decoding and official-style letter extraction; unparsable outputs are counted.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import parallel
from chat import generate
from data import left_pad
from lora_moe import load_adapter
from model import load_model, resolve_dtype
from tiny_qwen import model_dir_or_demo
from tokenizer import apply_chat_template, load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("cmexam", "cmb", "cmmlu-med")
# CMMLU-Med as defined by Apollo's XMedBench; names as in CMMLU's own subject table
CMMLU_MED = {"anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medicine": "大学医学",
             "genetics": "遗传学", "nutrition": "营养学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学"}
DEFAULT_SHOTS = {"cmexam": 0, "cmb": 0, "cmmlu-med": 5}
SOURCES = {"cmexam": "github williamliujl/CMExam (data/train.csv, val.csv, test_with_annotations.csv)",
           "cmb": "github FreedomIntelligence/CMB (data/CMB.zip -> CMB-Exam/..., data/CMB-test-choice-answer.json)",
           "cmmlu-med": "github haonan-li/CMMLU (data/dev/<subject>.csv, data/test/<subject>.csv)"}


@dataclass
class Item:
    id: str
    subject: str          # per-subject breakdown key: CMMLU subject, CMB exam_class, CMExam department
    question: str
    options: dict         # letter -> text, in letter order
    answer: str           # gold letters, sorted
    multi: bool           # multi-answer question
    meta: dict = field(default_factory=dict)


class EvalDataError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Loaders for the official files


def find_file(data_dir: str, name: str, bench: str) -> str:
    """``name`` (a path tail like 'dev/anatomy.csv') under ``data_dir`` at any depth, or a clear error."""
    for root, _, files in os.walk(data_dir):
        path = os.path.join(root, os.path.basename(name))
        if os.path.basename(name) in files and path.replace(os.sep, "/").endswith(name):
            return path
    raise EvalDataError(f"{bench}: {name} not found under {data_dir}. Expected the official files from "
                        f"{SOURCES[bench]}; --data-dir may point at the folder holding them or at the repo's data/.")


def read_csv(path: str) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: tolerate a BOM; csv handles CRLF
        return list(csv.DictReader(f))


def load_cmexam(data_dir: str, split: str) -> tuple[list[Item], int]:
    name = {"test": "test_with_annotations.csv", "val": "val.csv", "train": "train.csv"}[split]
    path = find_file(data_dir, name, "cmexam")
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
        for line in r["Options"].strip().splitlines():  # "A 原发病": letter, space, text
            m = re.match(r"\s*([A-F])\s+(.*)", line)
            if not m:
                raise EvalDataError(f"{path}: row {row}: option line {line!r} is not 'LETTER text'")
            options[m.group(1)] = m.group(2).strip()
        if not set(answer) <= options.keys():
            raise EvalDataError(f"{path}: row {row}: answer {answer!r} not among options {sorted(options)}")
        items.append(Item(f"cmexam-{split}-{n}", r.get("Clinical Department") or "all", r["Question"].strip(),
                          options, "".join(sorted(answer)), len(answer) > 1))
    return items, skipped


def load_cmb(data_dir: str, split: str) -> tuple[list[Item], int]:
    if split == "test":
        qpath = find_file(data_dir, "CMB-test-choice-question-merge.json", "cmb")
        apath = find_file(data_dir, "CMB-test-choice-answer.json", "cmb")
        rows = json.load(open(qpath, encoding="utf-8"))
        answers = {str(a["id"]): a["answer"] for a in json.load(open(apath, encoding="utf-8"))}
        for r in rows:
            if str(r.get("id")) not in answers:
                raise EvalDataError(f"{apath}: no answer for question id {r.get('id')!r}")
            r["answer"] = answers[str(r["id"])]
    else:
        qpath = find_file(data_dir, f"CMB-{split}-merge.json", "cmb")
        rows = json.load(open(qpath, encoding="utf-8"))
    items = []
    for n, r in enumerate(rows):
        missing = {"exam_type", "exam_class", "question", "question_type", "option", "answer"} - r.keys()
        if missing:
            raise EvalDataError(f"{qpath}: record {n}: missing {sorted(missing)}")
        options = {k: v.strip() for k, v in sorted(r["option"].items()) if v and v.strip()}  # drop unused keys
        answer = "".join(sorted(set(r["answer"].strip())))  # compare as letter sets: some are unsorted
        if not answer or not set(answer) <= options.keys():
            raise EvalDataError(f"{qpath}: record {n}: answer {r['answer']!r} not among options {sorted(options)}")
        items.append(Item(f"cmb-{split}-{r.get('id', n)}", r["exam_class"], r["question"].strip(), options, answer,
                          r["question_type"] == "多项选择题",
                          {"exam_type": r["exam_type"], "exam_class": r["exam_class"], "question_type": r["question_type"]}))
    return items, 0


def load_cmmlu(data_dir: str, split: str, subjects) -> tuple[list[Item], int]:
    items = []
    for subject in subjects:
        path = find_file(data_dir, f"{split}/{subject}.csv", "cmmlu-med")
        for n, r in enumerate(read_csv(path)):
            if not {"Question", "A", "B", "C", "D", "Answer"} <= r.keys():
                raise EvalDataError(f"{path}: header must be ',Question,A,B,C,D,Answer'; got {list(r)}")
            if r["Answer"].strip() not in "ABCD" or not r["Answer"].strip():
                raise EvalDataError(f"{path}: row {n + 2}: answer {r['Answer']!r} is not one of A-D")
            items.append(Item(f"cmmlu-{subject}-{split}-{n}", subject, r["Question"].strip(),
                              {k: r[k].strip() for k in "ABCD"}, r["Answer"].strip(), False))
    return items, 0


def load(bench, data_dir, split, subjects=None):
    if bench == "cmexam":
        return load_cmexam(data_dir, split)
    if bench == "cmb":
        return load_cmb(data_dir, split)
    return load_cmmlu(data_dir, split, subjects or list(CMMLU_MED))


def shot_pool(bench, data_dir, split, subjects=None) -> list[Item]:
    """Few-shot exemplars come from the dev/val split (CMMLU dev, CMB val, CMExam val or, for val, train)."""
    pool_split = {"cmmlu-med": "dev", "cmb": "val", "cmexam": "val" if split != "val" else "train"}[bench]
    return load(bench, data_dir, pool_split, subjects)[0]


def pick_shots(bench, item: Item, pool: list[Item], k: int) -> list[Item]:
    """The first k pool items of the same subject (CMMLU), exam_type+exam_class (CMB), or any (CMExam); never the item."""
    if k <= 0:
        return []
    if bench == "cmmlu-med":
        same = [p for p in pool if p.subject == item.subject]
    elif bench == "cmb":
        same = [p for p in pool if p.meta["exam_type"] == item.meta["exam_type"] and p.subject == item.subject]
    else:
        same = pool
    return [p for p in same if p.id != item.id][:k]


# ----------------------------------------------------------------------------------------------------------
# Prompts


def options_text(item: Item) -> str:
    return "\n".join(f"{k}. {v}" for k, v in item.options.items())


def question_text(bench: str, item: Item) -> str:
    """The question part of a prompt, without the answer cue."""
    if bench == "cmmlu-med":  # CMMLU's official per-question format
        return f"题目：{item.question}\n{options_text(item)}"
    if bench == "cmb":  # CMB's official answer-only (no-CoT) template
        m = item.meta
        return (f"以下是中国{m['exam_type']}中{m['exam_class']}考试的一道{m['question_type']}，"
                f"不需要做任何分析和解释，直接输出答案选项。\n{item.question}\n{options_text(item)}")
    # CMExam publishes no prompt; ours mirrors CMB's, stating single/multi as CMB does
    kind = "多项选择题" if item.multi else "单项选择题"
    return f"以下是中国医学考试的一道{kind}，不需要做任何分析和解释，直接输出答案选项。\n{item.question}\n{options_text(item)}"


ANSWER_CUE = {"cmmlu-med": "答案是：", "cmb": "答案：", "cmexam": "答案："}


def build_prompt(bench: str, item: Item, shots: list[Item], chat: bool) -> str:
    """Raw: header (CMMLU) + shots '...{cue}{X}\\n\\n' + question + cue. Chat: shots as user/assistant turns."""
    if chat:
        msgs = []
        for s in shots:
            msgs += [{"role": "user", "content": question_text(bench, s)}, {"role": "assistant", "content": s.answer}]
        msgs.append({"role": "user", "content": question_text(bench, item)})
        if bench == "cmmlu-med":
            msgs[0]["content"] = f"以下是关于{CMMLU_MED[item.subject]}的单项选择题，请直接给出正确答案的选项。\n\n" + msgs[0]["content"]
        return apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    cue = ANSWER_CUE[bench]
    head = f"以下是关于{CMMLU_MED[item.subject]}的单项选择题，请直接给出正确答案的选项。\n\n" if bench == "cmmlu-med" else ""
    body = "".join(f"{question_text(bench, s)}\n{cue}{s.answer}\n\n" for s in shots)
    return f"{head}{body}{question_text(bench, item)}\n{cue}"


# ----------------------------------------------------------------------------------------------------------
# Scoring


def letter_token_ids(tok) -> dict:
    out = {}
    for c in "ABCDEF":
        ids = tok.encode(c)
        if len(ids) != 1:
            raise ValueError(f"option letter {c!r} is not a single token in this vocabulary: {ids}")
        out[c] = ids[0]
    return out


@torch.inference_mode()
def next_token_logprobs(model, seqs: list[list[int]], pad_id: int):
    """log-softmax of the next-token logits after each sequence (batched, left-padded): (B, V) fp32."""
    device = model.lm_head.weight.device
    ids, mask = left_pad(seqs, pad_id)
    logits = model(ids.to(device), attention_mask=mask.to(device), last_only=True)[:, -1]
    return logits.float().log_softmax(-1).cpu()


@torch.inference_mode()
def answer_string_logprob(model, prompt: list[int], conts: list[list[int]], pad_id: int) -> torch.Tensor:
    """Total log-probability of each continuation after ``prompt`` (one batched forward; head only where needed)."""
    device = model.lm_head.weight.device
    seqs = [prompt + c for c in conts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)  # right padding: real tokens never see the pads after them
    hidden = model.model(ids.to(device))
    scores = torch.zeros(len(seqs))
    for i, c in enumerate(conts):
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=device)  # positions predicting c
        lp = model.lm_head(hidden[i, pos]).float().log_softmax(-1)
        scores[i] = lp.gather(-1, torch.tensor(c, device=device)[:, None]).sum().cpu()
    return scores


def score_logits(model, tok, prompts, items, batch_size, chat: bool):
    """Predictions and the letter distributions (softmax over the item's letters) for every item."""
    letters = letter_token_ids(tok)
    terminator = tok.encode("<|im_end|>") if chat else tok.encode("\n\n")
    encoded = [tok.encode(p) for p in prompts]
    preds, probs = [None] * len(items), [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    for b in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not sys.stderr.isatty()):
        idx = order[b:b + batch_size]
        lp = next_token_logprobs(model, [encoded[i] for i in idx], tok.pad_id)
        for row, i in enumerate(idx):
            opts = list(items[i].options)
            sel = lp[row, [letters[c] for c in opts]]
            probs[i] = dict(zip(opts, [round(x, 6) for x in sel.softmax(-1).tolist()]))
            preds[i] = opts[int(sel.argmax())]
            if items[i].multi:  # exact MAP over every non-empty subset, written sorted + terminator
                cands = ["".join(c) for n in range(1, len(opts) + 1) for c in itertools.combinations(opts, n)]
                s = answer_string_logprob(model, encoded[i], [tok.encode(c) + terminator for c in cands], tok.pad_id)
                preds[i] = cands[int(s.argmax())]
    return preds, probs


ANSWER_RUN = re.compile(r"[A-F](?:[\s,，、和及]*[A-F])*")


def extract_answer(text: str, item: Item) -> str | None:
    """Official-style extraction: the first run of option letters in the output (e.g. 'A', 'ABD', 'A、C')."""
    for m in ANSWER_RUN.finditer(text):
        found = sorted({c for c in m.group(0) if c in item.options})
        if found:
            return "".join(found) if item.multi else found[0]
    return None


def score_generate(model, tok, prompts, items, batch_size, max_new_tokens=16):
    preds = [None] * len(items)
    encoded = [tok.encode(p) for p in prompts]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    device = model.lm_head.weight.device
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tok.pad_id)
        out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        for row, i in enumerate(idx):
            text = tok.decode([t for t in out[row].tolist() if t not in (tok.eos_id, tok.pad_id)])
            preds[i] = extract_answer(text, items[i])
    return preds, [None] * len(items)


# ----------------------------------------------------------------------------------------------------------
# Metrics


def summarize(bench: str, records: list[dict]) -> dict:
    def acc(rs):
        return round(sum(r["correct"] for r in rs) / len(rs), 4) if rs else None

    by_subject = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    per_subject = {s: {"n": len(rs), "accuracy": acc(rs)} for s, rs in sorted(by_subject.items())}
    return {
        "benchmark": bench, "n": len(records),
        "accuracy_micro": acc(records),
        "accuracy_macro": round(sum(v["accuracy"] for v in per_subject.values()) / len(per_subject), 4) if per_subject else None,
        "single_answer": {"n": sum(not r["multi"] for r in records), "accuracy": acc([r for r in records if not r["multi"]])},
        "multi_answer": {"n": sum(r["multi"] for r in records), "accuracy": acc([r for r in records if r["multi"]])},
        "unparsable": sum(r["predicted"] is None for r in records),
        "per_subject": per_subject,
    }


# ----------------------------------------------------------------------------------------------------------


def evaluate(args) -> dict:
    bench = args.benchmark
    rank, world, device = parallel.setup()

    data_dir, split = args.data_dir, args.split
    if data_dir is None:
        data_dir = os.path.join(HERE, "data", "bench_sample", {"cmexam": "cmexam", "cmb": "cmb", "cmmlu-med": "cmmlu"}[bench])
        split = {"cmexam": "val", "cmb": "val", "cmmlu-med": "dev"}[bench] if split == "test" else split
        if rank == 0:
            print("=" * 78 + f"\nNO --data-dir: scoring the small bundled {split} sample. THESE ARE NOT BENCHMARK "
                  "NUMBERS.\n" + ("(the CMB sample is written by us in CMB's format, not CMB items)\n" if bench == "cmb" else "")
                  + "=" * 78, file=sys.stderr)
    subjects = args.subjects.split(",") if args.subjects else list(CMMLU_MED)
    unknown = [s for s in subjects if s not in CMMLU_MED]
    if bench == "cmmlu-med" and unknown:
        raise EvalDataError(f"unknown CMMLU-Med subject(s) {unknown}: valid are {list(CMMLU_MED)}")
    items, skipped = load(bench, data_dir, split, subjects)
    shots = DEFAULT_SHOTS[bench] if args.shots is None else args.shots
    pool = shot_pool(bench, data_dir, split, subjects) if shots > 0 else []
    if args.limit:
        items = items[:args.limit]

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
    records = [{"id": it.id, "subject": it.subject, "prompt_sha1": hashlib.sha1(p.encode()).hexdigest()[:12],
                "options": it.options, "gold": it.answer, "predicted": pr, "multi": it.multi,
                "correct": pr is not None and set(pr) == set(it.answer), "letter_probs": pb}
               for it, p, pr, pb in zip(mine, prompts, preds, probs)]
    records = [r for part in parallel.all_gather_objects(records) for r in part]
    summary = summarize(bench, records)
    summary.update(split=split, shots=shots, mode=args.mode, chat=chat, model=model_dir, adapter=args.adapter,
                   data_dir=data_dir, skipped_rows_without_answer=skipped)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for r in sorted(records, key=lambda r: r["id"]):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
        print(f"{bench} {split} ({summary['n']} questions, {shots}-shot, {args.mode}{', chat' if chat else ''}): "
              f"micro {summary['accuracy_micro']}, macro {summary['accuracy_macro']}, single "
              f"{summary['single_answer']['accuracy']}, multi {summary['multi_answer']['accuracy']}; "
              f"{summary['unparsable']} unparsable -> {args.out}/summary.json")
    return summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark", help=f"one of {', '.join(BENCHMARKS)}")
    ap.add_argument("--model", default=None, help="Qwen3 HF checkpoint dir (default: the tiny random demo model)")
    ap.add_argument("--adapter", default=None, help="a SparseDoctor adapter/checkpoint dir (implies --chat)")
    ap.add_argument("--data-dir", default=None, help="folder with the official files (default: bundled sample)")
    ap.add_argument("--split", default="test", choices=["test", "val", "dev", "train"])
    ap.add_argument("--shots", type=int, default=None, help="few-shot exemplars (default: 0 CMExam/CMB, 5 CMMLU-Med)")
    ap.add_argument("--mode", default="logits", choices=["logits", "generate"])
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the Qwen3 chat template (thinking off)")
    ap.add_argument("--subjects", default=None, help=f"CMMLU-Med subjects, comma-separated (default: {','.join(CMMLU_MED)})")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="runs/eval")
    args = ap.parse_args(argv)
    if args.benchmark not in BENCHMARKS:
        ap.error(f"unknown benchmark {args.benchmark!r}: valid names are {', '.join(BENCHMARKS)}")
    if args.out == "runs/eval":
        args.out = os.path.join("runs", "eval", args.benchmark)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        evaluate(args)
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

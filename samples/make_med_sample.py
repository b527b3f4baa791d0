"""Build samples/med_sample.jsonl: chat-form medical QA items from the CMExam *val* split (never test).

    python samples/make_med_sample.py [--src ../shared/benchmarks/cmexam/val_full.csv] [--n 300]

Each item: a system prompt, the question with its options as the user turn, and "答案：X。" plus the
official explanation as the assistant turn. Items are the first N single-answer rows with an explanation.
"""
import argparse
import csv
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM = "你是一名严谨的医学助手。请回答下面的医学考试选择题，先给出答案，再简要解析。"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(HERE, "..", "..", "shared", "benchmarks", "cmexam", "val_full.csv"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(HERE, "med_sample.jsonl"))
    a = ap.parse_args()
    with open(a.src, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.DictReader(f) if len(r["Answer"].strip()) == 1 and r["Explanation"].strip()]
    with open(a.out, "w", encoding="utf-8") as f:
        for r in rows[:a.n]:
            user = f"{r['Question'].strip()}\n{r['Options'].strip()}"
            answer = f"答案：{r['Answer'].strip()}。\n解析：{r['Explanation'].strip()}"
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                    {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"wrote {min(a.n, len(rows))} items to {a.out}")


if __name__ == "__main__":
    main()

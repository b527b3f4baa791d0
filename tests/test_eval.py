"""Evaluation: official file formats, golden prompts, predictions that never see the gold answer, the
shared-prefix scorer against the plain path and against transformers, metrics, compare, errors, 2 processes."""
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmarks as bm
import eval as ev
import scoring as sc
from conftest import ROOT, exit_status, require_shared, run_at_once, small_cfg, tree
from tokenizer import Tokenizer

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SAMPLE = os.path.join(ROOT, "samples", "benchmarks")


def test_cmexam_loader_on_shared_sample():
    items, skipped = bm.load_cmexam(os.path.join(require_shared(), "cmexam"), "val")
    assert len(items) == 39 and skipped == 1  # 40 rows, one with an empty answer
    multi = [it for it in items if it.multi]
    assert len(multi) == 8 and all(len(it.answer) > 1 for it in multi)
    assert all(it.pick_many for it in items)  # CMExam has no question type: every item may have several answers
    assert sorted({len(it.options) for it in items}) == [4, 5]
    noncontig = [it for it in items if list(it.options) in (list("BCDE"), list("ABDE"))]
    assert len(noncontig) == 3  # letters taken from the lines, not assumed A..E
    first = items[0]
    assert first.question.startswith("上消化道出血") and first.answer == "C" and first.options["B"] == "出血部位"


def test_cmexam_full_val_counts():
    import tempfile

    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(require_shared(), "cmexam", "val_full.csv"), os.path.join(tmp, "val.csv"))
    items, skipped = bm.load_cmexam(tmp, "val")
    assert (len(items), skipped) == (6810, 1)
    assert sum(it.multi for it in items) == 210


def test_cmmlu_loader_on_shared_dev():
    items, _ = bm.load_cmmlu(os.path.join(require_shared(), "cmmlu"), "dev", list(bm.CMMLU_MED))
    assert len(items) == 35 and all(len(it.options) == 4 and not it.multi and not it.pick_many for it in items)
    assert {it.subject for it in items} == set(bm.CMMLU_MED)
    anat = [it for it in items if it.subject == "anatomy"]
    assert anat[0].question == "壁胸膜的分部不包括" and anat[0].answer == "B" and anat[0].options["B"] == "肺胸膜"


def test_cmb_loaders_val_and_test_join():
    items, _ = bm.load_cmb(os.path.join(SAMPLE, "cmb"), "val")
    assert len(items) == 6
    assert [it.pick_many for it in items] == [False, True, False, True, False, False]  # from question_type
    assert list(items[1].options) == ["A", "B", "C", "D"]  # the empty E is dropped
    assert list(items[3].options) == list("ABCDEF") and items[3].answer == "ACDF"
    test, _ = bm.load_cmb(os.path.join(FIX, "cmb_test"), "test")
    assert [t.answer for t in test] == ["A", "BE", "A"]  # joined on id; unsorted answer sorted as a set
    assert test[2].pick_many and not test[2].multi  # a 多项选择题 with a one-letter answer: scored as 多项


def item(id, subject, q, options, answer, pick_many=False, meta=None):
    return bm.Item(id, subject, q, options, pick_many, answer, len(answer) > 1, meta or {})


def test_golden_prompts():
    it = item("x", "anatomy", "Q?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "B")
    shot = item("s", "anatomy", "S?", {"A": "1", "B": "2", "C": "3", "D": "4"}, "C")
    head = "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
    assert "".join(bm.build_prompt("cmmlu-med", it, [], chat=False)) == head + "题目：Q?\nA. a\nB. b\nC. c\nD. d\n答案是："
    assert bm.build_prompt("cmmlu-med", it, [shot], chat=False) == (
        head + "题目：S?\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：C\n\n", "题目：Q?\nA. a\nB. b\nC. c\nD. d\n答案是：")
    assert bm.build_prompt("cmmlu-med", it, [shot], chat=True) == (
        "<|im_start|>user\n" + head + "题目：S?\nA. 1\nB. 2\nC. 3\nD. 4<|im_end|>\n<|im_start|>assistant\nC<|im_end|>\n",
        "<|im_start|>user\n题目：Q?\nA. a\nB. b\nC. c\nD. d<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    cmb = item("c", "护士", "题干", {"A": "甲", "B": "乙"}, "AB", True,
               {"exam_type": "护理考试", "exam_class": "护士", "question_type": "多项选择题"})
    assert "".join(bm.build_prompt("cmb", cmb, [], chat=False)) == (
        "以下是中国护理考试中护士考试的一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n题干\nA. 甲\nB. 乙\n答案：")
    assert "".join(bm.build_prompt("cmb", cmb, [], chat=True)) == (
        "<|im_start|>user\n以下是中国护理考试中护士考试的一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n题干\nA. 甲\nB. 乙"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    cx, ex = item("e", "all", "题干", {"A": "甲", "B": "乙"}, "A", True), item("f", "all", "例", {"A": "x", "B": "y"}, "AB", True)
    intro = "以下是中国医学考试的一道选择题，正确答案可能有一个或多个，不需要做任何分析和解释，直接输出答案选项。\n"
    assert bm.build_prompt("cmexam", cx, [ex], chat=False) == (
        f"{intro}例\nA. x\nB. y\n答案：AB\n\n", f"{intro}题干\nA. 甲\nB. 乙\n答案：")


def test_few_shot_exemplars_share_subject_and_never_the_item():
    pool = [item(f"p{i}", s, f"q{i}{s}", dict.fromkeys("ABCD", "t"), "A") for i in range(7) for s in ("anatomy", "virology")]
    it = pool[2]  # an anatomy pool item evaluated against its own pool
    shots = bm.pick_shots("cmmlu-med", it, pool, 5)
    assert len(shots) == 5 and all(s.subject == "anatomy" for s in shots) and it not in shots
    meta = lambda t, c: {"exam_type": t, "exam_class": c, "question_type": "单项选择题"}  # noqa: E731
    cpool = [item(f"c{i}", c, f"cq{i}", dict.fromkeys("AB", "t"), "A", meta=meta(t, c))
             for i, (t, c) in enumerate([("医师考试", "执业医师"), ("护理考试", "执业医师"), ("医师考试", "护士")] * 3)]
    target = item("t", "执业医师", "tq", dict.fromkeys("AB", "t"), "A", meta=meta("医师考试", "执业医师"))
    got = bm.pick_shots("cmb", target, cpool, 5)
    assert len(got) == 3 and all(g.meta["exam_type"] == "医师考试" and g.subject == "执业医师" for g in got)


def test_option_letters_are_the_qwen_ids_after_the_cue(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    assert sc.letter_token_ids(tok) == dict(zip("ABCDEF", range(32, 38)))  # Qwen's own ids, no leading space
    cue = tok.encode("答案：")
    for c, i in sc.letter_token_ids(tok).items():  # the answer cue followed by the letter tokenizes that way
        assert tok.encode("答案：" + c) == cue + [i]


def test_extract_answer():
    many = item("x", "s", "q", dict.fromkeys("ABCDE", "t"), "C", True)
    assert sc.extract_answer("答案：A、B、D。解析：C错", many) == "ABD"
    one = item("x", "s", "q", dict.fromkeys("ABCD", "t"), "C")
    assert sc.extract_answer("B、D。", one) == "B"
    assert sc.extract_answer("C. 某某", one) == "C"
    assert sc.extract_answer("无法判断", one) is None


def test_candidate_trie_feeds_each_prefix_once():
    tokens, parents, depths, paths = sc.candidate_trie([[1, 9], [1, 2, 9], [2, 9], [1, 2, 3, 9]])
    assert tokens == [1, 2, 2, 3] and parents == [-1, 0, -1, 1] and depths == [0, 1, 0, 2]
    assert paths[1] == [(-1, 1), (0, 2), (1, 9)] and paths[3][-1] == (3, 9)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny_qwen import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ev") / "m"), hidden_size=48, intermediate_size=96,
                                head_dim=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_single_answer_predictions_equal_transformers(tiny_ckpt):
    from model import load_model
    from transformers import Qwen3ForCausalLM

    items = bm.load_cmmlu(os.path.join(require_shared(), "cmmlu"), "dev", list(bm.CMMLU_MED))[0]
    items += [it for it in bm.load_cmb(os.path.join(SAMPLE, "cmb"), "val")[0] if not it.pick_many]
    tok = Tokenizer(tiny_ckpt)
    prompts = [bm.build_prompt("cmb" if it.id.startswith("cmb") else "cmmlu-med", it, [], chat=False) for it in items]
    ours, _ = sc.score_logits(load_model(tiny_ckpt), tok, prompts, items, batch_size=8, chat=False)
    hf = Qwen3ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    ref = []
    with torch.no_grad():
        for (p, r), it in zip(prompts, items):  # one question at a time, no padding; Qwen letter ids A-F = 32-37
            logits = hf(torch.tensor([tok.encode(p + r)])).logits[0, -1]
            opts = list(it.options)
            ref.append(opts[int(logits[[32 + "ABCDEF".index(c) for c in opts]].argmax())])
    assert ours == ref and len(set(ours)) > 1


def test_subset_map_equals_transformers_over_terminated_answers(tiny_ckpt, tmp_path):
    """The subset MAP of score_logits (trie, shared prompt) = the best of every terminated answer string
    scored by transformers in full: sorted letters + '\\n\\n' (raw) or '<|im_end|>' (chat)."""
    from model import load_model
    from transformers import Qwen3ForCausalLM

    items = bm.load_cmexam(os.path.join(require_shared(), "cmexam"), "val")[0][:6]
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    hf = Qwen3ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    for chat, term in ((False, "\n\n"), (True, "<|im_end|>")):
        prompts = [bm.build_prompt("cmexam", it, [], chat=chat) for it in items]
        ours, _ = sc.score_logits(model, tok, prompts, items, batch_size=4, chat=chat)
        for (p, r), it, got in zip(prompts, items, ours):
            prompt = tok.encode(p + r)
            answers = ["".join(c) for n in range(1, len(it.options) + 1)
                       for c in itertools.combinations(sorted(it.options), n)]
            conts = [tok.encode(a + term) for a in answers]
            width = len(prompt) + max(map(len, conts))  # why one batch: right padding cannot reach earlier
            ids = torch.tensor([prompt + c + [0] * (width - len(prompt) - len(c)) for c in conts])  # positions
            with torch.no_grad():  # transformers' forward of every answer string in full, its LM head where read
                h = hf.model(ids).last_hidden_state[:, len(prompt) - 1:]  # (answers, longest answer + 1, hidden)
                lp = hf.lm_head(h).log_softmax(-1)
            scores = [sum(lp[i, j, t].item() for j, t in enumerate(c)) for i, c in enumerate(conts)]
            best, best_s = None, -float("inf")
            for a, s in zip(answers, scores):
                if s > best_s + 1e-6:
                    best, best_s = a, s
            assert got == best, (it.id, chat)


def cmmlu_test_dir(tmp_path):
    """dev = the shared dev files; test = the same questions reworded, so all 5 dev items are exemplars."""
    root = tmp_path / "cmmlu"
    shutil.copytree(os.path.join(require_shared(), "cmmlu", "dev"), root / "dev")
    (root / "test").mkdir()
    for f in os.listdir(root / "dev"):
        rows = list(csv.reader(open(root / "dev" / f, encoding="utf-8")))
        with open(root / "test" / f, "w", encoding="utf-8", newline="") as out:
            w = csv.writer(out)
            w.writerow(rows[0])
            w.writerows([r[:1] + [r[1] + "（测试）"] + r[2:] for r in rows[1:]])
    return str(root)


@pytest.mark.parametrize("chat", [False, True])
def test_shared_prefix_scoring_equals_the_plain_path(tiny_ckpt, tmp_path, chat):
    """5-shot CMMLU (one prefix per subject) and 0-shot CMExam subset MAP: the same predictions and letter
    distributions as reading every prompt and candidate in full."""
    from model import load_model

    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    d = cmmlu_test_dir(tmp_path)
    items = bm.load_cmmlu(d, "test", list(bm.CMMLU_MED))[0]
    pool = bm.shot_pool("cmmlu-med", d, "test")
    prompts = [bm.build_prompt("cmmlu-med", it, bm.pick_shots("cmmlu-med", it, pool, 5), chat) for it in items]
    assert len({p for p, _ in prompts}) == 7  # one shared prefix per subject
    groups = sc.prompt_groups(tok, prompts)
    assert len(groups) == 7 and "" not in groups  # every prompt split cleanly at its prefix
    cx = bm.load_cmexam(os.path.join(require_shared(), "cmexam"), "val")[0]
    items += cx
    prompts += [bm.build_prompt("cmexam", it, [], chat) for it in cx]
    fast, fast_p = sc.score_logits(model, tok, prompts, items, batch_size=4, chat=chat)
    slow, slow_p = sc.score_logits_full(model, tok, prompts, items, batch_size=4, chat=chat)
    assert fast == slow
    for a, b in zip(fast_p, slow_p):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert len(set(fast)) > 2 and any(len(p) > 1 for p in fast[35:])  # varied, and some multi-letter answers


def run_eval(bench, data_dir, split, out, model, extra=()):
    args = ev.parse_args([bench, "--model", model, "--data-dir", data_dir, "--split", split, "--out", str(out),
                          "--batch-size", "4", "--overwrite", *extra])  # one --out for every benchmark here
    ev.evaluate(args)
    return [json.loads(l) for l in open(out / "predictions.jsonl", encoding="utf-8")]


def test_swapping_gold_answers_changes_no_prediction(tiny_ckpt, tmp_path):
    """Rewrite only the answers (single <-> multi for CMExam and CMB, another letter for CMMLU): every
    prompt and prediction stays the same, for all three benchmarks, in logits and generate mode."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(os.path.join(require_shared(), "cmexam"), a / "cmexam")
    shutil.copytree(os.path.join(SAMPLE, "cmb"), a / "cmb")
    shutil.copytree(cmmlu_test_dir(tmp_path), a / "cmmlu")
    shutil.copytree(a, b)
    rows = list(csv.DictReader(open(b / "cmexam" / "val.csv", encoding="utf-8")))
    for r in rows:
        opts = [l.split()[0] for l in r["Options"].strip().splitlines()]
        r["Answer"] = r["Answer"] and ("".join(opts[:2]) if len(r["Answer"]) == 1 else opts[-1])
    with open(b / "cmexam" / "val.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path = b / "cmb" / "CMB-val" / "CMB-val-merge.json"
    recs = json.load(open(path, encoding="utf-8"))
    for r in recs:
        r["answer"] = "AB" if len(r["answer"]) == 1 else "C"
    json.dump(recs, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    for f in os.listdir(b / "cmmlu" / "test"):
        rows = list(csv.reader(open(b / "cmmlu" / "test" / f, encoding="utf-8")))
        rows = rows[:1] + [r[:-1] + ["ABCD"[("ABCD".index(r[-1]) + 1) % 4]] for r in rows[1:]]
        csv.writer(open(b / "cmmlu" / "test" / f, "w", encoding="utf-8", newline="")).writerows(rows)
    for bench, sub, split, extra in [("cmexam", "cmexam", "val", ()), ("cmb", "cmb", "val", ()),
                                     ("cmmlu-med", "cmmlu", "test", ()), ("cmexam", "cmexam", "val", ("--mode", "generate"))]:
        pa = run_eval(bench, str(a / sub), split, tmp_path / "oa", tiny_ckpt, extra)
        pb = run_eval(bench, str(b / sub), split, tmp_path / "ob", tiny_ckpt, extra)
        assert [r["gold"] for r in pa] != [r["gold"] for r in pb], bench  # the gold really changed
        for x, y in zip(pa, pb):
            assert (x["id"], x["prompt_sha1"], x["predicted"], x["letter_probs"]) == \
                   (y["id"], y["prompt_sha1"], y["predicted"], y["letter_probs"]), (bench, extra)


def test_summary_macro_is_the_mean_of_subjects_and_has_an_interval():
    recs = [{"subject": "a", "correct": c, "multi": False, "predicted": "A"} for c in (1, 1, 1, 0)]
    recs += [{"subject": "b", "correct": 0, "multi": True, "predicted": "AB"}, {"subject": "b", "correct": 1, "multi": False, "predicted": None}]
    s = ev.summarize("x", recs)
    assert s["accuracy_micro"] == round(4 / 6, 4) and s["accuracy_macro"] == round((0.75 + 0.5) / 2, 4)
    assert s["multi_answer"] == {"n": 1, "accuracy": 0.0} and s["unparsable"] == 1
    assert ev.wilson_interval(8, 10) == [0.4902, 0.9433]  # Wilson (1927), z = 1.96, by hand
    lo, hi = s["accuracy_micro_ci95"]
    assert lo < 4 / 6 < hi


def test_mcnemar_and_paired_bootstrap():
    assert ev.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # all 5 discordant pairs one way: 2 * 0.5^5
    assert ev.mcnemar_exact(3, 3) == 1.0
    assert ev.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    a = np.array([1] * 50 + [0] * 50)
    b = np.array([1] * 50 + [1] * 20 + [0] * 30)
    r = ev.paired_difference(a, b)
    assert r["difference"] == 0.2 and r["only_b_right"] == 20 and r["only_a_right"] == 0
    assert r["ci95"][0] > 0.1 and r["ci95"][1] < 0.3


def test_compare_cli_and_refusals(tmp_path):
    def write(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    rows = [{"id": f"q{i}", "subject": "s1" if i < 6 else "s2", "gold": "A", "correct": i % 2 == 0} for i in range(10)]
    write(tmp_path / "a.jsonl", rows)
    write(tmp_path / "b.jsonl", [{**r, "correct": True} for r in rows])
    r = subprocess.run([sys.executable, "eval.py", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "overall" in r.stdout and "s2" in r.stdout and "+0.5000" in r.stdout
    write(tmp_path / "c.jsonl", rows[:-1])
    r = subprocess.run([sys.executable, "eval.py", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "do not hold the same questions" in r.stderr and "Traceback" not in r.stderr


def test_errors_are_clear(tmp_path):
    with pytest.raises(bm.EvalDataError, match="test_with_annotations.csv not found .* williamliujl/CMExam"):
        bm.load_cmexam(str(tmp_path), "test")
    (tmp_path / "val.csv").write_text("Question,Options,Answer\nQ,\"A x\nB y\",C\n", encoding="utf-8")
    with pytest.raises(bm.EvalDataError, match=r"val.csv: row 2: answer 'C' not among options"):
        bm.load_cmexam(str(tmp_path), "val")
    (tmp_path / "val.csv").write_text("Question,Options,Answer\nQ,\"A x\n-- y\",A\n", encoding="utf-8")
    with pytest.raises(bm.EvalDataError, match="row 2: option line '-- y'"):
        bm.load_cmexam(str(tmp_path), "val")
    r = subprocess.run([sys.executable, "eval.py", "medqa"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "valid names are cmexam, cmb, cmmlu-med" in r.stderr
    r = subprocess.run([sys.executable, "eval.py", "cmb", "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "CMB-test-choice-question-merge.json not found" in r.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--limit", "0"], "--limit: must be >= 1"), (["--limit", "-1"], "--limit: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"), (["--shots", "-2"], "--shots: must be >= 0"),
    (["--split", "dev", "--data-dir", "."], "cmexam has test, val, train"),
])
def test_bad_flags_are_one_line_errors(flags, needle, capsys):
    assert eval_here("cmexam", *flags) == 2  # in this process: the suite's time
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_benchmark_files_are_one_line_errors(tmp_path, tiny_ckpt):
    (tmp_path / "val.csv").write_text("Question,Options,Answer\n", encoding="utf-8")
    d = tmp_path / "cm" / "test"
    d.mkdir(parents=True)
    (d / "anatomy.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,AB\n", encoding="utf-8")
    rec = {"exam_type": "t", "exam_class": "c", "question": "q", "question_type": "单项选择题", "answer": "A"}
    for name, option in (("cmb", ["x", "y"]), ("cmb2", {"A": "x"})):
        (tmp_path / name).mkdir()
        text = json.dumps([{**rec, "option": option}])
        (tmp_path / name / "CMB-val-merge.json").write_text(text if name == "cmb" else text[:-5], encoding="utf-8")
    model = ["--model", tiny_ckpt]
    runs = run_at_once(["eval.py", "cmexam", "--data-dir", str(tmp_path), "--split", "val", *model, "--out",
                        str(tmp_path / "o")],
                       ["eval.py", "cmmlu-med", "--data-dir", str(tmp_path / "cm"), "--subjects", "anatomy", "--shots",
                        "0", *model, "--out", str(tmp_path / "o2")],
                       ["eval.py", "cmb", "--data-dir", str(tmp_path / "cmb"), "--split", "val", *model, "--out",
                        str(tmp_path / "o3")],
                       ["eval.py", "cmb", "--data-dir", str(tmp_path / "cmb2"), "--split", "val", *model, "--out",
                        str(tmp_path / "o4")])
    needles = ["no questions to score", "answer 'AB' is not one of A-D", "'option' must be a letter -> text object",
               "CMB-val-merge.json: not a valid UTF-8 JSON file"]
    assert len(runs) == len(needles)
    for r, needle in zip(runs, needles):
        err = r.stderr.decode()
        assert r.returncode == 2 and needle in err and "Traceback" not in err, err[-1500:]
    assert not any((tmp_path / o).exists() for o in ("o", "o2", "o3", "o4"))


def test_two_process_eval_equals_one(tiny_ckpt, tmp_path):
    base = ["eval.py", "cmexam", "--model", tiny_ckpt, "--batch-size", "4"]
    for r in run_at_once(base + ["--out", str(tmp_path / "one")],
                         ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"] + base
                         + ["--out", str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"}):
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    one = json.load(open(tmp_path / "one" / "summary.json"))
    two = json.load(open(tmp_path / "two" / "summary.json"))
    assert one["n"] == two["n"] == 39
    assert one["accuracy_micro"] == two["accuracy_micro"] and one["per_subject"] == two["per_subject"]
    p1 = [json.loads(l)["predicted"] for l in open(tmp_path / "one" / "predictions.jsonl")]
    p2 = [json.loads(l)["predicted"] for l in open(tmp_path / "two" / "predictions.jsonl")]
    assert p1 == p2


def test_adapter_implies_chat_and_shot_defaults(tiny_dir, tmp_path):
    import eval as ev
    from train import train

    train(small_cfg(tiny_dir, tmp_path / "run", steps=2, save_every=2))
    s = ev.evaluate(ev.parse_args(["cmexam", "--model", tiny_dir, "--adapter", str(tmp_path / "run"),
                                   "--out", str(tmp_path / "e1"), "--limit", "3"]))
    assert s["chat"] is True and s["shots"] == 0 and s["adapter"] == str(tmp_path / "run")
    s = ev.evaluate(ev.parse_args(["cmmlu-med", "--model", tiny_dir, "--out", str(tmp_path / "e2"), "--limit", "3"]))
    assert s["chat"] is False and s["shots"] == 5


class SplitSensitiveTok:
    """A toy tokenizer whose ids depend on where a string is cut: "ab" is one token, "a" and "b" two others."""

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out, i = out + [1000], i + 2
            else:
                out, i = out + [ord(text[i])], i + 1
        return out


def test_prompt_groups_fall_back_to_the_whole_prompt_with_its_prefix():
    """A prefix ending in "a" and a question starting with "b" tokenize differently apart than together: the
    prompt goes whole into the no-prefix group, with exactly the ids of prefix + question (the instruction and
    exemplars kept), and the other prompt keeps its shared prefix."""
    from scoring import prompt_groups

    tok = SplitSensitiveTok()
    groups = prompt_groups(tok, [("instr a", "b question"), ("instr a", " c question")])
    assert groups[""] == ([], [(0, tok.encode("instr ab question"))])
    assert 1000 in groups[""][1][0][1]  # the merged token: the whole prompt, not the question alone
    assert groups["instr a"] == (tok.encode("instr a"), [(1, tok.encode(" c question"))])


def test_an_exemplar_is_never_the_test_question(tmp_path):
    """CMExam val and test share questions verbatim: a pool item with another id but the same question text is
    never a shot, nor is the item itself; the other pool items still are."""
    from benchmarks import Item, pick_shots

    def item(i, q):
        return Item(f"x-{i}", "s", q, {"A": "1", "B": "2"}, False, "A", False, {})

    test = item(0, "同一个问题？")
    pool = [item(0, "同一个问题？"), item(7, "同一个问题？"), item(8, "另一个问题？"), item(9, "第三个问题？")]
    shots = pick_shots("cmexam", test, pool, 3)
    assert [s.id for s in shots] == ["x-8", "x-9"]


def test_every_benchmark_record_loads_its_sample_and_poses_its_questions():
    """Each ``Benchmark`` record is all eval.py needs: its bundled sample loads through the record's loader, its
    shot pool comes from the record's shot split, and every prompt ends with the record's answer cue; an
    unknown split is refused naming the record's splits."""
    for name, b in bm.BENCHMARKS.items():
        folder, split = b.sample
        d = os.path.join(ROOT, "samples", "benchmarks", folder)
        items, _ = bm.load(name, d, split)
        assert items and all(set(it.answer) <= it.options.keys() for it in items), name
        pool = bm.shot_pool(name, d, split) if b.default_shots else []  # eval.py reads a pool only for shots
        shots = bm.pick_shots(name, items[0], pool, b.default_shots)
        assert (0 < len(shots) <= b.default_shots if b.default_shots else shots == []), name  # (the item is no shot)
        assert all(b.same_group(items[0], p) and p.id != items[0].id for p in shots), name
        prefix, rest = bm.build_prompt(name, items[0], shots, False)
        assert rest.endswith(b.answer_cue) and items[0].question in rest, name
        with pytest.raises(bm.EvalDataError, match=f"valid are {', '.join(b.splits)}"):
            bm.load(name, d, "nosuch")
    assert {it.pick_many for it in bm.load("cmexam", os.path.join(ROOT, "samples", "benchmarks", "cmexam"), "val")[0]} == {True}


def eval_cli(*args):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def eval_here(*args) -> int:
    import eval as ev

    return exit_status(ev.main, *args)


def test_an_eval_dir_holding_results_is_not_replaced_silently(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "E")
    assert eval_here("cmexam", "--model", tiny_dir, "--out", out, "--limit", "2") == 0
    before = tree(out)
    capsys.readouterr()
    assert eval_here("cmmlu-med", "--model", tiny_dir, "--out", out, "--limit", "2") == 2
    err = capsys.readouterr().err
    assert "holds earlier results" in err and len(err.strip().splitlines()) == 1
    assert tree(out) == before
    assert eval_here("cmmlu-med", "--model", tiny_dir, "--out", out, "--limit", "2", "--overwrite") == 0
    assert json.load(open(os.path.join(out, "summary.json")))["benchmark"] == "cmmlu-med"


def test_a_failed_eval_write_leaves_the_earlier_results(tmp_path, monkeypatch):
    import eval as ev

    out = str(tmp_path / "E")
    ev.write_results(out, [{"id": "a", "x": 1}], {"benchmark": "cmexam", "split": "val", "n": 1, "shots": 0,
                                                  "mode": "logits", "chat": False, "accuracy_micro": 1.0,
                                                  "accuracy_micro_ci95": None, "accuracy_macro": 1.0,
                                                  "single_answer": {"accuracy": 1.0},
                                                  "multi_answer": {"accuracy": None}, "unparsable": 0})
    before = tree(out)
    real = os.replace

    def fail_on_summary(src, dst):
        if dst.endswith("summary.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_summary)
    with pytest.raises(OSError):
        ev.write_results(out, [{"id": "b"}], {"benchmark": "cmb"})
    monkeypatch.undo()
    assert json.load(open(os.path.join(out, "summary.json")))["benchmark"] == "cmexam"
    assert all(line.strip() for line in open(os.path.join(out, "predictions.jsonl")))  # whole lines only
    assert before["summary.json"] == tree(out)["summary.json"]


def test_compare_refuses_duplicate_question_ids(tmp_path):
    rows = [{"id": "q1", "subject": "s", "gold": "A", "correct": True},
            {"id": "q1", "subject": "s", "gold": "A", "correct": False}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_text(json.dumps(rows[0]) + "\n")
    r = eval_cli("compare", str(a), str(b))
    assert r.returncode == 2 and "duplicate question ids" in r.stderr


def test_a_truncated_benchmark_csv_is_refused(tmp_path):
    from benchmarks import EvalDataError, load

    d = tmp_path / "cmexam"
    d.mkdir()
    (d / "val.csv").write_text("Question,Options,Answer,Clinical Department\n"
                               '问题一,"A 甲\nB 乙",A,内科\n'
                               '问题二,"A 甲\nB 乙"\n', encoding="utf-8")
    with pytest.raises(EvalDataError, match="row 3 has fewer fields than the header"):
        load("cmexam", str(d), "val")


def test_correctness_and_accuracy_match_the_gold_computed_from_the_official_file(tiny_ckpt, tmp_path, monkeypatch):
    """eval.py's `correct`, micro / macro / single / multi accuracies, against an independent computation from
    the CMExam sample's own Answer and Clinical Department columns (read with csv here): a prediction is right only
    when it is the gold set exactly; a strict subset or superset of a multi-answer gold, a wrong letter and no
    answer are wrong. The scorer is replaced by planned predictions of each kind."""
    data = os.path.join(SAMPLE, "cmexam")
    with open(os.path.join(data, "val.csv"), encoding="utf-8-sig", newline="") as f:
        numbered = [(n, r) for n, r in enumerate(csv.DictReader(f)) if (r["Answer"] or "").strip()]  # n: the id
    rows = [r for _, r in numbered]
    plan = {}  # row number -> (predicted letters or None, right?)
    for i, (n, r) in enumerate(numbered):
        gold = sorted(set(r["Answer"].strip()))
        wrong = next(L for L in "ABCDE" if L not in gold)
        pred = ["".join(gold), "".join(gold[:-1]) if len(gold) > 1 else wrong, "".join(sorted(gold + [wrong])),
                None, "".join(gold)][i % 5]
        plan[n] = (pred, pred is not None and sorted(pred) == gold)
    assert any(len(set(r["Answer"].strip())) > 1 for i, r in enumerate(rows) if i % 5 == 1)  # a strict subset is tried

    def planned(model, tok, prompts, items, batch_size, chat):
        return [plan[int(it.id.rsplit("-", 1)[1])][0] for it in items], [{} for _ in items]

    monkeypatch.setattr(ev, "score_logits", planned)
    args = ev.parse_args(["cmexam", "--model", tiny_ckpt, "--data-dir", data, "--split", "val", "--out",
                          str(tmp_path / "e")])
    summary = ev.evaluate(args)
    recs = {r["id"]: r for r in map(json.loads, open(tmp_path / "e" / "predictions.jsonl", encoding="utf-8"))}
    assert len(recs) == len(plan)
    for (n, (pred, ok)), (_, row) in zip(plan.items(), numbered):
        r = recs[f"cmexam-val-{n}"]
        assert (r["predicted"], r["correct"]) == (pred, ok), r
        assert r["gold"] == "".join(sorted(set(row["Answer"].strip())))
    right = [ok for _, ok in plan.values()]
    assert summary["accuracy_micro"] == round(sum(right) / len(right), 4)
    by_dept = {}
    for r, ok in zip(rows, right):
        by_dept.setdefault(r.get("Clinical Department") or "all", []).append(ok)
    assert summary["accuracy_macro"] == round(sum(round(sum(v) / len(v), 4) for v in by_dept.values()) / len(by_dept), 4)
    multi = [ok for r, ok in zip(rows, right) if len(set(r["Answer"].strip())) > 1]
    assert summary["multi_answer"] == {"n": len(multi), "accuracy": round(sum(multi) / len(multi), 4)}
    assert summary["unparsable"] == sum(p is None for p, _ in plan.values())


def test_benchmark_inputs_are_unambiguous(tmp_path):
    """Duplicate ids in CMB's question or answer files, two candidate files for one split, and a subject named
    twice are each refused naming the file, the id or the subject (a question scored against another's gold, a
    file picked by filesystem order, questions counted twice); the clean neighbour of each loads."""
    import shutil

    fix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cmb_test")
    for kind in ("answers", "questions"):
        d = tmp_path / kind
        shutil.copytree(fix, d)
        name = "CMB-test-choice-answer.json" if kind == "answers" else "CMB-test-choice-question-merge.json"
        rows = json.load(open(d / name, encoding="utf-8"))
        assert bm.load("cmb", str(d), "test")[0]  # the clean files load
        (d / name).write_text(json.dumps(rows + rows[:1], ensure_ascii=False), encoding="utf-8")
        with pytest.raises(bm.EvalDataError, match=rf"{name}: (answer|question) id .* appears more than once"):
            bm.load("cmb", str(d), "test")
    two = tmp_path / "two"
    shutil.copytree(os.path.join(SAMPLE, "cmexam"), two / "data")
    assert bm.load("cmexam", str(two), "val")[0]
    shutil.copytree(os.path.join(SAMPLE, "cmexam"), two / "backup_old")
    with pytest.raises(bm.EvalDataError, match=r"2 files named val.csv .*backup_old/val.csv.*data/val.csv"):
        bm.load("cmexam", str(two), "val")
    args = ev.parse_args(["cmmlu-med", "--subjects", "anatomy,virology,anatomy"])
    with pytest.raises(bm.EvalDataError, match="--subjects names anatomy more than once"):
        ev.load_questions(args, os.path.join(SAMPLE, "cmmlu"), "dev")
    args = ev.parse_args(["cmmlu-med", "--subjects", "anatomy,virology"])
    assert {it.subject for it in ev.load_questions(args, os.path.join(SAMPLE, "cmmlu"), "dev")[0]} == {"anatomy", "virology"}

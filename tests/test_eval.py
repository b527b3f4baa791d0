"""eval.py: official file formats, golden prompts, scoring parity with transformers, errors, two processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
from tokenizer import Tokenizer
from conftest import ROOT, require_shared

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SAMPLE = os.path.join(ROOT, "data", "bench_sample")


def test_cmexam_loader_on_shared_sample():
    items, skipped = ev.load_cmexam(os.path.join(require_shared(), "cmexam"), "val")
    assert len(items) == 39 and skipped == 1  # 40 rows, one with an empty answer
    multi = [it for it in items if it.multi]
    assert len(multi) == 8 and all(len(it.answer) > 1 for it in multi)
    assert sorted({len(it.options) for it in items}) == [4, 5]
    noncontig = [it for it in items if list(it.options) in (list("BCDE"), list("ABDE"))]
    assert len(noncontig) == 3  # letters taken from the lines, not assumed A..E
    first = items[0]
    assert first.question.startswith("上消化道出血") and first.answer == "C" and first.options["B"] == "出血部位"


def test_cmexam_full_val_counts():
    import shutil
    import tempfile

    d = tempfile.mkdtemp()
    shutil.copy(os.path.join(require_shared(), "cmexam", "val_full.csv"), os.path.join(d, "val.csv"))
    items, skipped = ev.load_cmexam(d, "val")
    assert (len(items), skipped) == (6810, 1)
    assert sum(it.multi for it in items) == 210


def test_cmmlu_loader_on_shared_dev():
    items, _ = ev.load_cmmlu(os.path.join(require_shared(), "cmmlu"), "dev", list(ev.CMMLU_MED))
    assert len(items) == 35 and all(len(it.options) == 4 and not it.multi for it in items)
    assert {it.subject for it in items} == set(ev.CMMLU_MED)
    anat = [it for it in items if it.subject == "anatomy"]
    assert anat[0].question == "壁胸膜的分部不包括" and anat[0].answer == "B" and anat[0].options["B"] == "肺胸膜"


def test_cmb_loaders_val_and_test_join():
    items, _ = ev.load_cmb(os.path.join(SAMPLE, "cmb"), "val")
    assert len(items) == 6
    assert [it.multi for it in items] == [False, True, False, True, False, False]
    assert list(items[1].options) == ["A", "B", "C", "D"]  # the empty E is dropped
    assert list(items[3].options) == list("ABCDEF") and items[3].answer == "ACDF"
    test, _ = ev.load_cmb(os.path.join(FIX, "cmb_test"), "test")
    assert [t.answer for t in test] == ["A", "BE", "A"]  # joined on id; unsorted answer sorted as a set
    assert test[2].multi and len(test[2].answer) == 1  # a 多项选择题 with a one-letter answer stays multi


def test_golden_prompts():
    it = ev.Item("x", "anatomy", "Q?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "B", False)
    shot = ev.Item("s", "anatomy", "S?", {"A": "1", "B": "2", "C": "3", "D": "4"}, "C", False)
    head = "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
    assert ev.build_prompt("cmmlu-med", it, [], chat=False) == head + "题目：Q?\nA. a\nB. b\nC. c\nD. d\n答案是："
    assert ev.build_prompt("cmmlu-med", it, [shot], chat=False) == (
        head + "题目：S?\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：C\n\n题目：Q?\nA. a\nB. b\nC. c\nD. d\n答案是：")
    assert ev.build_prompt("cmmlu-med", it, [shot], chat=True) == (
        "<|im_start|>user\n" + head + "题目：S?\nA. 1\nB. 2\nC. 3\nD. 4<|im_end|>\n<|im_start|>assistant\nC<|im_end|>\n"
        "<|im_start|>user\n题目：Q?\nA. a\nB. b\nC. c\nD. d<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    cmb = ev.Item("c", "护士", "题干", {"A": "甲", "B": "乙"}, "AB", True,
                  {"exam_type": "护理考试", "exam_class": "护士", "question_type": "多项选择题"})
    assert ev.build_prompt("cmb", cmb, [], chat=False) == (
        "以下是中国护理考试中护士考试的一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n题干\nA. 甲\nB. 乙\n答案：")
    assert ev.build_prompt("cmb", cmb, [], chat=True) == (
        "<|im_start|>user\n以下是中国护理考试中护士考试的一道多项选择题，不需要做任何分析和解释，直接输出答案选项。\n题干\nA. 甲\nB. 乙"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    cx = ev.Item("e", "all", "题干", {"A": "甲", "B": "乙"}, "A", False)
    assert ev.build_prompt("cmexam", cx, [cx.__class__("f", "all", "例", {"A": "x", "B": "y"}, "B", False)], chat=False) == (
        "以下是中国医学考试的一道单项选择题，不需要做任何分析和解释，直接输出答案选项。\n例\nA. x\nB. y\n答案：B\n\n"
        "以下是中国医学考试的一道单项选择题，不需要做任何分析和解释，直接输出答案选项。\n题干\nA. 甲\nB. 乙\n答案：")


def test_option_letters_are_single_qwen_tokens(qwen_tok_dir):
    ids = ev.letter_token_ids(Tokenizer(qwen_tok_dir))
    assert len(set(ids.values())) == 6


def test_extract_answer():
    it = ev.Item("x", "s", "q", dict.fromkeys("ABCDE", "t"), "ABD", True)
    assert ev.extract_answer("答案：A、B、D。解析：C错", it) == "ABD"
    one = ev.Item("x", "s", "q", dict.fromkeys("ABCD", "t"), "C", False)
    assert ev.extract_answer("C. 某某", one) == "C"
    assert ev.extract_answer("无法判断", one) is None


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tiny_qwen import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ev") / "m"), hidden_size=48, intermediate_size=96,
                                head_dim=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_predictions_equal_transformers(tiny_ckpt, tmp_path):
    import shutil

    from model import load_model
    from transformers import Qwen3ForCausalLM

    shutil.copy(os.path.join(require_shared(), "cmexam", "val_full.csv"), tmp_path / "val.csv")
    items = ev.load_cmexam(str(tmp_path), "val")[0][:240]
    items += ev.load_cmmlu(os.path.join(require_shared(), "cmmlu"), "dev", list(ev.CMMLU_MED))[0]
    single = [it for it in items if not it.multi]
    assert len(single) >= 200
    tok = Tokenizer(tiny_ckpt)
    prompts = [ev.build_prompt("cmexam" if it.id.startswith("cmexam") else "cmmlu-med", it, [], chat=False) for it in single]
    ours, _ = ev.score_logits(load_model(tiny_ckpt), tok, prompts, single, batch_size=16, chat=False)
    hf = Qwen3ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    letters = ev.letter_token_ids(tok)
    ref = []
    with torch.no_grad():
        for p, it in zip(prompts, single):  # one question at a time, no padding
            logits = hf(torch.tensor([tok.encode(p)])).logits[0, -1]
            opts = list(it.options)
            ref.append(opts[int(logits[[letters[c] for c in opts]].argmax())])
    assert ours == ref
    assert len(set(ours)) > 1  # not a constant predictor
    # multi-answer: our subset scores equal transformers' full-sequence log-probabilities
    multi = [it for it in items if it.multi][:2]
    model = load_model(tiny_ckpt)
    for it in multi:
        prompt = tok.encode(ev.build_prompt("cmexam", it, [], chat=False))
        conts = [tok.encode(c) + tok.encode("\n\n") for c in ("A", "AB", "BCE")]
        got = ev.answer_string_logprob(model, prompt, conts, tok.pad_id)
        with torch.no_grad():
            for g, c in zip(got, conts):
                lp = hf(torch.tensor([prompt + c])).logits[0].log_softmax(-1)
                want = sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(c))
                assert abs(g.item() - want.item()) < 1e-3


def test_errors_are_clear(tmp_path):
    with pytest.raises(ev.EvalDataError, match="test_with_annotations.csv not found .* williamliujl/CMExam"):
        ev.load_cmexam(str(tmp_path), "test")
    (tmp_path / "val.csv").write_text("Question,Options,Answer\nQ,\"A x\nB y\",C\n", encoding="utf-8")
    with pytest.raises(ev.EvalDataError, match=r"val.csv: row 2: answer 'C' not among options"):
        ev.load_cmexam(str(tmp_path), "val")
    (tmp_path / "val.csv").write_text("Question,Options,Answer\nQ,\"A x\n-- y\",A\n", encoding="utf-8")
    with pytest.raises(ev.EvalDataError, match="row 2: option line '-- y'"):
        ev.load_cmexam(str(tmp_path), "val")
    r = subprocess.run([sys.executable, "eval.py", "medqa"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "valid names are cmexam, cmb, cmmlu-med" in r.stderr
    r = subprocess.run([sys.executable, "eval.py", "cmb", "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "CMB-test-choice-question-merge.json not found" in r.stderr


def test_two_process_eval_equals_one(tiny_ckpt, tmp_path):
    base = [sys.executable, "eval.py", "cmexam", "--model", tiny_ckpt, "--batch-size", "4"]
    subprocess.run(base + ["--out", str(tmp_path / "one")], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
                   + base[1:] + ["--out", str(tmp_path / "two")], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    one = json.load(open(tmp_path / "one" / "summary.json"))
    two = json.load(open(tmp_path / "two" / "summary.json"))
    assert one["n"] == two["n"] == 39
    assert one["accuracy_micro"] == two["accuracy_micro"] and one["per_subject"] == two["per_subject"]
    p1 = [json.loads(l)["predicted"] for l in open(tmp_path / "one" / "predictions.jsonl")]
    p2 = [json.loads(l)["predicted"] for l in open(tmp_path / "two" / "predictions.jsonl")]
    assert p1 == p2

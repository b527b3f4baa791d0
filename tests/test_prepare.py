"""prepare.py: a benchmark split as training data, and decontamination of training data against benchmarks."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, exit_status, small_cfg

SAMPLE = os.path.join(ROOT, "samples", "benchmarks")
QUESTIONS = ["患者男性，45岁，血压160/95mmHg，心率110次/分，最可能的诊断是",
             "下列哪种药物可用于治疗急性心肌梗死后的室性心律失常",
             "小儿营养不良最早出现的症状是体重不增还是身高落后"]


def cmexam_dir(tmp_path):
    d = tmp_path / "CMExam" / "data"
    d.mkdir(parents=True)
    rows = "".join(f'{q},"A 甲\nB 乙",A,内科,解析{i}\n' for i, q in enumerate(QUESTIONS))
    (d / "val.csv").write_text("Question,Options,Answer,Clinical Department,Explanation\n" + rows, encoding="utf-8")
    return d


def test_export_writes_question_options_answer_and_explanation(tmp_path):
    from data import read_jsonl
    from prepare import export

    d = cmexam_dir(tmp_path)
    assert export("cmexam", str(d), "val", str(tmp_path / "ex.jsonl")) == 3
    examples = read_jsonl(str(tmp_path / "ex.jsonl"))
    user, answer = examples[1][0]["content"], examples[1][1]["content"]
    assert user == QUESTIONS[1] + "\nA. 甲\nB. 乙" and answer == "答案：A\n解析：解析1"
    n = export("cmmlu-med", os.path.join(SAMPLE, "cmmlu"), "dev", str(tmp_path / "cm.jsonl"))
    assert n > 0 and all(m[1]["content"].startswith("答案：") for m in read_jsonl(str(tmp_path / "cm.jsonl")))


def line(user, answer="答案：A"):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]},
                      ensure_ascii=False) + "\n"


def test_decontaminate_finds_duplicates_and_near_duplicates_and_nothing_else(tmp_path, capsys):
    """Verbatim, re-punctuated with spaces, and full-width copies of benchmark questions are found; an unrelated
    question that shares short medical phrases is not; a malformed line is kept for train.py to report."""
    from prepare import checked, decontaminate

    # spaces, other punctuation, full-width digits and letters; every 13-character window of the question holds
    # a digit, letter or punctuation mark, so only the normalisation can find this copy
    near = "患者 男性；４５岁；血压１６０／９５ｍｍＨｇ；心率 １１０次／分；最可能的诊断是？"
    lines = [line("请回答：" + QUESTIONS[0]),
             line(near),
             line("患者男性，30岁，咳嗽发热2天，最可能的诊断是什么？", "答案：B，肺炎"),
             "{not json\n",
             line("题目", "答案：C\n解析：" + QUESTIONS[2])]  # the question inside the answer counts too
    src = tmp_path / "train.jsonl"
    src.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    counts = decontaminate(str(src), [("cmexam", str(cmexam_dir(tmp_path)))], str(out))
    assert counts == {"cmexam val": 3}
    assert out.read_text(encoding="utf-8") == lines[2] + lines[3]  # kept byte for byte
    matches = [json.loads(m) for m in open(str(out) + ".matches.jsonl", encoding="utf-8")]
    assert [(m["line"], m["id"]) for m in matches] == [(1, "cmexam-val-0"), (2, "cmexam-val-0"), (5, "cmexam-val-2")]
    assert checked(str(out)) and not checked(str(src))
    out.write_text(out.read_text(encoding="utf-8") + line("另一个问题"), encoding="utf-8")
    assert not checked(str(out))  # edited after the check: no longer the checked file


def test_no_false_hits_on_clean_data(tmp_path):
    """The bundled training sample (from CMExam val) against the CMMLU and CMB samples: no match at 13 characters."""
    from prepare import decontaminate

    counts = decontaminate(os.path.join(ROOT, "samples", "med_sample.jsonl"),
                           [("cmmlu-med", os.path.join(SAMPLE, "cmmlu")), ("cmb", os.path.join(SAMPLE, "cmb"))],
                           str(tmp_path / "c.jsonl"))
    assert counts == {"cmmlu-med dev": 0, "cmb val": 0}


def test_cli_refuses_to_overwrite_its_input_and_a_dir_without_benchmark_files(tmp_path, capsys):
    import prepare

    src = os.path.join(ROOT, "samples", "med_sample.jsonl")
    r = subprocess.run([sys.executable, "prepare.py", "decontaminate", src, "--bench", f"cmexam={tmp_path}",
                        "--out", src], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "which this command reads" in r.stderr
    (tmp_path / "empty").mkdir()  # the rest in this process (the suite's time)
    assert exit_status(prepare.main, "decontaminate", src, "--bench", f"cmexam={tmp_path / 'empty'}", "--out",
                       str(tmp_path / "o.jsonl")) == 2
    assert "no file of cmexam found there" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    # one good --bench and one typo'd: still refused (the typo'd one would pass as checked), nothing written
    assert exit_status(prepare.main, "decontaminate", src, "--bench", f"cmexam={os.path.join(SAMPLE, 'cmexam')}",
                       "--bench", f"cmb={tmp_path / 'CMBB'}", "--out", str(tmp_path / "o.jsonl")) == 2
    assert f"--bench cmb={tmp_path / 'CMBB'}: no file of cmb found there" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.decontam.json").exists()


def test_train_warns_once_about_unchecked_data(tiny_dir, tmp_path, capsys):
    from prepare import decontaminate
    from train import train

    train(small_cfg(tiny_dir, tmp_path / "a", steps=1, save_every=1))
    assert capsys.readouterr().out.count("not been checked against the benchmarks") == 1
    clean = tmp_path / "clean.jsonl"
    decontaminate(os.path.join(ROOT, "samples", "med_sample.jsonl"), [("cmexam", os.path.join(SAMPLE, "cmexam"))],
                  str(clean))
    capsys.readouterr()
    train(small_cfg(tiny_dir, tmp_path / "b", steps=1, save_every=1, data=str(clean)))
    assert "not been checked" not in capsys.readouterr().out


def test_a_plain_lora_run_exported_for_peft_gives_the_same_logits(tiny_dir, tmp_path):
    """--num-experts 1 trained a few steps, exported with adapter_io.export_peft, loaded with
    PeftModel.from_pretrained onto transformers' Qwen3: logits equal ours to 1e-5 (fp32); E > 1 is refused."""
    import torch
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    from adapter_io import export_peft, load_adapter
    from model import load_model
    from train import train

    run = tmp_path / "lora"
    train(small_cfg(tiny_dir, run, steps=3, save_every=3, num_experts=1, top_k=1, rank=4, alpha=8.0, queue=False,
                    lr=2e-2))
    export_peft(str(run), str(tmp_path / "peft"))
    ours = load_model(tiny_dir)
    load_adapter(ours, str(run))
    hf = PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                   str(tmp_path / "peft")).eval()
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = ours.eval()(x), hf(x).logits
        with hf.disable_adapter():
            base = hf(x).logits
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - base).abs().max().item() > 1e-4  # the adapter really changes the output
    moe = tmp_path / "moe"
    train(small_cfg(tiny_dir, moe, steps=1, save_every=1))
    with pytest.raises(ValueError, match="only a plain-LoRA adapter"):
        export_peft(str(moe), str(tmp_path / "peft2"))


@pytest.mark.parametrize("length", [3, 4, 5, 13])
def test_ngrams_at_boundary_lengths(length):
    """A text of exactly n characters is one n-gram; n - 1 none; n + 1 two, the last window included."""
    from prepare import ngrams

    n = 4 if length < 13 else 13
    text = "".join(chr(0x4E00 + i) for i in range(length))
    got = ngrams(text, n)
    assert got == {text[i:i + n] for i in range(length - n + 1)}
    assert len(got) == max(0, length - n + 1) and (length < n or text[-n:] in got)


def test_normalisation_ignores_case_width_and_punctuation():
    """What n-grams are cut from: NFKC (full-width letters and digits), lower case, letters and digits only."""
    from prepare import normalize

    assert normalize("ＡＢＣ，Hello World! 123") == normalize("abc hello-world 123") == "abchelloworld123"
    assert normalize("下列哪项  是（ ）正确的？") == "下列哪项是正确的"


def test_cmb_test_questions_are_checked_without_their_answer_file(tmp_path):
    """CMB's test questions come apart from their answers; decontamination needs only the questions."""
    from prepare import decontaminate

    d = tmp_path / "CMB"
    d.mkdir()
    rec = {"exam_type": "t", "exam_class": "c", "question_type": "单项选择题", "option": {"A": "甲", "B": "乙"}}
    (d / "CMB-test-choice-question-merge.json").write_text(json.dumps(
        [{**rec, "id": i, "question": q} for i, q in enumerate(QUESTIONS)], ensure_ascii=False), encoding="utf-8")
    src = tmp_path / "train.jsonl"
    src.write_text(line(QUESTIONS[1]) + line("无关的问题，与任何考题都不同的一段文字"), encoding="utf-8")
    assert decontaminate(str(src), [("cmb", str(d))], str(tmp_path / "clean.jsonl")) == {"cmb test": 1}


def test_decontamination_is_precise_short_questions_and_boilerplate(tmp_path, capsys):
    """A question shorter than n matches only as a whole prompt or with its options, never as a bare substring;
    an n-gram that FREQUENT or more questions share is not evidence on its own (reported, not counted), while a
    real copy of such a question is still found by its own n-grams; the matches file shows both texts."""
    from prepare import FREQUENT, decontaminate

    law = "根据中华人民共和国药品管理法的规定"
    stems = ["处方药可以在大众媒介发布广告吗", "药品批准文号的有效期是几年", "医疗机构配制的制剂能否在市场销售",
             "假药与劣药的区别在于什么地方"]
    questions = ["子宫的位置"] + [law + s for s in stems]
    assert len(stems) >= FREQUENT
    d = tmp_path / "CMExam" / "data"
    d.mkdir(parents=True)
    rows = "".join(f'{q},"A 前倾前屈\nB 后倾",A,内科,\n' for q in questions)
    (d / "val.csv").write_text("Question,Options,Answer,Clinical Department,Explanation\n" + rows, encoding="utf-8")
    lines = [line("关于子宫的位置，下列哪项描述是正确的？请详细说明"),  # the short question, bare: kept
             line("子宫的位置\nA. 前倾前屈\nB. 后倾"),  # with its options: removed
             line("子宫的位置"),  # as the whole prompt: removed
             line(law + "，零售企业应当如何陈列非处方药？"),  # the boilerplate alone: kept, reported
             line("请回答：" + questions[2])]  # a real copy of a boilerplate question: removed
    src = tmp_path / "train.jsonl"
    src.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    assert decontaminate(str(src), [("cmexam", str(d))], str(out)) == {"cmexam val": 3}
    assert out.read_text(encoding="utf-8") == lines[0] + lines[3]
    assert "not counted, kept" in capsys.readouterr().out
    matches = [json.loads(m) for m in open(str(out) + ".matches.jsonl", encoding="utf-8")]
    assert [(m["line"], m["id"]) for m in matches] == [(2, "cmexam-val-0"), (3, "cmexam-val-0"), (5, "cmexam-val-2")]
    assert matches[2]["question"] == questions[2] and matches[2]["training"] == "请回答：" + questions[2] + "\n答案：A"

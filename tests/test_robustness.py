"""Careless and hostile input: every case gets a one-line error (exit 2) naming the flag or file, and
nothing on disk that should survive is changed. No pickle is ever read."""
import json
import sys

import pytest

from conftest import ROOT, run_at_once


def one_line_exit(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------
# train.py flags: checked in parse_args, before anything is loaded


@pytest.mark.parametrize("flags, needle", [
    (["--top-k", "9"], "top_k=9 must be in [1, num_experts=8]"),
    (["--rank", "0"], "--rank: must be >= 1, got 0"),
    (["--num-experts", "0"], "--num-experts: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
    (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--ce-chunk", "0"], "--ce-chunk: must be >= 1"),
    (["--keep", "0"], "--keep: must be >= 1"),
    (["--keep", "-1"], "--keep: must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--max-len", "-5"], "--max-len: must be >= 2"),
    (["--lr", "-0.001"], "--lr: must be in (0"),
    (["--lr", "abc"], "--lr: expected a number"),
    (["--dropout", "1.5"], "--dropout: must be in [0"),
    (["--temperature", "0"], "--temperature: must be in (0"),
    (["--tokens-per-site", "0"], "--tokens-per-site: must be >= 1"),
    (["--cl-debias", "1"], "--cl-debias: must be in [0"),
    (["--cl-debias", "0.1", "--cl-views", "mixture"], "--cl-debias corrects the routing readings' InfoNCE"),
    (["--cl-debias", "0.1", "--lambda-cl", "0"], "--cl-debias corrects the routing readings' InfoNCE"),
    (["--cl-debias", "0.1", "--temperature", "0.01"], "--cl-debias 0.1 needs --temperature >= 0.02"),
    (["--temperature", "0.01"], "give --cl-debias 0 for plain InfoNCE"),  # the default's tau+ 1/8
    (["--targets", "q_proj,vproj"], "['vproj'] not projection names"),
    (["--data", "/nonexistent.jsonl"], "--data: /nonexistent.jsonl is not found"),
    (["--data", ROOT], "is a directory"),
    (["--model", ROOT], "--model: " + ROOT + " has no config.json"),
    (["--queue-momentum", "0.9"], "--queue-momentum moves projection heads, which only the head readings have"),
    (["--queue-momentum", "0.9", "--cl-views", "mixture", "--lambda-cl", "0"], "--queue-momentum moves projection"),
    (["--queue", "--lambda-cl", "0"], "--queue holds negatives of the contrastive term, which is off"),
    (["--queue", "--num-experts", "1", "--top-k", "1"], "--queue holds negatives of the contrastive term"),
    (["--fsdp"], "--fsdp shards over processes: run under torchrun"),
    (["--batch-size", "1"], "--batch-size 1 leaves no negatives"),
    (["--batch-size", "1", "--cl-views", "assign"], "--cl-views assign contrasts the sequences of one micro-batch"),
    (["--cl-views", "experts"], "invalid choice: 'experts'"),
    (["--router", "ctx"], "invalid choice: 'ctx'"),
    (["--router", "context", "--num-experts", "1", "--top-k", "1"], "router='context' needs num_experts > 1"),
])
def test_bad_train_flags(capsys, flags, needle):
    from train import parse_args

    assert needle in one_line_exit(capsys, lambda: parse_args(flags))


def test_the_debiased_infonce_is_the_default_of_the_routing_readings_only():
    """No --cl-debias: tau+ 1/8 with the sequence and assign readings; 0 where nothing would read it (head
    readings, which mask same-expert negatives; the contrastive term off); an explicit value is kept."""
    from config import DEBIAS
    from train import parse_args

    assert DEBIAS == 0.125 and parse_args([]).cl_debias == parse_args(["--cl-views", "assign"]).cl_debias == 0.125
    assert parse_args(["--cl-views", "mixture"]).cl_debias == parse_args(["--lambda-cl", "0"]).cl_debias == 0
    assert parse_args(["--cl-debias", "0"]).cl_debias == 0 and parse_args(["--cl-debias", "0.3"]).cl_debias == 0.3


def test_the_router_defaults_to_context_where_there_is_one():
    """No --router: context routers (E > 1), and plain LoRA (--num-experts 1, no router) stays valid; the
    paper's token routers on request. An adapter's config resolves the same way."""
    from lora_moe import LoRAMoEConfig
    from train import parse_args

    assert parse_args([]).router == "context"
    assert parse_args(["--num-experts", "1", "--top-k", "1"]).router == "token"
    assert parse_args(["--router", "token"]).router == "token"
    assert (LoRAMoEConfig().router, LoRAMoEConfig(num_experts=1, top_k=1).router) == ("context", "token")


def test_unsupported_model_config_is_a_flag_error(capsys, tmp_path):
    from train import parse_args

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
                                                       "num_attention_heads": 2}), encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    assert "model_type='llama'" in one_line_exit(capsys, lambda: parse_args(["--model", str(tmp_path)]))


# ----------------------------------------------------------------------------------------------------------
# data: file:line for every bad line, and --skip-bad skips them all


BAD_LINES = [
    (b'{"prompt": "q", "response": "\xff\xfe"}', "not UTF-8"),
    (b'{"instruction": 3, "output": "o"}', "instruction/output must be strings (instruction is int)"),
    (b'{"prompt": "\\ud800", "response": "a"}', "lone UTF-16 surrogate"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "q", "response": "a"', "invalid JSON"),
]


@pytest.mark.parametrize("line, needle", BAD_LINES)
def test_bad_data_lines_name_file_and_line(tmp_path, line, needle):
    from data import DataError, read_jsonl

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "q", "response": "a"}\n' + line + b"\n")
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{needle[:20]}"):
        read_jsonl(str(p))
    examples, bad = read_jsonl(str(p), skip_bad=True)
    assert (len(examples), bad) == (1, 1)


# ----------------------------------------------------------------------------------------------------------
# the command lines: one line, exit 2


def test_cli_one_line_errors(tiny_dir, tmp_path):
    cases = [
        (["train.py", "--model", tiny_dir, "--resume", str(tmp_path / "f.txt")], "not a run dir or checkpoint dir"),
        (["chat.py", "--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1"),
        (["chat.py", "--model", tiny_dir, "--adapter", str(tmp_path)], "adapter_config.json not found"),
    ]
    (tmp_path / "f.txt").write_text("x")
    runs = run_at_once(*(args for args, _ in cases))
    assert len(runs) == len(cases)
    for (args, needle), r in zip(cases, runs):
        stderr = r.stderr.decode()
        err = stderr.strip().splitlines()
        assert r.returncode == 2 and needle in stderr and "Traceback" not in stderr, (args, stderr[-1500:])
        assert len([l for l in err if l.startswith(("error", "train.py", "chat.py"))]) == 1


def test_chat_stdin_closed_empty_or_not_utf8(tiny_dir):
    bad, empty, closed = run_at_once((["chat.py", "--model", tiny_dir, "--max-new-tokens", "2"], b"\xff\xfe\n"),
                                     (["chat.py", "--model", tiny_dir], b""),
                                     f"{sys.executable} chat.py --model {tiny_dir} <&-")
    assert bad.returncode == 2 and b"stdin is not UTF-8" in bad.stderr and b"Traceback" not in bad.stderr
    assert empty.returncode == 0 and b"Traceback" not in empty.stderr
    assert closed.returncode == 0 and b"Traceback" not in closed.stderr

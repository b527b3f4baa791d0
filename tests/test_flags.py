"""train.py's flags: what --help says, each flag's range and every rule on how they combine, checked before
anything is loaded (one line, exit 2)."""
import json

import pytest

from conftest import ROOT


def one_line_exit(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, needle", [
    (["--top-k", "9"], "top_k=9 must be in [1, num_experts=8]"),
    (["--rank", "0"], "--rank: must be >= 1, got 0"),
    (["--num-experts", "0"], "--num-experts: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
    (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--keep", "0"], "--keep: must be >= 1"),
    (["--keep", "-1"], "--keep: must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--max-len", "-5"], "--max-len: must be >= 2"),
    (["--lr", "-0.001"], "--lr: must be in (0"),
    (["--lr", "abc"], "--lr: expected a number"),
    (["--dropout", "1.5"], "--dropout: must be in [0"),
    (["--temperature", "0"], "--temperature: must be in (0"),
    (["--cl-debias", "1"], "--cl-debias: must be in [0"),
    (["--cl-debias", "0.1", "--lambda-cl", "0"], "--cl-debias corrects the contrastive term's InfoNCE, which is off"),
    (["--cl-debias", "0.1", "--num-experts", "1", "--top-k", "1"], "--cl-debias corrects the contrastive term's"),
    (["--queue", "-1"], "--queue: must be >= 0"),
    (["--lambda-z", "-1"], "--lambda-z: must be >= 0"),
    (["--cl-views", "sequence"], "unrecognized arguments: --cl-views"),  # removed: not a recipe setting
    (["--cl-debias", "0.1", "--temperature", "0.01"], "--cl-debias 0.1 needs --temperature >= 0.02"),
    (["--temperature", "0.01"], "give --cl-debias 0 for plain InfoNCE"),  # the default's tau+ 1/8
    (["--targets", "q_proj,vproj"], "['vproj'] not projection names"),
    (["--data", "/nonexistent.jsonl"], "--data: /nonexistent.jsonl is not found"),
    (["--data", ROOT], "is a directory"),
    (["--model", ROOT], "--model: " + ROOT + " has no config.json"),
    (["--queue", "16", "--lambda-cl", "0"], "--queue holds negatives of the contrastive term, which is off"),
    (["--queue", "16", "--num-experts", "1", "--top-k", "1"], "--queue holds negatives of the contrastive term"),
    (["--fsdp"], "--fsdp shards over processes: run under torchrun"),
    (["--batch-size", "1"], "--batch-size 1 leaves no negatives"),
    (["--router", "ctx"], "invalid choice: 'ctx'"),
    (["--router", "context", "--num-experts", "1", "--top-k", "1"], "router='context' needs num_experts > 1"),
])
def test_bad_train_flags(capsys, flags, needle):
    from train import parse_args

    assert needle in one_line_exit(capsys, lambda: parse_args(flags))


def test_the_debiased_infonce_is_the_default_where_the_term_is_on():
    """No --cl-debias: tau+ 1/8 with the contrastive term on; 0 where nothing would read it (the term off); an
    explicit value is kept. The accept side of each refusal: --batch-size 1 with --queue runs."""
    from config import DEBIAS
    from train import parse_args

    assert DEBIAS == 0.125 and parse_args([]).cl_debias == 0.125
    assert parse_args(["--lambda-cl", "0"]).cl_debias == 0
    assert parse_args(["--num-experts", "1", "--top-k", "1"]).cl_debias == 0
    assert parse_args(["--cl-debias", "0"]).cl_debias == 0 and parse_args(["--cl-debias", "0.3"]).cl_debias == 0.3
    assert parse_args(["--batch-size", "1", "--queue", "16"]).queue == 16
    assert parse_args(["--cl-debias", "0", "--temperature", "0.01"]).temperature == 0.01


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


def test_every_train_flag_says_what_it_does(capsys):
    """--help: at most 30 options, each with its own sentence (not only a default), in the groups of
    config.HELP, and no path of this machine in any default."""
    from dataclasses import fields

    import config

    assert set(config.HELP_OF) == {f.name for f in fields(config.TrainConfig)}
    assert len(config.HELP_OF) <= 30
    assert all(len(text.split()) >= 3 for text in config.HELP_OF.values())
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    out = capsys.readouterr().out
    for group in config.HELP:
        assert f"\n{group}:\n" in out
    assert "bundled samples/med_sample.jsonl" in " ".join(out.split()) and ROOT not in out
    assert out.count("\n  --") <= 31  # the options and -h


@pytest.mark.parametrize("field, value", [("hidden_size", -8), ("hidden_size", 0), ("num_attention_heads", 0),
                                          ("hidden_size", 64.5), ("vocab_size", 10 ** 12), ("head_dim", "16"),
                                          ("rms_norm_eps", float("nan")), ("rope_theta", float("inf")),
                                          ("num_key_value_heads", 3)])
def test_a_model_config_with_a_bad_size_is_one_line_naming_the_field(capsys, tmp_path, field, value):
    """Negative, zero, non-integer, huge or non-finite sizes in --model's config.json: one line naming the field,
    checked before anything is allocated (not a traceback, nor "try a lower --lr" after a NaN)."""
    from model import Qwen3Config
    from train import parse_args

    cfg = {**Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_hf_dict(),
           field: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    err = one_line_exit(capsys, lambda: parse_args(["--model", str(tmp_path)]))
    assert f"config.json: {field}=" in err or (field == "num_key_value_heads" and "not a multiple of" in err), err

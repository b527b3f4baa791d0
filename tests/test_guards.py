"""What the guards promise, each written so that it fails when the guard is weakened (issue 23's survivors):
scoring keeps every part of a prompt, an exemplar is never the question, nothing non-finite is saved or
applied, an earlier run's history is not replaced, and a new --lr on resume holds for every later step."""
import json
import os

import pytest
import torch

from conftest import small_cfg

# ----------------------------------------------------------------------------------------------------------
# evaluation: what the model sees


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


# ----------------------------------------------------------------------------------------------------------
# training: nothing non-finite is saved or applied


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_checkpoint_with_any_non_finite_value_is_never_written(tmp_path, bad):
    from checkpoint import save_checkpoint

    with pytest.raises(FloatingPointError, match="non-finite values"):
        save_checkpoint(str(tmp_path), 1, None, {"w": torch.tensor([1.0, bad])}, {}, None, None, None)
    assert os.listdir(tmp_path) == []


def test_an_infinite_gradient_norm_with_a_finite_loss_is_not_applied(tiny_dir, tmp_path, monkeypatch):
    """The guard reads the gradient norm too: a step whose norm is inf (the loss finite) stops before the
    update, and the adapters stay as they were."""
    import train as T

    def infinite_norm(params, max_norm, *a, **k):
        return torch.tensor(float("inf"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", infinite_norm)
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    with pytest.raises(FloatingPointError, match=r"gradient norm \(inf\)"):
        T.train(small_cfg(tiny_dir, tmp_path / "g", save_every=1))
    assert steps == [] and not any(d.startswith("ckpt-") for d in os.listdir(tmp_path / "g"))


# ----------------------------------------------------------------------------------------------------------
# the run directory and resume


def test_a_run_dir_holding_only_metrics_is_an_earlier_run(tiny_dir, tmp_path):
    """metrics.jsonl alone (its checkpoints deleted) is still a run's history: a fresh start stops without
    --overwrite and leaves it byte-identical."""
    from run_dir import RunDirError
    from train import train

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm": 1.0}) + "\n")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="holds an earlier run"):
        train(small_cfg(tiny_dir, run))
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_new_lr_on_resume_holds_for_every_later_step(tiny_dir, tmp_path):
    """Resuming step 3 of 6 with --lr 5e-4: steps 4, 5, 6 use 5e-4 x the schedule (not the checkpoint's 1e-3 x it),
    and so does the scheduler's state written at the end."""
    from checkpoint import read_training_state
    from train import lr_at, train

    train(small_cfg(tiny_dir, tmp_path / "r", steps=3, save_every=3))
    cfg = small_cfg(tiny_dir, tmp_path / "r", resume=str(tmp_path / "r"), lr=5e-4, save_every=3)
    hist = train(cfg)
    assert [h["step"] for h in hist] == [4, 5, 6]
    for h in hist:
        assert h["lr"] == pytest.approx(5e-4 * lr_at(h["step"] - 1, cfg), rel=1e-9), h["step"]
    sched = read_training_state(str(tmp_path / "r" / "ckpt-000006"))["scheduler"]
    assert sched["base_lrs"] == [pytest.approx(5e-4)]


# ----------------------------------------------------------------------------------------------------------
# adapters: nothing loaded is trusted before it is checked


def saved_adapter(tmp_path):
    from adapter_io import save_adapter
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights, save_model

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_model(init_weights(Qwen3(cfg)), str(tmp_path / "base"))
    from model import load_model

    save_adapter(add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=4, rank=2),
                              verbose=False), str(tmp_path / "ad"))
    return load_model, tmp_path / "ad"


@pytest.mark.parametrize("field, value", [("num_experts", 10 ** 9), ("rank", -2), ("rank", 0), ("top_k", "2")])
def test_a_bad_adapter_config_is_refused_before_anything_is_allocated(tmp_path, field, value):
    """A checkpoint's adapter_config.json (manifest recomputed, so the checksums pass) with a huge or invalid
    shape: a one-line ValueError naming the field, not a 512 GB allocation or a ZeroDivisionError."""
    from adapter_io import load_adapter, write_manifest

    load_model, ad = saved_adapter(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg[field] = value
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    write_manifest(str(ad))
    with pytest.raises(ValueError, match=field):
        load_adapter(load_model(str(tmp_path / "base")), str(ad))


def test_an_adapter_without_its_manifest_is_refused(tmp_path):
    """Deleting manifest.json must not switch the checksum off: the edited weights are refused, naming the file."""
    from adapter_io import load_adapter

    load_model, ad = saved_adapter(tmp_path)
    (ad / "manifest.json").unlink()
    data = bytearray((ad / "adapter.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (ad / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="manifest.json not found"):
        load_adapter(load_model(str(tmp_path / "base")), str(ad))


# ----------------------------------------------------------------------------------------------------------
# flags and data


def test_every_train_flag_says_what_it_does(capsys):
    """--help: every option has its own sentence (not only a default), in the groups of config.HELP."""
    from dataclasses import fields

    import config

    assert set(config.HELP_OF) == {f.name for f in fields(config.TrainConfig)}
    assert all(len(text.split()) >= 3 for text in config.HELP_OF.values())
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    out = capsys.readouterr().out
    for group in config.HELP:
        assert f"\n{group}:\n" in out
    assert "--queue-momentum" in out and "head readings only" in out


@pytest.mark.parametrize("line, want", [
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, ["system", "user", "assistant"]),
    ({"data": ["q1", "a1", "q2", "a2"]}, ["user", "assistant", "user", "assistant"]),
])
def test_sharegpt_and_huatuo_lines_become_chat_messages(tmp_path, line, want):
    from data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line, ensure_ascii=False).encode() + b"\n")  # with a BOM
    (msgs,), bad = read_jsonl(str(path))
    assert [m["role"] for m in msgs] == want and bad == 0
    assert msgs[-1]["content"] in ("a", "a2")


@pytest.mark.parametrize("line, needle", [
    ({"conversations": [{"from": "robot", "value": "x"}]}, "from system/human/user/gpt/assistant"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"data": ["only a question"]}, "alternating question, answer"),
    ({"data": ["q", 3]}, "alternating question, answer"),
])
def test_bad_sharegpt_and_huatuo_lines_name_file_and_line(tmp_path, line, needle):
    from data import DataError, read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{__import__('re').escape(needle)}"):
        read_jsonl(str(path))
    assert len(read_jsonl(str(path), skip_bad=True)[0]) == 1


def test_an_adapter_is_refused_on_another_base_of_the_same_shape(tmp_path):
    """Two random bases of one config share the config hash; the fingerprint of the base's weights tells them
    apart. The same base loaded in bf16 still matches."""
    import torch

    from adapter_io import load_adapter
    from model import Qwen3, Qwen3Config, load_model
    from tiny_qwen import init_weights, save_model

    load_model_, ad = saved_adapter(tmp_path)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_model(init_weights(Qwen3(cfg), seed=1), str(tmp_path / "other"))
    with pytest.raises(ValueError, match="another base model of the same shape"):
        load_adapter(load_model(str(tmp_path / "other")), str(ad))
    load_adapter(load_model(str(tmp_path / "base"), dtype=torch.bfloat16), str(ad))

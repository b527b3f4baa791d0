"""The offline Qwen vocabulary (tiny_qwen.py's converter) against tiktoken, and Qwen3's chat template."""
import csv
import os
import unicodedata

import pytest

from tokenizer import Tokenizer, apply_chat_template
from conftest import require_shared


def medical_lines(n=1200):
    path = os.path.join(require_shared(), "cmexam", "val_full.csv")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = []
    for r in rows:
        lines += [r["Question"], r["Options"], r["Explanation"]]
        if len(lines) >= n:
            break
    return lines


def test_ids_identical_to_tiktoken_on_chinese_medical_text(qwen_tok_dir):
    import tiktoken
    from tiny_qwen import QWEN3_ADDED_TOKENS, QWEN_SPLIT_REGEX, load_ranks, qwen_tiktoken_path

    ranks = load_ranks(qwen_tiktoken_path())
    assert len(ranks) == 151643
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT_REGEX, mergeable_ranks=ranks,
                            special_tokens={t: i for i, t, _ in QWEN3_ADDED_TOKENS})
    tok = Tokenizer(qwen_tok_dir)
    lines = medical_lines()
    assert len(lines) >= 1000
    mismatched = [s for s in lines if tok.encode(s) != enc.encode(unicodedata.normalize("NFC", s), allowed_special="all")]
    assert not mismatched, f"{len(mismatched)} lines differ, e.g. {mismatched[0][:60]!r}"
    assert sum(len(tok.encode(s)) for s in lines) > 50_000  # a real workload, not a handful of tokens
    for s in lines[:200]:
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)


def test_mixed_script_and_whitespace_match_tiktoken(qwen_tok_dir):
    import tiktoken
    from tiny_qwen import QWEN_SPLIT_REGEX, load_ranks, qwen_tiktoken_path

    enc = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT_REGEX, mergeable_ranks=load_ranks(qwen_tiktoken_path()),
                            special_tokens={})
    tok = Tokenizer(qwen_tok_dir)
    for s in ["Hello  world!\n\n  x", "患者男，45岁。BP 120/80mmHg，HR 88次/分。", "It's 3.14159 ", "\t\r\n  end",
              "emoji 🙂 ok", "A. 阿司匹林\nB. 布洛芬"]:
        assert tok.encode(s) == enc.encode(s), s


def test_special_token_ids(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    expect = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
              "</think>": 151668}
    for s, i in expect.items():
        assert tok.token_to_id(s) == i
        assert tok.encode(s) == [i]
    assert tok.encode("<|im_start|>user\n你好<|im_end|>") == [151644, 872, 198, 108386, 151645]
    assert tok.decode([151644, 872, 198, 108386, 151645], skip_special_tokens=True) == "user\n你好"


def test_option_letters_are_single_tokens(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    for letter in "ABCDEF":
        assert len(tok.encode(letter)) == 1
        assert len(tok.encode(" " + letter)) == 1


def test_non_qwen_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFT, models

    HFT(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a Qwen3 tokenizer"):
        Tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(str(tmp_path / "nope"))


# Golden strings: what Qwen3's official chat template renders for these messages.
def test_chat_template_single_turn_generation_prompt():
    got = apply_chat_template([{"role": "user", "content": "头痛怎么办？"}], add_generation_prompt=True)
    assert got == "<|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    think = apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=True)
    assert think == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_system_and_multi_turn():
    msgs = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    assert apply_chat_template(msgs) == (
        "<|im_start|>system\n你是医生。<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"          # before the last user turn: no think block
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n")  # the final answer: empty think block
    assert apply_chat_template(msgs[:4], add_generation_prompt=True).endswith(
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_inline_reasoning_moves_into_think_block():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nA"}]
    assert apply_chat_template(msgs) == ("<|im_start|>user\nQ<|im_end|>\n"
                                         "<|im_start|>assistant\n<think>\nwhy\n</think>\n\nA<|im_end|>\n")
    with pytest.raises(ValueError, match="unknown chat role"):
        apply_chat_template([{"role": "robot", "content": "x"}])


def test_generate_text_roundtrip_on_tiny_demo_checkpoint(tmp_path):
    import torch
    from generate import generate
    from model import load_model
    from tiny_qwen import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / "tiny"), num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                head_dim=16)
    model, tok = load_model(path), Tokenizer(path)
    prompt = apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    ids = generate(model, tok.encode(prompt), max_new_tokens=5, eos_id=None)
    assert ids.shape == (1, 5)
    text = generate(model, prompt, tokenizer=tok, max_new_tokens=5, eos_id=None)
    assert text == tok.decode(ids[0].tolist())
    a = generate(model, tok.encode(prompt), max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, eos_id=None)
    b = generate(model, tok.encode(prompt), max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, eos_id=None)
    assert torch.equal(a, b)


def test_tiny_top_p_keeps_only_the_argmax(tmp_path):
    import torch
    from generate import generate
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights

    cfg = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = init_weights(Qwen3(cfg), std=0.5).eval()
    ids = torch.tensor([[1, 2, 3]])
    greedy = generate(model, ids, max_new_tokens=8, eos_id=None)
    nucleus = generate(model, ids, max_new_tokens=8, temperature=5.0, top_p=1e-6, seed=0, eos_id=None)
    assert torch.equal(greedy, nucleus)
    hot = generate(model, ids, max_new_tokens=8, temperature=5.0, top_p=1.0, seed=0, eos_id=None)
    assert not torch.equal(greedy, hot)  # sampling really samples (fixed seed, so deterministic)


def test_chat_template_without_a_user_turn():
    """Qwen3's template finds the last user turn; with none, it is taken to be the last message, so no assistant
    turn gets a think block (system-only, assistant-first); an assistant turn after a later user turn does."""
    sys_only = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]
    assert apply_chat_template(sys_only) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert apply_chat_template([{"role": "assistant", "content": "A"}]) == "<|im_start|>assistant\nA<|im_end|>\n"
    first = [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]
    assert apply_chat_template(first) == ("<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                                          "<|im_start|>assistant\n<think>\n\n</think>\n\nB<|im_end|>\n")
    assert apply_chat_template(sys_only[:1], add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")

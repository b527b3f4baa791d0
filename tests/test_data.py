"""data.py: chat-format lines of every supported shape, assistant-only labels, truncation and padding, a bad
line named by file:line, and how a step's batches are cut."""
import json
import random
import re

import pytest

from data import IGNORE, DataError, collate, encode_all, read_jsonl, tokenize
from tokenizer import IM_END, Tokenizer


def test_assistant_only_labels_golden(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    msgs = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "答案：C"}]
    ids, labels = tokenize(msgs, tok)
    from tokenizer import apply_chat_template
    assert ids == tok.encode(apply_chat_template(msgs))  # turn-by-turn tokenization == whole-text tokenization
    supervised = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    assert supervised == "A1<|im_end|>答案：C<|im_end|>"  # answers + their <|im_end|>, nothing else
    assert all(y in (IGNORE, t) for t, y in zip(ids, labels))
    assert labels.count(IM_END) == 2


def test_truncation_and_padding_never_carry_loss(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    long_prompt = [{"role": "user", "content": "头痛" * 200}, {"role": "assistant", "content": "休息"}]
    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "好的，请多喝水。"}]
    items, counts = encode_all([long_prompt, short], tok, max_len=64)
    assert counts == {"truncated": 1, "dropped_no_target": 1}  # the answer was cut away: dropped, counted
    items, _ = encode_all([short, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]], tok, 64)
    ids, labels, mask = collate(items, tok.pad_id)
    assert (labels[~mask] == IGNORE).all()
    assert ((labels != IGNORE) <= mask).all()


def test_empty_file_and_other_shapes(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no usable examples"):
        read_jsonl(str(p))
    p.write_text('{"instruction": "i", "input": "x", "output": "o"}\n', encoding="utf-8")
    (msgs,) = read_jsonl(str(p))
    assert msgs == [{"role": "user", "content": "i\n\nx"}, {"role": "assistant", "content": "o"}]


def test_batches_are_length_bucketed():
    from data import batch_order

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(2000)]
    spread = lambda bs: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)  # noqa: E731
    order = batch_order(lengths, 8, seed=0, epoch=0)
    shuffled = list(range(2000))
    rng.shuffle(shuffled)
    assert spread(order) < 0.1 * spread([shuffled[i:i + 8] for i in range(0, 2000, 8)])
    assert sorted(i for b in order for i in b) == list(range(2000))  # every example once (2000 = 250 x 8)


def test_a_steps_pieces_do_not_depend_on_the_split():
    """batch_order: the pieces of --batch-size sequences of every step are the same for 1 process x accumulation
    4, 2 ranks x 2 and 4 ranks x 1 (micro-step j of rank r = piece j * world + r), and the ranks of one micro-step
    hold what 1 rank x world * batch-size holds in that micro-step."""
    from data import batch_order

    lengths = [random.Random(1).randint(5, 90) for _ in range(100)]

    def pieces(world, accum, B=3):
        per_rank = [batch_order(lengths, B, 7, 0, r, world, accum) for r in range(world)]
        return [[per_rank[r][s * accum + j] for j in range(accum) for r in range(world)]
                for s in range(len(per_rank[0]) // accum)]

    one = pieces(1, 4)
    assert len(one) == 8 and one == pieces(2, 2) == pieces(4, 1)
    wide = pieces(1, 2, B=6)  # 2 ranks x 3 sequences per micro-step == 1 rank x 6
    assert [[a + b for a, b in zip(s[::2], s[1::2])] for s in pieces(2, 2)] == wide


@pytest.mark.parametrize("line, want", [
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, ["system", "user", "assistant"]),
    ({"data": ["q1", "a1", "q2", "a2"]}, ["user", "assistant", "user", "assistant"]),
])
def test_sharegpt_and_huatuo_lines_become_chat_messages(tmp_path, line, want):
    from data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line, ensure_ascii=False).encode() + b"\n")  # with a BOM
    (msgs,) = read_jsonl(str(path))
    assert [m["role"] for m in msgs] == want
    assert msgs[-1]["content"] in ("a", "a2")


BAD_LINES = [  # one bad line of each kind, as the second line of a file: what its error names
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', "invalid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    (b'{"prompt": 3, "response": "x"}', "prompt/response"),
    (b'{"question": "x"}', "unknown shape"),
    (b'[1, 2]', "expected a JSON object"),
    (b'{"prompt": "q", "response": "\xff\xfe"}', "not UTF-8"),
    (b'{"instruction": 3, "output": "o"}', "instruction/output must be strings (instruction is int)"),
    (b'{"prompt": "\\ud800", "response": "a"}', "lone UTF-16 surrogate"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}).encode(), "from system/human/user/gpt/assistant"),
    (json.dumps({"conversations": []}).encode(), "'conversations' must be a non-empty list"),
    (json.dumps({"data": ["only a question"]}).encode(), "alternating question, answer"),
    (json.dumps({"data": ["q", 3]}).encode(), "alternating question, answer"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}).encode(),
     "an assistant turn is empty"),  # a judgement call (docs/design.md): refused, with file:line
    (json.dumps({"prompt": "q", "response": "  \n"}).encode(), "an assistant turn is empty"),
]


@pytest.mark.parametrize("line, needle", BAD_LINES)
def test_a_bad_line_stops_the_read_naming_file_and_line(tmp_path, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "q", "response": "a"}\n' + line + b"\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{re.escape(needle)}"):
        read_jsonl(str(p))


def test_a_bad_line_through_train_py_is_one_line_and_exit_2(tmp_path, tiny_dir):
    import subprocess
    import sys

    from conftest import ROOT

    p = tmp_path / "d.jsonl"
    p.write_text("{oops\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "train.py", "--data", str(p), "--model", tiny_dir, "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {p}:1: invalid JSON: " + r.stderr.split("invalid JSON: ")[1].strip()
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "config.json").exists()


def test_collate_marks_exactly_the_real_tokens():
    """Right padding: the mask is True on each row's real tokens and nowhere else, padding ids are pad_id and
    padding labels IGNORE."""
    items = [([5, 6, 7], [IGNORE, 6, 7]), ([8], [IGNORE]), ([1, 2, 3, 4, 9], [IGNORE, IGNORE, 3, 4, 9])]
    ids, labels, mask = collate(items, pad_id=0)
    assert mask.sum(1).tolist() == [3, 1, 5] and mask[:, 0].all()
    for b, (x, y) in enumerate(items):
        assert ids[b, :len(x)].tolist() == x and labels[b, :len(y)].tolist() == y
        assert (ids[b, len(x):] == 0).all() and (labels[b, len(x):] == IGNORE).all() and not mask[b, len(x):].any()


def test_a_huge_example_is_read_only_as_far_as_max_len_needs(qwen_tok_dir):
    """Bounded work per example: with ``limit`` (encode_all passes --max-len) the tokenizer is handed at most
    (limit + 1 + margin) tokens' worth of characters per turn, whatever the turn's length (a 50 MB answer here),
    and the first ``limit`` tokens and labels equal those of the whole text, wherever the cut falls."""
    import data

    tok = Tokenizer(qwen_tok_dir)
    rng = random.Random(0)
    pieces = ["患者", "心肌梗死", "的", "治疗", "，", "。", " ", "  ", "mg", "2024", "=" * 40, "a" * 70, "\n", "x" * 3,
              "Diagnosis", "：", "①"]
    for trial in range(12):
        text = lambda n: "".join(rng.choice(pieces) for _ in range(n))  # noqa: E731
        msgs = [{"role": "user", "content": text(rng.randint(1, 300))},
                {"role": "assistant", "content": text(rng.randint(1, 900))}]
        ids, labels = tokenize(msgs, tok)
        for limit in (1, 5, 37, 120, 400, len(ids) - 1):
            got_ids, got_labels = tokenize(msgs, tok, limit=limit)
            assert (got_ids[:limit], got_labels[:limit]) == (ids[:limit], labels[:limit]), (trial, limit)
    seen = []
    real = tok.encode_with_offsets
    tok.encode_with_offsets = lambda s: (seen.append(len(s)), real(s))[1]
    huge = [{"role": "user", "content": "下列说法正确的是"}, {"role": "assistant", "content": "答案：A " * (50 << 18)}]
    items, counts = encode_all([huge], tok, 96)
    assert counts["truncated"] == 1 and len(items[0][0]) == 96
    assert max(seen) <= (96 + 1 + data.CUT_MARGIN) * tok.max_token_chars

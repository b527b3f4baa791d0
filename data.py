"""Training data: jsonl -> chat messages -> token ids with assistant-only labels -> length-bucketed batches.

Accepted line shapes (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}          (OpenAI / HF chat)
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}            (ShareGPT)
    {"data": ["question", "answer", "question", "answer", ...]}                           (HuatuoGPT)
    {"prompt": "...", "response": "..."}            {"instruction": "...", "input": "...", "output": "..."}
A UTF-8 byte-order mark at the start of the file is skipped.
"""
from __future__ import annotations

import json
import random

import torch

from tokenizer import render_turns

IGNORE = -100  # label of tokens without loss (prompt, template, padding)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_LINE = 64 << 20  # bytes; why a bound: a device file or a jsonl without newlines must not eat the memory


def answer_mask(labels):
    """(B, T) labels -> (B, T-1) bool: the positions t whose next token t+1 carries loss (an answer token)."""
    return labels[:, 1:] != IGNORE


class DataError(ValueError):
    pass


def to_messages(obj) -> list[dict]:
    """One parsed jsonl object -> a list of chat messages, or DataError saying what is wrong."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataError("each message needs role system/user/assistant and a string content, "
                                f"got {m!r:.80}")
    elif "conversations" in obj:
        msgs = sharegpt_messages(obj["conversations"])
    elif "data" in obj:
        msgs = huatuo_messages(obj["data"])
    elif "prompt" in obj and "response" in obj:
        _strings(obj, "prompt", "response")
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    elif "instruction" in obj and "output" in obj:
        _strings(obj, "instruction", "output", *(["input"] if obj.get("input") is not None else []))
        user = obj["instruction"] + ("\n\n" + obj["input"] if obj.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    else:
        raise DataError(f"unknown shape with keys {sorted(obj)}: expected 'messages', 'conversations', 'data', "
                        "'prompt'+'response' or 'instruction'(+'input')+'output'")
    for m in msgs:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # why: JSON may spell a lone surrogate (\ud800) that no tokenizer can take
            raise DataError("text holds a lone UTF-16 surrogate (invalid Unicode)") from None
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError("no assistant turn: nothing to learn from")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        # why refused, not kept: its only target would be <|im_end|>, teaching the model to answer with nothing
        raise DataError("an assistant turn is empty: its only target would be the end of the turn")
    return msgs


def sharegpt_messages(turns) -> list[dict]:
    """ShareGPT's [{"from": "human"|"gpt"|"system", "value": ...}] -> chat messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError("'conversations' must be a non-empty list")
    msgs = []
    for t in turns:
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise DataError(f"each conversation turn needs from {'/'.join(SHAREGPT_ROLES)} and a string value, "
                            f"got {t!r:.80}")
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return msgs


def huatuo_messages(texts) -> list[dict]:
    """HuatuoGPT's ["question", "answer", ...] (alternating, user first) -> chat messages."""
    if not isinstance(texts, list) or len(texts) < 2 or len(texts) % 2 or not all(isinstance(t, str) for t in texts):
        raise DataError("'data' must be a list of strings alternating question, answer (an even number >= 2)")
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def _strings(obj: dict, *keys):
    wrong = [k for k in keys if not isinstance(obj.get(k), str)]
    if wrong:
        got = ", ".join(f"{k} is {type(obj.get(k)).__name__}" for k in wrong)
        raise DataError(f"{'/'.join(keys)} must be strings ({got})")


def parse_line(raw: bytes) -> list[dict]:
    """One jsonl line (bytes) -> chat messages, or DataError saying what is wrong with it."""
    try:
        return to_messages(json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise DataError("JSON nested too deeply") from None


def read_jsonl(path: str) -> list[list[dict]]:
    """All examples of a jsonl file; a bad line stops with file:line (why not skip it: a silently smaller
    dataset is a result nobody asked for; fix or drop the line)."""
    out = []
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is reported with its line number
        for n, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(line) > MAX_LINE:
                raise DataError(f"{path}:{n}: a line longer than {MAX_LINE >> 20} MiB: not a jsonl file")
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
                line = line[3:]
            if not line.strip():
                continue
            try:
                out.append(parse_line(line))
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from None
    if not out:
        raise DataError(f"{path}: no usable examples (empty file)")
    return out


CUT_MARGIN = 16  # tokens read past a limit, so that where a turn is cut cannot change the tokens kept


def tokenize(messages: list[dict], tok, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Render with Qwen3's chat template (thinking off) and label only assistant tokens (+ their <|im_end|>).

    Each turn's text is tokenized on its own (turns meet at special tokens, so this equals tokenizing the
    whole text); the empty think block Qwen3 puts before the last answer is prompt (at inference it is
    prefilled), the answer and its <|im_end|> are targets. ``limit``: only the first ``limit`` tokens are
    wanted (more may come back). why: a 50 MB line would otherwise be tokenized whole (minutes, gigabytes)
    before being cut; a token covers at most ``tok.max_token_chars`` characters, so reading that many per
    token still wanted, plus a margin, gives the same first ``limit`` tokens (tested)."""
    ids, labels = [], []
    for i, seg in enumerate(render_turns(messages)):
        if limit is not None and len(ids) > limit:
            break  # nothing of this turn is kept
        if limit is not None:
            seg = seg[:(limit + 1 - len(ids) + CUT_MARGIN) * tok.max_token_chars]
        if messages[i]["role"] != "assistant":
            ids += tok.encode(seg)
            labels += [IGNORE] * (len(ids) - len(labels))
            continue
        # seg = "<|im_start|>assistant\n" [+ "<think>\n\n</think>\n\n"] + content + "<|im_end|>\n"
        answer_start = seg.index("\n", len("<|im_start|>assistant")) + 1
        if seg.startswith("<think>", answer_start):
            answer_start = seg.index("</think>\n\n", answer_start) + len("</think>\n\n")
        answer_end = len(seg) - 1  # everything up to and including <|im_end|>, not the final "\n"
        seg_ids, offsets = tok.encode_with_offsets(seg)
        for t, (s, e) in zip(seg_ids, offsets):
            ids.append(t)
            labels.append(t if s >= answer_start and e <= answer_end else IGNORE)
    return ids, labels


def encode_all(examples, tok, max_len: int):
    """Tokenize; truncate to max_len; drop examples whose supervised part is cut away. Returns (items, counts)."""
    items, truncated, dropped = [], 0, 0
    for msgs in examples:
        ids, labels = tokenize(msgs, tok, limit=max_len)
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(x == IGNORE for x in labels[1:]):
            dropped += 1
            continue
        items.append((ids, labels))
    return items, {"truncated": truncated, "dropped_no_target": dropped}


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                grad_accum: int = 1):
    """One epoch of this rank's micro-batches (lists of example indices), length-bucketed, in step order: step s
    is entries [s * grad_accum, (s + 1) * grad_accum).

    Shuffle, sort within windows of 50 step batches, cut step batches of n = batch_size * grad_accum * world,
    shuffle those; cut each into pieces of batch_size, and micro-step j of rank r takes piece j * world + r.
    why: a step's examples and its pieces of batch_size depend only on n and batch_size, not on how the pieces
    are spread over ranks and micro-steps: 1 process x accumulation k and k ranks x 1 see the same pieces (the
    contrastive term contrasts within a piece, so its loss needs this), and the ranks of micro-step j together
    hold what 1 rank x world * batch_size would (the balance term counts over ranks). A run can resume on
    another split of the same n. The remainder that does not fill a step batch is dropped."""
    rng = random.Random(seed * 1000 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    n = batch_size * grad_accum * world
    window = 50 * n
    idx = [i for w in range(0, len(idx), window) for i in sorted(idx[w:w + window], key=lambda i: lengths[i])]
    steps = [idx[i:i + n] for i in range(0, len(idx) - n + 1, n)]
    rng.shuffle(steps)
    piece = lambda b, p: b[p * batch_size:(p + 1) * batch_size]  # noqa: E731
    return [piece(b, j * world + rank) for b in steps for j in range(grad_accum)]


class Batches:
    """The batch schedule of a run (``cfg``: batch_size, grad_accum, seed): a deterministic function of
    (seed, epoch, step), so a resume continues it exactly, on any split of the step batch."""

    def __init__(self, items, cfg, pad_id: int, rank: int, world: int):
        self.items, self.cfg, self.pad_id, self.rank, self.world = items, cfg, pad_id, rank, world
        self.lengths = [len(ids) for ids, _ in items]
        self.steps_per_epoch = len(self.order(0)) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(items)} examples fill no step of batch-size x grad-accum x processes = "
                            f"{cfg.batch_size * cfg.grad_accum * world} sequences")

    def order(self, epoch: int) -> list:
        c = self.cfg
        return batch_order(self.lengths, c.batch_size, c.seed, epoch, self.rank, self.world, c.grad_accum)

    def __call__(self, step: int) -> list:
        """The micro-batches (ids, labels, mask) of optimizer step ``step`` on this rank."""
        a = self.cfg.grad_accum
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        return [collate([self.items[i] for i in order[k * a + j]], self.pad_id) for j in range(a)]


def collate(items, pad_id: int):
    """Right-pad a list of (ids, labels). Returns input_ids, labels (B, T) and the valid-token mask.

    why right padding: with causal attention a real token never sees a pad that comes after it, so the
    model needs no attention mask (the fast causal kernel) and real tokens get exactly the unpadded result."""
    T = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.bool)
    for b, (x, y) in enumerate(items):
        ids[b, :len(x)] = torch.tensor(x)
        labels[b, :len(y)] = torch.tensor(y)
        mask[b, :len(x)] = True
    return ids, labels, mask


def left_pad(seqs: list[list[int]], pad_id: int):
    """Left-pad token lists for inference: ids (B, T) and the attention mask (B, T), 1 = real token.

    why left: every row's last position is then its next-token position, and generation appends in step."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask

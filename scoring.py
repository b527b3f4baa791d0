"""Scoring multiple-choice questions with a causal LM, from the question side only.

``--mode logits`` (``score_logits``): the next-token log-probabilities after the prompt, restricted to the
question's option letters, give the letter distribution. A one-answer question (CMMLU, CMB 单项选择题) is
predicted by its argmax. A question whose answer may be any subset (CMExam, CMB 多项选择题) is predicted by
the exact MAP over well-formed answers: every non-empty option subset, written as sorted letters followed
by the answer terminator, is scored by its total log-probability

    score(c) = sum_j log p(c_j | prompt, c_<j)

and the best is the prediction. How it is computed, without reading anything twice:
- prompts that share a prefix (the few-shot header and exemplars of a subject) prefill it once into a KV
  cache, and every question runs as a continuation of it (``KVCache.repeat``);
- a question's candidate answers form a token trie (``candidate_trie``): each trie node is fed once, as one
  tree-shaped continuation of the question whose attention mask lets a node see the prompt and its own
  ancestors only. 31 subsets of 5 options cost 31 tokens instead of 31 prompt re-reads.
``score_logits_full`` is the plain path (each prompt whole, each candidate a full forward): the reference
the tests and bench/eval_speed.py compare with.

``--mode generate`` (``score_generate``): greedy decoding and official-style letter extraction.
"""
from __future__ import annotations

import itertools
import re
import sys

import torch
from tqdm import tqdm

from benchmarks import Item
from generate import generate
from data import left_pad
from router_context import new_context, read_in_context


def letter_token_ids(tok) -> dict:
    """Option letter -> its single token id (Qwen: A-F are 32-37)."""
    out = {}
    for c in "ABCDEF":
        ids = tok.encode(c)
        if len(ids) != 1:
            raise ValueError(f"option letter {c!r} is not a single token in this vocabulary: {ids}")
        out[c] = ids[0]
    return out


def answer_candidates(item: Item) -> list[str]:
    """Every non-empty subset of the options, as sorted letters."""
    opts = list(item.options)
    return ["".join(c) for n in range(1, len(opts) + 1) for c in itertools.combinations(opts, n)]


def candidate_ids(tok, item: Item, terminator: list[int]) -> list[list[int]]:
    """The token ids of every candidate answer string (``answer_candidates``), each ended by the terminator."""
    return [tok.encode(c) + terminator for c in answer_candidates(item)]


def letter_choice(logprobs, item: Item, letters: dict) -> tuple[str, dict]:
    """(argmax letter, the distribution over the item's letters) from next-token log-probabilities (V,)."""
    opts = list(item.options)
    sel = logprobs[[letters[c] for c in opts]].cpu()
    return opts[int(sel.argmax())], dict(zip(opts, [round(x, 6) for x in sel.softmax(-1).tolist()]))


def terminator_ids(tok, chat: bool) -> list[int]:
    """What ends an answer: the end of the assistant turn (chat) or the blank line before the next question."""
    return tok.encode("<|im_end|>") if chat else tok.encode("\n\n")


def candidate_trie(cands: list[list[int]]):
    """Token sequences -> a trie of the tokens that must be *fed* to score them all.

    Returns (tokens, parents, depths, paths): node i feeds ``tokens[i]`` and sees its ancestors (``parents``,
    -1 = the prompt); ``paths[c]`` lists (state, token) pairs: token c_j is predicted by the output at
    ``state`` (-1 = the prompt's last position, else a node). A sequence's last token is never fed."""
    tokens, parents, depths, index, paths = [], [], [], {}, []
    for seq in cands:
        state, path = -1, []
        for j, t in enumerate(seq):
            path.append((state, t))
            if j == len(seq) - 1:
                break
            key = (state, t)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(t)
                parents.append(state)
                depths.append(0 if state < 0 else depths[state] + 1)
            state = index[key]
        paths.append(path)
    return tokens, parents, depths, paths


def _ancestor_mask(parents: list[int]) -> torch.Tensor:
    """(n, n) bool: node q may see node k iff k is q or one of its ancestors."""
    n = len(parents)
    m = torch.eye(n, dtype=torch.bool)
    for q in range(n):  # parents come before children, so a parent's row is complete
        if parents[q] >= 0:
            m[q] |= m[parents[q]]
    return m


@torch.inference_mode()
def _forward_batch(model, prefix, rests: list[list[int]], tries: list):
    """One batch of questions after a shared prefix (``_prefill``'s (KV cache, router context), or None): the
    log-probabilities after each question (B, V) and at every trie node (list of (n_b, V))."""
    device = model.lm_head.weight.device
    prefix_cache, prefix_ctx = prefix or (None, None)
    B, P = len(rests), (prefix_cache.pos if prefix_cache is not None else 0)
    Ls, Lt = max(map(len, rests)), max((len(t[0]) for t in tries), default=0)
    cache = prefix_cache.repeat(B, P + Ls + Lt) if prefix_cache is not None else model.new_cache(B, Ls + Lt)
    ctx = prefix_ctx.repeat(B) if prefix_ctx is not None else new_context(model, B)
    lens = torch.tensor([len(r) for r in rests], device=device)
    ids = torch.full((B, Ls), 0, dtype=torch.long)
    for b, r in enumerate(rests):
        ids[b, :len(r)] = torch.tensor(r)  # right padding: the trie nodes come after each row's padding
    q = torch.arange(Ls, device=device)
    k = torch.arange(P + Ls, device=device)
    own = (k[None, None, :] - P <= q[None, :, None]) & (k[None, None, :] - P < lens[:, None, None])
    mask = (k[None, None, :] < P) | own | (k[None, None, :] - P == q[None, :, None])  # (B, Ls, P+Ls)
    with read_in_context(model, ctx, weight=q[None, :] < lens[:, None]):  # the real tokens of each row's rest
        h = model.model(ids.to(device), position_ids=(P + q).expand(B, Ls), cache=cache, attn_mask=mask)
    root = model.lm_head(h[torch.arange(B, device=device), lens - 1]).float().log_softmax(-1)  # (B, V)
    if Lt == 0:
        return root, [None] * B
    ids = torch.zeros(B, Lt, dtype=torch.long)
    pos = torch.zeros(B, Lt, dtype=torch.long)
    tree = torch.eye(Lt, dtype=torch.bool).repeat(B, 1, 1)  # padding nodes see themselves only
    for b, (tokens, parents, depths, _) in enumerate(tries):
        n = len(tokens)
        ids[b, :n], pos[b, :n] = torch.tensor(tokens), P + len(rests[b]) + torch.tensor(depths)
        tree[b, :n, :n] = _ancestor_mask(parents)
    prompt_keys = (k[None, None, :] < P) | (k[None, None, :] - P < lens[:, None, None])  # (B, 1, P+Ls)
    mask = torch.cat([prompt_keys.expand(B, Lt, P + Ls), tree.to(device)], dim=-1)
    with read_in_context(model, ctx, tree=tree.to(device)):  # a node's past: the prompt and its ancestors
        h = model.model(ids.to(device), position_ids=pos.to(device), cache=cache, attn_mask=mask)
    nodes = [model.lm_head(h[b, :len(t[0])]).float().log_softmax(-1) for b, t in enumerate(tries)]
    return root, nodes


def _path_score(path, root_b, nodes_b) -> float:
    return sum(float(root_b[t] if s < 0 else nodes_b[s, t]) for s, t in path)


def prompt_groups(tok, prompts: list[tuple[str, str]]) -> dict:
    """prefix text -> (prefix ids, [(item index, the rest's ids)]). A prompt whose two parts tokenize
    differently apart than together goes whole into the no-prefix group (same ids as the plain path)."""
    groups, enc = {}, {"": []}
    for i, (prefix, rest) in enumerate(prompts):
        if prefix not in enc:
            enc[prefix] = tok.encode(prefix)
        rest_ids = tok.encode(rest)
        if prefix and enc[prefix] + rest_ids != tok.encode(prefix + rest):
            prefix, rest_ids = "", tok.encode(prefix + rest)
        groups.setdefault(prefix, (enc[prefix], []))[1].append((i, rest_ids))
    return groups


def score_logits(model, tok, prompts: list[tuple[str, str]], items: list[Item], batch_size: int, chat: bool):
    """Predictions and letter distributions for every item; ``prompts`` are (shared prefix, rest) pairs."""
    letters, term = letter_token_ids(tok), terminator_ids(tok, chat)
    preds, probs, tries = [None] * len(items), [None] * len(items), {}
    groups = list(prompt_groups(tok, prompts).values())
    bar = tqdm(total=len(items), desc="scoring", disable=not sys.stderr.isatty())
    for prefix_ids, rows in groups:
        prefix = _prefill(model, prefix_ids) if prefix_ids else None  # once per group
        rows = sorted(rows, key=lambda r: len(r[1]))  # similar lengths batch together
        for j in range(0, len(rows), batch_size):
            batch = rows[j:j + batch_size]
            cands = []
            for i, _ in batch:
                key = tuple(items[i].options) if items[i].pick_many else None
                if key is not None and key not in tries:
                    tries[key] = candidate_trie(candidate_ids(tok, items[i], term))
                cands.append(tries[key] if key is not None else ([], [], [], []))
            root, nodes = _forward_batch(model, prefix, [r for _, r in batch], cands)
            for b, (i, _) in enumerate(batch):
                preds[i], probs[i] = letter_choice(root[b], items[i], letters)
                if items[i].pick_many:  # the exact MAP over every terminated subset
                    scores = torch.tensor([_path_score(p, root[b], nodes[b]) for p in cands[b][3]])
                    preds[i] = answer_candidates(items[i])[int(scores.argmax())]
            bar.update(len(batch))
    bar.close()
    return preds, probs


@torch.inference_mode()
def _prefill(model, ids: list[int]):
    """One shared prefix read once: its (KV cache, router context) (the context None for token routers)."""
    cache, ctx = model.new_cache(1, len(ids)), new_context(model, 1)
    with read_in_context(model, ctx):
        model.model(torch.tensor([ids], device=model.lm_head.weight.device), cache=cache)
    return cache, ctx


# ----------------------------------------------------------------------------------------------------------
# The plain path: each prompt read whole, each candidate answer a full forward (the reference)


@torch.inference_mode()
def next_token_logprobs(model, seqs: list[list[int]], pad_id: int):
    """log-softmax of the next-token logits after each sequence (batched, left-padded): (B, V) fp32."""
    device = model.lm_head.weight.device
    ids, mask = left_pad(seqs, pad_id)
    with read_in_context(model, new_context(model, len(seqs)), weight=mask.to(device)):  # skip the left pads
        logits = model(ids.to(device), attention_mask=mask.to(device), last_only=True)[:, -1]
    return logits.float().log_softmax(-1).cpu()


@torch.inference_mode()
def answer_string_logprob(model, prompt: list[int], conts: list[list[int]], pad_id: int) -> torch.Tensor:
    """Total log-probability of each continuation after ``prompt``: one full forward per continuation."""
    device = model.lm_head.weight.device
    seqs = [prompt + c for c in conts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)  # right padding: real tokens never see the pads after them
    hidden = model.model(ids.to(device))  # whole right-padded rows: a context router needs no context
    scores = torch.zeros(len(seqs))
    for i, c in enumerate(conts):
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=device)  # positions predicting c
        lp = model.lm_head(hidden[i, pos]).float().log_softmax(-1)
        scores[i] = lp.gather(-1, torch.tensor(c, device=device)[:, None]).sum().cpu()
    return scores


def score_logits_full(model, tok, prompts: list[tuple[str, str]], items: list[Item], batch_size: int, chat: bool):
    """``score_logits`` without any sharing: the same rule, each prompt and candidate read in full."""
    letters, term = letter_token_ids(tok), terminator_ids(tok, chat)
    encoded = [tok.encode(p + r) for p, r in prompts]
    preds, probs = [None] * len(items), [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lp = next_token_logprobs(model, [encoded[i] for i in idx], tok.pad_id)
        for row, i in enumerate(idx):
            preds[i], probs[i] = letter_choice(lp[row], items[i], letters)
            if items[i].pick_many:
                s = answer_string_logprob(model, encoded[i], candidate_ids(tok, items[i], term), tok.pad_id)
                preds[i] = answer_candidates(items[i])[int(s.argmax())]
    return preds, probs


# ----------------------------------------------------------------------------------------------------------
# Generate mode


ANSWER_RUN = re.compile(r"[A-F](?:[\s,，、和及]*[A-F])*")


def extract_answer(text: str, item: Item) -> str | None:
    """Official-style extraction: the first run of option letters in the output (e.g. 'A', 'ABD', 'A、C');
    all of its letters where the answer may be a subset, else the first."""
    for m in ANSWER_RUN.finditer(text):
        found = sorted({c for c in m.group(0) if c in item.options})
        if found:
            return "".join(found) if item.pick_many else found[0]
    return None


def score_generate(model, tok, prompts: list[tuple[str, str]], items: list[Item], batch_size: int,
                   max_new_tokens: int = 16):
    preds = [None] * len(items)
    encoded = [tok.encode(p + r) for p, r in prompts]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    device = model.lm_head.weight.device
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tok.pad_id)
        out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        for row, i in enumerate(idx):
            text = tok.decode([t for t in out[row].tolist() if t not in (tok.eos_id, tok.pad_id)])
            preds[i] = extract_answer(text, items[i])
    return preds, [None] * len(items)

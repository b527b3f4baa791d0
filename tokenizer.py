"""Qwen3's tokenizer (a ``tokenizer.json`` read by the ``tokenizers`` library) and its chat template.

Used by data.py (training labels), eval.py (prompts) and chat.py (generation).
"""
from __future__ import annotations

import functools
import os

from tokenizers import Tokenizer as HFTokenizer

ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = 151643, 151644, 151645, 151667, 151668


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` reading a checkpoint's ``tokenizer.json``."""

    def __init__(self, path: str):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} not found: the checkpoint dir needs a tokenizer.json")
        self.tok = HFTokenizer.from_file(file)
        specials = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END,
                    "<think>": THINK, "</think>": END_THINK}
        wrong = {s: self.tok.token_to_id(s) for s, i in specials.items() if self.tok.token_to_id(s) != i}
        if wrong:
            raise ValueError(f"{file} is not a Qwen3 tokenizer: special token ids {wrong}, expected {specials}")
        self.eos_id, self.pad_id = IM_END, ENDOFTEXT  # chat turns end with <|im_end|>; pad with <|endoftext|>

    @functools.cached_property
    def max_token_chars(self) -> int:
        """A token covers at most this many characters. why cached and lazy: reading the 151,669-entry vocabulary
        takes 0.1 s, which only data.tokenize's bounded reading needs, not every chat or eval start."""
        return max(map(len, self.tok.get_vocab()))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str):
        """ids and each token's (start, end) character span in ``text``."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)


def render_turns(messages: list[dict]) -> list[str]:
    """Qwen3's ChatML template (the official Jinja template, for messages without tools), one string per message.

    Like Qwen3's own template: a leading system message opens the prompt; assistant turns after the last
    user turn carry an (empty) ``<think>\\n\\n</think>\\n\\n`` block, earlier ones do not. Training uses the
    per-message pieces to know where each answer starts (data.tokenize)."""
    out = []
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role in ("user", "system"):
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            reasoning = ""
            if "</think>" in content:  # the template moves inline reasoning into the think block
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            if i > last_user and (i == len(messages) - 1 or reasoning):
                out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                           f"{content.lstrip(chr(10))}<|im_end|>\n")
            else:
                out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        else:
            raise ValueError(f"unknown chat role {role!r}: expected system, user or assistant")
    return out


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = False,
                        enable_thinking: bool = False) -> str:
    """The rendered conversation; with thinking off the generation prompt is prefilled with an empty think
    block (``<think>\\n\\n</think>\\n\\n``), exactly as Qwen3's template does, so the model answers directly."""
    text = "".join(render_turns(messages))
    if add_generation_prompt:
        text += "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    return text

"""Tokenizer, Qwen3's chat template, and generation with the KV cache.

    python chat.py --model DIR            # interactive chat (no --model: the tiny random demo model)
"""
from __future__ import annotations

import argparse
import os

import torch

ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = 151643, 151644, 151645, 151667, 151668


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` reading a checkpoint's ``tokenizer.json``."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

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


@torch.inference_mode()
def generate(model, prompt, tokenizer: Tokenizer | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = IM_END, pad_id: int = ENDOFTEXT,
             attention_mask=None, seed: int | None = None, stream=None):
    """Decode with the preallocated KV cache. Greedy when ``temperature == 0``, else temperature + top-p.

    ``prompt``: a string (needs ``tokenizer``), a list of ids, or a (B, T) LongTensor (left-padded, with
    ``attention_mask``). Returns the new tokens (B, n) (finished rows padded with ``pad_id``), or a
    string when the prompt was a string. ``stream(token_id)`` is called on each new token of row 0.
    """
    as_text = isinstance(prompt, str)
    if as_text:
        prompt = tokenizer.encode(prompt)
    device = model.lm_head.weight.device
    ids = prompt if torch.is_tensor(prompt) else torch.tensor([list(prompt)], dtype=torch.long)
    ids = ids.to(device)
    B, T = ids.shape
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, T + max_new_tokens)
    mask = attention_mask.to(device) if attention_mask is not None else None
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, -1)
            if top_p < 1.0:
                p, idx = probs.sort(-1, descending=True)
                drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0.0))
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        if stream is not None and not done[0]:
            stream(int(nxt[0]))
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):  # one host sync per step: the price of stopping early
                break
        if step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(nxt[:, None], attention_mask=mask, cache=cache, last_only=True)[:, -1]
    new = torch.stack(out, dim=1) if out else ids.new_zeros(B, 0)
    if as_text:
        return tokenizer.decode([t for t in new[0].tolist() if t not in (eos_id, pad_id)])
    return new


def main():
    ap = argparse.ArgumentParser(description="Chat with a Qwen3 checkpoint (thinking off).")
    ap.add_argument("--model", default=None, help="HF Qwen3 checkpoint dir (default: the tiny random demo model)")
    ap.add_argument("--adapter", default=None, help="a SparseDoctor adapter: a train.py run dir, checkpoint dir "
                    "or run/latest (default: the base model alone)")
    ap.add_argument("--system", default=None, help="optional system prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--prompt", default=None, help="answer this one prompt and exit (no interactive loop)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from model import load_model

    path = a.model
    if path is None:
        from tiny_qwen import default_model_dir
        path = default_model_dir()
        print("(no --model: using the tiny *random* demo model; expect gibberish)")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model, tok = load_model(path, dtype=dtype, device=a.device), load_tokenizer(path)
    if a.adapter:
        from lora_moe import load_adapter, resolve_adapter_dir
        load_adapter(model, a.adapter)  # adds the LoRA-MoE experts and routers, then fills them
        model.eval()  # no adapter dropout
        print(f"(adapter: {resolve_adapter_dir(a.adapter)})")
    messages = [{"role": "system", "content": a.system}] if a.system else []

    def turn(user: str):
        messages.append({"role": "user", "content": user})
        prompt = apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
        pieces = []

        def show(t):  # stream: decode the whole answer so far, print only what is new (multi-byte safe)
            if t in (IM_END, ENDOFTEXT):
                return
            before = tok.decode(pieces)
            pieces.append(t)
            print(tok.decode(pieces)[len(before):], end="", flush=True)

        generate(model, tok.encode(prompt), max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                 top_p=a.top_p, seed=a.seed, stream=show)
        print()
        messages.append({"role": "assistant", "content": tok.decode(pieces)})

    if a.prompt is not None:
        turn(a.prompt)
        return
    print("Type a message; empty line or Ctrl-D to quit.")
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        turn(user)


if __name__ == "__main__":
    main()

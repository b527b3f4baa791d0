"""Generation with the KV cache, and an interactive chat (Qwen3's chat template, thinking off).

    python chat.py --model DIR            # interactive chat (no --model: the tiny random demo model)
"""
from __future__ import annotations

import sys

import torch

import cli
from lora_moe import load_adapter, resolve_adapter_dir
from model import load_model, resolve_dtype
from tiny_qwen import model_dir_or_demo
from tokenizer import ENDOFTEXT, IM_END, Tokenizer, apply_chat_template, load_tokenizer


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


def parse_args(argv=None):
    ap = cli.Parser(description="Chat with a Qwen3 checkpoint (thinking off).")
    ap.add_argument("--model", default=None, help="HF Qwen3 checkpoint dir (default: the tiny random demo model)")
    ap.add_argument("--adapter", default=None, help="a SparseDoctor adapter: a train.py run dir, checkpoint dir "
                    "or run/latest (default: the base model alone)")
    ap.add_argument("--system", default=None, help="optional system prompt")
    ap.add_argument("--max-new-tokens", type=cli.at_least(1), default=256)
    ap.add_argument("--temperature", type=cli.at_least(0.0, float), default=0.7, help="0 = greedy")
    ap.add_argument("--top-p", type=cli.in_range(0, 1, lo_open=True), default=0.8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--prompt", default=None, help="answer this one prompt and exit (no interactive loop)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return ap.parse_args(argv)


def read_user() -> str | None:
    """The next message from stdin; None at its end (Ctrl-D, a closed or exhausted stdin)."""
    if sys.stdin is None or sys.stdin.closed:
        return None
    try:
        text = input("> ").strip()
        text.encode("utf-8")  # why: a C locale decodes bad bytes to lone surrogates instead of failing
        return text
    except EOFError:
        return None
    except UnicodeError:
        raise ValueError("stdin is not UTF-8 text") from None


def chat(a):
    path = model_dir_or_demo(a.model, announce=True)
    model = load_model(path, dtype=resolve_dtype(a.dtype, a.device), device=a.device)
    tok = load_tokenizer(path)
    if a.adapter:
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
    while user := read_user():
        turn(user)


def main(argv=None):
    a = parse_args(argv)
    cli.run(lambda: chat(a), a.debug)


if __name__ == "__main__":
    main()

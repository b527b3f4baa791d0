"""An interactive chat with a Qwen3 checkpoint and an optional adapter (Qwen3's chat template, thinking off).

    python chat.py --model DIR            # interactive chat (no --model: the tiny random demo model)
"""
from __future__ import annotations

import sys

import torch

import cli
from adapter_io import load_adapter, resolve_adapter_dir
from generate import generate
from model import load_model, resolve_dtype
from tiny_qwen import model_dir_or_demo
from tokenizer import ENDOFTEXT, IM_END, apply_chat_template, load_tokenizer


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

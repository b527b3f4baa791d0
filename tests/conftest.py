"""Shared test helpers. transformers/peft are used here only as reference oracles."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.environ.get("SPARSEDOCTOR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
BENCH = os.path.join(SHARED, "benchmarks")


def exit_status(main, *args) -> int:
    """A command's ``main(argv)`` run in this process (the suite's time, where a test needs no fresh
    interpreter): its exit status, 0 when it returns."""
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def run_at_once(*calls, env=None, timeout: float = 300) -> list:
    """Each call (python's argv list, or a shell line as a str; optional stdin bytes as a second item) run from
    the repo root, all at once; their CompletedProcess in order (bytes out). why at once: a run is mostly
    one-threaded (start-up, or OMP_NUM_THREADS=1 for float-for-float comparisons), so one after another leaves
    a core of 2 idle; no call may read another's files."""
    import subprocess

    procs = []
    for call in calls:
        cmd, stdin = call if isinstance(call, tuple) else (call, None)
        procs.append((cmd, stdin, subprocess.Popen(cmd if isinstance(cmd, str) else [sys.executable, *cmd],
                                                   shell=isinstance(cmd, str), cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    done = []
    for cmd, stdin, p in procs:
        out, err = p.communicate(stdin, timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    return done


def hf_tiny(path, tie=False, head_dim=32, heads=4, kv_heads=2, layers=2, hidden=64, vocab=1000, seed=0,
            max_shard_size=None, dtype=torch.float32):
    """Save a tiny random transformers Qwen3ForCausalLM with save_pretrained; return the HF model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, tie_word_embeddings=tie, rope_theta=1_000_000.0,
                      max_position_embeddings=512, attn_implementation="eager")
    m = Qwen3ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # norms start at 1 in HF; randomize so a wrong norm cannot hide
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    m.save_pretrained(path, **kw)
    return m


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tiny_qwen import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny") / "m"
    return make_tiny_checkpoint(str(d), hidden_size=32, intermediate_size=64, head_dim=16, num_hidden_layers=2)


def small_cfg(tiny_dir, out, **kw):
    """train.py's defaults at tiny size: the tiny model, 4 experts of rank 4, short runs, small batches (dropout 0.1
    so that a test of its RNG cannot pass by having none)."""
    from train import TrainConfig

    base = dict(model=tiny_dir, out=str(out), steps=6, batch_size=2, max_len=96, num_experts=4, rank=4, top_k=2,
                save_every=3, warmup=2, dropout=0.1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def qwen_tok_dir(tmp_path_factory):
    """A dir holding tokenizer.json with the real Qwen vocabulary (built once per test session)."""
    from tiny_qwen import write_qwen_tokenizer

    d = tmp_path_factory.mktemp("qwen_tok")
    write_qwen_tokenizer(str(d))
    return str(d)


def require_shared():
    assert os.path.isdir(BENCH), f"../shared/benchmarks not found at {BENCH} (set SPARSEDOCTOR_SHARED)"
    return BENCH


def forward_records(model, x, mask=None):
    """model(x) (``mask`` (B, T) bool: left padding, passed as the attention mask) inside ``record_routing``:
    (the stacked RouterRecord (S, B, T, ...), token weights (B, T))."""
    from lora_moe import record_routing, stack_records, token_weight

    with record_routing(model) as recs:
        model(x, attention_mask=None if mask is None else mask.long())
    rec = stack_records(recs)
    return rec, token_weight(mask, rec.probs)


def one_site(logits, topk_idx=None, top_k=1):
    """A stacked record of one site over N tokens from router logits (N, E), and its weights (1, N)."""
    from lora_moe import RouterRecord

    probs = logits.softmax(-1)
    idx = probs.topk(top_k, -1).indices if topk_idx is None else topk_idx
    rec = RouterRecord(logits[None, None], probs[None, None], idx[None, None], torch.zeros_like(probs)[None, None])
    return rec, torch.ones(1, logits.shape[0])


def tiny_adapted(E=4, k=2, seed=0, router="token"):
    """A tiny random Qwen3 (vocab 64, 2 layers) with LoRA-MoE adapters on every projection, no dropout."""
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = init_weights(Qwen3(cfg), seed=seed)
    torch.manual_seed(seed)
    add_lora_moe(model, LoRAMoEConfig(num_experts=E, rank=4, top_k=k, dropout=0.0, router=router), verbose=False)
    return model


def tree(path) -> dict:
    """{relative path: bytes} of every file under path, the lock file aside."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name != ".lock":
                full = os.path.join(root, name)
                out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out

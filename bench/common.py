"""Shared benchmark helpers: timing, peak memory, a random Qwen3-0.6B-shaped checkpoint."""
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Qwen3-0.6B's shape, cut to 4 layers so a CPU benchmark finishes in minutes.
QWEN3_06B_4L = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                    max_position_embeddings=40960, tie_word_embeddings=True)


def make_checkpoint(path, **overrides):
    """Write (once) a random HF-format checkpoint of the 4-layer Qwen3-0.6B shape; return its dir."""
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights, save_model

    if not os.path.exists(os.path.join(path, "model.safetensors")):
        save_model(init_weights(Qwen3(Qwen3Config(**{**QWEN3_06B_4L, **overrides}))), path)
    return path


def timeit(fn, reps=3, warmup=1):
    """Median wall time of fn() in seconds (CUDA-synchronized when on GPU)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def interleaved(ours, theirs, reps: int):
    """(median time of ours, median of theirs, per-repetition speed ratios theirs/ours), alternating the two,
    and which goes first (why: the second of a pair runs on a warmer cache / allocator, a bias of a few %)."""
    ours(), theirs()
    t_o, t_t = [], []
    for rep in range(reps):
        pair = ((ours, t_o), (theirs, t_t))
        for f, ts in pair if rep % 2 == 0 else pair[::-1]:
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return med(t_o), med(t_t), [b / a for a, b in zip(t_o, t_t)]


def ratio(rs) -> str:
    rs = sorted(rs)
    return f"{rs[len(rs) // 2]:.2f}x ({rs[0]:.2f}-{rs[-1]:.2f})"


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB.

    why VmHWM and not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child started by a big
    parent reports the parent's peak; VmHWM belongs to the process's own address space.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def run_isolated(code: str) -> str:
    """Run python code in a fresh process (for clean peak-memory numbers); return its stdout."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.path.join(ROOT, "bench")}).stdout


def matmul_peak_gflops(n=2048, reps=5, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = timeit(lambda: torch.mm(a, b), reps=reps)
    return 2 * n ** 3 / t / 1e9


def table(rows, headers):
    w = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def reference_forward(layer, x):
    """A slow per-expert loop over routed tokens, for tests and the benchmark's baseline, on x (B, T, in):
    whole sequences from their first token, as training runs (no ``read_in_context``).

    Its routing is written out here, independent of ``route`` and ``context_mean``: logits W x_t, plus for a
    context router W_c applied to the mean of x_1..x_t (the mean of the inputs, then projected: W_c is linear),
    then softmax -> top-k -> renormalize."""
    y = layer.base(x)
    xf = layer.dropout(x).to(layer.lora_A.dtype).reshape(-1, x.shape[-1])  # (N, in)
    if layer.router is None:
        p = torch.ones(xf.shape[0], 1, device=xf.device)
    else:
        logits = x.float() @ layer.router.weight.T  # (B, T, E)
        if layer.router_ctx is not None:
            seen = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=torch.float32)[:, None]  # (T, 1)
            logits = logits + (x.float().cumsum(-2) / seen) @ layer.router_ctx.T
        p = logits.reshape(-1, layer.E).softmax(-1)  # (N, E)
    top_p, top_i = p.topk(layer.top_k, dim=-1)
    out = torch.zeros(xf.shape[0], layer.base.out_features, dtype=xf.dtype, device=xf.device)
    for e in range(layer.E):
        rows = (top_i == e).any(-1).nonzero().squeeze(-1)
        g = (top_p[rows] * (top_i[rows] == e)).sum(-1, keepdim=True) / top_p[rows].sum(-1, keepdim=True)
        A = layer.lora_A[e * layer.r:(e + 1) * layer.r]
        B = layer.lora_B[:, e * layer.r:(e + 1) * layer.r]
        out = out.index_add(0, rows, (xf[rows] @ A.T @ B.T) * g)
    return y + (out * layer.scaling).reshape(*x.shape[:-1], -1).to(y.dtype)

"""SparseDoctor training: frozen Qwen3 + LoRA-MoE adapters, hybrid loss, one process or many.

    python train.py                                         # tiny demo model + bundled data, CPU, minutes
    torchrun --nproc_per_node=8 train.py --model Qwen3-4B --data med.jsonl --dtype bfloat16

total = LM (assistant tokens only) + lambda_bal * load balancing + lambda_cl * expert contrastive.
Reads top to bottom: config, data, model, losses, the loop, checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    data: str = os.path.join(HERE, "data", "med_sample.jsonl")
    model: str | None = None          # HF Qwen3 checkpoint dir; None = the tiny random demo model
    out: str = "runs/sparsedoctor"
    dtype: str | None = None          # base dtype: default bfloat16 on CUDA, float32 on CPU
    max_len: int = 512
    batch_size: int = 4               # sequences per micro-batch per rank
    grad_accum: int = 1
    steps: int = 100                  # optimizer steps
    lr: float = 1e-3                  # LoRA-MoE on the tiny demo; use ~2e-4 on a real Qwen3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    num_experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    dropout: float = 0.05
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lambda_bal: float = 0.01
    z_loss: float = 0.0
    lambda_cl: float = 0.1
    temperature: float = 0.07
    queue_size: int = 1024
    proj_dim: int = 64
    tokens_per_site: int = 256
    no_balance: bool = False
    no_contrastive: bool = False
    no_queue: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False                # under torchrun: FSDP2 (fully_shard per decoder block) instead of DDP
    ce_chunk: int = 2048              # supervised positions per LM-head chunk
    save_every: int = 50
    keep: int = 2                     # checkpoints kept
    resume: str | None = None
    seed: int = 0
    skip_bad: bool = False
    log_every: int = 1
    progress: bool = True


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            continue  # --no-progress, below
        if f.type == "bool":
            ap.add_argument(flag, action="store_true" if not f.default else "store_false", dest=f.name,
                            default=f.default)
        else:
            typ = {"int": int, "float": float}.get(f.type, str)
            ap.add_argument(flag, type=typ, default=f.default, dest=f.name, help=f"default: {f.default}")
    ap.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    return TrainConfig(**vars(ap.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(x: float, device) -> float:
    if dist.is_initialized():
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()
    return x


class Body(nn.Module):
    """What DDP / FSDP wrap: the adapted model and the contrastive heads. Its forward returns the step's
    three losses, so that every parameter use (LM head, routers, experts, heads) happens inside the wrapped
    call: FSDP has the parameters unsharded there, and DDP sees them all in one backward."""

    def __init__(self, model, heads, queues, gen, cfg: "TrainConfig", use_bal: bool, use_cl: bool):
        super().__init__()
        self.model, self.heads = model, heads
        self.aux = (queues, gen)  # a tuple, not submodules: the queues are synced by hand, never by DDP/FSDP
        self.cfg, self.use_bal, self.use_cl = cfg, use_bal, use_cl

    def forward(self, ids, labels, mask):
        from contrastive import contrastive_loss
        from lora_moe import balance_loss, set_token_mask

        c, (queues, gen) = self.cfg, self.aux
        set_token_mask(self.model, mask)
        hidden = self.model.model(ids)  # (B, T, hidden); right padding needs no attention mask
        lm_sum = lm_loss_sum(self.model, hidden, labels, c.ce_chunk)
        bal = balance_loss(self.model, c.z_loss, sync=dist.is_initialized()) if self.use_bal else None
        cl = contrastive_loss(self.model, self.heads, queues, c.tokens_per_site, c.temperature, gen) if self.use_cl else None
        return lm_sum, bal, cl


# ----------------------------------------------------------------------------------------------------------
# The LM loss on supervised positions only


class FrozenHeadCE(torch.autograd.Function):
    """Sum of cross-entropy of ``h @ W.T`` against ``y`` for a *frozen* head W, chunk by chunk.

    why: with Qwen3's 151,936-token vocabulary the logits are the largest tensor of a step. Each chunk's
    logits live only inside forward: the gradient w.r.t. h (softmax - onehot) @ W is computed right there and
    kept (N x hidden, small), so backward is one multiply. Two matmuls per chunk, no recompute, and memory
    of one chunk of logits. W gets no gradient: the base is frozen.
    """

    @staticmethod
    def forward(ctx, h, W, y, chunk):
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax in fp32 at least (bf16 base on GPU)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ W.T).to(acc)  # (n, V)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(-1, y[i:i + chunk, None]).squeeze(-1)).sum()
            if grad_h is not None:
                p = (logits - lse[:, None]).exp_()  # softmax, in place over the chunk's logits
                p[torch.arange(p.shape[0], device=p.device), y[i:i + chunk]] -= 1.0
                grad_h[i:i + chunk] = (p.to(W.dtype) @ W).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None


def lm_loss_sum(model, hidden, labels, chunk: int):
    """Sum of next-token cross-entropy over supervised positions; the LM head runs only there, in chunks."""
    h, y = hidden[:, :-1], labels[:, 1:]
    sel = y != -100
    if model.lm_head.weight.requires_grad:
        raise ValueError("lm_loss_sum expects a frozen LM head (the base model is frozen)")
    return FrozenHeadCE.apply(h[sel], model.lm_head.weight, y[sel], chunk)  # h[sel]: (N, hidden), y[sel]: (N,)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: adapters + heads + queues (safetensors) and the training state, written atomically


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a plain one or an FSDP2 shard (a DTensor; gathering it is a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_state(body: Body, opt):
    """Every rank calls this (under FSDP it gathers): (adapter + head + queue tensors, optimizer state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from lora_moe import adapter_state

    queues = body.aux[0]
    tensors = {n: full_tensor(p).detach() for n, p in adapter_state(body.model).items()}
    if body.heads is not None:
        tensors.update({f"heads.{k}": full_tensor(v) for k, v in body.heads.state_dict().items()})
    if queues is not None:
        tensors.update({f"queues.{k}": v for k, v in queues.state_dict().items()})
    # keyed by parameter name, full tensors on CPU: the same file resumes a 1-process, DDP or FSDP run
    optim = get_optimizer_state_dict(body, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return tensors, optim


def save_checkpoint(out_dir, step, body, tensors, optim, sched, gen, cfg, fail_after_tensors=False):
    """Write ckpt-<step>/ via a temp dir + rename, then point ``latest`` at it; keep the last ``cfg.keep``."""
    from lora_moe import save_adapter

    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(body.model, tmp, tensors=tensors)
    if fail_after_tensors:  # test hook: a crash in the middle of a save
        raise RuntimeError("injected failure during save")
    torch.save({"step": step, "optimizer": optim, "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate(), "numpy_rng": np.random.get_state(), "sample_gen": gen.get_state()},
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(cfg), f, indent=2)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)  # why: a rename is atomic; a kill before it leaves the last good checkpoint intact
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    ckpts = sorted(d for d in os.listdir(out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp"))
    for old in ckpts[:-cfg.keep]:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir, or a run dir (or its ``latest`` file) naming one."""
    from lora_moe import resolve_adapter_dir

    path = resolve_adapter_dir(path)
    if not os.path.exists(os.path.join(path, "state.pt")):
        raise FileNotFoundError(f"{path} is not a checkpoint (no state.pt) nor a run dir with a 'latest' file")
    return path


# ----------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, fail_save_at: int | None = None) -> list[dict]:
    """Run training; returns the per-step metrics (rank 0 also writes them to out/metrics.jsonl)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from chat import load_tokenizer
    from contrastive import make_heads
    from data import DataError, batch_order, collate, encode_all, read_jsonl
    from expert_queue import ExpertQueues
    from lora_moe import add_lora_moe, load_adapter, routing_stats, set_record_u, sites
    from model import load_model

    rank, world, device = setup_distributed()
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # --- data ---
    model_dir = cfg.model
    if model_dir is None:
        from tiny_qwen import default_model_dir
        model_dir = default_model_dir() if main else None
        if dist.is_initialized():
            box = [model_dir]
            dist.broadcast_object_list(box)  # rank 0 creates the demo model once; the others wait here
            model_dir = box[0]
    tok = load_tokenizer(model_dir)
    examples, bad = read_jsonl(cfg.data, skip_bad=cfg.skip_bad)
    items, counts = encode_all(examples, tok, cfg.max_len)
    log(f"data: {len(items)} examples from {cfg.data} ({bad} bad lines skipped, {counts['truncated']} truncated "
        f"to {cfg.max_len} tokens, {counts['dropped_no_target']} dropped with no answer left)")
    if not items:
        raise DataError(f"{cfg.data}: no example keeps an answer token within --max-len {cfg.max_len}")
    lengths = [len(ids) for ids, _ in items]

    # --- model: frozen base, fp32 adapters ---
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = load_model(model_dir, dtype=dtype, device=device)
    model.model.gradient_checkpointing = cfg.grad_checkpointing
    torch.manual_seed(cfg.seed)  # adapters start identical on every rank
    targets = tuple(t.strip() for t in cfg.targets.split(","))
    add_lora_moe(model, targets, cfg.num_experts, cfg.rank, cfg.alpha, cfg.top_k, cfg.dropout, verbose=main)
    use_bal = not cfg.no_balance and cfg.lambda_bal > 0
    use_cl = not cfg.no_contrastive and cfg.lambda_cl > 0 and cfg.num_experts > 1
    heads = make_heads(model, cfg.proj_dim) if use_cl else None
    queues = ExpertQueues(len(sites(model)), cfg.queue_size, cfg.proj_dim).to(device) if use_cl and not cfg.no_queue else None
    set_record_u(model, use_cl)
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 100 + rank)  # token sampling for the contrastive loss

    state = None
    if cfg.resume:  # adapters, heads and queues go in before any wrapping (FSDP shards what is there)
        ck = resolve_checkpoint(cfg.resume)
        extra = load_adapter(model, ck)
        if heads is not None:
            heads.load_state_dict({k[6:]: v for k, v in extra.items() if k.startswith("heads.")})
        if queues is not None:
            queues.load_state_dict({k[7:]: v.to(device) for k, v in extra.items() if k.startswith("queues.")})
        state = torch.load(os.path.join(ck, "state.pt"), weights_only=False)
        log(f"resuming from {ck} at step {state['step']}")

    # --- wrapping: one module, whose forward returns the losses ---
    body = Body(model, heads, queues, gen, cfg, use_bal, use_cl)
    wrapped, fsdp = body, cfg.fsdp and world > 1
    if fsdp:  # FSDP2: each decoder block is one unit, the rest (embeddings, norm, heads) the root unit
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(body)
    elif world > 1:
        wrapped = nn.parallel.DistributedDataParallel(body, device_ids=[device.index] if device.type == "cuda" else None)

    params = [p for p in body.parameters() if p.requires_grad]  # after fully_shard: the sharded ones
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")

    def lr_at(step):  # linear warmup, then cosine down to min_lr_ratio * lr
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    start = 0
    if state is not None:
        set_optimizer_state_dict(body, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        # the schedule is a function of (step, --steps): re-derive the lr, so resuming with a longer --steps
        # extends the cosine instead of keeping the lr the shorter run had reached
        for g, base in zip(opt.param_groups, sched.base_lrs):
            g["lr"] = base * lr_at(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        gen.set_state(state["sample_gen"])
        start = state["step"]

    if main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w", encoding="utf-8") as f:
            json.dump({**asdict(cfg), "model": model_dir, "world_size": world}, f, indent=2)
        print("config:", json.dumps({**asdict(cfg), "model": model_dir, "world_size": world}))

    # the batch schedule: a deterministic function of (seed, epoch), so resume continues it exactly
    per_epoch = len(batch_order(lengths, cfg.batch_size, cfg.seed, 0, rank, world))
    if per_epoch < cfg.grad_accum:
        raise ValueError(f"{len(items)} examples give {per_epoch} micro-batches per rank, fewer than --grad-accum")
    steps_per_epoch = per_epoch // cfg.grad_accum

    def micro_batches(step):
        epoch, k = divmod(step, steps_per_epoch)
        order = batch_order(lengths, cfg.batch_size, cfg.seed, epoch, rank, world)
        return [collate([items[i] for i in order[(k * cfg.grad_accum + j)]], tok.pad_id) for j in range(cfg.grad_accum)]

    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and cfg.progress), dynamic_ncols=True)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    history = []
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        batches = micro_batches(step)
        # normalize the LM loss by the global number of supervised tokens of this step (all micro-batches,
        # all ranks), so 2 ranks x B equals 1 rank x 2B exactly; DDP and FSDP average gradients, hence * world
        n_sup = all_sum(float(sum(int((b[1][:, 1:] != -100).sum()) for b in batches)), device)
        n_tok = all_sum(float(sum(int(b[2].sum()) for b in batches)), device)
        n_pad = all_sum(float(sum(b[2].numel() for b in batches)), device) - n_tok
        sums = {"lm": 0.0, "bal": 0.0, "cl": 0.0}
        for j, (ids, labels, mask) in enumerate(batches):
            sync = j == cfg.grad_accum - 1  # gradients are reduced over ranks on the last micro-step only
            if fsdp:
                body.set_requires_gradient_sync(sync)
            no_sync = wrapped.no_sync() if (world > 1 and not fsdp and not sync) else contextlib.nullcontext()
            with no_sync:
                lm_sum, bal, cl = wrapped(ids.to(device), labels.to(device), mask.to(device))
                lm = lm_sum / n_sup * world
                loss = lm
                if bal is not None:
                    loss = loss + cfg.lambda_bal * bal / cfg.grad_accum
                if cl is not None:
                    loss = loss + cfg.lambda_cl * cl / cfg.grad_accum
                loss.backward()
            sums["lm"] += lm.item() / world
            sums["bal"] += (bal.item() if bal is not None else 0.0) / cfg.grad_accum
            sums["cl"] += (cl.item() if cl is not None else 0.0) / cfg.grad_accum
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.clip)) if cfg.clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lm_v = all_sum(sums["lm"], device)
        bal_v, cl_v = all_sum(sums["bal"], device) / world, all_sum(sums["cl"], device) / world
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": lm_v + cfg.lambda_bal * bal_v * use_bal + cfg.lambda_cl * cl_v * use_cl,
               "lm": lm_v, "balance": bal_v if use_bal else None, "contrastive": cl_v if use_cl else None,
               "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), "step_time": dt, "tokens_per_s": n_tok / dt,
               "padding_share": n_pad / (n_pad + n_tok)}
        if main and (step + 1) % cfg.log_every == 0:
            rec["routing"] = _per_layer(routing_stats(model))
        history.append(rec)
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(lm=f"{lm_v:.3f}", bal=f"{bal_v:.3f}" if use_bal else "-", cl=f"{cl_v:.3f}" if use_cl else "-",
                            tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            tensors, optim = gather_state(body, opt)  # every rank: under FSDP this gathers
            if main:
                save_checkpoint(cfg.out, step + 1, body, tensors, optim, sched, gen, cfg,
                                fail_after_tensors=fail_save_at == step + 1)
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    if main and history:
        log(f"done: {len(history)} steps, lm {history[0]['lm']:.3f} -> {history[-1]['lm']:.3f}; adapters in {cfg.out}/latest")
    return history


def _per_layer(stats: dict) -> dict:
    """Site stats -> per layer: mean expert load over the layer's sites and its entropy."""
    layers = {}
    for name, s in stats.items():
        layer = name.split(".")[2]
        layers.setdefault(layer, []).append(s)
    out = {}
    for layer, ss in layers.items():
        load = np.mean([s["load"] for s in ss], axis=0)
        out[layer] = {"load": [round(float(x), 4) for x in load],
                      "load_entropy": round(float(np.mean([s["load_entropy"] for s in ss])), 4),
                      "token_entropy": round(float(np.mean([s["token_entropy"] for s in ss])), 4)}
    return out


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except Exception as e:  # a clear one-line error for data problems; a traceback for everything else
        from data import DataError
        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

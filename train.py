"""SparseDoctor training: frozen Qwen3 + LoRA-MoE adapters, the hybrid loss, one process or many.

    python train.py                                         # tiny demo model + bundled data, CPU, minutes
    torchrun --nproc_per_node=8 train.py --model Qwen3-4B --data med.jsonl --dtype bfloat16

L = L_LM (assistant tokens only) + lambda_bal * L_bal (load balancing) + lambda_cl * L_cl (expert contrastive);
the objective lives in objective.py, every flag in config.py (``python train.py --help``). This file reads top
to bottom: building the run (data, model + adapters, resume, parallel wrapping, optimizer), one training step,
the loop.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import fields

import numpy as np
import torch
from tqdm import tqdm

import cli
import config
import parallel
import prepare
from adapter_io import base_fingerprint
from checkpoint import gather_state, load_checkpoint, restore_rng, rng_state, save_checkpoint
from config import FIXED_ON_RESUME, TrainConfig
from contrastive import ROUTING_VIEWS, make_heads
from data import Batches, DataError, answer_mask, encode_all, read_jsonl
from expert_queue import ExpertQueue
from lora_moe import LoRAMoEConfig, add_lora_moe, routing_stats, sites
from model import load_model, resolve_dtype
from objective import HybridLoss
from run_dir import (RunLock, append_metrics, plan_resume, prepare_out_dir, prune, trim_metrics,
                     write_run_config)
from tiny_qwen import model_dir_or_demo
from tokenizer import load_tokenizer

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The lr multiplier: linear warmup, then cosine down to ``min_lr_ratio``. A function of (step, --steps)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


# ----------------------------------------------------------------------------------------------------------
# Building the run


def load_data(cfg: TrainConfig, tok, log):
    """Tokenized (ids, labels) examples with answer tokens left after truncation."""
    examples, bad = read_jsonl(cfg.data, skip_bad=cfg.skip_bad)
    items, counts = encode_all(examples, tok, cfg.max_len)
    log(f"data: {len(items)} examples from {cfg.data} ({bad} bad lines skipped, {counts['truncated']} truncated "
        f"to {cfg.max_len} tokens, {counts['dropped_no_target']} dropped with no answer left)")
    if not prepare.checked(cfg.data):
        log(f"warning: {cfg.data} has not been checked against the benchmarks: a score on questions trained on is "
            "worthless (python prepare.py decontaminate --help)")
    if not items:
        raise DataError(f"{cfg.data}: no example keeps an answer token within --max-len {cfg.max_len}")
    return items


def build_model(cfg: TrainConfig, model_dir: str, device, rank: int, verbose: bool):
    """The frozen base with fp32 LoRA-MoE adapters, the contrastive heads and queue, and the sampling RNG."""
    model = load_model(model_dir, dtype=resolve_dtype(cfg.dtype, device), device=device)
    model.model.gradient_checkpointing = cfg.grad_checkpointing
    torch.manual_seed(cfg.seed)  # adapters start identical on every rank
    add_lora_moe(model, LoRAMoEConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoRAMoEConfig)}), verbose)
    if cfg.compile:
        compile_layers(model)
    if verbose and cfg.num_experts == 1:
        print("num_experts 1: plain LoRA, no router: the balance, z and contrastive terms are off")
    heads, queue = build_contrastive(model, cfg, device)
    gen = torch.Generator(device).manual_seed(cfg.seed * 100 + rank)  # the contrastive loss's token sampling
    return model.train(), heads, queue, gen


def compile_layers(model, backend: str = "inductor"):
    """torch.compile every decoder layer in place (parameter names unchanged, so checkpoints are too): one graph
    per layer with its 7 sites, no graph break (tests/test_train.py)."""
    for layer in model.model.layers:
        layer.compile(backend=backend)


def build_contrastive(model, cfg: TrainConfig, device):
    """(projection heads, expert memory queue) for the adapted ``model``, each None where ``cfg`` has none:
    heads for the two head readings, a queue with ``--queue`` (routings of E numbers in the sequence reading)."""
    if not cfg.uses_contrastive:
        return None, None
    seq = cfg.cl_views in ROUTING_VIEWS  # the sequence and assign readings compare routings: no heads
    heads = None if seq else make_heads(model, cfg.proj_dim, cfg.queue_momentum)
    dim = cfg.num_experts if seq else cfg.proj_dim
    queue = ExpertQueue(len(sites(model)), cfg.queue_size, dim).to(device) if cfg.queue else None
    return heads, queue


def make_optimizer(body: HybridLoss, cfg: TrainConfig, device):
    params = [p for p in body.parameters() if p.requires_grad]  # after fully_shard: the sharded ones
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))


def restore_optimizer(body, opt, sched, gen, state: dict, cfg: TrainConfig) -> int:
    """Optimizer, schedule and RNG from a checkpoint's state; returns the step to continue from."""
    parallel.load_optimizer_state(body, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    # the schedule is a function of (step, --lr, --steps, ...) of *this* run: re-derive it, so a resume with a
    # longer --steps extends the cosine and a new --lr or --weight-decay really applies (plan_resume logs it)
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    for g in opt.param_groups:
        g.update(initial_lr=cfg.lr, lr=cfg.lr * lr_at(state["step"], cfg), weight_decay=cfg.weight_decay)
    restore_rng(state["rng"], gen, parallel.rank())
    return state["step"]


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(wrapped, body, batches, queue, gen, params, opt, sched, cfg: TrainConfig, fsdp: bool, device,
               step: int):
    """Forward and backward every micro-batch, clip, step (0-based ``step``: the first --router-warmup steps
    leave the experts as they are). Returns (the step's losses as global means, what the routers did on the last
    micro-batch). One read from the device per step: the loss parts and the gradient norm together, for the log
    and the non-finite guard."""
    # N_sup, real and padding tokens of the whole step (all micro-batches, all ranks), from the CPU batches
    n_sup, n_tok, n_all = parallel.all_sum([float(sum(int(answer_mask(y).sum()) for _, y, _ in batches)),
                                            float(sum(int(m.sum()) for _, _, m in batches)),
                                            float(sum(m.numel() for _, _, m in batches))], device)
    names = ("lm", "balance", "z", "contrastive")
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)  # summed on the device, read once
    entries = []  # the queue's new entries, written after the step: every micro-step reads the same queue
    for j, (ids, labels, mask) in enumerate(batches):
        last = j == len(batches) - 1  # gradients are reduced over ranks on the last micro-step only
        with parallel.gradient_sync(wrapped, body, fsdp, sync=last):
            loss, parts, routing, new = wrapped(ids.to(device), labels.to(device), mask.to(device), n_sup,
                                                len(batches), queue, gen)
            loss.backward()
        entries += [new] if new is not None else []
        sums += torch.stack([parts[k].double() if parts[k] is not None else sums.new_zeros(()) for k in names])
    if step < cfg.router_warmup:  # why: routing settles before the experts learn (AdamW skips a None gradient)
        for _, m in sites(body.model):
            m.lora_A.grad = m.lora_B.grad = None
    grad_norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf))
    world = parallel.world_size()
    sums = parallel.all_reduce_(sums / torch.tensor([1.0] + [world] * 3, dtype=torch.float64, device=device))
    lm, bal, z, cl, grad_norm = torch.cat([sums, grad_norm.double().reshape(1)]).tolist()  # the one read
    if not all(math.isfinite(x) for x in (lm, bal, z, cl, grad_norm)):  # the same global values on every rank
        raise FloatingPointError(f"non-finite loss (lm {lm}, balance {bal}, contrastive {cl}, z {z}) or gradient "
                                 f"norm ({grad_norm}): stopped before the update; the last checkpoint is untouched "
                                 "(try a lower --lr or a larger --temperature)")
    lr = opt.param_groups[0]["lr"]  # the lr this step used
    opt.step()
    if entries:  # (S, n, d) per micro-step, every rank's -> (S, micro-steps * n, d), the order of the pieces
        queue.enqueue(torch.cat([k for k, _ in entries], 1), torch.cat([lab for _, lab in entries], 1))
    if body.heads is not None:
        body.heads.update_keys()  # the EMA key heads follow (momentum > 0 only)
    sched.step()
    opt.zero_grad(set_to_none=True)
    lam = body.weights
    out = {"loss": lm + lam["balance"] * bal + lam["z"] * z + lam["contrastive"] * cl, "lm": lm,
           "balance": bal if lam["balance"] > 0 else None, "contrastive": cl if lam["contrastive"] > 0 else None,
           "lr": lr, "grad_norm": grad_norm, "tokens": n_tok, "padding_share": (n_all - n_tok) / n_all}
    if lam["z"] > 0:
        out["z"] = z
    return out, routing


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, objective=HybridLoss) -> list[dict]:
    """Run training; returns the per-step metrics (rank 0 also writes them to out/metrics.jsonl).
    ``objective(model, heads, cfg)`` makes the loss module: HybridLoss, or a control arm's subclass of it
    (bench/ablation.py)."""
    rank, world, device = parallel.setup()
    lock = []  # one run per --out: rank 0 holds the lock; if it cannot, every rank stops with its error

    def take_lock():
        lock.append(RunLock(cfg.out))

    parallel.broadcast_outcome(take_lock)  # runs on rank 0 only
    try:
        return run(cfg, rank, world, device, objective)
    finally:
        for held in lock:
            held.release()


def run(cfg: TrainConfig, rank: int, world: int, device, objective=HybridLoss) -> list[dict]:
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    seed_everything(cfg.seed)

    # 1. what to resume (rank 0 decides, before anything is loaded), data, model and adapters
    ckpt = parallel.broadcast_outcome(lambda: plan_resume(cfg, FIXED_ON_RESUME, log) if main else None)
    model_dir = parallel.broadcast_outcome(lambda: model_dir_or_demo(cfg.model))  # the demo made once, on rank 0
    tok = load_tokenizer(model_dir)
    batches = Batches(load_data(cfg, tok, log), cfg, tok.pad_id, rank, world)
    model, heads, queue, gen = build_model(cfg, model_dir, device, rank, verbose=main)

    # 2. resume: adapters, heads and queue go in before any wrapping (FSDP shards what is there)
    state = load_checkpoint(ckpt, model, heads, queue, device) if ckpt else None

    # 3. one module whose forward returns the loss, wrapped for DDP / FSDP; the optimizer over its shards
    fingerprint = base_fingerprint(model)  # of the base, read before FSDP shards it
    body = objective(model, heads, cfg)
    wrapped, fsdp = parallel.wrap(body, body.model.model.layers, cfg.fsdp, device)
    params, opt, sched = make_optimizer(body, cfg, device)
    start = restore_optimizer(body, opt, sched, gen, state, cfg) if state else 0
    if main:
        if ckpt:
            log(f"resuming from {ckpt} at step {start}")
        prepare_out_dir(cfg, ckpt, log)  # only now, once all is loaded: what --overwrite removes
        trim_metrics(cfg.out, start)  # the steps after the checkpoint are logged again below
        write_run_config(cfg, model_dir, world)

    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and cfg.progress), dynamic_ncols=True)
    history = []
    for step in range(start, cfg.steps):
        # 4. one optimizer step over this step's micro-batches
        t0 = time.perf_counter()
        micro = batches(step)
        losses, routing = train_step(wrapped, body, micro, queue, gen, params, opt, sched, cfg, fsdp, device, step)
        rec = {"step": step + 1, **losses, "step_time": time.perf_counter() - t0}
        rec["tokens_per_s"] = rec.pop("tokens") / rec["step_time"]
        # 5. log: metrics.jsonl (+ on logging steps, per-layer routing of the last micro-batch's real tokens)
        if main and routing is not None and (step + 1) % cfg.log_every == 0:
            rec["routing"] = routing_stats([n for n, _ in sites(model)], *routing, micro[-1][2].to(device))
        history.append(rec)
        if main:
            append_metrics(cfg.out, rec)
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("lm", "balance", "contrastive") if rec[k] is not None})
            bar.update(1)
        # 6. checkpoint
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save(cfg, step + 1, body, queue, opt, sched, gen, fingerprint, main)
    bar.close()
    if history:
        log(f"done: {len(history)} steps, lm {history[0]['lm']:.3f} -> {history[-1]['lm']:.3f}; "
            f"adapters in {cfg.out}/latest")
    return history


def save(cfg: TrainConfig, step: int, body, queue, opt, sched, gen, fingerprint, main: bool):
    """Every rank gathers its state (FSDP shards) and sends its RNG streams; rank 0 writes and prunes."""
    tensors, optim = gather_state(body, queue, opt)
    rngs = parallel.all_gather_objects(rng_state(gen))
    if main:
        saved = save_checkpoint(cfg.out, step, body.model, tensors, optim, sched, rngs, cfg, fingerprint)
        prune(cfg.out, cfg.keep, protect={os.path.basename(saved)})
    parallel.barrier()


def parse_args(argv=None) -> TrainConfig:
    """Flags -> TrainConfig (config.py: every flag, its --help, its range and how flags combine)."""
    return config.parse_args(argv, description=__doc__)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        cli.run(lambda: train(cfg), cfg.debug)  # user mistakes: one line, exit 2; our bugs: a traceback
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()

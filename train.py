"""SparseDoctor training: frozen Qwen3 + LoRA-MoE adapters, the hybrid loss, one process or many.

    python train.py                                         # tiny demo model + bundled data, CPU, minutes
    torchrun --nproc_per_node=8 train.py --model Qwen3-4B --data med.jsonl --dtype bfloat16

L = L_LM (assistant tokens only) + lambda_bal * L_bal (load balancing) + lambda_cl * L_cl (expert contrastive);
the objective lives in objective.py. This file reads top to bottom: the config and its flags, building the
run (data, model + adapters, resume, parallel wrapping, optimizer), one training step, the loop.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

import cli
import parallel
from checkpoint import (RunLock, append_metrics, gather_state, load_checkpoint, plan_resume, restore_rng,
                        rng_state, save_checkpoint, trim_metrics, write_run_config)
from contrastive import CL_VIEWS, make_heads
from data import IGNORE, Batches, DataError, encode_all, read_jsonl
from expert_queue import ExpertQueue
from lora_moe import TARGETS, LoRAMoEConfig, add_lora_moe, check_targets, routing_stats, sites
from model import Qwen3Config, load_model, resolve_dtype
from objective import HybridLoss
from tiny_qwen import model_dir_or_demo
from tokenizer import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig(LoRAMoEConfig):
    """Every flag of train.py (``--num-experts`` for ``num_experts``). The adapter fields (num_experts,
    rank, alpha, top_k, dropout, targets) and their defaults come from ``LoRAMoEConfig``."""
    # data
    data: str = os.path.join(HERE, "data", "med_sample.jsonl")
    max_len: int = 512                # tokens per example; longer ones are truncated
    skip_bad: bool = False            # skip malformed jsonl lines (counted) instead of stopping
    # model
    model: str | None = None          # HF Qwen3 checkpoint dir; None = the tiny random demo model
    dtype: str | None = None          # base dtype: default bfloat16 on CUDA, float32 on CPU
    grad_checkpointing: bool = False  # recompute each decoder block in backward
    # the hybrid loss: one weight per term, 0 = off
    lambda_bal: float = 0.01          # load balancing weight
    z_loss: float = 0.0               # router z-loss weight (a term of its own)
    lambda_cl: float = 1.0            # expert contrastive weight (1.0: see docs/ablation.md, "sequence reading")
    temperature: float = 0.07         # InfoNCE tau
    cl_views: str = "sequence"        # contrastive reading: sequence, mixture or expert (contrastive.py)
    queue_momentum: float = 0.0       # EMA momentum of the key heads (MoCo); 0 = keys from the heads themselves
    queue: bool = False               # --queue: the expert memory queue's negatives (off: docs/ablation.md)
    queue_size: int = 1024            # expert memory queue entries per site (K)
    proj_dim: int = 64                # projection head output (d)
    tokens_per_site: int = 256        # tokens sampled per site for the contrastive loss
    ce_chunk: int = 2048              # supervised positions per LM-head chunk
    # optimization
    batch_size: int = 4               # sequences per micro-batch per rank
    grad_accum: int = 1               # micro-batches per optimizer step
    steps: int = 100                  # optimizer steps
    lr: float = 1e-3                  # LoRA-MoE on the tiny demo; use ~2e-4 on a real Qwen3
    warmup: int = 10                  # linear warmup steps, then cosine down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0                 # gradient-norm clip; 0 = off
    seed: int = 0
    # parallelism
    fsdp: bool = False                # under torchrun: FSDP2 (fully_shard per decoder block) instead of DDP
    # run directory, checkpoints, logging
    out: str = "runs/sparsedoctor"
    save_every: int = 50
    keep: int = 2                     # checkpoints kept
    resume: str | None = None         # a run dir (its newest valid checkpoint), or a checkpoint dir; empty: fresh
    overwrite: bool = False           # start over in an --out that holds an earlier run
    log_every: int = 1                # steps between per-layer routing stats in metrics.jsonl
    progress: bool = True             # --no-progress: no progress bar
    debug: bool = False               # tracebacks instead of one-line errors

    def __post_init__(self):
        super().__post_init__()
        validate(self)

    def loss_weights(self) -> dict:
        """The weight of each routing term as trained: all 0 for plain LoRA (E = 1: no router to train)."""
        routed = self.num_experts > 1
        return {"balance": self.lambda_bal * routed, "z": self.z_loss * routed, "contrastive": self.lambda_cl * routed}

    @property
    def uses_contrastive(self) -> bool:
        return self.loss_weights()["contrastive"] > 0


def validate(cfg: TrainConfig):
    """Every rule on how flags combine, in one place (each flag's own range is its parser's, in CHECKS): a
    combination that would do nothing, or something other than it says, is refused with one line."""
    if cfg.cl_views not in CL_VIEWS:
        raise ValueError(f"--cl-views {cfg.cl_views!r}: valid: {', '.join(CL_VIEWS)}")
    contrastive = cfg.lambda_cl > 0 and cfg.num_experts > 1
    if cfg.queue and not contrastive:
        raise ValueError("--queue holds negatives of the contrastive term, which is off (--lambda-cl 0 or "
                         "--num-experts 1)")
    if cfg.queue_momentum > 0 and not (contrastive and cfg.cl_views != "sequence"):
        raise ValueError("--queue-momentum moves projection heads, which only the head readings have "
                         "(--cl-views mixture|expert, with --lambda-cl > 0 and --num-experts > 1)")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards over processes: run under torchrun with --nproc_per_node >= 2")


INF = float("inf")
CHECKS = {  # each numeric flag's parser, which states its valid range
    "num_experts": cli.at_least(1), "rank": cli.at_least(1), "top_k": cli.at_least(1),
    "alpha": cli.in_range(0, INF, lo_open=True), "dropout": cli.in_range(0, 1, hi_open=True),
    "max_len": cli.at_least(2), "batch_size": cli.at_least(1), "grad_accum": cli.at_least(1),
    "steps": cli.at_least(1), "lr": cli.in_range(0, INF, lo_open=True), "warmup": cli.at_least(0),
    "min_lr_ratio": cli.in_range(0, 1), "weight_decay": cli.at_least(0, float), "clip": cli.at_least(0, float),
    "seed": cli.at_least(0), "lambda_bal": cli.at_least(0, float), "z_loss": cli.at_least(0, float),
    "lambda_cl": cli.at_least(0, float), "temperature": cli.in_range(0, INF, lo_open=True),
    "queue_momentum": cli.in_range(0, 1, hi_open=True), "queue_size": cli.at_least(1),
    "proj_dim": cli.at_least(1), "tokens_per_site": cli.at_least(1), "ce_chunk": cli.at_least(1),
    "save_every": cli.at_least(1), "keep": cli.at_least(1), "log_every": cli.at_least(1)}
# adapter and loss shapes a checkpoint was trained with: a resume must use the same ones (checkpoint.plan_resume
# also refuses a resume that turns the contrastive term or the momentum heads on or off)
FIXED_ON_RESUME = ("num_experts", "rank", "alpha", "top_k", "targets", "proj_dim", "queue_size", "queue",
                   "cl_views")


def parse_targets(s: str) -> tuple:
    try:
        return check_targets(t.strip() for t in s.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> TrainConfig:
    """Flags -> TrainConfig; every value checked here, before anything is loaded."""
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            ap.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
        elif f.type == "bool":
            ap.add_argument(flag, action="store_true", dest=f.name)
        elif f.name == "cl_views":
            ap.add_argument(flag, choices=CL_VIEWS, default=f.default, help=f"default: {f.default}")
        elif f.name == "targets":
            ap.add_argument(flag, type=parse_targets, default=TARGETS, help=f"default: {','.join(TARGETS)}")
        else:
            typ = CHECKS.get(f.name, str)
            valid = f"; {typ.valid}" if hasattr(typ, "valid") else ""
            ap.add_argument(flag, type=typ, default=f.default, dest=f.name, help=f"default: {f.default}{valid}")
    ns = ap.parse_args(argv)
    try:
        cfg = TrainConfig(**vars(ns))
    except ValueError as e:
        ap.error(str(e))
    if not os.path.isfile(cfg.data):
        ap.error(f"argument --data: {cfg.data} is {'a directory' if os.path.isdir(cfg.data) else 'not found'}, "
                 "expected a jsonl file")
    if cfg.model is not None:
        for name in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(cfg.model, name)):
                ap.error(f"argument --model: {cfg.model} has no {name}: expected a Hugging Face Qwen3 checkpoint")
        try:
            Qwen3Config.from_json(os.path.join(cfg.model, "config.json"))
        except (ValueError, KeyError, TypeError, UnicodeError) as e:
            ap.error(f"argument --model: {cfg.model}/config.json: {cli.message(e)}")
    return cfg


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
    if not items:
        raise DataError(f"{cfg.data}: no example keeps an answer token within --max-len {cfg.max_len}")
    return items


def build_model(cfg: TrainConfig, model_dir: str, device, rank: int, verbose: bool):
    """The frozen base with fp32 LoRA-MoE adapters, the contrastive heads and queue, and the sampling RNG."""
    model = load_model(model_dir, dtype=resolve_dtype(cfg.dtype, device), device=device)
    model.model.gradient_checkpointing = cfg.grad_checkpointing
    torch.manual_seed(cfg.seed)  # adapters start identical on every rank
    add_lora_moe(model, LoRAMoEConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoRAMoEConfig)}), verbose)
    if verbose and cfg.num_experts == 1:
        print("num_experts 1: plain LoRA, no router: the balance, z and contrastive terms are off")
    heads, queue = build_contrastive(model, cfg, device)
    gen = torch.Generator(device).manual_seed(cfg.seed * 100 + rank)  # the contrastive loss's token sampling
    return model.train(), heads, queue, gen


def build_contrastive(model, cfg: TrainConfig, device):
    """(projection heads, expert memory queue) for the adapted ``model``, each None where ``cfg`` has none:
    heads for the two head readings, a queue with ``--queue`` (routings of E numbers in the sequence reading)."""
    if not cfg.uses_contrastive:
        return None, None
    seq = cfg.cl_views == "sequence"  # the sequence reading contrasts routings: no heads
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


def train_step(wrapped, body, batches, queue, gen, params, opt, sched, cfg: TrainConfig, fsdp: bool, device):
    """Forward and backward every micro-batch, clip, step. Returns (the step's losses as global means, what
    the routers did on the last micro-batch). One read from the device per step: the loss parts and the
    gradient norm together, for the log and the non-finite guard."""
    # N_sup, real and padding tokens of the whole step (all micro-batches, all ranks), from the CPU batches
    n_sup, n_tok, n_all = parallel.all_sum([float(sum(int((y[:, 1:] != IGNORE).sum()) for _, y, _ in batches)),
                                            float(sum(int(m.sum()) for _, _, m in batches)),
                                            float(sum(m.numel() for _, _, m in batches))], device)
    names = ("lm", "balance", "z", "contrastive")
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)  # summed on the device, read once
    for j, (ids, labels, mask) in enumerate(batches):
        last = j == len(batches) - 1  # gradients are reduced over ranks on the last micro-step only
        with parallel.gradient_sync(wrapped, body, fsdp, sync=last):
            loss, parts, routing = wrapped(ids.to(device), labels.to(device), mask.to(device), n_sup, len(batches),
                                           queue, gen)
            loss.backward()
        sums += torch.stack([parts[k].double() if parts[k] is not None else sums.new_zeros(()) for k in names])
    grad_norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else INF))
    world = parallel.world_size()
    sums = parallel.all_reduce_(sums / torch.tensor([1.0] + [world] * 3, dtype=torch.float64, device=device))
    lm, bal, z, cl, grad_norm = torch.cat([sums, grad_norm.double().reshape(1)]).tolist()  # the one read
    if not all(math.isfinite(x) for x in (lm, bal, z, cl, grad_norm)):  # the same global values on every rank
        raise FloatingPointError(f"non-finite loss (lm {lm}, balance {bal}, contrastive {cl}, z {z}) or gradient "
                                 f"norm ({grad_norm}): stopped before the update; the last checkpoint is untouched "
                                 "(try a lower --lr or a larger --temperature)")
    lr = opt.param_groups[0]["lr"]  # the lr this step used
    opt.step()
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


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step metrics (rank 0 also writes them to out/metrics.jsonl)."""
    rank, world, device = parallel.setup()
    lock = []  # one run per --out: rank 0 holds the lock; if it cannot, every rank stops with its error

    def take_lock():
        lock.append(RunLock(cfg.out))

    parallel.broadcast_outcome(take_lock)  # runs on rank 0 only
    try:
        return run(cfg, rank, world, device)
    finally:
        for held in lock:
            held.release()


def run(cfg: TrainConfig, rank: int, world: int, device) -> list[dict]:
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
    body = HybridLoss(model, heads, cfg)
    wrapped, fsdp = parallel.wrap(body, body.model.model.layers, cfg.fsdp, device)
    params, opt, sched = make_optimizer(body, cfg, device)
    start = restore_optimizer(body, opt, sched, gen, state, cfg) if state else 0
    if main:
        if ckpt:
            log(f"resuming from {ckpt} at step {start}")
        trim_metrics(cfg.out, start)  # the steps after the checkpoint are logged again below
        write_run_config(cfg, model_dir, world)

    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and cfg.progress), dynamic_ncols=True)
    history = []
    for step in range(start, cfg.steps):
        # 4. one optimizer step over this step's micro-batches
        t0 = time.perf_counter()
        micro = batches(step)
        losses, routing = train_step(wrapped, body, micro, queue, gen, params, opt, sched, cfg, fsdp, device)
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
        # 6. checkpoint: every rank gathers (FSDP) and sends its RNG streams, rank 0 writes
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            tensors, optim = gather_state(body, queue, opt)
            rngs = parallel.all_gather_objects(rng_state(gen))
            if main:
                save_checkpoint(cfg.out, step + 1, model, tensors, optim, sched, rngs, cfg, cfg.keep)
            parallel.barrier()
    bar.close()
    if history:
        log(f"done: {len(history)} steps, lm {history[0]['lm']:.3f} -> {history[-1]['lm']:.3f}; "
            f"adapters in {cfg.out}/latest")
    return history


def main(argv=None):
    cfg = parse_args(argv)
    try:
        cli.run(lambda: train(cfg), cfg.debug)  # user mistakes: one line, exit 2; our bugs: a traceback
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()

"""SparseDoctor training: frozen Qwen3 + LoRA-MoE adapters, the hybrid loss, one process or many.

    python train.py                                         # tiny demo model + bundled data, CPU, minutes
    torchrun --nproc_per_node=8 train.py --model Qwen3-4B --data med.jsonl

L = L_LM (assistant tokens only) + lambda_bal * L_bal (load balancing) + lambda_cl * L_cl (expert contrastive);
the objective lives in objective.py, every flag in config.py (``python train.py --help``). This file reads top
to bottom: building the run (data, model + adapters, resume, parallel wrapping, optimizer), one training step,
the loop. A user mistake ends in one line and exit status 2; SPARSEDOCTOR_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, fields

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
from data import Batches, DataError, answer_mask, encode_all, read_jsonl
from expert_queue import ExpertQueue
from lora_moe import LoRAMoEConfig, RouterRecord, add_lora_moe, expert_load, sites, token_weight
from model import load_model, resolve_dtype
from objective import HybridLoss, step_losses
from outputs import one_writer
from run_dir import (append_metrics, plan_resume, prepare_out_dir, prune, trim_metrics,
                     write_run_config)
from tiny_qwen import model_dir_or_demo
from tokenizer import load_tokenizer

CLIP = 1.0  # the gradient-norm clip
WEIGHT_DECAY = 0.0  # why 0: B starts at 0 and the adapters are the only trained weights; decay would pull them home
MIN_LR_RATIO = 0.1  # the cosine schedule's floor, as a share of --lr
ROUTING_EVERY = 10  # steps between per-layer routing statistics in metrics.jsonl (and the last step)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The lr multiplier: linear warmup, then cosine down to MIN_LR_RATIO. A function of (step, --steps)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


# ----------------------------------------------------------------------------------------------------------
# Building the run


@dataclass
class RunState:
    """What a training step reads and changes, by name: the objective (the model with its adapters and the loss
    terms) and what the step calls (``wrapped``: the objective under DDP / FSDP, or itself in one process), the
    optimizer over its trainable parameters, the schedule, the expert memory queue (None: off) and the
    contrastive term's token-sampling generator."""
    objective: HybridLoss
    wrapped: torch.nn.Module
    fsdp: bool
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    queue: ExpertQueue | None
    gen: torch.Generator
    device: torch.device


def load_data(cfg: TrainConfig, tok, log):
    """Tokenized (ids, labels) examples with answer tokens left after truncation."""
    examples = read_jsonl(cfg.data)
    items, counts = encode_all(examples, tok, cfg.max_len)
    log(f"data: {len(items)} examples from {cfg.data} ({counts['truncated']} truncated to {cfg.max_len} tokens, "
        f"{counts['dropped_no_target']} dropped with no answer left)")
    if not prepare.checked(cfg.data):
        log(f"warning: {cfg.data} has not been checked against the benchmarks: a score on questions trained on is "
            "worthless (python prepare.py decontaminate --help)")
    if not items:
        raise DataError(f"{cfg.data}: no example keeps an answer token within --max-len {cfg.max_len}")
    return items


def build_model(cfg: TrainConfig, model_dir: str, device, rank: int, verbose: bool):
    """(the frozen base with fp32 LoRA-MoE adapters, the expert memory queue or None, the sampling generator)."""
    model = load_model(model_dir, dtype=resolve_dtype(None, device), device=device)
    model.model.gradient_checkpointing = cfg.grad_checkpointing
    torch.manual_seed(cfg.seed)  # adapters start identical on every rank
    add_lora_moe(model, LoRAMoEConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoRAMoEConfig)}), verbose)
    if cfg.compile:
        check_compiler(device)
        compile_layers(model)
    if verbose and cfg.num_experts == 1:
        print("num_experts 1: plain LoRA, no router: the balance, z and contrastive terms are off")
    queue = ExpertQueue(len(sites(model)), cfg.queue, cfg.num_experts).to(device) if cfg.queue else None
    gen = torch.Generator(device).manual_seed(cfg.seed * 100 + rank)  # the contrastive loss's token sampling
    return model.train(), queue, gen


def check_compiler(device):
    """Compile a one-line function now. why: the layers compile at the first step, after --overwrite has removed
    the earlier run; a machine that cannot compile (no C++ compiler, no triton) must stop before that."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001 - dynamo and inductor raise errors of many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--compile: torch.compile does not work on this machine ({first[:200]}); run without "
                         "--compile") from None


def compile_layers(model, backend: str = "inductor"):
    """torch.compile every decoder layer in place (parameter names unchanged, so checkpoints are too): one graph
    per layer with its 7 sites, no graph break (tests/test_train.py)."""
    for layer in model.model.layers:
        layer.compile(backend=backend)


def build_state(objective: HybridLoss, queue, gen, cfg: TrainConfig, device) -> RunState:
    """The objective wrapped for DDP / FSDP, AdamW over its (sharded) trainable parameters, the schedule."""
    wrapped, fsdp = parallel.wrap(objective, objective.model.model.layers, cfg.fsdp, device)
    params = [p for p in objective.parameters() if p.requires_grad]  # after fully_shard: the sharded ones
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=WEIGHT_DECAY, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    return RunState(objective, wrapped, fsdp, params, opt, sched, queue, gen, device)


def restore_optimizer(state: RunState, saved: dict, cfg: TrainConfig) -> int:
    """Optimizer, schedule and RNG from a checkpoint's training state; returns the step to continue from."""
    parallel.load_optimizer_state(state.objective, state.opt, saved["optimizer"])
    state.sched.load_state_dict(saved["scheduler"])
    # the schedule is a function of (step, --lr, --steps, ...) of *this* run: re-derive it, so a resume with a
    # longer --steps extends the cosine and a new --lr really applies (plan_resume logs it)
    state.sched.base_lrs = [cfg.lr for _ in state.opt.param_groups]
    for g in state.opt.param_groups:
        g.update(initial_lr=cfg.lr, lr=cfg.lr * lr_at(saved["step"], cfg), weight_decay=WEIGHT_DECAY)
    restore_rng(saved["rng"], state.gen, parallel.rank())
    return saved["step"]


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(state: RunState, batches: list) -> tuple[dict, tuple | None]:
    """Forward and backward every micro-batch (ids, labels, mask) of one step, clip, step, then the queue.
    Returns (the step's losses as global means, what the routers did on the last micro-batch). One read from
    the device per step: the loss parts and the gradient norm together, for the log and the non-finite guard."""
    dev = state.device
    # N_sup, real and padding tokens of the whole step (all micro-batches, all ranks), from the CPU batches
    n_sup, n_tok, n_all = parallel.all_sum([float(sum(int(answer_mask(y).sum()) for _, y, _ in batches)),
                                            float(sum(int(m.sum()) for _, _, m in batches)),
                                            float(sum(m.numel() for _, _, m in batches))], dev)
    negatives = state.queue.negatives() if state.queue is not None else None  # one queue for the whole step
    parts, fused, micro = 0, [], None
    for j, (ids, labels, mask) in enumerate(batches):
        last = j == len(batches) - 1  # gradients are reduced over ranks on the last micro-step only
        with parallel.gradient_sync(state.wrapped, state.objective, state.fsdp, sync=last):
            micro = state.wrapped(ids.to(dev), labels.to(dev), mask.to(dev), n_sup, len(batches), negatives, state.gen)
            micro.loss.backward()
        parts, fused = parts + micro.parts, fused + [micro.fused]  # parts summed on the device, read once
    grad_norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(state.params, CLIP, foreach=True))
    *parts, grad_norm = torch.cat([parallel.all_reduce_(parts), grad_norm.double().reshape(1)]).tolist()  # the read
    if not all(math.isfinite(x) for x in [*parts, grad_norm]):  # the same global values on every rank
        raise FloatingPointError(f"non-finite loss parts (lm, balance, z, contrastive: {parts}) or gradient norm "
                                 f"({grad_norm}): stopped before the update; the last checkpoint is untouched "
                                 "(try a lower --lr or a larger --temperature)")
    lr = state.opt.param_groups[0]["lr"]  # the lr this step used
    state.opt.step()
    if state.queue is not None:  # after the step: every micro-step above read the same queue
        state.queue.push(fused)
    state.sched.step()
    state.opt.zero_grad(set_to_none=True)
    losses = step_losses(parts, state.objective.weights)
    return {**losses, "lr": lr, "grad_norm": grad_norm, "tokens": n_tok, "padding_share": (n_all - n_tok) / n_all}, \
        micro.routing


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, objective=HybridLoss) -> list[dict]:
    """Run training; returns the per-step metrics (rank 0 also writes them to out/metrics.jsonl).
    ``objective(model, cfg)`` makes the loss module: HybridLoss, or a control arm's subclass of it
    (bench/ablation_task.py)."""
    rank, world, device = parallel.setup()
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    seed_everything(cfg.seed)
    with one_writer(cfg.out):  # a second run into this --out stops here, on every rank
        # 1. what to resume (rank 0 decides, before anything is loaded), data, model and adapters
        ckpt = parallel.broadcast_outcome(lambda: plan_resume(cfg, FIXED_ON_RESUME, log) if main else None)
        model_dir = parallel.broadcast_outcome(lambda: model_dir_or_demo(cfg.model))  # the demo made once, on rank 0
        tok = load_tokenizer(model_dir)
        batches = Batches(load_data(cfg, tok, log), cfg, tok.pad_id, rank, world)
        model, queue, gen = build_model(cfg, model_dir, device, rank, verbose=main)
        # 2. resume: adapters and queue go in before any wrapping (FSDP shards what is there)
        saved = load_checkpoint(ckpt, model, queue, device) if ckpt else None
        # 3. one module whose forward returns the loss, wrapped for DDP / FSDP; the optimizer over its shards
        fingerprint = base_fingerprint(model)  # of the base, read before FSDP shards it
        state = build_state(objective(model, cfg), queue, gen, cfg, device)
        start = restore_optimizer(state, saved, cfg) if saved else 0
        if main:
            if ckpt:
                log(f"resuming from {ckpt} at step {start}")
            prepare_out_dir(cfg, ckpt, log)  # only now, once all is loaded: what --overwrite removes
            trim_metrics(cfg.out, start)  # the steps after the checkpoint are logged again below
            write_run_config(cfg, model_dir, world)
        return loop(cfg, state, batches, start, fingerprint, main, log)


def loop(cfg: TrainConfig, state: RunState, batches, start: int, fingerprint: str, main: bool, log) -> list[dict]:
    """Steps ``start`` .. --steps: train, log, checkpoint. why the bar's disable=None: off when not on a terminal."""
    bar = tqdm(total=cfg.steps, initial=start, disable=None if main else True, dynamic_ncols=True)
    history = []
    for step in range(start, cfg.steps):
        # 4. one optimizer step over this step's micro-batches
        t0 = time.perf_counter()
        micro = batches(step)
        losses, routing = train_step(state, micro)
        rec = {"step": step + 1, **losses, "step_time": time.perf_counter() - t0}
        rec["tokens_per_s"] = rec.pop("tokens") / rec["step_time"]
        # 5. log: metrics.jsonl (+ every ROUTING_EVERY steps, per-layer routing of the last micro-batch's tokens)
        if main and routing is not None and ((step + 1) % ROUTING_EVERY == 0 or step + 1 == cfg.steps):
            names = [n for n, _ in sites(state.objective.model)]
            rec["routing"] = routing_stats(names, *routing, micro[-1][2].to(state.device))
        history.append(rec)
        if main:
            append_metrics(cfg.out, rec)
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("lm", "balance", "contrastive") if rec[k] is not None})
            bar.update(1)
        # 6. checkpoint
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save(cfg, step + 1, state, fingerprint, main)
    bar.close()
    if history:
        log(f"done: {len(history)} steps, lm {history[0]['lm']:.3f} -> {history[-1]['lm']:.3f}; "
            f"adapters in {cfg.out}/latest")
    return history


@torch.no_grad()
def routing_stats(names: list[str], topk_idx, probs, mask=None) -> dict:
    """Per layer, over real tokens of one forward (stacked (S, B, T, ...) ``topk_idx`` and ``probs`` of the sites
    ``names``): mean expert load shares (top-k slots) of the layer's sites, their entropy, and the mean per-token
    router entropy (nats). One read from the device for all sites."""
    rec = RouterRecord(probs, probs, topk_idx, probs)
    w = token_weight(mask, probs)
    load = expert_load(rec, w)
    load = load / load.sum(-1, keepdim=True).clamp(min=1)  # (S, E)
    load_ent = -(load * load.clamp(min=1e-12).log()).sum(-1)  # (S,)
    tok_ent = -(probs * probs.clamp(min=1e-12).log()).sum(-1).reshape(len(names), -1)  # (S, B*T)
    tok_ent = (tok_ent * w.reshape(1, -1)).sum(1) / w.sum().clamp(min=1)
    load, load_ent, tok_ent = load.tolist(), load_ent.tolist(), tok_ent.tolist()
    layers = {}
    for i, name in enumerate(names):
        layers.setdefault(name.split(".")[2], []).append(i)

    def mean(xs):
        return round(sum(xs) / len(xs), 4)

    return {layer: {"load": [mean(col) for col in zip(*(load[i] for i in ii))],
                    "load_entropy": mean([load_ent[i] for i in ii]),
                    "token_entropy": mean([tok_ent[i] for i in ii])} for layer, ii in layers.items()}


def save(cfg: TrainConfig, step: int, state: RunState, fingerprint: str, main: bool):
    """Every rank gathers its state (FSDP shards) and sends its RNG streams; rank 0 writes and prunes."""
    tensors, optim = gather_state(state.objective, state.queue, state.opt)
    rngs = parallel.all_gather_objects(rng_state(state.gen))
    if main:
        saved = save_checkpoint(cfg.out, step, state.objective.model, tensors, optim, state.sched, rngs, cfg,
                                fingerprint)
        prune(cfg.out, cfg.keep, protect={os.path.basename(saved)})
    parallel.barrier()


def parse_args(argv=None) -> TrainConfig:
    """Flags -> TrainConfig (config.py: every flag, its --help, its range and how flags combine)."""
    return config.parse_args(argv, description=__doc__)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        cli.run(lambda: train(cfg))  # user mistakes: one line, exit 2; our bugs: a traceback
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()

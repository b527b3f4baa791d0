"""Run directories and checkpoints.

A run directory belongs to one run at a time (``RunLock``) and holds ``config.json``, ``metrics.jsonl``,
``ckpt-NNNNNN/`` checkpoints and a ``latest`` file naming the newest. A checkpoint holds
``adapter.safetensors`` (adapters, contrastive heads, queues), ``adapter_config.json``, ``state.safetensors`` +
``state.json`` (optimizer, schedule, every RNG: tensors and plain JSON, so reading a checkpoint can never run
code), ``train_config.json`` and ``manifest.json`` (the sha256 of each file, checked on every load). It is
written into ``ckpt-N.tmp/``, flushed to disk and renamed: a kill at any moment leaves the previous
checkpoint and ``latest`` intact.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from dataclasses import asdict, replace

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adapter_io import (CKPT_NAME, adapter_state, load_adapter, resolve_adapter_dir, save_adapter,
                        verify_manifest, write_manifest)
from parallel import full_tensor, optimizer_state


class RunDirError(ValueError):
    pass


def gather_state(body, queue, opt):
    """Every rank calls this (under FSDP it gathers): (adapter + head + queue tensors, optimizer state)."""
    tensors = {n: full_tensor(p).detach() for n, p in adapter_state(body.model).items()}
    if body.heads is not None:
        tensors.update({f"heads.{k}": full_tensor(v) for k, v in body.heads.state_dict().items()})
    if queue is not None:
        tensors.update({f"queue.{k}": v for k, v in queue.state_dict().items()})
    return tensors, optimizer_state(body, opt)


# ----------------------------------------------------------------------------------------------------------
# Training state as tensors + JSON (no pickle)


def _flatten(obj, prefix: str, tensors: dict):
    """Nested dicts/lists/tuples with tensors -> JSON-able structure; tensors moved into ``tensors``."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__":
                [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        raise ValueError(f"unknown record in a checkpoint's state.json: {sorted(obj)}")
    return obj


def write_training_state(path: str, state: dict):
    """``state`` (nested dicts of tensors, arrays and plain values) as state.safetensors + state.json."""
    tensors = {}
    tree = _flatten(state, "s", tensors)
    save_file(tensors, os.path.join(path, "state.safetensors"))
    with open(os.path.join(path, "state.json"), "w", encoding="utf-8") as f:
        json.dump(tree, f)


def read_training_state(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        tree = json.load(f)
    return _unflatten(tree, load_file(os.path.join(path, "state.safetensors")))


def rng_state(gen: torch.Generator) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "python": random.getstate(), "numpy": np.random.get_state(), "sample_gen": gen.get_state()}


def restore_rng(rngs: list[dict] | dict, gen: torch.Generator, rank: int = 0):
    """This rank's RNG streams (dropout, sampling, ...) from a checkpoint's per-rank states (``rng_state`` of
    every rank, in rank order). why per rank: each rank samples its own contrastive tokens and draws its own
    dropout, so restoring rank 0's streams everywhere would resume another run. A rank the checkpoint has no
    state for (a resume on more ranks, which continues no run exactly) takes rank 0's; a dict is a checkpoint
    written before states were kept per rank."""
    rngs = [rngs] if isinstance(rngs, dict) else rngs
    rng = rngs[rank] if rank < len(rngs) else rngs[0]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    gen.set_state(rng["sample_gen"])


# ----------------------------------------------------------------------------------------------------------
# Writing, finding and pruning checkpoints


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: str, final: str):
    """Rename ``tmp`` to ``final`` after its bytes (every file of a dir) are on disk; then the rename itself."""
    for f in (os.listdir(tmp) if os.path.isdir(tmp) else []):
        _fsync(os.path.join(tmp, f))
    _fsync(tmp)
    os.replace(tmp, final)  # why: a rename is atomic; a kill before it leaves the last good checkpoint intact
    _fsync(os.path.dirname(final) or ".")


def save_checkpoint(out_dir, step, model, tensors, optim, sched, rngs: list[dict], cfg, keep: int):
    """Write ckpt-<step>/ via a temp dir + rename, point ``latest`` at it, keep the newest ``keep``.
    ``rngs``: every rank's ``rng_state``, in rank order."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # why: a non-finite checkpoint would replace good ones when pruning
        raise FloatingPointError(f"step {step}: non-finite values in {bad[:4]}; checkpoint not written")
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, tensors=tensors)
    write_training_state(tmp, {"step": step, "optimizer": optim, "scheduler": sched.state_dict(),
                               "rng": list(rngs)})
    with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(cfg), f, indent=2)
    write_manifest(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    _replace_durably(tmp, final)
    with open(os.path.join(out_dir, "latest.tmp"), "w", encoding="utf-8") as f:
        f.write(os.path.basename(final))
    _replace_durably(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    prune(out_dir, keep, protect={os.path.basename(final)})
    return final


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in a run dir, oldest first (by parsed step, not by name)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, d)) for d in os.listdir(out_dir) if (m := CKPT_NAME.fullmatch(d))]
    return sorted(found)


def prune(out_dir: str, keep: int, protect: set):
    """Delete all but the newest ``keep`` checkpoints; never one in ``protect`` nor the one ``latest`` names."""
    latest = os.path.join(out_dir, "latest")
    if os.path.isfile(latest):
        protect = protect | {open(latest, encoding="utf-8").read().strip()}
    for _, path in checkpoints(out_dir)[:-keep]:
        if os.path.basename(path) not in protect:
            shutil.rmtree(path, ignore_errors=True)


def is_valid_checkpoint(path: str) -> bool:
    try:
        verify_manifest(path)
    except (OSError, ValueError):
        return False
    needed = ("state.json", "state.safetensors", "adapter.safetensors")
    return all(os.path.isfile(os.path.join(path, f)) for f in needed)


def find_resume(path: str) -> str | None:
    """What ``--resume PATH`` continues: a checkpoint dir; or in a run dir the one ``latest`` names, else (latest
    missing, dangling or corrupted) the newest valid checkpoint; None for an empty or new dir (start fresh)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        path = os.path.dirname(path) or "."
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--resume {path}: not a run dir or checkpoint dir")
    try:
        named = resolve_adapter_dir(path)
    except ValueError:
        named = None
    if named and named != path and is_valid_checkpoint(named):
        return named
    found = [p for _, p in checkpoints(path)]
    newest_valid = next((p for p in reversed(found) if is_valid_checkpoint(p)), None)  # hashes stop at the first
    if newest_valid:
        return newest_valid
    if any(os.path.isfile(os.path.join(p, "state.pt")) for p in found + [path]):
        raise RunDirError(f"{path}: an old-format checkpoint (state.pt, a pickle); it is not read, since loading "
                          "a pickle can run code")
    if found:
        raise RunDirError(f"--resume {path}: no valid checkpoint among {[os.path.basename(p) for p in found]} "
                          "(incomplete or corrupted)")
    return None


class RunLock:
    """An exclusive lock on a run dir (``OUT/.lock``): a second run into the same dir stops at once."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, ".lock"), "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise RunDirError(f"{out_dir} is in use by another run (it holds {out_dir}/.lock)") from None

    def release(self):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def trim_metrics(out_dir: str, step: int):
    """Keep only the metrics.jsonl lines of steps <= ``step`` (a resume re-logs the steps after it)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def clear_run(out_dir: str):
    """``--overwrite``: remove an earlier run's checkpoints, latest, metrics and config."""
    for _, path in checkpoints(out_dir):
        shutil.rmtree(path)
    for name in ("latest", "metrics.jsonl", "config.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def plan_resume(cfg, fixed_on_resume: tuple, log) -> str | None:
    """Rank 0, before anything is loaded: the checkpoint to resume (None = a fresh run), after checking that
    ``cfg.out`` is free to use and that the flags fit the checkpoint: those in ``fixed_on_resume`` must
    match it, any other that differs is applied and logged."""
    ckpt = find_resume(cfg.resume) if cfg.resume else None
    if cfg.resume and ckpt is None:
        log(f"--resume {cfg.resume}: no checkpoint there yet, starting a fresh run")
    if ckpt is None:
        earlier = checkpoints(cfg.out) or os.path.exists(os.path.join(cfg.out, "metrics.jsonl"))
        if earlier and not cfg.overwrite:
            raise RunDirError(f"{cfg.out} holds an earlier run: --resume {cfg.out} continues it, "
                              "--overwrite starts over")
        if earlier:
            clear_run(cfg.out)
        return None
    with open(os.path.join(ckpt, "train_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    try:  # the checkpoint's settings as a config of this run's type, so its properties say what it had on
        was = replace(cfg, **{k: v for k, v in saved.items() if k in now})
    except (TypeError, ValueError) as e:
        raise RunDirError(f"--resume {ckpt}: its train_config.json is not a valid config: {e}") from None
    fixed = {k: (saved.get(k), now[k]) for k in fixed_on_resume if saved.get(k) != now[k]}
    if was.uses_contrastive != cfg.uses_contrastive:
        fixed["contrastive loss on"] = (was.uses_contrastive, cfg.uses_contrastive)
    if (saved.get("queue_momentum", 0) > 0) != (now["queue_momentum"] > 0):
        fixed["momentum key heads"] = (saved.get("queue_momentum", 0) > 0, now["queue_momentum"] > 0)
    if fixed:
        raise RunDirError(f"--resume {ckpt}: these differ from the checkpoint (saved, now): {fixed}")
    for k in sorted(now.keys() - {"resume", "overwrite", "progress", "debug", "out"}):
        if k in saved and saved[k] != now[k]:
            log(f"resume: --{k.replace('_', '-')} {saved[k]} -> {now[k]} (applied)")
    return ckpt


def load_checkpoint(path: str, model, heads, queue, device) -> dict:
    """Fill adapters, heads and queue from checkpoint ``path`` (checksums verified); return its
    training state."""
    extra = load_adapter(model, path)
    if heads is not None:
        heads.load_state_dict({k[6:]: v for k, v in extra.items() if k.startswith("heads.")})
    if queue is not None:
        queue.load_state_dict({k[6:]: v.to(device) for k, v in extra.items() if k.startswith("queue.")})
    return read_training_state(path)


def write_run_config(cfg, model_dir: str, world: int):
    """``OUT/config.json``: this run's resolved settings (the model dir, the world size), also printed."""
    os.makedirs(cfg.out, exist_ok=True)
    resolved = {**asdict(cfg), "model": model_dir, "world_size": world}
    with open(os.path.join(cfg.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(resolved, f, indent=2)
    print("config:", json.dumps(resolved))


def append_metrics(out: str, rec: dict):
    """One step's metrics as one line of ``OUT/metrics.jsonl``."""
    with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")

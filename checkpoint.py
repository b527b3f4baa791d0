"""Checkpoints: what one holds, written atomically, read without trusting it.

A checkpoint (``ckpt-NNNNNN/`` in a run directory, see run_dir.py) holds
``adapter.safetensors`` (adapters and the expert memory queue), ``adapter_config.json``, ``state.safetensors`` +
``state.json`` (optimizer, schedule, every RNG: tensors and plain JSON, so reading a checkpoint can never run
code), ``train_config.json`` and ``manifest.json`` (the sha256 of each file, checked on every load). It is
written into ``ckpt-N.tmp/``, flushed to disk and renamed: a kill at any moment leaves the previous
checkpoint and ``latest`` intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adapter_io import adapter_state, load_adapter, save_adapter, verify_manifest, write_manifest
from outputs import OutputError, is_regular_file, make_fresh_dir, write_atomically
from parallel import full_tensor, optimizer_state


CKPT_FILES = {"adapter.safetensors", "adapter_config.json", "state.safetensors", "state.json", "train_config.json",
              "manifest.json"}  # everything save_checkpoint writes into a checkpoint dir


def gather_state(objective, queue, opt):
    """Every rank calls this (under FSDP it gathers): (adapter + queue tensors, optimizer state)."""
    tensors = {n: full_tensor(p).detach() for n, p in adapter_state(objective.model).items()}
    if queue is not None:
        tensors.update({f"queue.{k}": v for k, v in queue.state_dict().items()})
    return tensors, optimizer_state(objective, opt)


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


def restore_rng(rngs: list[dict], gen: torch.Generator, rank: int = 0):
    """This rank's RNG streams (dropout, sampling, ...) from a checkpoint's per-rank states (``rng_state`` of
    every rank, in rank order). why per rank: each rank samples its own contrastive tokens and draws its own
    dropout, so restoring rank 0's streams everywhere would resume another run. A rank the checkpoint has no
    state for (a resume on more ranks, which continues no run exactly) takes rank 0's."""
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


def save_checkpoint(out_dir, step, model, tensors, optim, sched, rngs: list[dict], cfg, fingerprint=None) -> str:
    """Write ckpt-<step>/ via a temp dir + rename and point ``latest`` at it. ``rngs``: every rank's
    ``rng_state``, in rank order; ``fingerprint``: the base's (``adapter_io.base_fingerprint``)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # why: a non-finite checkpoint would replace good ones when pruning
        raise FloatingPointError(f"step {step}: non-finite values in {bad[:4]}; checkpoint not written")
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    remove_own_dir(tmp)  # a leftover of a killed save
    make_fresh_dir(tmp)  # why exclusive: a link planted at ckpt-N.tmp must not lead the files elsewhere
    save_adapter(model, tmp, tensors=tensors, fingerprint=fingerprint)
    write_training_state(tmp, {"step": step, "optimizer": optim, "scheduler": sched.state_dict(),
                               "rng": list(rngs)})
    with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(cfg), f, indent=2)
    write_manifest(tmp)
    remove_own_dir(final)  # a rewind saves a step again
    _replace_durably(tmp, final)
    write_atomically(os.path.join(out_dir, "latest"), os.path.basename(final))
    _fsync(out_dir)
    return final


def is_checkpoint_like(path: str) -> bool:
    """A real dir (not a link) holding only regular files named like what save_checkpoint writes."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    names = os.listdir(path)
    return set(names) <= CKPT_FILES and all(is_regular_file(os.path.join(path, n)) for n in names)


def remove_own_dir(path: str):
    """Remove ``path`` if it is checkpoint-like; refuse anything else there (a link, a file, a user's dir): only
    what save_checkpoint writes is ever removed."""
    if not os.path.lexists(path):
        return
    if not is_checkpoint_like(path):
        raise OutputError(f"{path} is in the way and was not written by train.py: move it away by hand")
    shutil.rmtree(path)


def checkpoint_step(path: str) -> int:
    """The step a checkpoint was saved at, from its state.json (no tensor is read)."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        tree = json.load(f)
    return next(v for k, v in tree["__dict__"] if k == "step")


def verify_checkpoint(path: str):
    """The checkpoint's manifest covers every file a resume reads, and each matches (``verify_manifest``)."""
    verify_manifest(path, required=tuple(sorted(CKPT_FILES - {"manifest.json"})))


def is_valid_checkpoint(path: str) -> bool:
    try:
        verify_checkpoint(path)
    except (OSError, ValueError):
        return False
    return True


def load_checkpoint(path: str, model, queue, device) -> dict:
    """Fill adapters and queue from checkpoint ``path`` (checksums verified); return its training state."""
    verify_checkpoint(path)
    extra = load_adapter(model, path)
    if queue is not None:
        queue.load_state_dict({k[6:]: v.to(device) for k, v in extra.items() if k.startswith("queue.")})
    return read_training_state(path)

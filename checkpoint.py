"""Checkpoints: a run directory of ``ckpt-NNNNNN/`` folders and a ``latest`` file naming the newest.

A checkpoint holds ``adapter.safetensors`` (adapters, contrastive heads, queues), ``adapter_config.json``,
``state.safetensors`` + ``state.json`` (optimizer, schedule, every RNG: tensors and plain JSON, so reading a
checkpoint can never run code) and ``train_config.json``. It is written into ``ckpt-N.tmp/`` and renamed:
a kill at any moment leaves the previous checkpoint and ``latest`` intact.
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from lora_moe import adapter_state, load_adapter, resolve_adapter_dir, save_adapter


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a plain one or an FSDP2 shard (a DTensor; gathering it is a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_state(body, opt):
    """Every rank calls this (under FSDP it gathers): (adapter + head + queue tensors, optimizer state)."""
    tensors = {n: full_tensor(p).detach() for n, p in adapter_state(body.model).items()}
    if body.heads is not None:
        tensors.update({f"heads.{k}": full_tensor(v) for k, v in body.heads.state_dict().items()})
    if body.queues is not None:
        tensors.update({f"queues.{k}": v for k, v in body.queues.state_dict().items()})
    # keyed by parameter name, full tensors on CPU: the same file resumes a 1-process, DDP or FSDP run
    optim = get_optimizer_state_dict(body, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return tensors, optim


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
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": np.random.get_state(), "sample_gen": gen.get_state()}


def restore_rng(rng: dict, gen: torch.Generator):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    gen.set_state(rng["sample_gen"])


# ----------------------------------------------------------------------------------------------------------
# Writing, finding and pruning checkpoints


def save_checkpoint(out_dir, step, model, tensors, optim, sched, gen, cfg, keep: int):
    """Write ckpt-<step>/ via a temp dir + rename, then point ``latest`` at it; keep the newest ``keep``."""
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, tensors=tensors)
    write_training_state(tmp, {"step": step, "optimizer": optim, "scheduler": sched.state_dict(), "rng": rng_state(gen)})
    with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(cfg), f, indent=2)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)  # why: a rename is atomic; a kill before it leaves the last good checkpoint intact
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    ckpts = sorted(d for d in os.listdir(out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp"))
    for old in ckpts[:-keep]:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir, or a run dir (or its ``latest`` file) naming one."""
    path = resolve_adapter_dir(path)
    if not os.path.exists(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"{path} is not a checkpoint (no state.json) nor a run dir with a 'latest' file")
    return path


def load_checkpoint(path: str, model, heads, queues, device) -> dict:
    """Fill adapters, heads and queues from checkpoint ``path``; return its training state."""
    extra = load_adapter(model, path)
    if heads is not None:
        heads.load_state_dict({k[6:]: v for k, v in extra.items() if k.startswith("heads.")})
    if queues is not None:
        queues.load_state_dict({k[7:]: v.to(device) for k, v in extra.items() if k.startswith("queues.")})
    return read_training_state(path)

"""Saving and loading only the adapters: ``adapter.safetensors`` + ``adapter_config.json`` + ``manifest.json``.

An adapter dir (or a train.py checkpoint, which is one plus its training state) holds the trainable tensors,
the adapters' ``LoRAMoEConfig`` with a hash of the base model's config, and the sha256 of every file. Nothing
is trusted before it is checked: the manifest first (a dir without one is refused), then the config with the
same rules as train.py's flags (before anything is allocated), then the base, then every tensor's shape.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields

import torch
import torch.nn as nn
from safetensors.torch import load_file, save, save_file

from lora_moe import TARGETS, LoRAMoEConfig, add_lora_moe, sites
from outputs import CKPT_NAME, OutputLock, check_output, is_regular_file, refuse_inputs, write_atomically



def adapter_config(model) -> LoRAMoEConfig:
    """The LoRAMoEConfig of a model's adapters, read off its first site (every site has the same shape)."""
    found = sites(model)
    if not found:
        raise ValueError("the model has no LoRA-MoE adapters")
    m = found[0][1]
    targets = tuple(t for t in TARGETS if any(n.endswith("." + t) for n, _ in found))
    dropout = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
    return LoRAMoEConfig(m.E, m.r, m.alpha, m.top_k, dropout, targets,
                         "token" if m.router_ctx is None else "context")


def base_config_hash(model) -> str:
    return hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode()).hexdigest()[:16]


def base_fingerprint(model) -> list[float]:
    """16 values of the base's token embedding. why: two bases of one config (two random inits, two model families
    of one shape) share the config hash; their weights differ here. Compared with a 1% tolerance, so a bf16 and an
    fp32 load of one base agree (a light fine-tune of the same base may pass: this catches a wrong base, not a
    retouched one)."""
    return [round(float(v), 6) for v in model.model.embed_tokens.weight[0, :16].detach().float().cpu()]


def adapter_state(model: nn.Module) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str, tensors: dict | None = None, fingerprint: list | None = None):
    """Trainable tensors as ``adapter.safetensors`` + ``adapter_config.json`` (the LoRAMoEConfig, base hash and
    fingerprint) + ``manifest.json``. ``tensors`` replaces the model's own trainable tensors and ``fingerprint``
    the base's (train.py passes them gathered from FSDP shards / taken before sharding)."""
    os.makedirs(path, exist_ok=True)
    state = {n: t.contiguous().cpu() for n, t in (adapter_state(model) if tensors is None else tensors).items()}
    save_file(state, os.path.join(path, "adapter.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({**asdict(adapter_config(model)), "base_config_hash": base_config_hash(model),
                   "base_fingerprint": fingerprint or base_fingerprint(model), "base_config": asdict(model.cfg)},
                  f, indent=2)
    write_manifest(path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(path: str):
    """``manifest.json``: the sha256 of every file in the dir, so corruption is caught on load."""
    files = sorted(f for f in os.listdir(path) if f != "manifest.json" and os.path.isfile(os.path.join(path, f)))
    with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({name: file_sha256(os.path.join(path, name)) for name in files}, f, indent=1)


ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json")  # what load_adapter and the export read


def verify_manifest(path: str, required: tuple = ADAPTER_FILES):
    """Check every file named in ``manifest.json`` against its sha256, and that it names every file of
    ``required`` (the files the caller will read). why a missing manifest, or one that leaves a file out, is an
    error: if deleting it (or a line of it) switched the check off, an edited adapter would load silently."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest):
        raise ValueError(f"{manifest} not found: not a complete adapter or checkpoint dir (its files cannot be "
                         "checked)")
    try:
        with open(manifest, encoding="utf-8") as f:
            sums = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest}: not a JSON manifest ({e})") from None
    missing = [name for name in required if not isinstance(sums, dict) or name not in sums]
    if missing:
        raise ValueError(f"{manifest} does not list {', '.join(missing)}: its files cannot all be checked")
    for name, digest in sums.items():
        file = os.path.join(path, os.path.basename(str(name)))
        if not os.path.isfile(file) or file_sha256(file) != digest:
            raise ValueError(f"{file} is missing or does not match the checkpoint's manifest.json: "
                             "corrupted or edited")


def resolve_adapter_dir(path: str) -> str:
    """An adapter/checkpoint dir, a train.py run dir, or its ``latest`` file -> the adapter dir."""
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        path = os.path.dirname(path) or "."
    named = os.path.join(path, "latest")
    if not os.path.exists(os.path.join(path, "adapter_config.json")) and os.path.isfile(named):
        with open(named, encoding="utf-8") as f:
            name = f.read(64).strip()
        if not CKPT_NAME.fullmatch(name):  # why: a hand-edited latest must not point outside the run dir
            raise ValueError(f"{path}/latest names {name[:40]!r}, not a ckpt-NNNNNN checkpoint of this run")
        path = os.path.join(path, name)
    return path


def read_adapter_config(path: str) -> LoRAMoEConfig:
    """An adapter dir's LoRAMoEConfig, checked with the rules of train.py's flags before anything is allocated."""
    cfg_file = os.path.join(path, "adapter_config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    optional = {"router": "token"}  # why: adapters saved before --router existed all have token routers
    missing = [k for k in ("base_config_hash", *(f.name for f in fields(LoRAMoEConfig)))
               if not isinstance(cfg, dict) or (k not in cfg and k not in optional)]
    if missing:
        raise ValueError(f"{cfg_file} is not a SparseDoctor adapter config: missing {missing}")
    try:
        return LoRAMoEConfig(**{f.name: cfg.get(f.name, optional.get(f.name)) for f in fields(LoRAMoEConfig)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None


def load_adapter(model: nn.Module, path: str) -> dict:
    """Add (if needed) and fill the adapters saved by ``save_adapter``; returns any extra tensors saved with them.

    ``path``: an adapter dir, a train.py checkpoint, a run dir or its ``latest`` file (the newest checkpoint)."""
    path = resolve_adapter_dir(path)
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: an adapter dir holds adapter_config.json + "
                                "adapter.safetensors")
    verify_manifest(path)
    saved = read_adapter_config(path)
    with open(cfg_file, encoding="utf-8") as f:
        raw = json.load(f)
    if raw["base_config_hash"] != base_config_hash(model):
        theirs, ours = raw.get("base_config") or {}, asdict(model.cfg)
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        raise ValueError(f"adapter {path} was trained on a different base model: "
                         f"(adapter's, this base's) = {diff}")
    theirs = raw.get("base_fingerprint")
    if theirs is not None and not torch.allclose(torch.tensor(theirs, dtype=torch.float64),
                                                 torch.tensor(base_fingerprint(model), dtype=torch.float64),
                                                 rtol=1e-2, atol=1e-4):
        raise ValueError(f"adapter {path} was trained on another base model of the same shape (its weights "
                         "differ): load it onto the base it was trained on")
    if not sites(model):
        add_lora_moe(model, saved, verbose=False)
    elif adapter_config(model) != saved:
        present = asdict(adapter_config(model))
        diff = {k: (v, present[k]) for k, v in asdict(saved).items() if present[k] != v}
        raise ValueError(f"adapter {path} does not match this model's adapters: (saved, present) = {diff}")
    state = load_file(os.path.join(path, "adapter.safetensors"), device=str(next(model.parameters()).device))
    params = dict(model.named_parameters())
    want = set(adapter_state(model))
    missing = sorted(want - state.keys())
    if missing:
        raise KeyError(f"adapter {path} lacks tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for n in want:
            if params[n].shape != state[n].shape:
                raise ValueError(f"adapter tensor {n}: saved {tuple(state[n].shape)}, "
                                 f"model {tuple(params[n].shape)}")
            params[n].copy_(state[n])
    return {k: v for k, v in state.items() if k not in want}


# ----------------------------------------------------------------------------------------------------------
# The plain-LoRA baseline in peft's format


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")  # all that export_peft writes into its out dir


def check_peft_out(out: str, overwrite: bool):
    """outputs.py's rule for an export's files: an earlier export replaced only with --overwrite, and a file
    there that is not a peft export's never."""
    for name in PEFT_FILES:
        check_output(os.path.join(out, name), overwrite, is_peft_export)


def is_peft_export(path: str) -> bool:
    """A file of a peft adapter dir that export_peft wrote: its config says peft_type LORA; its tensors file is
    beside such a config."""
    config = os.path.join(os.path.dirname(path), "adapter_config.json")
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("peft_type") == "LORA" and is_regular_file(config)
    except (OSError, ValueError, AttributeError):
        return False


def export_peft(path: str, out: str, base_model: str | None = None, overwrite: bool = False):
    """A plain-LoRA adapter (``--num-experts 1``) as a peft adapter dir (adapter_config.json +
    adapter_model.safetensors) that ``PeftModel.from_pretrained`` loads onto transformers' Qwen3. Our
    lora_A (r, in) and lora_B (out, r) are peft's, and alpha / r its scaling, so the logits are the same.

    why E = 1 only: with experts, each token's output depends on its own routing, which no LoRA adapter can
    express; such adapters load with our load_adapter (chat.py, eval.py)."""
    path = resolve_adapter_dir(path)
    verify_manifest(path)
    cfg = read_adapter_config(path)
    if cfg.num_experts != 1:
        raise ValueError(f"{path} has {cfg.num_experts} experts: only a plain-LoRA adapter (--num-experts 1) has "
                         "a peft form (routing is input-dependent); load it with chat.py / eval.py --adapter")
    state = load_file(os.path.join(path, "adapter.safetensors"))
    tensors = {f"base_model.model.{k}.weight": v.contiguous() for k, v in state.items()
               if k.endswith((".lora_A", ".lora_B"))}
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                "target_modules": list(cfg.targets), "bias": "none", "fan_in_fan_out": False,
                "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    refuse_inputs([out], [path])  # why before the lock: its file must not land in the adapter read
    with OutputLock(out):
        check_peft_out(out, overwrite)
        write_atomically(os.path.join(out, "adapter_model.safetensors"), save(tensors, metadata={"format": "pt"}))
        write_atomically(os.path.join(out, "adapter_config.json"), json.dumps(peft_cfg, indent=2))
    print(f"{len(tensors) // 2} LoRA pairs (r={cfg.rank}, alpha={cfg.alpha}) -> {out} (peft format)")


if __name__ == "__main__":
    import cli

    ap = cli.Parser(description="Export a plain-LoRA run (--num-experts 1) as a peft adapter directory.")
    ap.add_argument("adapter", help="a train.py run dir, checkpoint dir or adapter dir")
    ap.add_argument("out", help="the peft adapter dir to write")
    ap.add_argument("--base-model", default=None, help="recorded as base_model_name_or_path")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    a = ap.parse_args()
    cli.run(lambda: export_peft(a.adapter, a.out, a.base_model, a.overwrite), False)

"""LoRA-MoE: LoRA experts with a token router inside each frozen projection.

    y = base(x) + (alpha / r) * sum_{e in top-k(x)} g_e(x) * B_e A_e dropout(x)

Router: a bias-free linear to E logits, in fp32; gates = softmax over all E experts, keep the top-k and
renormalize them to sum to 1 (so top_k = E is dense routing with the full softmax, and E = 1 is plain LoRA).
Experts are stored pre-stacked, A as (E*r, in) and B as (out, E*r), and computed *densely masked*: one
matmul into every expert's rank space, each r-block scaled by its gate (0 where not chosen), one matmul
out. No Python loop over experts, no host sync, every parameter in the graph (DDP needs no
``find_unused_parameters``).

A *site* is one adapted projection (``model.layers.3.mlp.up_proj``); every routing loss is computed per site
over real (non-padding) tokens and averaged over sites. The load-balancing loss (``balance_loss``):

    L_bal = E * sum_e f_e * P_e      f_e: share of top-k slots given to expert e, P_e: mean router probability

The model knows nothing of this file: ``add_lora_moe`` swaps ``nn.Linear`` modules from the outside.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from parallel import all_reduce_

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_targets(names) -> tuple:
    """Projection names to adapt, each one of TARGETS (a typo must not silently adapt less)."""
    names = tuple(names)
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ValueError(f"targets {unknown or '(none)'} not projection names; valid: {','.join(TARGETS)}")
    return names


@dataclass
class LoRAMoEConfig:
    """The adapters' shape: the one place their defaults live (train.py's flags and adapter_config.json)."""
    num_experts: int = 8      # E; 1 = plain LoRA
    rank: int = 8             # r, per expert
    alpha: float = 16.0       # output scaled by alpha / r
    top_k: int = 2            # experts per token
    dropout: float = 0.05     # on the adapters' input
    targets: tuple = TARGETS  # projection names to adapt

    def __post_init__(self):
        self.targets = check_targets(self.targets)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")


@dataclass
class RouterRecord:
    """What one forward of a ``LoRAMoELinear`` leaves for the losses, all over the same tokens ``(..., )``:

    logits (..., E) router logits, fp32          probs (..., E) full softmax p
    topk_idx (..., k) chosen experts (top-1 first) gates (..., E) renormalized top-k gates g (0 = not chosen)
    expert_acts (..., E, r) every expert's A_e x, only when recording them is on (the contrastive loss)
    seq (N,) the sequence (batch row) of each token, set by ``valid`` (the sequence reading of the loss)
    """
    logits: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor
    gates: torch.Tensor
    expert_acts: torch.Tensor | None = None
    seq: torch.Tensor | None = None

    def valid(self, mask) -> "RouterRecord":
        """Flattened to tokens (N, ...) and, with ``mask`` (B, T) bool, to real tokens only.

        why one filter: padding must enter neither the balance loss, nor the contrastive loss, nor the stats."""
        keep = mask.reshape(-1).to(self.probs.device) if mask is not None else None

        def flat(t, tail: int):  # (..., *last `tail` dims) -> (N, *those dims)
            if t is None:
                return None
            t = t.reshape(-1, *t.shape[t.dim() - tail:])
            return t[keep] if keep is not None else t

        seq = None
        if self.probs.dim() == 3:  # (B, T, E): every token's batch row, (B, T) -> (N,)
            B, T = self.probs.shape[:2]
            seq = flat(torch.arange(B, device=self.probs.device)[:, None].expand(B, T), 0)
        return RouterRecord(flat(self.logits, 1), flat(self.probs, 1), flat(self.topk_idx, 1),
                            flat(self.gates, 1), flat(self.expert_acts, 2), seq)


class LoRAMoELinear(nn.Module):
    """A frozen ``nn.Linear`` plus E LoRA experts and a router (the equation at the top of this file).

    Each forward leaves ``self.record``, a ``RouterRecord`` of that forward's routing (overwritten by the
    next one); with ``self.record_expert_acts`` on (``record_expert_acts(model, True)``) it also keeps every
    expert's A_e x. The losses read these after the model's forward (``router_records``).
    """

    def __init__(self, base: nn.Linear, cfg: LoRAMoEConfig | None = None):
        super().__init__()
        cfg = cfg or LoRAMoEConfig()
        self.base = base.requires_grad_(False)
        self.E, self.r, self.top_k, self.alpha = cfg.num_experts, cfg.rank, cfg.top_k, cfg.alpha
        self.scaling = cfg.alpha / cfg.rank
        dev = base.weight.device
        # adapters live in fp32 whatever the base dtype (bf16 base on GPU): their updates are tiny
        self.router = nn.Linear(base.in_features, self.E, bias=False, device=dev, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(self.E * self.r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.E * self.r, device=dev))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.reset_parameters()
        self.record_expert_acts = False
        self.record: RouterRecord | None = None

    def reset_parameters(self):
        with torch.no_grad():
            for e in range(self.E):  # kaiming-uniform per expert block, exactly as peft inits lora_A
                nn.init.kaiming_uniform_(self.lora_A[e * self.r:(e + 1) * self.r], a=math.sqrt(5))
            self.lora_B.zero_()  # B = 0: the adapted model equals the base at init
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def route(self, x) -> RouterRecord:
        """x (..., in) -> the routing of every token: logits, full-softmax probs, top-k, gates (fp32)."""
        logits = F.linear(x.float(), self.router.weight)
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        # why renormalize: with top-k < E the kept gates then sum to 1, so scale does not depend on k or E
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        return RouterRecord(logits, probs, top_i, gates)

    def forward(self, x):
        y = self.base(x)
        xf = x.to(self.lora_A.dtype)  # why one cast: router and experts share it, so autograd keeps one fp32 copy
        rec = self.route(xf)
        h = F.linear(self.dropout(xf), self.lora_A)  # (..., E*r): every expert's A_e x
        lead = h.shape[:-1]
        u = h.view(*lead, self.E, self.r)  # (..., E, r)
        if self.record_expert_acts:
            rec.expert_acts = u
        self.record = rec
        h = (u * rec.gates.to(u.dtype).unsqueeze(-1)).reshape(*lead, self.E * self.r)  # unchosen experts -> 0
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def extra_repr(self):
        return f"experts={self.E}, rank={self.r}, top_k={self.top_k}, alpha={self.alpha}"


def reference_forward(layer: LoRAMoELinear, x):
    """A slow, obviously-correct per-expert loop over routed tokens, for tests and the benchmark's baseline.

    Its routing is written out here (softmax -> top-k -> renormalize), independent of ``route``."""
    y = layer.base(x)
    xf = layer.dropout(x).to(layer.lora_A.dtype).reshape(-1, x.shape[-1])  # (N, in)
    p = (x.float().reshape(-1, x.shape[-1]) @ layer.router.weight.T).softmax(-1)  # (N, E)
    top_p, top_i = p.topk(layer.top_k, dim=-1)
    out = torch.zeros(xf.shape[0], layer.base.out_features, dtype=xf.dtype, device=xf.device)
    for e in range(layer.E):
        rows = (top_i == e).any(-1).nonzero().squeeze(-1)
        g = (top_p[rows] * (top_i[rows] == e)).sum(-1, keepdim=True) / top_p[rows].sum(-1, keepdim=True)
        A = layer.lora_A[e * layer.r:(e + 1) * layer.r]
        B = layer.lora_B[:, e * layer.r:(e + 1) * layer.r]
        out = out.index_add(0, rows, (xf[rows] @ A.T @ B.T) * g)
    return y + (out * layer.scaling).reshape(*x.shape[:-1], -1).to(y.dtype)


# ----------------------------------------------------------------------------------------------------------
# Putting adapters into a model; reading what they recorded


def sites(model: nn.Module) -> list[tuple[str, LoRAMoELinear]]:
    """Every *site*, i.e. adapted projection, in model order: [(name, module)]."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def add_lora_moe(model: nn.Module, cfg: LoRAMoEConfig | None = None, verbose: bool = True) -> nn.Module:
    """Swap every ``nn.Linear`` whose name ends in one of ``cfg.targets`` for a LoRAMoELinear; freeze the rest."""
    cfg = cfg or LoRAMoEConfig()
    model.requires_grad_(False)
    swaps = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.split(".")[-1] in cfg.targets]
    if not swaps:
        raise ValueError(f"no nn.Linear named like {cfg.targets} in the model")
    for name, lin in swaps:
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, LoRAMoELinear(lin, cfg))
    model.lora_moe_config = cfg
    if verbose:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA-MoE on {len(swaps)} projections (E={cfg.num_experts}, r={cfg.rank}, top-{cfg.top_k}): "
              f"{total / 1e6:.2f}M parameters, {train / 1e6:.3f}M trainable ({100 * train / total:.3f}%)")
    return model


def record_expert_acts(model: nn.Module, on: bool):
    """Keep every expert's A_e x in each forward's record (the contrastive loss needs them; memory otherwise)."""
    for _, m in sites(model):
        m.record_expert_acts = on


def router_records(model: nn.Module, mask=None) -> list[RouterRecord]:
    """Every site's record of the last forward, flattened to the real tokens of ``mask`` (B, T) bool."""
    out = []
    for name, m in sites(model):
        if m.record is None:
            raise RuntimeError(f"{name} has no router record: run the model's forward first")
        out.append(m.record.valid(mask))
    return out


def balance_loss(records: list[RouterRecord], z_loss_weight: float = 0.0, sync: bool = False):
    """Switch-style load balancing E * sum_e f_e * P_e per site, averaged over sites.

    f_e = share of the top-k slots given to expert e (no gradient), P_e = mean full-softmax probability of e
    (gradient into the router), both over the records' (valid) tokens. Equals 1.0 under uniform routing and
    E under full collapse with top-1. ``sync=True`` sums the slot counts over ranks (global-batch balancing,
    as the Qwen MoE work recommends). ``z_loss_weight`` adds the router z-loss mean(logsumexp(logits)^2).
    """
    losses = []
    for rec in records:
        probs, idx, E = rec.probs, rec.topk_idx, rec.probs.shape[-1]
        counts = torch.zeros(E, device=probs.device).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device))
        if sync:
            all_reduce_(counts)
        f = counts / counts.sum().clamp(min=1)
        P = probs.mean(0) if probs.shape[0] else probs.sum(0)  # mean router probability per expert
        loss = E * (f * P).sum()
        if z_loss_weight:
            loss = loss + z_loss_weight * (rec.logits.logsumexp(-1) ** 2).mean()
        losses.append(loss)
    return torch.stack(losses).mean()


@torch.no_grad()
def routing_stats(model: nn.Module, mask=None) -> dict:
    """Per site, over the last forward's real tokens: expert load shares (top-k slots), their entropy, and the
    mean per-token router entropy (nats)."""
    out = {}
    for (name, m) in sites(model):
        if m.record is None:
            continue
        rec = m.record.valid(mask)
        load = torch.bincount(rec.topk_idx.reshape(-1), minlength=m.E).float()
        load = load / load.sum().clamp(min=1)
        ent = -(load * load.clamp(min=1e-12).log()).sum()
        probs = rec.probs
        tok_ent = -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean() if probs.shape[0] else torch.tensor(0.0)
        out[name] = {"load": [round(v, 4) for v in load.tolist()], "load_entropy": round(ent.item(), 4),
                     "token_entropy": round(tok_ent.item(), 4)}
    return out


def per_layer(stats: dict) -> dict:
    """``routing_stats`` by site -> by layer: the mean expert load over the layer's sites and its entropies."""
    layers = {}
    for name, s in stats.items():
        layers.setdefault(name.split(".")[2], []).append(s)

    def mean(xs):
        return round(sum(xs) / len(xs), 4)

    return {layer: {"load": [mean(col) for col in zip(*(s["load"] for s in ss))],
                    "load_entropy": mean([s["load_entropy"] for s in ss]),
                    "token_entropy": mean([s["token_entropy"] for s in ss])} for layer, ss in layers.items()}


# ----------------------------------------------------------------------------------------------------------
# Saving and loading only the adapters


def base_config_hash(model) -> str:
    return hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode()).hexdigest()[:16]


def adapter_state(model: nn.Module) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str, tensors: dict | None = None):
    """Trainable tensors as ``adapter.safetensors`` + ``adapter_config.json`` (the LoRAMoEConfig, base hash).

    ``tensors`` replaces the model's own trainable tensors (train.py passes them gathered from FSDP shards,
    plus the contrastive heads and queues)."""
    os.makedirs(path, exist_ok=True)
    state = {n: t.contiguous().cpu() for n, t in (adapter_state(model) if tensors is None else tensors).items()}
    save_file(state, os.path.join(path, "adapter.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({**asdict(model.lora_moe_config), "base_config_hash": base_config_hash(model),
                   "base_config": asdict(model.cfg)}, f, indent=2)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(path: str):
    """``manifest.json``: the sha256 of every file in the dir (a checkpoint), so corruption is caught on load."""
    files = sorted(f for f in os.listdir(path) if f != "manifest.json" and os.path.isfile(os.path.join(path, f)))
    with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({name: file_sha256(os.path.join(path, name)) for name in files}, f, indent=1)


def verify_manifest(path: str):
    """Check every file named in ``manifest.json`` (if the dir has one) against its sha256."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest):
        return
    with open(manifest, encoding="utf-8") as f:
        sums = json.load(f)
    for name, digest in sums.items():
        file = os.path.join(path, os.path.basename(name))
        if not os.path.isfile(file) or file_sha256(file) != digest:
            raise ValueError(f"{file} is missing or does not match the checkpoint's manifest.json: "
                             "corrupted or edited")


LATEST = re.compile(r"ckpt-\d+")


def resolve_adapter_dir(path: str) -> str:
    """An adapter/checkpoint dir, a train.py run dir, or its ``latest`` file -> the adapter dir."""
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        path = os.path.dirname(path) or "."
    named = os.path.join(path, "latest")
    if not os.path.exists(os.path.join(path, "adapter_config.json")) and os.path.isfile(named):
        with open(named, encoding="utf-8") as f:
            name = f.read().strip()
        if not LATEST.fullmatch(name):  # why: a hand-edited latest must not point outside the run dir
            raise ValueError(f"{path}/latest names {name[:40]!r}, not a ckpt-NNNNNN checkpoint of this run")
        path = os.path.join(path, name)
    return path


def load_adapter(model: nn.Module, path: str) -> dict:
    """Add (if needed) and fill the adapters saved by ``save_adapter``; returns any extra tensors saved with them.

    ``path``: an adapter dir, a train.py checkpoint, a run dir or its ``latest`` file (the newest checkpoint)."""
    path = resolve_adapter_dir(path)
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: an adapter dir holds adapter_config.json + "
                                "adapter.safetensors")
    verify_manifest(path)
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    missing = [k for k in ("base_config_hash", *(f.name for f in fields(LoRAMoEConfig))) if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_file} is not a SparseDoctor adapter config: missing {missing}")
    if cfg["base_config_hash"] != base_config_hash(model):
        theirs, ours = cfg.get("base_config", {}), asdict(model.cfg)
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        raise ValueError(f"adapter {path} was trained on a different base model: "
                         f"(adapter's, this base's) = {diff}")
    saved = LoRAMoEConfig(**{f.name: cfg[f.name] for f in fields(LoRAMoEConfig)})
    if not sites(model):
        add_lora_moe(model, saved, verbose=False)
    elif model.lora_moe_config != saved:
        present = asdict(model.lora_moe_config)
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

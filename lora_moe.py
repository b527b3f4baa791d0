"""LoRA-MoE: LoRA experts with a token router inside each frozen projection.

    y = base(x) + (alpha / r) * sum_{e in top-k(x)} g_e(x) * B_e A_e dropout(x)

Router: a bias-free linear to E logits, in fp32; gates = softmax over all E experts, keep the top-k and
renormalize them to sum to 1 (so top_k = E is dense routing with the full softmax, and E = 1 is plain LoRA).
Experts are stored pre-stacked, A as (E*r, in) and B as (out, E*r), and computed *densely masked*: one
matmul into every expert's rank space, each r-block scaled by its gate (0 where not chosen), one matmul
out. No Python loop over experts, no host sync, every parameter in the graph (DDP needs no
``find_unused_parameters``).

The model knows nothing of this file: ``add_lora_moe`` swaps ``nn.Linear`` modules from the outside.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAMoELinear(nn.Module):
    def __init__(self, base: nn.Linear, num_experts: int = 8, rank: int = 8, alpha: float = 16.0, top_k: int = 2,
                 dropout: float = 0.05):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.base = base.requires_grad_(False)
        self.E, self.r, self.top_k, self.alpha = num_experts, rank, top_k, alpha
        self.scaling = alpha / rank
        dev = base.weight.device
        # adapters live in fp32 whatever the base dtype (bf16 base on GPU): their updates are tiny
        self.router = nn.Linear(base.in_features, num_experts, bias=False, device=dev, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, num_experts * rank, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()
        # What the losses need, for the current step only (overwritten by every forward):
        self.record_u = False   # set by the contrastive loss: keep per-expert low-rank activations A_e x
        self.token_mask = None  # (B, T) bool of valid tokens, set by the caller via set_token_mask
        self.logits = self.probs = self.topk_idx = self.u = None

    def reset_parameters(self):
        with torch.no_grad():
            for e in range(self.E):  # kaiming-uniform per expert block, exactly as peft inits lora_A
                nn.init.kaiming_uniform_(self.lora_A[e * self.r:(e + 1) * self.r], a=math.sqrt(5))
            self.lora_B.zero_()  # B = 0: the adapted model equals the base at init
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def route(self, x):
        """x (..., in) -> logits, full-softmax probs (..., E) in fp32; top-k indices (..., k); gates (..., E)."""
        logits = F.linear(x.float(), self.router.weight)
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        # why renormalize: with top-k < E the kept gates then sum to 1, so scale does not depend on k or E
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        return logits, probs, top_i, gates

    def forward(self, x):
        y = self.base(x)
        xf = x.to(self.lora_A.dtype)  # why one cast: router and experts share it, so autograd keeps one fp32 copy
        logits, probs, top_i, gates = self.route(xf)
        h = F.linear(self.dropout(xf), self.lora_A)  # (..., E*r): every expert's A_e x
        lead = h.shape[:-1]
        u = h.view(*lead, self.E, self.r)  # (..., E, r)
        self.logits, self.probs, self.topk_idx = logits, probs, top_i
        self.u = u if self.record_u else None
        h = (u * gates.to(u.dtype).unsqueeze(-1)).reshape(*lead, self.E * self.r)  # unchosen experts -> 0
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def extra_repr(self):
        return f"experts={self.E}, rank={self.r}, top_k={self.top_k}, alpha={self.alpha}"


def reference_forward(layer: LoRAMoELinear, x):
    """A slow, obviously-correct per-expert loop over routed tokens, for tests and the benchmark's baseline."""
    y = layer.base(x)
    _, _, top_i, gates = layer.route(x)
    xf = layer.dropout(x).to(layer.lora_A.dtype).reshape(-1, x.shape[-1])
    g = gates.reshape(-1, layer.E)
    out = torch.zeros(xf.shape[0], layer.base.out_features, dtype=xf.dtype, device=xf.device)
    for e in range(layer.E):
        rows = (top_i.reshape(-1, layer.top_k) == e).any(-1).nonzero().squeeze(-1)
        A = layer.lora_A[e * layer.r:(e + 1) * layer.r]
        B = layer.lora_B[:, e * layer.r:(e + 1) * layer.r]
        out = out.index_add(0, rows, (xf[rows] @ A.T @ B.T) * g[rows, e:e + 1])
    return y + (out * layer.scaling).reshape(*x.shape[:-1], -1).to(y.dtype)


# ----------------------------------------------------------------------------------------------------------
# Putting adapters into a model


def sites(model: nn.Module) -> list[tuple[str, LoRAMoELinear]]:
    """Every adapted projection, in model order: [(name, module)]."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def add_lora_moe(model: nn.Module, targets=TARGETS, num_experts: int = 8, rank: int = 8, alpha: float = 16.0,
                 top_k: int = 2, dropout: float = 0.05, verbose: bool = True) -> nn.Module:
    """Swap every ``nn.Linear`` whose name ends in one of ``targets`` for a LoRAMoELinear; freeze the rest."""
    model.requires_grad_(False)
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not swaps:
        raise ValueError(f"no nn.Linear named like {targets} in the model")
    for name, lin in swaps:
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, LoRAMoELinear(lin, num_experts, rank, alpha, top_k, dropout))
    model.lora_moe_config = dict(num_experts=num_experts, rank=rank, alpha=alpha, top_k=top_k, dropout=dropout,
                                 targets=list(targets))
    if verbose:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA-MoE on {len(swaps)} projections (E={num_experts}, r={rank}, top-{top_k}): "
              f"{total / 1e6:.2f}M parameters, {train / 1e6:.3f}M trainable ({100 * train / total:.3f}%)")
    return model


def set_token_mask(model: nn.Module, mask):
    """Tell every site which tokens are real (B, T) bool, so padding never enters the routing losses."""
    for _, m in sites(model):
        m.token_mask = mask


def set_record_u(model: nn.Module, on: bool):
    for _, m in sites(model):
        m.record_u = on


def _valid(m: LoRAMoELinear):
    """Flatten a site's records to valid tokens: probs (N, E), topk_idx (N, k), logits (N, E)."""
    E, k = m.E, m.top_k
    probs, idx, logits = m.probs.reshape(-1, E), m.topk_idx.reshape(-1, k), m.logits.reshape(-1, E)
    if m.token_mask is not None:
        keep = m.token_mask.reshape(-1).to(probs.device)
        probs, idx, logits = probs[keep], idx[keep], logits[keep]
    return probs, idx, logits


def balance_loss(model: nn.Module, z_loss_weight: float = 0.0, sync: bool = False):
    """Switch-style load balancing E * sum_e f_e * P_e per site, averaged over sites.

    f_e = share of the top-k slots given to expert e (no gradient), P_e = mean full-softmax probability of e
    (gradient into the router), both over valid tokens only. Equals 1.0 under uniform routing and E under
    full collapse with top-1. ``sync=True`` all-reduces the slot counts over ranks (global-batch balancing,
    as the Qwen MoE work recommends). ``z_loss_weight`` adds the router z-loss mean(logsumexp(logits)^2).
    """
    losses = []
    for _, m in sites(model):
        probs, idx, logits = _valid(m)
        counts = torch.zeros(m.E, device=probs.device).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device))
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        f = counts / counts.sum().clamp(min=1)
        P = probs.mean(0) if probs.shape[0] else probs.sum(0)
        loss = m.E * (f * P).sum()
        if z_loss_weight:
            loss = loss + z_loss_weight * (logits.logsumexp(-1) ** 2).mean()
        losses.append(loss)
    return torch.stack(losses).mean()


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict:
    """Per site: expert load shares (top-k slots), their entropy, and the mean per-token router entropy (nats)."""
    out = {}
    for name, m in sites(model):
        if m.probs is None:
            continue
        probs, idx, _ = _valid(m)
        load = torch.bincount(idx.reshape(-1), minlength=m.E).float()
        load = load / load.sum().clamp(min=1)
        ent = -(load * load.clamp(min=1e-12).log()).sum()
        tok_ent = -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean() if probs.shape[0] else torch.tensor(0.0)
        out[name] = {"load": [round(v, 4) for v in load.tolist()], "load_entropy": round(ent.item(), 4),
                     "token_entropy": round(tok_ent.item(), 4)}
    return out


# ----------------------------------------------------------------------------------------------------------
# Saving and loading only the adapters


def base_config_hash(model) -> str:
    return hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode()).hexdigest()[:16]


def adapter_state(model: nn.Module) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str, tensors: dict | None = None):
    """Trainable tensors as ``adapter.safetensors`` + ``adapter_config.json`` (E, r, alpha, top_k, targets, base hash).

    ``tensors`` replaces the model's own trainable tensors (train.py passes them gathered from FSDP shards,
    plus the contrastive heads and queues)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {n: t.contiguous().cpu() for n, t in (adapter_state(model) if tensors is None else tensors).items()}
    save_file(state, os.path.join(path, "adapter.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({**model.lora_moe_config, "base_config_hash": base_config_hash(model),
                   "base_config": asdict(model.cfg)}, f, indent=2)


def resolve_adapter_dir(path: str) -> str:
    """An adapter/checkpoint dir, a train.py run dir, or its ``latest`` file -> the adapter dir."""
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        path = os.path.dirname(path) or "."
    if not os.path.exists(os.path.join(path, "adapter_config.json")) and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    return path


def load_adapter(model: nn.Module, path: str) -> dict:
    """Add (if needed) and fill the adapters saved by ``save_adapter``; returns any extra tensors saved with them.

    ``path``: an adapter dir, a train.py checkpoint, a run dir or its ``latest`` file (the newest checkpoint)."""
    from safetensors.torch import load_file

    path = resolve_adapter_dir(path)
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: an adapter dir holds adapter_config.json + adapter.safetensors")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg["base_config_hash"] != base_config_hash(model):
        theirs, ours = cfg.get("base_config", {}), asdict(model.cfg)
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        raise ValueError(f"adapter {path} was trained on a different base model: (adapter's, this base's) = {diff}")
    keys = ("num_experts", "rank", "alpha", "top_k", "dropout", "targets")
    if not sites(model):
        add_lora_moe(model, **{k: cfg[k] for k in keys}, verbose=False)
    elif any(model.lora_moe_config[k] != cfg[k] for k in keys):
        diff = {k: (cfg[k], model.lora_moe_config[k]) for k in keys if model.lora_moe_config[k] != cfg[k]}
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
                raise ValueError(f"adapter tensor {n}: saved {tuple(state[n].shape)}, model {tuple(params[n].shape)}")
            params[n].copy_(state[n])
    return {k: v for k, v in state.items() if k not in want}

"""LoRA-MoE: LoRA experts with a router inside each frozen projection, choosing the top-k experts per token.

    y = base(x) + (alpha / r) * sum_{e in top-k(x)} g_e(x) * B_e A_e dropout(x)

Router: a bias-free linear to E logits (plus a context term, below), in fp32; gates = softmax over all E
experts, keep the top-k and renormalize them to sum to 1 (so top_k = E is dense routing with the full
softmax). E = 1 is plain LoRA: no router at all (its one gate is always 1). Experts are stored pre-stacked,
A as (E*r, in) and B as (out, E*r), and computed *densely masked*: one matmul into every expert's rank space,
each r-block scaled by its gate (0 where not chosen), one matmul out. No Python loop over experts, no host
sync, every parameter in the graph (DDP needs no ``find_unused_parameters=True``).

A *site* is one adapted projection (``model.layers.3.mlp.up_proj``). What the routers did is collected, only
when asked, by ``record_routing``: ``with record_routing(model) as records: model(ids)`` leaves one
``RouterRecord`` per site in ``records``; ``stack_records`` makes them one record with a leading site dim, so a
loss over all sites is a few batched tensor ops, not a Python loop over 252 sites. Every routing loss weighs
tokens by a (B, T) weight (1 real, 0 padding): static shapes, no boolean indexing, no host sync. The
load-balancing loss (``balance_loss``), per site, averaged over sites:

    L_bal = E * sum_e f_e * P_e      f_e: share of top-k slots given to expert e, P_e: mean router probability

*Context routers* (the default; ``--router token`` is the paper's token router, logits W x_t): logits
W x_t + W_c m_t, m_t the mean of the site's inputs over the tokens t sees (itself and the real tokens before
it; W_c = 0 at init, so the router starts as a token router). why: at a token whose own input does not say what
the sequence is about (an answer letter at layer 0), m_t still does (docs/results.md, token vs context routers).
W_c is linear, so a site averages c_i = W_c x_i, E numbers a token. A forward of whole sequences from their
first token, padded on the right (training), needs nothing: m is a running mean. Any other forward (left
padding, KV-cache decoding, scoring's candidate trees) runs inside ``read_in_context`` with a
``SequenceContext`` (both in ``router_context.py``): each row's sum of c over what it read before, which is to the
routers what the KV cache is to attention.

The model knows nothing of this file: ``add_lora_moe`` swaps ``nn.Linear`` modules from the outside.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import num_params
from parallel import all_reduce_

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTERS = ("context", "token")  # what a router reads: x_t and the mean of x over the sequence so far, or x_t
ADAPTER_FLOOR = 1 << 24  # adapters up to this many parameters are allowed whatever the base (add_lora_moe)


def check_targets(names) -> tuple:
    """Projection names to adapt, each one of TARGETS (a typo must not silently adapt less)."""
    names = tuple(names)
    unknown = [n for n in names if not isinstance(n, str) or n not in TARGETS]
    if unknown or not names:
        raise ValueError(f"targets {unknown or '(none)'} not projection names; valid: {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)  # in model order: the same set is the same config


@dataclass
class LoRAMoEConfig:
    """The adapters' shape: the one place their defaults live (train.py's flags and adapter_config.json)."""
    num_experts: int = 8      # E; 1 = plain LoRA
    rank: int = 8             # r, per expert
    alpha: float = 16.0       # output scaled by alpha / r
    top_k: int = 2            # experts per token
    dropout: float = 0.05     # on the adapters' input
    targets: tuple = TARGETS  # projection names to adapt
    router: str | None = None  # one of ROUTERS; None: "context" where there is a router (E > 1), else "token"

    def __post_init__(self):
        self.targets = check_targets(self.targets)
        for name in ("num_experts", "rank", "top_k"):  # why here: a loaded adapter_config.json is checked too
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 4096:
                raise ValueError(f"{name}={v!r} must be an integer in [1, 4096]")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha={self.alpha!r} must be a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.router is None:  # why not a fixed default: plain LoRA has no router to give a context
            self.router = "context" if self.num_experts > 1 else "token"
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r}: valid: {', '.join(ROUTERS)}")
        if self.router == "context" and self.num_experts == 1:
            raise ValueError("router='context' needs num_experts > 1: plain LoRA has no router")


@dataclass
class RouterRecord:
    """What one site's routers did in one forward, over its (B, T) tokens (with a leading site dim (S, ...)
    once stacked by ``stack_records``):

    logits (..., E) router logits, fp32          probs (..., E) full softmax p
    topk_idx (..., k) chosen experts (top-1 first) gates (..., E) renormalized top-k gates g (0 = not chosen)
    """
    logits: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor
    gates: torch.Tensor


def route(logits, top_k: int) -> RouterRecord:
    """Router logits (..., E) -> every token's routing: logits, full-softmax probs, top-k, gates (fp32)."""
    logits = logits if logits.dtype == torch.float32 else logits.float()
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    # why renormalize: with top-k < E the kept gates then sum to 1, so scale does not depend on k or E.
    # why from probs (not the fewer ops of a softmax over the top-k logits): the gates must depend on probs, or a
    # compiled layer recomputed under gradient checkpointing, where nothing records probs, saves fewer tensors
    gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    return RouterRecord(logits, probs, top_i, gates)


class LoRAMoELinear(nn.Module):
    """A frozen ``nn.Linear`` plus E LoRA experts and a router (the equation at the top of this file).

    ``forward`` returns the output only. Inside ``record_routing(model)`` it also hands its ``RouterRecord``
    to the recorder (``self.recording``, set and cleared by that context manager, never by anything else).
    """

    def __init__(self, base: nn.Linear, cfg: LoRAMoEConfig | None = None):
        super().__init__()
        cfg = cfg or LoRAMoEConfig()
        self.base = base.requires_grad_(False)
        self.E, self.r, self.top_k, self.alpha = cfg.num_experts, cfg.rank, cfg.top_k, cfg.alpha
        self.scaling = cfg.alpha / cfg.rank
        dev = base.weight.device
        # adapters live in fp32 whatever the base dtype (bf16 base on GPU): their updates are tiny
        self.router = (nn.Linear(base.in_features, self.E, bias=False, device=dev, dtype=torch.float32)
                       if self.E > 1 else None)  # why none for E = 1: its gate is 1 whatever it learns
        # W_c of a context router (0 at init); why a bare tensor: an nn.Linear would draw an init from the RNG
        self.router_ctx = (nn.Parameter(torch.zeros(self.E, base.in_features, device=dev))
                           if cfg.router == "context" and self.E > 1 else None)
        self.lora_A = nn.Parameter(torch.empty(self.E * self.r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.E * self.r, device=dev))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.reset_parameters()
        self.recording = None  # (records dict, this site's index): see record_routing
        self.context = None  # (SequenceContext, site index, weight, tree, written dict): router_context.py

    def reset_parameters(self):
        with torch.no_grad():
            for e in range(self.E):  # kaiming-uniform per expert block, exactly as peft inits lora_A
                nn.init.kaiming_uniform_(self.lora_A[e * self.r:(e + 1) * self.r], a=math.sqrt(5))
            self.lora_B.zero_()  # B = 0: the adapted model equals the base at init
            if self.router is not None:
                nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def forward(self, x):
        y = self.base(x)
        # why one cast: router and experts share it, so autograd keeps one fp32 copy; why the test: each op counts,
        # a no-op cast too, 252 times a forward at Qwen3-4B's depth (bench/host_ops.py)
        xf = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        h = F.linear(self.dropout(xf), self.lora_A)  # (..., E*r): every expert's A_e x
        if self.router is not None:
            if self.router_ctx is not None and type(self.router) is nn.Linear:  # the default: one matmul, 2E outputs
                tok, c = F.linear(xf, torch.cat([self.router.weight, self.router_ctx])).split(self.E, dim=-1)
                logits = tok + self.context_mean(c)  # why split, not two slices: its backward is one cat
            else:  # why a module call: a control (bench/) can give its own router
                logits = self.router(xf)
                if self.router_ctx is not None:
                    logits = logits + self.context_mean(F.linear(xf, self.router_ctx))
            rec = route(logits, self.top_k)
            if self.recording is not None:
                records, i = self.recording
                records[i] = rec
            lead = h.shape[:-1]
            u = h.view(*lead, self.E, self.r)  # (..., E*r) -> (..., E, r)
            h = (u * rec.gates.unsqueeze(-1)).view(*lead, self.E * self.r)  # unchosen -> 0 (gates: fp32, as u)
        out = F.linear(h, self.lora_B) * self.scaling
        return y + (out if out.dtype == y.dtype else out.to(y.dtype))

    def context_mean(self, c):
        """c (B, T, E), c_t = W_c x_t -> (B, T, E) the mean of c over the real tokens each token sees."""
        if self.context is None:  # whole sequences from their first token, any padding after the real tokens
            n = torch.arange(1, c.shape[-2] + 1, device=c.device, dtype=c.dtype)[:, None]  # (T, 1) tokens so far
            return c.cumsum(-2) / n
        ctx, i, weight, tree, written = self.context
        w = torch.ones_like(c[..., :1]) if weight is None else weight[..., None].to(c.dtype)  # (B, T, 1)
        if tree is None:  # causal: what came before in ctx, then this forward's real tokens up to t
            s, n = ctx.sums[i][:, None] + (c * w).cumsum(1), ctx.count[:, None] + w.cumsum(1)
            written[i] = (s[:, -1], n[:, -1])
        else:
            seen = tree.to(c.dtype) * w.transpose(1, 2)  # (B, T, T): query t sees key j, and j is real
            s, n = ctx.sums[i][:, None] + seen @ c, ctx.count[:, None] + seen.sum(-1, keepdim=True)
        # why clamp: a padding query sees nothing, and its 0/0 = NaN would reach attention, where NaN * 0 = NaN
        return s / n.clamp(min=1)

    def extra_repr(self):
        return f"experts={self.E}, rank={self.r}, top_k={self.top_k}, alpha={self.alpha}"


# ----------------------------------------------------------------------------------------------------------
# Putting adapters into a model; collecting what the routers did


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
    # why before any allocation: an adapter config inside every range (4096 experts of rank 4096) can still ask
    # for more memory than the machine has; adapters larger than the frozen base are never what a fine-tune means.
    # ADAPTER_FLOOR keeps tiny test bases usable (2^24 fp32 numbers: 64 MB, harmless to allocate)
    routers = (cfg.num_experts > 1) * (1 + (cfg.router == "context"))
    size = sum(cfg.num_experts * (cfg.rank * (m.in_features + m.out_features) + routers * m.in_features)
               for _, m in swaps)
    base = num_params(model)
    if size > max(base, ADAPTER_FLOOR):
        raise ValueError(f"adapters of {cfg.num_experts} experts of rank {cfg.rank} would hold {size:,} parameters, "
                         f"more than the base model's {base:,}: give a smaller --num-experts or --rank")
    for name, lin in swaps:
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, LoRAMoELinear(lin, cfg))
    if verbose:
        total = num_params(model)
        train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA-MoE on {len(swaps)} projections (E={cfg.num_experts}, r={cfg.rank}, top-{cfg.top_k}): "
              f"{total / 1e6:.2f}M parameters, {train / 1e6:.3f}M trainable ({100 * train / total:.3f}%)")
    return model


@contextlib.contextmanager
def record_routing(model: nn.Module):
    """``with record_routing(model) as records: model(ids)``: once the block exits, ``records`` holds one
    ``RouterRecord`` per site, in model order, of the last forward inside the block (None for a site that did
    not run; plain-LoRA sites record nothing).

    why a context and not a module attribute: what the losses read is then visible where they are called, and
    nothing is left behind (a gradient-checkpointing recompute in backward runs after the block: no record).
    why the sites write into a dict: torch.compile (``--compile``) traces a dict store, while a store into a
    list item would break the compiled layer's graph at every site."""
    found = [m for _, m in sites(model)]
    written, records = {}, [None] * len(found)
    for i, m in enumerate(found):
        m.recording = (written, i)
    try:
        yield records
    finally:
        for m in found:
            m.recording = None
        for i, rec in written.items():
            records[i] = rec


def stack_records(records: list[RouterRecord]) -> RouterRecord:
    """One record per site -> one record with a leading site dim: (B, T, ...) x S -> (S, B, T, ...)."""
    if not records or any(r is None for r in records):
        raise RuntimeError("a site has no router record: run the model's forward inside record_routing first")
    return RouterRecord(torch.stack([r.logits for r in records]), torch.stack([r.probs for r in records]),
                        torch.stack([r.topk_idx for r in records]), torch.stack([r.gates for r in records]))


def token_weight(mask, like: torch.Tensor) -> torch.Tensor:
    """(B, T) bool real-token mask (None: every token real) -> (B, T) float weights on ``like``'s device.

    why weights and not ``x[mask]``: boolean indexing has a data-dependent shape, so on a GPU the host waits
    for it; a weight keeps every shape static and padding out of every sum."""
    if mask is None:
        return torch.ones(like.shape[1:3], dtype=torch.float32, device=like.device)
    return mask.to(device=like.device, dtype=torch.float32)


def expert_load(rec: RouterRecord, weight) -> torch.Tensor:
    """(S, E) top-k slots given to each expert, over the weighted tokens of a stacked record."""
    S, k, E = rec.topk_idx.shape[0], rec.topk_idx.shape[-1], rec.probs.shape[-1]
    idx = rec.topk_idx.reshape(S, -1)  # (S, B, T, k) -> (S, B*T*k)
    w = weight.reshape(1, -1, 1).expand(S, -1, k).reshape(S, -1)  # each token's weight on its k slots
    return torch.zeros(S, E, device=w.device).scatter_add_(1, idx, w)


def balance_loss(rec: RouterRecord, weight, sync: bool = False) -> torch.Tensor:
    """Switch-style load balancing E * sum_e f_e * P_e per site, averaged over sites.

    ``rec``: a stacked record (S, B, T, ...); ``weight`` (B, T): 1 real token, 0 padding. f_e = share of the
    top-k slots given to expert e (no gradient), P_e = mean full-softmax probability of e (gradient into the
    router), both over the real tokens. Equals 1.0 under uniform routing and E under full collapse with top-1.
    ``sync=True`` sums the slot counts over ranks (global-batch balancing, as the Qwen MoE work recommends)."""
    S, E = rec.probs.shape[0], rec.probs.shape[-1]
    counts = expert_load(rec, weight)  # (S, E)
    if sync:
        all_reduce_(counts)
    f = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    w = weight.reshape(1, -1, 1)  # (1, B*T, 1)
    P = (rec.probs.reshape(S, -1, E) * w).sum(1) / w.sum().clamp(min=1)  # (S, E) mean router probability
    return (E * (f * P).sum(-1)).mean()


def z_loss(rec: RouterRecord, weight) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over real tokens of logsumexp(logits)^2, averaged over sites. It keeps the
    router logits small (numerics in bf16); a term of its own, weighted by ``--z-loss``."""
    S = rec.logits.shape[0]
    lse2 = rec.logits.logsumexp(-1).reshape(S, -1) ** 2  # (S, B*T)
    w = weight.reshape(1, -1)
    return ((lse2 * w).sum(1) / w.sum().clamp(min=1)).mean()

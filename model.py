"""Qwen3 decoder in plain PyTorch, loaded straight from a Hugging Face checkpoint directory.

Module names equal the checkpoint keys (``model.layers.0.self_attn.q_proj.weight`` ...), so loading is one
strict ``load_state_dict`` with no rename table. The model knows nothing about adapters: ``lora_moe.py``
swaps its ``nn.Linear`` projections from the outside.

Numerics follow Hugging Face's ``Qwen3ForCausalLM`` (RMSNorm in fp32 and cast back before the weight
multiply, RoPE tables in fp32 cast to the activation dtype, split-half rotation), so logits agree to float
noise; ``tests/test_model.py`` checks that against ``transformers`` itself.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Config


SIZE_BOUNDS = {"vocab_size": 1 << 20, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
               "max_position_embeddings": 1 << 24}


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    def __post_init__(self):
        """Every size an integer in its range and every float finite and positive, before anything is allocated.
        why the upper bounds: a typo'd or hostile config.json (hidden_size 10**12) must end in one line, not in
        an allocation that takes the machine down; they are several times the largest Qwen3's."""
        for name, hi in SIZE_BOUNDS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise ValueError(f"config.json: {name}={v!r} must be an integer in [1, {hi}]")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                raise ValueError(f"config.json: {name}={v!r} must be a finite number > 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        """Read a HF ``config.json`` dict; refuse any setting this implementation does not implement."""
        problems = []
        if d.get("model_type", "qwen3") != "qwen3":
            problems.append(f"model_type={d.get('model_type')!r} (only 'qwen3' is implemented)")
        if d.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
        # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters={rope_type, rope_theta}.
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_parameters.rope_type={rope['rope_type']!r} (only plain RoPE)")
        if d.get("rope_scaling"):
            problems.append(f"rope_scaling={d['rope_scaling']!r} (only plain RoPE, no YaRN/linear/dynamic)")
        if d.get("use_sliding_window"):
            problems.append("use_sliding_window=true (only full attention)")
        layer_types = d.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            problems.append(f"layer_types={sorted(set(layer_types))} (only 'full_attention')")
        if d.get("attention_dropout", 0.0):
            problems.append(f"attention_dropout={d['attention_dropout']} (the base is frozen: must be 0)")
        if problems:
            raise ValueError("unsupported Qwen3 config setting(s):\n  " + "\n  ".join(problems))
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "rope_theta"}
        if "head_dim" not in d or d["head_dim"] is None:  # why the check first: 0 heads would divide by zero
            h, n = d.get("hidden_size"), d.get("num_attention_heads")
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, n))
            kw["head_dim"] = h // n if ok else None  # else __post_init__ names the bad field
        number = isinstance(rope_theta, (int, float)) and not isinstance(rope_theta, bool)
        kw["rope_theta"] = float(rope_theta) if number else rope_theta  # else __post_init__ names it
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str) -> "Qwen3Config":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """The config.json a HF checkpoint of this shape carries (transformers 4.x spelling, read by 5.x too)."""
        d = asdict(self)
        d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu", rope_scaling=None,
                 use_sliding_window=False, sliding_window=None, attention_dropout=0.0, torch_dtype="float32",
                 bos_token_id=151643, eos_token_id=151645)
        return d


# ----------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # why: normalize in fp32 and cast back *before* the weight multiply, exactly as HF does; doing the
        # multiply in fp32 instead changes bf16 logits by more than rounding noise.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin tables for split-half RoPE. position_ids (B, T) -> cos, sin (B, 1, T, head_dim)."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (dims / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2), fp32 as HF
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    # x (B, H, T, D); rotate_half(x) = cat(-x2, x1) over the two halves of D
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: "KVCache | None"):
        B, T, _ = x.shape
        # (B, T, H*D) -> (B, T, H, D) -> norm over D -> (B, H, T, D)
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, D), S = past + T
        # GQA without materializing repeated K/V: SDPA broadcasts each kv head over its group of q heads.
        gqa = self.n_kv != self.n_heads
        if mask is None:
            # no padding: plain causal (top-left aligned, correct only when S == T); a single decode step
            # attends to every cached key, so it needs no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        # (B, H, T, D) -> (B, T, H*D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated K/V for all layers: (layers, B, n_kv, max_len, head_dim) each; grows nothing while decoding."""

    def __init__(self, cfg: Qwen3Config, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0  # tokens already written, same for every layer once a forward has finished

    def update(self, layer: int, k, v):
        T = k.shape[2]
        if self.pos + T > self.k.shape[3]:
            raise ValueError(f"KV cache full: {self.pos} + {T} > max_len {self.k.shape[3]}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def repeat(self, batch: int, max_len: int) -> "KVCache":
        """A new cache of ``batch`` rows that each start with this (1-row) cache's contents: a shared prefix."""
        new = KVCache.__new__(KVCache)
        L, _, H, _, D = self.k.shape
        new.k = self.k.new_zeros(L, batch, H, max_len, D)
        new.v = self.v.new_zeros(L, batch, H, max_len, D)
        new.k[:, :, :, :self.pos] = self.k[:, :1, :, :self.pos]
        new.v[:, :, :, :self.pos] = self.v[:, :1, :, :self.pos]
        new.pos = self.pos
        return new


# ----------------------------------------------------------------------------------------------------------
# The model


class Qwen3Model(nn.Module):
    """Embeddings + decoder layers + final norm; returns hidden states (B, T, hidden)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                attn_mask=None):
        """``attention_mask`` (B, past + T): 1 = real token, 0 = left padding, as in HF. ``attn_mask``
        (B, T, past + T) bool, with ``position_ids``: exactly which keys each query sees (tree-shaped
        continuations, eval.py's shared-prefix scoring); it replaces the causal and padding masks."""
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        x = self.embed_tokens(input_ids)
        if attn_mask is not None:
            mask = attn_mask[:, None]  # (B, 1, T, S), broadcast over heads
        elif attention_mask is not None and bool((attention_mask == 0).any()):
            mask, position_ids = self.padding_mask(attention_mask, position_ids, past, T)
        else:
            mask = None
            if T > 1 and past > 0:  # a multi-token chunk after a prefix: causal mask with an offset
                q = past + torch.arange(T, device=x.device)
                mask = (torch.arange(past + T, device=x.device)[None, :] <= q[:, None])[None, None]
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=x.device)).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(x)


    @staticmethod
    def padding_mask(attention_mask, position_ids, past: int, T: int):
        """Left padding: the (B, 1, T, S) causal mask without padding keys, and positions counted from each
        row's first real token, so a padded row equals the same row unpadded."""
        keep, dev = attention_mask.bool(), attention_mask.device
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        S = past + T
        q = past + torch.arange(T, device=dev)
        mask = (torch.arange(S, device=dev)[None, :] <= q[:, None])[None] & keep[:, None, :]  # (B, T, S)
        # why: a padding query sees no key at all and SDPA would return NaN; let it see itself (output unused).
        mask = mask | (torch.arange(S, device=dev)[None, None, :] == q[None, :, None])
        return mask[:, None], position_ids


class Qwen3(nn.Module):
    """Qwen3ForCausalLM: ``model`` (Qwen3Model) + ``lm_head``. Key names match HF checkpoints."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                last_only: bool = False):
        """input_ids (B, T) -> logits (B, T, V); ``last_only`` -> (B, 1, V), all a decoder step needs."""
        h = self.model(input_ids, attention_mask, position_ids, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch, max_len, p.dtype, p.device)


# ----------------------------------------------------------------------------------------------------------
# Loading


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a HF checkpoint dir: sharded (index.json) or single-file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) not in {path}: {missing}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json + shards")


def load_model(path: str, dtype=torch.float32, device="cpu") -> Qwen3:
    """Build a frozen Qwen3 from a HF checkpoint dir (config.json + *.safetensors).

    The module tree is built on the ``meta`` device (no memory), then every tensor is read from the
    safetensors files straight into place (``assign=True``), so a load never holds two copies of the weights.
    """
    from safetensors import safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a checkpoint dir needs config.json and *.safetensors")
    cfg = Qwen3Config.from_json(cfg_path)
    with torch.device("meta"):
        model = Qwen3(cfg)
    state = {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head (HF drops this key when saving)
    expected = set(model.state_dict().keys()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"checkpoint {path} does not match Qwen3 {cfg}:\n  missing keys: {missing}\n"
                       f"  unexpected keys: {unexpected}")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters: re-tie
    model.requires_grad_(False)
    return model.eval()


def resolve_dtype(name: str | None, device) -> torch.dtype:
    """``--dtype`` -> a torch dtype; no name: bfloat16 on CUDA, float32 elsewhere."""
    return getattr(torch, name or ("bfloat16" if torch.device(device).type == "cuda" else "float32"))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

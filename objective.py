"""The hybrid objective, in one place: what one training micro-step minimizes.

    L = L_LM + lambda_bal * L_bal + lambda_cl * L_cl (+ lambda_z * L_z, off by default)

    L_LM  = - (1 / N_sup) * sum_{answer tokens t} log p(x_{t+1} | x_<=t)   (``lm_loss_sum`` / N_sup)
    L_bal = E * sum_e f_e * P_e, mean over sites                           (``lora_moe.balance_loss``)
    L_cl  = InfoNCE of routed vs fused views, mean over sites              (``contrastive.contrastive_loss``)
    L_z   = mean logsumexp(router logits)^2, mean over sites               (``lora_moe.z_loss``)

The routing terms read what the routers did in this forward, collected by ``lora_moe.record_routing`` and
stacked over sites; they are off (weight 0) for plain LoRA (E = 1), which has no router.

N_sup counts the supervised (assistant) tokens of the whole optimizer step: all micro-batches, all ranks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from contrastive import ROUTING_VIEWS, contrastive_loss
from data import answer_mask
from lora_moe import balance_loss, record_routing, stack_records, token_weight, z_loss
from parallel import is_distributed, world_size


class FrozenHeadCE(torch.autograd.Function):
    """Sum of cross-entropy of ``h @ W.T`` against ``y`` for a *frozen* head W, chunk by chunk.

    why: with Qwen3's 151,936-token vocabulary the logits are the largest tensor of a step. Each chunk's
    logits live only inside forward: the gradient w.r.t. h (softmax - onehot) @ W is computed right there and
    kept (N x hidden, small), so backward is one multiply. Two matmuls per chunk, no recompute, and memory
    of one chunk of logits. W gets no gradient: the base is frozen.
    """

    @staticmethod
    def forward(ctx, h, W, y, chunk):
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax in fp32 at least (bf16 base on GPU)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ W.T).to(acc)  # (n, V)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(-1, y[i:i + chunk, None]).squeeze(-1)).sum()
            if grad_h is not None:
                p = (logits - lse[:, None]).exp_()  # softmax, in place over the chunk's logits
                p[torch.arange(p.shape[0], device=p.device), y[i:i + chunk]] -= 1.0
                grad_h[i:i + chunk] = (p.to(W.dtype) @ W).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None


def lm_loss_sum(model, hidden, labels, chunk: int):
    """Sum of next-token cross-entropy over supervised positions; the LM head runs only there, in chunks."""
    h, y = hidden[:, :-1], labels[:, 1:]  # position t predicts token t+1
    sel = answer_mask(labels)
    if model.lm_head.weight.requires_grad:
        raise ValueError("lm_loss_sum expects a frozen LM head (the base model is frozen)")
    return FrozenHeadCE.apply(h[sel], model.lm_head.weight, y[sel], chunk)  # h[sel]: (N, hidden), y[sel]: (N,)


class HybridLoss(nn.Module):
    """The adapted model, the contrastive heads and the weights of the loss terms; ``forward`` returns one
    micro-batch's share of the step's loss L, its parts and (detached) what the routers did.

    why a module: DDP / FSDP wrap *this*, so every parameter use (LM head, routers, experts, heads) happens
    inside the wrapped call: FSDP has the parameters unsharded there, and DDP sees them all in one backward.
    The memory queue and the sampling generator are state that DDP / FSDP must not touch: they are arguments.
    """

    def __init__(self, model, heads, cfg):
        super().__init__()
        self.model, self.heads, self.cfg = model, heads, cfg
        self.weights = cfg.loss_weights()  # {"balance": lambda_bal, "z": z-loss, "contrastive": lambda_cl}

    def forward(self, ids, labels, mask, sup_tokens: float, micro_steps: int, queue=None, generator=None):
        """``sup_tokens``: supervised tokens of the whole step (N_sup); ``micro_steps``: micro-batches per step;
        ``queue``: the expert memory queue (None: off), read by the contrastive term; ``generator``: its token
        sampling.

        Returns (loss to backpropagate, {"lm", "balance", "z", "contrastive"}: this rank's detached parts, each
        already divided so that summing over micro-steps and averaging over ranks gives the step's value, None
        for a term that is off; routing: (topk_idx, probs) stacked over sites, detached, or None for plain LoRA;
        the queue entries this micro-step adds (keys, labels) or None: train.py writes them after the step)."""
        c, lam = self.cfg, self.weights
        routed = any(lam.values())  # plain LoRA (E = 1) has no router: nothing is recorded
        with record_routing(self.model, expert_acts=lam["contrastive"] > 0 and c.cl_views not in ROUTING_VIEWS) as recs:
            hidden = self.model.model(ids)  # (B, T, hidden); right padding needs no attention mask
        world = world_size()
        # LM: a sum over this micro-batch / N_sup of the whole step = this micro-batch's share of the global
        # token mean. DDP and FSDP *average* gradients over ranks, hence * world. why not a per-batch mean:
        # then 2 ranks x B would differ from 1 rank x 2B, and short answers would weigh more than long ones.
        lm = lm_loss_sum(self.model, hidden, labels, c.ce_chunk) / sup_tokens * world
        loss, parts = lm, {"lm": lm.detach() / world, "balance": None, "z": None, "contrastive": None}
        if not routed:
            return loss, parts, None, None
        rec = stack_records(recs)  # (S, B, T, ...): every site at once
        weight = token_weight(mask, rec.probs)  # (B, T): 1 real token, 0 padding
        # the routing terms: per-rank means, then averaged over ranks and micro-steps. why it is exact only with
        # equal token counts per rank: a mean of means weighs every rank alike (tests use equal lengths)
        # why balance syncs and contrastive does not: f_e counts the tokens of all ranks (global-batch balancing),
        # while the contrastive negatives are the micro-batch's own sequences (docs/design.md, "batch splits")
        entries = None
        if lam["balance"] > 0:
            parts["balance"] = balance_loss(rec, weight, sync=is_distributed()) / micro_steps
        if lam["z"] > 0:
            parts["z"] = z_loss(rec, weight) / micro_steps
        if lam["contrastive"] > 0:
            cl, entries = contrastive_loss(rec, weight, c.cl_views, self.heads, queue, c.tokens_per_site,
                                           temperature=c.temperature, debias=c.cl_debias, generator=generator)
            parts["contrastive"] = cl / micro_steps
        for name in ("balance", "z", "contrastive"):
            if parts[name] is not None:
                loss, parts[name] = loss + lam[name] * parts[name], parts[name].detach()
        return loss, parts, (rec.topk_idx.detach(), rec.probs.detach()), entries

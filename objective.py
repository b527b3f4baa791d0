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

from dataclasses import dataclass

import torch
import torch.nn as nn

from contrastive import FusedViews, contrastive_loss
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


TERMS = ("lm", "balance", "z", "contrastive")  # the order of ``MicroStep.parts``


@dataclass
class MicroStep:
    """What one micro-batch's forward gives the training step.

    loss     this micro-batch's share of the step's L, to backpropagate (x world: DDP / FSDP average gradients)
    parts    (4,) float64, detached, in TERMS order: each term's share of the step's global value, so that summed
             over micro-steps and ranks it *is* the step's value (``step_losses``); 0 for a term that is off
    routing  (topk_idx, probs) stacked over sites, detached, for the routing statistics; None for plain LoRA
    fused    the micro-batch's fused views, for the expert memory queue; None when the contrastive term is off
    """
    loss: torch.Tensor
    parts: torch.Tensor
    routing: tuple | None
    fused: FusedViews | None


def step_losses(parts: list[float], weights: dict) -> dict:
    """The step's values from ``MicroStep.parts`` summed over micro-steps and ranks: the total L and each term
    (None for a term that is off; the z-loss, off by default, only when it is on)."""
    values = dict(zip(TERMS, parts))
    out = {"loss": values["lm"] + sum(weights[k] * values[k] for k in TERMS[1:]), "lm": values["lm"]}
    out.update({k: values[k] if weights[k] > 0 else None for k in ("balance", "contrastive")})
    return {**out, "z": values["z"]} if weights["z"] > 0 else out


class HybridLoss(nn.Module):
    """The adapted model and the weights of the loss terms; ``forward`` returns one micro-batch's ``MicroStep``.

    why a module: DDP / FSDP wrap *this*, so every parameter use (LM head, routers, experts) happens inside the
    wrapped call: FSDP has the parameters unsharded there, and DDP sees them all in one backward. The queue's
    negatives and the sampling generator are state that DDP / FSDP must not touch: they are arguments.
    A control arm subclasses it (bench/ablation_task.py) and is passed as ``train(cfg, objective=...)``.
    """

    ce_chunk = 2048  # answer positions per LM-head chunk: the memory of the logits, not the result
    tokens_per_site = 256  # anchor tokens sampled per site for L_cl (its cost is O(tokens * batch) per site)

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.weights = cfg.loss_weights()  # {"balance": lambda_bal, "z": lambda_z, "contrastive": lambda_cl}

    def forward(self, ids, labels, mask, sup_tokens: float, micro_steps: int, negatives=None,
                generator=None) -> MicroStep:
        """``sup_tokens``: supervised tokens of the whole step (N_sup); ``micro_steps``: micro-batches per step;
        ``negatives``: the expert memory queue's (None: off); ``generator``: the contrastive token sampling's."""
        c, lam = self.cfg, self.weights
        world = world_size()
        with record_routing(self.model) as recs:
            hidden = self.model.model(ids)  # (B, T, hidden); right padding needs no attention mask
        # LM: a sum over this micro-batch / N_sup of the whole step = this micro-batch's share of the global
        # token mean. DDP and FSDP *average* gradients over ranks, hence * world. why not a per-batch mean:
        # then 2 ranks x B would differ from 1 rank x 2B, and short answers would weigh more than long ones.
        lm = lm_loss_sum(self.model, hidden, labels, self.ce_chunk) / sup_tokens * world
        terms = {"lm": lm.detach() / world}
        if not any(lam.values()):  # plain LoRA (E = 1) has no router: nothing was recorded
            return MicroStep(lm, self.parts(terms, world), None, None)
        rec = stack_records(recs)  # (S, B, T, ...): every site at once
        weight = token_weight(mask, rec.probs)  # (B, T): 1 real token, 0 padding
        # the routing terms: per-rank means over this micro-batch, / micro_steps so that a step sums them.
        # why balance syncs and contrastive does not: f_e counts the tokens of all ranks (global-batch balancing),
        # while the contrastive negatives are the micro-batch's own sequences (docs/design.md, "batch splits")
        fused = None
        if lam["balance"] > 0:
            terms["balance"] = balance_loss(rec, weight, sync=is_distributed()) / micro_steps
        if lam["z"] > 0:
            terms["z"] = z_loss(rec, weight) / micro_steps
        if lam["contrastive"] > 0:
            cl = contrastive_loss(rec, weight, negatives, tokens_per_site=self.tokens_per_site,
                                  temperature=c.temperature, debias=c.cl_debias, generator=generator)
            terms["contrastive"], fused = cl.loss / micro_steps, cl.fused
        loss = lm
        for name in TERMS[1:]:
            if name in terms:
                loss, terms[name] = loss + lam[name] * terms[name], terms[name].detach()
        return MicroStep(loss, self.parts(terms, world), (rec.topk_idx.detach(), rec.probs.detach()), fused)

    @staticmethod
    def parts(terms: dict, world: int) -> torch.Tensor:
        """The detached terms as ``MicroStep.parts``. why / world for the routing terms: each is this rank's mean,
        and the step's value is the mean over ranks (exact with equal token counts per rank; the LM term is a
        share of the global token sum already)."""
        v = torch.stack([terms[k].double() if k in terms else terms["lm"].new_zeros((), dtype=torch.float64)
                         for k in TERMS])
        v[1:] /= world
        return v

"""Why the expert memory queue fails at one sequence per device (issue 37's diagnosis): during training, how
many negatives each contrastive anchor has left after the queue's rule, and how large the contrastive term's
share of the routers' gradient is, at 4 x accumulation 4 against 1 x accumulation 16 (16 sequences a step).

    python bench/queue_diag.py [--steps 100] [--every 10] [--rule mask|none] [--seed 0]

The miniature task of bench/ablation.py, the defaults arm (cl-seq-ctx-db: context routers, tau 0.2, debiased),
a dev sample only (no held-out numbers here). It plugs into train.py through ``train(cfg, objective=...)``:
``Diagnosed`` is HybridLoss plus a forward hook per site that reads the routing record the site just wrote.
Every --every steps, on the step's first micro-batch: per anchor, the in-batch negatives (the other sequences
of the micro-batch) and the queue's entries that the rule keeps; and |d(lambda_cl L_cl)/dW_router| over
|dL/dW_router| (L: the micro-batch's whole loss).
"""
import argparse
import functools
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ablation import run_config  # noqa: E402
from ablation_task import forward_with_records, make_base, make_examples, permutations  # noqa: E402

import contrastive  # noqa: E402
from contrastive import contrastive_loss, fused_views  # noqa: E402

masked_logits_of = contrastive.logits_of
NO_EXPERT = 1 << 30  # a queue label no sequence has: the mask then keeps the entry
from lora_moe import sites, stack_records, token_weight  # noqa: E402
from objective import HybridLoss  # noqa: E402


def adaptive_logits_of(rho, seq, fused, negatives=None, *, temperature: float):
    """contrastive.logits_of with the queue's mask applied only where it leaves at least K/4 negatives."""
    if negatives is not None:
        keys, labels = negatives
        top = fused.phi.argmax(-1).gather(1, seq)  # (S, n) each anchor's own sequence's top expert
        left = ((labels[:, None, :] != top[..., None]) & (labels[:, None, :] >= 0)).sum(-1)  # (S, n)
        few = (left < labels.shape[1] // 4).all(1)  # (S,) why per site: B = 1 here, one own sequence
        labels = torch.where(few[:, None] & (labels >= 0), torch.full_like(labels, NO_EXPERT), labels)
        negatives = (keys, labels)
    return masked_logits_of(rho, seq, fused, negatives, temperature=temperature)


class Diagnosed(HybridLoss):
    """HybridLoss that prints the diagnosis every ``every`` steps; ``unmasked``: the candidate rule, every filled
    queue entry a negative (the debiased loss weighs them)."""

    def __init__(self, model, cfg, every: int, unmasked: bool):
        super().__init__(model, cfg)
        self.every, self.unmasked, self.calls = every, unmasked, 0

    def forward(self, ids, labels, mask, sup_tokens, micro_steps, negatives=None, generator=None):
        if negatives is not None and self.unmasked:  # a label no sequence has: the mask keeps every filled entry
            negatives = (negatives[0], negatives[1].masked_fill(negatives[1] >= 0, NO_EXPERT))
        step, first = divmod(self.calls, micro_steps)
        self.calls += 1
        if first or step % self.every:
            return super().forward(ids, labels, mask, sup_tokens, micro_steps, negatives, generator)
        micro, recs = forward_with_records(
            lambda: super(Diagnosed, self).forward(ids, labels, mask, sup_tokens, micro_steps, negatives, generator),
            self.model)
        rec = stack_records(recs)
        weight = token_weight(mask, rec.probs)
        phi = fused_views(rec.probs.detach(), weight).phi  # (S, B, E)
        in_batch = int(weight.sum(1).gt(0).sum()) - 1
        kept = 0.0
        if negatives is not None:
            keys, q_labels = negatives
            top = phi.argmax(-1)  # (S, B) each sequence's top expert: its anchors' rule
            kept = float(((q_labels[:, None, :] != top[..., None]) & (q_labels[:, None, :] >= 0)).sum(-1)
                         .float().mean())
        routers = [m.router.weight for _, m in sites(self.model)] + \
            [m.router_ctx for _, m in sites(self.model) if m.router_ctx is not None]
        cl = self.cfg.lambda_cl * contrastive_loss(rec, weight, negatives, tokens_per_site=self.tokens_per_site,
                                                   temperature=self.cfg.temperature, debias=self.cfg.cl_debias,
                                                   generator=torch.Generator().manual_seed(step)).loss
        norm = lambda gs: float(torch.sqrt(sum((g ** 2).sum() for g in gs if g is not None)))  # noqa: E731
        g_cl = norm(torch.autograd.grad(cl, routers, retain_graph=True, allow_unused=True))
        g_all = norm(torch.autograd.grad(micro.loss * micro_steps, routers, retain_graph=True, allow_unused=True))
        print(json.dumps({"step": step + 1, "in_batch_negatives": in_batch, "queue_negatives_kept": kept,
                          "contrastive": float(cl.detach()) / self.cfg.lambda_cl, "cl_share_of_router_grad": g_cl / g_all}),
              flush=True)
        return micro


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="1x16", choices=["1x16", "4x4"])
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--rule", default="mask", choices=["mask", "none", "adaptive"],
                    help="the queue's rule: today's; none (every filled entry a negative); adaptive (today's mask only "
                         "where it leaves at least K/4 negatives, else none: a mask once routers disagree)")
    ap.add_argument("--eval-seed", type=int, default=555, help="the dev sample (999, the held-out one, is not for "
                    "pilots)")
    a = ap.parse_args()
    from tiny_qwen import DEFAULT_CACHE
    from train import train

    model = make_base(os.path.join(DEFAULT_CACHE, "ablation-base"))
    work = tempfile.mkdtemp()
    data = os.path.join(work, "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for _, msgs in make_examples(2048, 10_000 + a.seed, permutations()):
            f.write(json.dumps({"messages": msgs}) + "\n")
    b, k = (1, 16) if a.split == "1x16" else (4, 4)
    ns = argparse.Namespace(model=model, steps=a.steps, batch_size=b, lr=3e-3, eval_every=a.steps, queue_size=a.queue,
                            set=[f"grad_accum={k}", f"queue={a.queue}"])
    cfg = run_config("cl-seq-ctx-db", a.seed, ns, data, work)
    if a.rule == "adaptive":  # why a patch of the module: contrastive_loss reads logits_of from it at each call
        contrastive.logits_of = adaptive_logits_of
    train(cfg, objective=functools.partial(Diagnosed, every=a.every, unmasked=a.rule == "none"))
    from ablation_metrics import measure, routed_ablation, specificity
    from adapter_io import load_adapter
    from model import load_model
    from tokenizer import load_tokenizer

    m = load_model(model)
    load_adapter(m, work)
    tok, held_out = load_tokenizer(model), make_examples(256, a.eval_seed, permutations())
    r = measure(m, tok, held_out)
    routed = routed_ablation(m, tok, held_out, make_examples(256, a.eval_seed + 1, permutations()))
    print(json.dumps({"split": a.split, "queue": a.queue, "rule": a.rule, "seed": a.seed, "eval_seed": a.eval_seed,
                      "loss": r["loss"], "nmi_mean": sum(r["nmi"]) / len(r["nmi"]),
                      "load_entropy": r.get("load_entropy"), "specificity_routed": specificity(routed)}))


if __name__ == "__main__":
    main()

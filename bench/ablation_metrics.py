"""The miniature ablation's measurements of a trained model (bench/ablation.py runs them on each checkpoint).

``measure``: held-out LM loss on answer tokens; exact match per domain (every answer token and <|im_end|> the
argmax under teacher forcing); per layer NMI(domain; top-1 expert) over answer positions, mean per-token router
entropy, expert-load entropy, mean pairwise cosine of the experts' outputs B_e A_e x on the same tokens.
``router_gradient_share``: ||d(lambda_cl L_cl)/dW_router|| / ||d L_LM/dW_router||. ``expert_ablation`` and
``routed_ablation``: domain x expert (or domain x domain) held-out loss ``damage`` when experts are dropped, and
``specificity``, their one-number summary. ``probe_ceiling``: what any token-level router could reach, from the
frozen base (linear probe and k-means on router inputs).

Examples are ``(domain, chat messages)`` pairs with domains 0..D-1 (``ablation_task.make_examples``).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

TOKENS_PER_SITE = 128  # the ablation's anchors per site (ablation_task.AblationLoss samples as many)


@torch.no_grad()
def measure(model, tok, examples, batch_size: int = 32) -> dict:
    """Held-out loss and exact match per domain, and per-site routing statistics at answer positions."""
    from data import answer_mask, collate, tokenize
    from lora_moe import record_routing, sites

    model.eval()
    found = sites(model)
    E = found[0][1].E if found else 1
    has_moe, D = E > 1, 1 + max(d for d, _ in examples)
    nll, n_tok, exact, count = np.zeros(D), np.zeros(D), np.zeros(D), np.zeros(D)
    joint = {name: np.zeros((D, E)) for name, _ in found} if has_moe else {}
    cos, ent = {name: [] for name in joint}, {name: [] for name in joint}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, labels, mask = collate([tokenize(msgs, tok) for _, msgs in chunk], tok.pad_id)
        inputs = {}  # each site's input x, for its experts' A_e x (why hooks: the product records routings only)
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0])) for n, m in found]
        try:
            with record_routing(model) as recs:
                hidden = model.model(ids)  # (B, T, hidden)
        finally:
            for h in hooks:
                h.remove()
        tgt = labels[:, 1:]  # position t predicts token t+1
        sel = answer_mask(labels)  # (B, T-1) answer positions
        logits = model.lm_head(hidden[:, :-1][sel]).float()  # (N, V)
        y = tgt[sel]
        dom = torch.tensor([d for d, _ in chunk])
        dom_tok = dom[:, None].expand_as(sel)[sel]  # (N,) domain of each answer position
        tok_nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        np.add.at(nll, dom_tok.numpy(), tok_nll.numpy())
        np.add.at(n_tok, dom_tok.numpy(), 1)
        right = torch.zeros_like(tgt, dtype=torch.bool)
        right[sel] = logits.argmax(-1) == y
        row_ok = (right | ~sel).all(1)
        np.add.at(exact, dom.numpy(), row_ok.numpy())
        np.add.at(count, dom.numpy(), 1)
        for (name, m), rec in zip(found, recs):
            if name not in joint:
                continue
            top1 = rec.topk_idx[:, :-1, 0][sel]  # (N,)
            np.add.at(joint[name], (dom_tok.numpy(), top1.numpy()), 1)
            p = rec.probs[:, :-1][sel]  # (N, E)
            ent[name].append(float(-(p * p.clamp(min=1e-12).log()).sum(-1).mean()))
            u = (inputs[name][:, :-1][sel].float() @ m.lora_A.T).view(-1, m.E, m.r)  # (N, E*r) -> (N, E, r): A_e x
            outs = torch.einsum("ner,oer->neo", u, m.lora_B.view(-1, m.E, m.r))  # (N, E, out): B_e A_e x
            outs = torch.nn.functional.normalize(outs, dim=-1)
            gram = outs @ outs.transpose(1, 2)  # (N, E, E)
            off = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
            cos[name].append((off / (m.E * (m.E - 1))).mean().item())
    res = {"loss": float(nll.sum() / n_tok.sum()), "loss_per_domain": (nll / n_tok).tolist(),
           "exact": (exact / count).tolist(), "exact_mean": float(exact.sum() / count.sum())}
    if has_moe:
        layers = sorted({int(n.split(".")[2]) for n in joint})
        per = {L: [n for n in joint if int(n.split(".")[2]) == L] for L in layers}
        res["nmi"] = [float(np.mean([nmi(joint[n]) for n in per[L]])) for L in layers]
        res["load_entropy"] = [float(np.mean([entropy(joint[n].sum(0)) for n in per[L]])) for L in layers]
        res["router_entropy"] = [float(np.mean([np.mean(ent[n]) for n in per[L]])) for L in layers]
        res["expert_cos"] = [float(np.mean([np.mean(cos[n]) for n in per[L]])) for L in layers]
        # a domain x expert share table for the heat map: the last layer's sites summed
        hm = sum(joint[n] for n in per[layers[-1]])
        res["heatmap_last_layer"] = (hm / hm.sum(1, keepdims=True)).tolist()
        res["top1_counts"] = {n: j.tolist() for n, j in joint.items()}  # routed_ablation's domain -> expert
    return res


@contextlib.contextmanager
def dropped(model, choice: dict):
    """Inside, expert ``choice[site name]`` (an index; absent = none) contributes nothing at that site: its
    B block is zeroed, and restored on exit."""
    from lora_moe import sites

    saved = {}
    with torch.no_grad():
        for name, m in sites(model):
            if name in choice:
                blk = slice(int(choice[name]) * m.r, (int(choice[name]) + 1) * m.r)
                saved[name] = (m, blk, m.lora_B[:, blk].clone())
                m.lora_B[:, blk] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, blk, b in saved.values():
                m.lora_B[:, blk] = b


def damage(model, tok, examples, choices: list[dict]) -> list[list[float]]:
    """(domain x ablation): each domain's held-out loss increase with ``dropped(model, choice)``, one column
    per choice."""
    base = np.array(measure(model, tok, examples)["loss_per_domain"])
    cols = []
    for choice in choices:
        with dropped(model, choice):
            cols.append(np.array(measure(model, tok, examples)["loss_per_domain"]) - base)
    return np.stack(cols, 1).round(4).tolist()


def expert_ablation(model, tok, examples) -> list[list[float]]:
    """(domain x expert): each domain's held-out loss increase when expert e is dropped from every site."""
    from lora_moe import sites

    names, E = [n for n, _ in sites(model)], sites(model)[0][1].E
    return damage(model, tok, examples, [{n: e for n in names} for e in range(E)])


def routed_ablation(model, tok, examples, mapping_examples) -> list[list[float]]:
    """(domain x domain): each domain's held-out loss increase when, at every site, domain d's expert is
    dropped: the one d's answer tokens are most often routed to (top-1), counted on ``mapping_examples``.

    why besides ``expert_ablation``: expert e at one site and expert e at another are unrelated unless
    training ties them. Dropping index e everywhere hits one domain only if every site gives that domain the
    same index, which the oracle does by construction and a learned router has no reason to. This asks the
    question per site: are the experts a domain is routed to the ones that domain needs?"""
    joint = measure(model, tok, mapping_examples)["top1_counts"]  # {site: (D, E)}
    mine = {n: np.asarray(j).argmax(1) for n, j in joint.items()}  # {site: (D,) each domain's expert}
    D = 1 + max(d for d, _ in examples)
    return damage(model, tok, examples, [{n: e[d] for n, e in mine.items()} for d in range(D)])


def specificity(damage) -> float:
    """Largest / mean loss damage over the domains (rows), averaged over the ablations (columns): 1 when a
    drop hurts every domain alike, D when it hurts one domain only."""
    d = np.asarray(damage)
    return float(np.mean(d.max(0) / np.maximum(d.mean(0), 1e-9)))


def router_gradient_share(model, tok, examples, cfg, queue) -> float:
    """||d(lambda_cl L_cl)/dW_router|| / ||d L_LM/dW_router|| on held-out examples, with the run's settings and
    the checkpoint's queue: how much of the routers' training signal the contrastive term is."""
    from contrastive import contrastive_loss
    from data import answer_mask, collate, tokenize
    from lora_moe import record_routing, sites, stack_records
    from objective import lm_loss_sum

    routers = [m.router.weight for _, m in sites(model)]
    ids, labels, mask = collate([tokenize(msgs, tok) for _, msgs in examples[:32]], tok.pad_id)
    model.eval()
    norms = []
    for term in ("lm", "cl"):
        with record_routing(model) as recs:
            hidden = model.model(ids)
        if term == "lm":
            loss = lm_loss_sum(model, hidden, labels, 4096) / answer_mask(labels).sum()
        else:
            loss = cfg.lambda_cl * contrastive_loss(stack_records(recs), mask.float(),
                                                    queue.negatives() if queue is not None else None,
                                                    tokens_per_site=TOKENS_PER_SITE, temperature=cfg.temperature,
                                                    debias=cfg.cl_debias,
                                                    generator=torch.Generator().manual_seed(0)).loss
        grads = torch.autograd.grad(loss, routers, allow_unused=True)
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))))
    return norms[1] / max(norms[0], 1e-12)


# ----------------------------------------------------------------------------------------------------------
# What any token-level router could reach: probes on the frozen base


@torch.no_grad()
def probe_ceiling(model_dir: str, tok, examples, k: int, seed: int = 0) -> dict:
    """Per layer and router input (attention in: q/k/v; o_proj in; MLP in: gate/up; down_proj in): held-out
    accuracy of a linear classifier from the router input x to the domain over answer positions, and
    NMI(domain; k-means cluster) with k = E. Train / test: the two halves of ``examples``."""
    from data import answer_mask, collate, tokenize
    from model import load_model

    model = load_model(model_dir)
    kinds = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
             "down_in": "mlp.down_proj"}
    feats, hooks = {}, []
    for L, layer in enumerate(model.model.layers):
        for kind, path in kinds.items():
            mod = layer.get_submodule(path)
            hooks.append(mod.register_forward_hook(lambda m, i, o, key=(L, kind): feats.setdefault(key, []).append(i[0])))
    doms, xs = [], {}
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        ids, labels, _ = collate([tokenize(msgs, tok) for _, msgs in chunk], tok.pad_id)
        feats.clear()
        model.model(ids)
        sel = answer_mask(labels)  # answer positions (those that predict an answer token)
        doms.append(torch.tensor([d for d, _ in chunk])[:, None].expand_as(sel)[sel])
        for key, (x,) in feats.items():
            xs.setdefault(key, []).append(x[:, :-1][sel])
    for h in hooks:
        h.remove()
    y = torch.cat(doms)
    half = len(y) // 2
    out = {}
    for (L, kind), parts in sorted(xs.items()):
        x = torch.cat(parts).float()
        x = (x - x[:half].mean(0)) / (x[:half].std(0) + 1e-6)
        out[f"layer {L} {kind}"] = {"probe_accuracy": _linear_probe(x[:half], y[:half], x[half:], y[half:], seed),
                                    "kmeans_nmi": _kmeans_nmi(x, y, k, seed)}
    return out


def _linear_probe(xtr, ytr, xte, yte, seed: int) -> float:
    torch.manual_seed(seed)
    with torch.enable_grad():
        D = int(ytr.max()) + 1
        w = torch.zeros(xtr.shape[1], D, requires_grad=True)
        b = torch.zeros(D, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            (torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 1e-3 * (w ** 2).sum()).backward()
            opt.step()
    return round(float(((xte @ w + b).argmax(-1) == yte).float().mean()), 4)


def _kmeans_nmi(x, y, k: int, seed: int, iters: int = 25) -> float:
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            if (assign == j).any():
                c[j] = x[assign == j].mean(0)
    joint = np.zeros((int(y.max()) + 1, k))
    np.add.at(joint, (y.numpy(), assign.numpy()), 1)
    return round(nmi(joint), 4)


def entropy(counts) -> float:
    p = counts / max(counts.sum(), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def nmi(joint) -> float:
    """I(domain; expert) / H(domain) from a count table (D, E)."""
    p = joint / joint.sum()
    pd, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pd @ pe)[nz])).sum())
    return mi / entropy(joint.sum(1))

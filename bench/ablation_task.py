"""The miniature ablation's synthetic task and its control arms (routers told the answer, the domain).

The task: D = 8 domains, each a different random permutation sigma_d of the 26 letters, named by its own
prefix word; a prompt ``"<word_d> <n>: x"`` asks for the chain ``sigma_d(x) sigma_d(sigma_d(x)) ...`` of n letters
(``make_examples``). The frozen base is the tiny demo Qwen3 with a sharper output temperature (``make_base``).
The arms reach train.py only through its public parts: a site's router module and the objective factory
``train.train(cfg, objective=...)`` (``control_objective``). bench/ablation.py runs them; this file only builds them.
"""
from __future__ import annotations

import functools
import os
import random
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_moe import sites
from ablation_metrics import TOKENS_PER_SITE
from objective import HybridLoss

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DOMAINS = ("north", "south", "east", "west", "red", "blue", "green", "black")  # each a single Qwen token


def permutations(task_seed: int = 1234) -> list[dict]:
    """One fixed random permutation of LETTERS per domain (the task, the same for every run)."""
    rng = random.Random(task_seed)
    perms = []
    for _ in DOMAINS:
        p = list(LETTERS)
        rng.shuffle(p)
        perms.append(dict(zip(LETTERS, p)))
    return perms


def make_examples(n: int, seed: int, perms) -> list[tuple[int, list[dict]]]:
    """n (domain, chat messages) pairs, domains balanced: "<word_d> <n>: x" -> "sigma_d(x) sigma_d^2(x) ..." (n letters)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = i % len(DOMAINS)
        x = start = rng.choice(LETTERS)
        chain = []
        for _ in range(rng.randint(6, 10)):
            x = perms[d][x]
            chain.append(x)
        out.append((d, [{"role": "user", "content": f"{DOMAINS[d]} {len(chain)}: {start}"},
                        {"role": "assistant", "content": " ".join(chain)}]))
    rng.shuffle(out)
    return out


def make_base(path: str, logit_scale: float = 8.0) -> str:
    """The ablation's frozen base: the tiny demo Qwen3 (random, real Qwen vocabulary) with its final norm's
    weight set to ``logit_scale``.

    why: with std-0.02 random embeddings as the tied LM head, a unit final norm caps every logit at about
    sqrt(128) * 0.02 * sqrt(128) ~ 3, so no adapter can take the LM loss below ~9 nats over 151,936 tokens
    and every arm would look equally bad. A larger final-norm weight is a sharper output temperature: the
    base stays frozen and random, but a confident prediction becomes expressible."""
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights, save_model
    from tiny_qwen import TINY_CONFIG, write_qwen_tokenizer

    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        model = init_weights(Qwen3(Qwen3Config(**TINY_CONFIG)), seed=0)
        with torch.no_grad():
            model.model.norm.weight.fill_(logit_scale)
        tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"  # why per process: two ablations may start at once
        save_model(model, tmp)
        write_qwen_tokenizer(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first: its base is the same (seed 0), keep it
            shutil.rmtree(tmp)
            if not os.path.exists(os.path.join(path, "tokenizer.json")):
                raise
    return path


# ----------------------------------------------------------------------------------------------------------
# The control arms: routing told the domain, through train.py's public parts (its routers, its objective)


def domain_word_ids(tok) -> list[int]:
    """The token id of each domain's prefix word (each a single Qwen token)."""
    return [tok.encode(w)[0] for w in DOMAINS]


def domain_of(ids, word_ids) -> torch.Tensor:
    """(B,) the domain of each sequence: which domain word its prompt holds."""
    return torch.stack([(ids == w).any(1) for w in word_ids], 1).float().argmax(1)


class DomainRouter(nn.Module):
    """The oracle's router: every token of a domain-d sequence gets logit +30 on expert d, -30 elsewhere, so
    ``lora_moe.route`` (top-1 in this arm) sends it to expert d. ``domain`` (B,) is set before each forward by
    ``install_oracle``'s hook; the replaced router's weight is kept (unused) so checkpoints keep their keys."""

    def __init__(self, old: nn.Linear):
        super().__init__()
        self.weight, self.domain = old.weight, None

    def forward(self, x):
        E, lead = self.weight.shape[0], x.shape[:-1]
        d = self.domain.to(x.device).reshape(-1, *[1] * (len(lead) - 1), 1).expand(*lead, 1)  # (B,) -> (B, T, 1)
        return torch.full((*lead, E), -30.0, device=x.device).scatter(-1, d, 30.0)  # (B, T, E)


ORACLE_KEEPS = {"oracle": (), "oracle-l0": ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                                             "layers.0.self_attn.v_proj")}  # sites that keep their own router


def install_oracle(model, word_ids, keep=()):
    """Give every site but those named in ``keep`` a DomainRouter, and the model a hook that tells them the
    domain of each forward's sequences (training and evaluation alike; a decode step of one token keeps the
    prompt's domain)."""
    routers = []
    for name, m in sites(model):
        if not name.endswith(keep):  # (a tuple of suffixes; () keeps none)
            m.router = DomainRouter(m.router)
            routers.append(m.router)

    def tell_domain(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        if ids.shape[1] > 1:
            d = domain_of(ids, word_ids)
            for r in routers:
                r.domain = d

    model.model.register_forward_pre_hook(tell_domain, with_kwargs=True)
    return model


def install_control(arm: str, model, tok):
    """The arm's own routers, given to the model's sites (the oracle arms; any other arm: none)."""
    if arm in ORACLE_KEEPS:
        install_oracle(model, domain_word_ids(tok), ORACLE_KEEPS[arm])
    return model


class AblationLoss(HybridLoss):
    """The hybrid loss as every arm trains it: 128 anchors per site (the ablation's rows were measured so)."""
    tokens_per_site = TOKENS_PER_SITE


def forward_with_records(forward, model):
    """``forward()`` (an objective's, which records the routing) and the ``RouterRecord`` every site of ``model``
    wrote during it, gradient included: a forward hook per site reads the record the site has just written
    inside the objective's ``record_routing`` (which a second ``record_routing`` around it would disturb)."""
    recs = []

    def keep(site, inp, out):
        records, i = site.recording
        recs.append(records[i])

    hooks = [m.register_forward_hook(keep) for _, m in sites(model)]
    try:
        return forward(), recs
    finally:
        for h in hooks:
            h.remove()


class SupervisedRouting(AblationLoss):
    """The supervised control: the hybrid loss + lambda_sup * the routers' cross-entropy to the domain over
    real tokens, averaged over sites (each site's routing logits, context term included, gradient included:
    ``forward_with_records``)."""

    def __init__(self, model, cfg, word_ids, lambda_sup: float):
        super().__init__(model, cfg)
        self.word_ids, self.lambda_sup = word_ids, lambda_sup

    def forward(self, ids, labels, mask, sup_tokens, micro_steps, negatives=None, generator=None):
        micro, recs = forward_with_records(
            lambda: super(SupervisedRouting, self).forward(ids, labels, mask, sup_tokens, micro_steps, negatives,
                                                           generator), self.model)
        logits = [r.logits for r in recs]  # (B, T, E) per site, the context term included, with gradient
        d = domain_of(ids, self.word_ids)[:, None].expand_as(mask)[mask]  # (N,) the domain of each real token
        ce = torch.stack([F.cross_entropy(z[mask], d) for z in logits]).mean()
        micro.loss = micro.loss + self.lambda_sup * ce / micro_steps
        return micro


def control_objective(arm: str, tok, lambda_sup: float):
    """train.train's ``objective`` for an arm: AblationLoss (of a model with the arm's own routers), or a
    control's."""
    if arm == "supervised":
        return functools.partial(SupervisedRouting, word_ids=domain_word_ids(tok), lambda_sup=lambda_sup)
    return lambda model, cfg: AblationLoss(install_control(arm, model, tok), cfg)

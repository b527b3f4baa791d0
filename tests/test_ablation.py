"""bench/ablation.py (the miniature ablation, its task and measurements), plot_routing.py and chat.py --adapter."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, run_at_once


def _load_ablation():
    """bench/ablation.py by path: putting bench/ on sys.path would shadow contrastive.py with bench/contrastive.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "bench", "ablation.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ablation = _load_ablation()
import ablation_metrics as metrics  # noqa: E402  (bench/ is on sys.path, last, once ablation.py ran)
import ablation_task as task  # noqa: E402


def test_nmi_and_entropy_hand_values():
    entropy, nmi = metrics.entropy, metrics.nmi

    assert nmi(np.eye(4) * 10) == pytest.approx(1.0)  # the expert names the domain
    assert nmi(np.ones((4, 4))) == pytest.approx(0.0, abs=1e-12)  # routing ignores the domain
    # two domains, one always on expert 0, the other split evenly over 0 and 1: I = H(D) - H(D|X)
    j = np.array([[2.0, 0.0], [1.0, 1.0]])
    h_d_given_x = 0.75 * entropy(np.array([2.0, 1.0])) + 0.25 * 0.0
    assert nmi(j) == pytest.approx((np.log(2) - h_d_given_x) / np.log(2))
    assert entropy(np.array([1, 1, 1, 1])) == pytest.approx(np.log(4))


def test_task_rules_are_domain_permutations():
    DOMAINS, LETTERS, make_examples, permutations = task.DOMAINS, task.LETTERS, task.make_examples, task.permutations

    perms = permutations()
    assert all(sorted(p.values()) == list(LETTERS) for p in perms)
    assert len({tuple(p.values()) for p in perms}) == len(DOMAINS)  # the rules conflict
    for d, msgs in make_examples(40, 0, perms):
        head, start = msgs[0]["content"].split(": ")
        word, n = head.split(" ")
        assert word == DOMAINS[d]
        chain = msgs[1]["content"].split(" ")
        assert len(chain) == int(n)  # the prompt says how long the answer is: exact match 1 is reachable
        assert chain[0] == perms[d][start] and all(perms[d][a] == b for a, b in zip(chain, chain[1:]))


def test_letters_are_single_qwen_tokens(qwen_tok_dir):
    make_examples, permutations = task.make_examples, task.permutations
    from tokenizer import Tokenizer
    from data import IGNORE, tokenize

    tok = Tokenizer(qwen_tok_dir)
    (d, msgs), = make_examples(1, 3, permutations())
    ids, labels = tokenize(msgs, tok)
    answer = [t for t, y in zip(ids, labels) if y != IGNORE]
    assert len(answer) == len(msgs[1]["content"].split(" ")) + 1  # one token per letter, then <|im_end|>


def test_quick_ablation_is_reproducible(tmp_path):
    """The same seed gives the same table: two quick runs, one run at a time and all at once (--jobs 3),
    agree on every number but the timings, in the same order. (The serial one skips the ablation matrices,
    which tests/test_ablation.py checks on their own: the suite's time.)"""
    outs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both, so the same float sums
    runs = run_at_once(["bench/ablation.py", "--quick", "--out", str(tmp_path / "run0"), "--jobs", "1",
                        "--ablate-seeds="],
                       ["bench/ablation.py", "--quick", "--out", str(tmp_path / "run1"), "--jobs", "3"], env=env,
                       timeout=600)
    matrices = ("expert_ablation", "routed_ablation")
    for k, r in enumerate(runs):
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        res = json.load(open(tmp_path / f"run{k}" / "results.json"))
        for r in res["runs"]:
            r.pop("step_time_s"), r.pop("peak_rss_mb")
            assert all((m in r) == (k == 1 and r["arm"] != "lora") for m in matrices), (k, r["arm"])
            for m in matrices:
                r.pop(m, None)
        outs.append(res["runs"])
    assert outs[0] == outs[1]
    arms = {r["arm"]: r for r in outs[0]}
    assert list(arms) == ["lora", "cl-seq-ctx-db"]
    moe = arms["cl-seq-ctx-db"]
    assert "nmi" not in arms["lora"] and len(moe["nmi"]) == 4  # per layer, MoE arms only
    assert all(0 <= x <= 1 for x in moe["nmi"]) and 0 < moe["expert_cos"][0] < 1
    assert arms["lora"]["router_grad_share"] is None and moe["router_grad_share"] > 0
    assert (tmp_path / "run0" / "results.md").read_text().startswith("| arm")


def _domain_model(tok, top_k):
    from data import collate, tokenize
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = add_lora_moe(init_weights(Qwen3(cfg)), LoRAMoEConfig(num_experts=8, rank=2, top_k=top_k, dropout=0.0),
                         verbose=False)
    ex = task.make_examples(16, 0, task.permutations())
    ids, labels, mask = collate([tokenize(m, tok) for _, m in ex], tok.pad_id)
    return model, ex, ids, labels, mask


def test_oracle_routes_each_domain_to_its_expert(qwen_tok_dir):
    """The oracle control (its own routers, given to the adapters) forces domain d onto expert d, in training's
    forward and in a plain model call alike; its checkpoint keys are the model's own."""
    from lora_moe import record_routing, sites
    from tokenizer import Tokenizer

    tok = Tokenizer(qwen_tok_dir)
    model, ex, ids, _, _ = _domain_model(tok, top_k=1)
    keys = set(model.state_dict())
    task.install_oracle(model, task.domain_word_ids(tok))
    assert set(model.state_dict()) == keys
    want = torch.tensor([d for d, _ in ex])[:, None].expand(ids.shape)
    for call in (lambda: model(ids), lambda: model.model(ids)):
        with record_routing(model) as recs:
            call()
        assert len(recs) == 7 and all(torch.equal(r.topk_idx[..., 0], want) for r in recs)
    model, ex, ids, _, _ = _domain_model(tok, top_k=1)  # oracle-l0: layer 0's q/k/v keep their own routers
    task.install_oracle(model, task.domain_word_ids(tok), task.ORACLE_KEEPS["oracle-l0"])
    kept = [n.split(".")[-1] for n, m in sites(model) if not isinstance(m.router, task.DomainRouter)]
    assert kept == ["q_proj", "k_proj", "v_proj"]


def test_routed_ablation_finds_each_domains_expert_site_by_site(qwen_tok_dir):
    """Every site routes domain d (top-1) to its own expert perm_s[d], a different permutation per site, and
    every expert's B is nonzero. Dropping, site by site, the expert a domain is routed to hurts that domain and
    leaves the others exactly as they were (specificity D); dropping index e everywhere hits a different domain
    at each site. The mapping comes from a separate sample, and every weight is back afterwards."""
    import torch.nn as nn

    from lora_moe import sites
    from tokenizer import Tokenizer

    class PermutedRouter(nn.Module):  # logit +30 on expert perm[d] instead of d
        def __init__(self, inner, perm):
            super().__init__()
            self.inner, self.inv = inner, torch.argsort(perm)

        def forward(self, x):
            return self.inner(x)[..., self.inv]

    tok = Tokenizer(qwen_tok_dir)
    model, _, _, _, _ = _domain_model(tok, top_k=1)
    task.install_oracle(model, task.domain_word_ids(tok))
    g = torch.Generator().manual_seed(0)
    for _, m in sites(model):
        m.router = PermutedRouter(m.router, torch.randperm(8, generator=g))
        nn.init.normal_(m.lora_B, std=0.5, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out, mapping = (task.make_examples(32, s, task.permutations()) for s in (1, 2))
    routed = np.array(metrics.routed_ablation(model, tok, held_out, mapping))  # (domain, dropped domain)
    assert routed.shape == (8, 8)
    assert np.all(routed[~np.eye(8, dtype=bool)] == 0) and np.all(routed.diagonal() != 0)
    by_index = np.array(metrics.expert_ablation(model, tok, held_out))  # (domain, dropped index)
    assert all((by_index[:, e] != 0).sum() >= 2 for e in range(8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert metrics.specificity(np.eye(4)) == pytest.approx(4.0) and metrics.specificity(np.ones((4, 3))) == 1.0


def test_supervised_control_adds_the_routers_cross_entropy(qwen_tok_dir):
    """SupervisedRouting's loss = the hybrid loss + lambda_sup * mean over sites of the router cross-entropy to
    the domain over real tokens, / micro-steps; the hybrid parts are unchanged."""
    import torch.nn.functional as F

    from config import TrainConfig
    from lora_moe import record_routing
    from objective import HybridLoss
    from tokenizer import Tokenizer

    tok = Tokenizer(qwen_tok_dir)
    model, ex, ids, labels, mask = _domain_model(tok, top_k=2)
    with torch.no_grad():  # the context term away from its init of 0: the cross-entropy reads the whole logits
        for m in model.modules():
            if getattr(m, "router_ctx", None) is not None:
                m.router_ctx.normal_(0, 0.3)
    cfg = TrainConfig(lambda_cl=0.0, dropout=0.0)
    word_ids = task.domain_word_ids(tok)
    sup = task.SupervisedRouting(model, cfg, word_ids, lambda_sup=0.5)
    got = sup(ids, labels, mask, 100.0, 2)
    base = HybridLoss(model, cfg)(ids, labels, mask, 100.0, 2)
    with record_routing(model) as recs:
        model.model(ids)
    d = torch.tensor([d for d, _ in ex])[:, None].expand(ids.shape)[mask]
    ce = torch.stack([F.cross_entropy(r.logits[mask], d) for r in recs]).mean()
    assert torch.allclose(got.loss, base.loss + 0.5 * ce / 2, atol=1e-6)
    assert torch.equal(got.parts, base.parts)
    got.loss.backward()
    assert all(m.router.weight.grad is not None for m in model.modules() if hasattr(m, "router") and m.router)


def test_run_config_layers_arm_and_set_overrides():
    """A run's settings: the arm's own over the common ones, and --set over everything: the earlier arms keep
    token routers, tau 0.07 and plain InfoNCE; cl-seq takes --queue-size; the arm named for train.py's defaults
    has the objective's defaults."""
    from types import SimpleNamespace

    a = SimpleNamespace(model="m", steps=300, batch_size=16, lr=3e-3, queue_size=1024, eval_every=100,
                        set=["queue=64", "temperature=0.2"])
    seq = ablation.run_config("cl-seq-nq", 1, a, "d.jsonl", "w")
    assert (seq.lambda_cl, seq.queue, seq.temperature, seq.seed, seq.router) == (1.0, 64, 0.2, 1, "token")
    plain = SimpleNamespace(**{**vars(a), "set": []})
    q = ablation.run_config("cl-seq", 0, plain, "d.jsonl", "w")
    assert (q.queue, q.num_experts, q.rank, q.temperature, q.cl_debias) == (1024, ablation.E, ablation.R, 0.07, 0)
    assert ablation.run_config("cl-seq-q16", 0, plain, "d.jsonl", "w").queue == 16
    t2 = ablation.run_config("cl-seq-ctx-t2", 0, plain, "d.jsonl", "w")
    assert (t2.router, t2.temperature, t2.cl_debias) == ("context", 0.2, 0)
    from train import TrainConfig  # the arm named for train.py's defaults has its objective's defaults
    keys = ("lambda_cl", "lambda_bal", "lambda_z", "temperature", "cl_debias", "queue", "router", "top_k")
    now = ablation.run_config("cl-seq-ctx-db", 0, plain, "d.jsonl", "w")
    assert [getattr(now, k) for k in keys] == [getattr(TrainConfig(), k) for k in keys]

"""The routing terms' exact values, computed by hand (loops over sites, sequences and tokens, nothing shared
with lora_moe), on padded input, and their normalisation over accumulated micro-steps: what train_step logs
is each term's mean over the step's micro-batches, whatever the split."""
import math

import pytest
import torch

from conftest import small_cfg
from lora_moe import RouterRecord, balance_loss, z_loss


def padded_record(S=2, B=3, T=5, E=4, k=2, seed=0):
    """A stacked record (S, B, T, ...) of random router logits and a (B, T) mask with right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, B, T, E, generator=g) * 2
    probs = logits.softmax(-1)
    topk = probs.topk(k, -1).indices
    mask = torch.ones(B, T)
    mask[0, 3:] = 0  # padding at the end of rows 0 and 2
    mask[2, 1:] = 0
    return RouterRecord(logits, probs, topk, torch.zeros_like(probs)), mask


def balance_by_hand(rec, mask):
    """E * sum_e f_e * P_e per site over the real tokens only, mean over sites: f_e the share of the real
    tokens' top-k slots given to e, P_e the mean probability of e over the real tokens."""
    S, B, T, E = rec.probs.shape
    per_site = []
    for s in range(S):
        slots, prob_sum, n = [0.0] * E, [0.0] * E, 0
        for b in range(B):
            for t in range(T):
                if mask[b, t] == 0:
                    continue
                n += 1
                for e in rec.topk_idx[s, b, t].tolist():
                    slots[e] += 1
                for e in range(E):
                    prob_sum[e] += float(rec.probs[s, b, t, e])
        per_site.append(E * sum(slots[e] / sum(slots) * prob_sum[e] / n for e in range(E)))
    return sum(per_site) / S


def z_by_hand(rec, mask):
    S, B, T, E = rec.probs.shape
    per_site = []
    for s in range(S):
        vals = [math.log(sum(math.exp(float(x)) for x in rec.logits[s, b, t])) ** 2
                for b in range(B) for t in range(T) if mask[b, t] == 1]
        per_site.append(sum(vals) / len(vals))
    return sum(per_site) / S


def test_balance_and_z_loss_values_by_hand_on_a_padded_batch():
    """Padding's routings are neither counted in f_e nor averaged into P_e (nor into the z-loss): the values
    equal the by-hand ones over real tokens, and differ from what counting padding would give."""
    rec, mask = padded_record()
    assert float(balance_loss(rec, mask)) == pytest.approx(balance_by_hand(rec, mask), rel=1e-5)
    assert float(z_loss(rec, mask)) == pytest.approx(z_by_hand(rec, mask), rel=1e-5)
    everything = torch.ones_like(mask)
    assert balance_by_hand(rec, everything) != pytest.approx(balance_by_hand(rec, mask), rel=1e-3)  # can tell
    assert z_by_hand(rec, everything) != pytest.approx(z_by_hand(rec, mask), rel=1e-3)


def test_the_logged_routing_terms_are_the_mean_over_micro_steps(tiny_dir, tmp_path):
    """One real train_step with 2 micro-batches of other lengths: the logged balance, z and contrastive terms
    equal the mean over the two micro-batches of each term computed on its own micro-batch's forward (balance
    and z by hand over real tokens); and the step's total is lm + sum of lambda x term."""
    import train as T
    from contrastive import contrastive_loss
    from data import collate, encode_all, read_jsonl
    from lora_moe import record_routing, stack_records
    from objective import HybridLoss
    from tokenizer import load_tokenizer

    cfg = small_cfg(tiny_dir, tmp_path / "o", dropout=0.0, lambda_z=0.5)
    tok = load_tokenizer(tiny_dir)
    items = encode_all(read_jsonl(cfg.data)[:12], tok, 96)[0]
    micro = [collate(items[:2], tok.pad_id), collate(items[2:4], tok.pad_id)]  # 2 x <= 96 tokens: all anchors
    T.seed_everything(0)
    model, queue, gen = T.build_model(cfg, tiny_dir, torch.device("cpu"), 0, verbose=False)
    want = {"balance": [], "z": [], "contrastive": []}
    with torch.no_grad():
        for ids, _, mask in micro:
            with record_routing(model) as recs:
                model.model(ids)
            rec = stack_records(recs)
            want["balance"].append(balance_by_hand(rec, mask.float()))
            want["z"].append(z_by_hand(rec, mask.float()))
            # fewer than 256 tokens a micro-batch: every real token is an anchor, nothing is sampled
            want["contrastive"].append(float(contrastive_loss(rec, mask.float(), tokens_per_site=256,
                                                              temperature=cfg.temperature,
                                                              debias=cfg.cl_debias).loss))
    state = T.build_state(HybridLoss(model, cfg), queue, gen, cfg, torch.device("cpu"))
    got, _ = T.train_step(state, micro)
    for k, vals in want.items():
        assert got[k] == pytest.approx(sum(vals) / len(vals), rel=1e-5), k
    w = state.objective.weights
    assert got["loss"] == pytest.approx(got["lm"] + w["balance"] * got["balance"] + w["z"] * got["z"]
                                        + w["contrastive"] * got["contrastive"], rel=1e-9)

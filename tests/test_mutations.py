"""One test per bug that a mutation run let through (issue 14), each checking a property rather than a
recorded curve; each was checked by putting its bug in and seeing it fail."""
import json
import os
import random

import pytest
import torch

from conftest import ROOT, small_cfg


def tiny_model(E=4, k=2, seed=0):
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = init_weights(Qwen3(cfg), seed=seed)
    torch.manual_seed(seed)
    add_lora_moe(model, LoRAMoEConfig(num_experts=E, rank=4, top_k=k, dropout=0.0), verbose=False)
    return model


# ----------------------------------------------------------------------------------------------------------
# chat.py


def test_generate_pads_each_row_after_its_own_end():
    """A batch whose rows stop at different steps: after its end token a row holds only padding, and the
    rows still running continue exactly as without stopping."""
    from generate import generate
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights

    cfg = Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = init_weights(Qwen3(cfg), std=0.5).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    free = generate(model, ids, max_new_tokens=8, eos_id=None)  # (3, 8)

    def ends_at(tok):  # the step at which each row would emit ``tok`` first (None: never)
        return [next((j for j in range(8) if int(free[b, j]) == tok), None) for b in range(3)]

    eos = next(int(t) for t in free.flatten() if len(set(ends_at(int(t)))) == 3)  # three different endings
    ends = ends_at(eos)
    got = generate(model, ids, max_new_tokens=8, eos_id=eos, pad_id=39)
    for b, end in enumerate(ends):
        stop = got.shape[1] if end is None else end + 1
        assert torch.equal(got[b, :stop], free[b, :stop])
        assert (got[b, stop:] == 39).all()


def test_chat_with_adapter_answers_as_the_adapted_model(tiny_dir, tmp_path):
    """chat.py --adapter RUN, greedy: exactly the adapted model's own greedy answer, not the base's."""
    import subprocess
    import sys

    from generate import generate
    from adapter_io import load_adapter
    from model import load_model
    from tokenizer import Tokenizer, apply_chat_template
    from train import train

    train(small_cfg(tiny_dir, tmp_path / "run", steps=6, lr=5e-2, save_every=6))
    tok = Tokenizer(tiny_dir)
    prompt = tok.encode(apply_chat_template([{"role": "user", "content": "头痛怎么办？"}], add_generation_prompt=True))
    base = load_model(tiny_dir)
    adapted = load_model(tiny_dir)
    load_adapter(adapted, str(tmp_path / "run"))
    adapted.eval()
    want = tok.decode([t for t in generate(adapted, prompt, max_new_tokens=8)[0].tolist() if t not in (151643, 151645)])
    plain = tok.decode([t for t in generate(base, prompt, max_new_tokens=8)[0].tolist() if t not in (151643, 151645)])
    assert want != plain  # else the test could not tell
    r = subprocess.run([sys.executable, "chat.py", "--model", tiny_dir, "--adapter", str(tmp_path / "run"),
                        "--prompt", "头痛怎么办？", "--max-new-tokens", "8", "--temperature", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == want


# ----------------------------------------------------------------------------------------------------------
# training


def step_once(tiny_dir, out, batches):
    """One real train_step over ``batches`` (LM only); returns (metrics, the gradients it applied)."""
    import train as T
    from objective import HybridLoss

    cfg = small_cfg(tiny_dir, out, dropout=0.0, lambda_bal=0.0, lambda_cl=0.0, queue=False, clip=0.0)
    T.seed_everything(0)
    model, heads, queue, gen = T.build_model(cfg, tiny_dir, torch.device("cpu"), 0, verbose=False)
    body = HybridLoss(model, heads, cfg)
    params, opt, sched = T.make_optimizer(body, cfg, torch.device("cpu"))
    grads = []
    opt.step = lambda: grads.extend(p.grad.clone() for p in params)
    rec, _ = T.train_step(body, body, batches, queue, gen, params, opt, sched, cfg, False, torch.device("cpu"))
    return rec, grads


def test_grad_accumulation_equals_the_doubled_batch(tiny_dir, tmp_path):
    """--grad-accum 2 x B == --grad-accum 1 x 2B: the LM loss is normalized by the whole step's answer tokens."""
    from data import collate, encode_all, read_jsonl
    from tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir)
    items = encode_all(read_jsonl(os.path.join(ROOT, "data", "med_sample.jsonl"))[0][:40], tok, 96)[0][:4]
    lengths = [sum(y != -100 for y in lab) for _, lab in items]
    assert lengths[0] + lengths[1] != lengths[2] + lengths[3]  # unequal halves: a per-micro-batch mean would differ
    two, g2 = step_once(tiny_dir, tmp_path / "a", [collate(items[:2], tok.pad_id), collate(items[2:], tok.pad_id)])
    one, g1 = step_once(tiny_dir, tmp_path / "b", [collate(items, tok.pad_id)])
    assert two["lm"] == pytest.approx(one["lm"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for a, b in zip(g2, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_routing_stats_never_count_padding():
    from conftest import forward_records
    from lora_moe import routing_stats, sites

    model = tiny_model()
    names = [n for n, _ in sites(model)]
    x = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # right padding, as in training
    rec, _ = forward_records(model, x)
    a = routing_stats(names, rec.topk_idx, rec.probs, mask)
    x2 = x.clone()
    x2[1, 5:] = (x2[1, 5:] + 11) % 64  # other padding tokens
    rec, _ = forward_records(model, x2)
    assert routing_stats(names, rec.topk_idx, rec.probs, mask) == a
    assert routing_stats(names, rec.topk_idx, rec.probs) != a  # the stats can tell: counting padding changes them


@pytest.mark.parametrize("switch, value, gone", [("queue", False, "queue."), ("lambda_cl", 0.0, "heads."),
                                                 ("lambda_bal", 0.0, None)])
def test_each_ablation_switch_removes_its_part(tiny_dir, tmp_path, switch, value, gone):
    """no --queue: no queue (no buffers saved, in-batch negatives only); --lambda-cl 0: no heads, no term;
    --lambda-bal 0: no balance term. The full run has all three."""
    from safetensors.torch import load_file

    from train import train

    full = train(small_cfg(tiny_dir, tmp_path / "full", steps=2, save_every=2))
    extra = {"queue": False} if switch == "lambda_cl" else {}  # the queue needs the term it serves
    off = train(small_cfg(tiny_dir, tmp_path / "off", steps=2, save_every=2, **{switch: value}, **extra))
    saved_full = load_file(tmp_path / "full" / "ckpt-000002" / "adapter.safetensors")
    saved_off = load_file(tmp_path / "off" / "ckpt-000002" / "adapter.safetensors")
    assert any(k.startswith("queue.") for k in saved_full) and any(k.startswith("heads.") for k in saved_full)
    if gone:
        assert not any(k.startswith(gone) for k in saved_off)
    key = {"queue": "contrastive", "lambda_cl": "contrastive", "lambda_bal": "balance"}[switch]
    if switch == "queue":  # the term stays, but without the queue's negatives it is another number
        assert off[1][key] is not None and off[1][key] != pytest.approx(full[1][key], rel=1e-6)
    else:
        assert off[0][key] is None and full[0][key] is not None
        assert off[0]["loss"] == pytest.approx(off[0]["lm"] + 0.01 * (off[0]["balance"] or 0) + 0.1 * (off[0]["contrastive"] or 0))


def test_z_loss_is_its_own_term(tiny_dir, tmp_path):
    """--z-loss adds lambda_z * mean(logsumexp(logits)^2), logged as "z", also with the balance term off."""
    from train import train

    a = train(small_cfg(tiny_dir, tmp_path / "a", steps=1))
    b = train(small_cfg(tiny_dir, tmp_path / "b", steps=1, z_loss=0.5, lambda_bal=0.0))
    assert "z" not in a[0] and b[0]["z"] > 0 and b[0]["lm"] == pytest.approx(a[0]["lm"], rel=1e-6)
    assert b[0]["loss"] == pytest.approx(b[0]["lm"] + 0.5 * b[0]["z"] + 0.1 * b[0]["contrastive"], rel=1e-6)


def test_keep_prunes_to_the_newest(tiny_dir, tmp_path):
    from train import train

    train(small_cfg(tiny_dir, tmp_path / "k", steps=6, save_every=2, keep=1))
    assert sorted(d for d in os.listdir(tmp_path / "k") if d.startswith("ckpt-")) == ["ckpt-000006"]


# ----------------------------------------------------------------------------------------------------------
# the four bugs that only the golden curve caught


def test_topk_gates_are_renormalized():
    from lora_moe import LoRAMoEConfig, LoRAMoELinear, route

    layer = LoRAMoELinear(torch.nn.Linear(8, 8), LoRAMoEConfig(num_experts=5, rank=2, top_k=2, dropout=0.0))
    rec = route(torch.randn(4, 8), layer.router.weight, layer.top_k)
    assert torch.allclose(rec.gates.sum(-1), torch.ones(4))  # the kept gates sum to 1
    assert ((rec.gates > 0).sum(-1) == 2).all()
    p = rec.probs.gather(-1, rec.topk_idx)
    assert torch.allclose(rec.gates.gather(-1, rec.topk_idx), p / p.sum(-1, keepdim=True))


def test_balance_loss_falls_when_routing_evens_out():
    """Minimizing the balance loss must spread the load: gradient descent on it raises the load entropy."""
    from conftest import one_site
    from lora_moe import balance_loss

    torch.manual_seed(0)
    logits = (torch.randn(256, 4) + torch.tensor([3.0, 0, 0, 0])).requires_grad_()
    opt = torch.optim.SGD([logits], lr=5.0)

    def record():
        return one_site(logits)

    def top_share():
        return (torch.bincount(logits.argmax(-1), minlength=4).float() / 256).max().item()

    first, share = balance_loss(*record()).item(), top_share()
    for _ in range(50):
        opt.zero_grad()
        balance_loss(*record()).backward()
        opt.step()
    assert balance_loss(*record()).item() < first - 0.5 and top_share() < share - 0.1


def test_keys_enter_the_queue_only_after_the_loss():
    """With an empty queue, a step's loss equals the in-batch-only loss: its own keys are not yet negatives."""
    from conftest import forward_records
    from contrastive import contrastive_loss, make_heads
    from expert_queue import ExpertQueue
    from lora_moe import sites

    model = tiny_model()
    heads = make_heads(model, dim=16)
    rec, w = forward_records(model, torch.randint(0, 64, (2, 10)), expert_acts=True)
    queue = ExpertQueue(len(sites(model)), size=64, dim=16)
    with_queue = contrastive_loss(rec, w, "mixture", heads, queue, temperature=0.1)
    in_batch = contrastive_loss(rec, w, "mixture", heads, None, temperature=0.1)
    assert torch.allclose(with_queue, in_batch)
    assert int((queue.labels >= 0).sum()) == 20 * len(sites(model))  # and then they were enqueued
    assert not torch.allclose(contrastive_loss(rec, w, "mixture", heads, queue, temperature=0.1, enqueue=False),
                              in_batch)


def test_batches_are_length_bucketed():
    from data import batch_order

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(2000)]
    spread = lambda bs: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)  # noqa: E731
    order = batch_order(lengths, 8, seed=0, epoch=0)
    shuffled = list(range(2000))
    rng.shuffle(shuffled)
    assert spread(order) < 0.1 * spread([shuffled[i:i + 8] for i in range(0, 2000, 8)])
    assert sorted(i for b in order for i in b) == list(range(2000))  # every example once (2000 = 250 x 8)


# ----------------------------------------------------------------------------------------------------------
# evaluation claims


def test_adapter_implies_chat_and_shot_defaults(tiny_dir, tmp_path):
    import eval as ev
    from train import train

    train(small_cfg(tiny_dir, tmp_path / "run", steps=2, save_every=2))
    s = ev.evaluate(ev.parse_args(["cmexam", "--model", tiny_dir, "--adapter", str(tmp_path / "run"),
                                   "--out", str(tmp_path / "e1"), "--limit", "3"]))
    assert s["chat"] is True and s["shots"] == 0 and s["adapter"] == str(tmp_path / "run")
    s = ev.evaluate(ev.parse_args(["cmmlu-med", "--model", tiny_dir, "--out", str(tmp_path / "e2"), "--limit", "3"]))
    assert s["chat"] is False and s["shots"] == 5


def test_adapter_mismatch_lists_the_fields(tmp_path):
    from adapter_io import load_adapter, save_adapter
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights, save_model

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_model(init_weights(Qwen3(cfg)), str(tmp_path / "base"))
    from model import load_model

    a = add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=4, rank=2), verbose=False)
    save_adapter(a, str(tmp_path / "ad"))
    b = add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=2, rank=2, top_k=1), verbose=False)
    with pytest.raises(ValueError) as e:
        load_adapter(b, str(tmp_path / "ad"))
    assert "'num_experts': (4, 2)" in str(e.value) and "'top_k': (2, 1)" in str(e.value) and "'rank'" not in str(e.value)

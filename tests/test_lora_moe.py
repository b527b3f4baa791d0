"""LoRA-MoE adapters: reduction to plain LoRA (peft), the dense-masked path vs a per-expert loop, balance loss."""
import pytest
import torch


from adapter_io import load_adapter, save_adapter
from conftest import forward_records, hf_tiny, one_site, tiny_adapted
from bench.common import reference_forward
from lora_moe import (TARGETS, LoRAMoEConfig, LoRAMoELinear, add_lora_moe, balance_loss, record_routing, sites,
                      stack_records, z_loss)
from model import load_model
from train import routing_stats


def randomize_b(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sites(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def test_init_equals_base_exactly(tmp_path):
    hf_tiny(tmp_path)
    base, adapted = load_model(str(tmp_path)), load_model(str(tmp_path))
    add_lora_moe(adapted, LoRAMoEConfig(num_experts=4, rank=4, top_k=2, dropout=0.0))
    x = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))
    assert len(sites(adapted)) == 2 * len(TARGETS)
    trainable = {n.rsplit(".", 1)[-1] for n, p in adapted.named_parameters() if p.requires_grad}
    # router.weight is the only 'weight' left trainable; router_ctx is W_c of the (default) context routers
    assert trainable == {"lora_A", "lora_B", "weight", "router_ctx"}
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if ".base." in n or "norm" in n)


def test_single_expert_equals_peft_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = hf_tiny(tmp_path, tie=False)
    ours = add_lora_moe(load_model(str(tmp_path)), LoRAMoEConfig(num_experts=1, rank=4, alpha=8, top_k=1, dropout=0.0))
    randomize_b(ours)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS)))
    n_copied = 0
    with torch.no_grad():
        pm = dict(peft_model.named_modules())
        for name, m in sites(ours):
            p = pm["base_model.model." + name]
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)
            n_copied += 1
    assert n_copied == 2 * 7  # every target projection of every layer
    x = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        ref, got = peft_model(x).logits, ours(x)
        assert (got - ref).abs().max().item() <= 1e-5
    # and the adapters really changed the output (the comparison is not base vs base)
    with torch.no_grad():
        with peft_model.disable_adapter():
            plain = peft_model(x).logits
    assert (got - plain).abs().max().item() > 1e-3


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 3), (3, 3)])
def test_dense_masked_equals_per_expert_loop(E, k):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    layer = LoRAMoELinear(base, LoRAMoEConfig(num_experts=E, rank=5, alpha=10, top_k=k, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.router_ctx.normal_(0, 0.3)  # the default context router, its W_c away from its init of 0
    x = torch.randn(3, 7, 24)
    out = layer(x)
    ref = reference_forward(layer, x)
    assert (out - ref).abs().max().item() <= 1e-5
    params = [layer.lora_A, layer.lora_B, layer.router.weight, layer.router_ctx]
    g1 = torch.autograd.grad(out.pow(2).sum(), params)
    g2 = torch.autograd.grad(ref.pow(2).sum(), params)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert g1[2].abs().sum() > 0  # the router learns through the gates


def test_balance_loss_values():
    # uniform routing: exactly 1.0 (top-k slots spread evenly, P uniform)
    E = 4
    logits = torch.zeros(8, E, requires_grad=True)
    rec = one_site(logits, topk_idx=torch.arange(8).remainder(E)[:, None])  # ties broken evenly
    assert balance_loss(*rec).item() == pytest.approx(1.0, abs=1e-6)
    # full collapse with top-1: E
    collapse = torch.full((8, E), -1e4)
    collapse[:, 2] = 1e4
    assert balance_loss(*one_site(collapse)).item() == pytest.approx(E, abs=1e-4)


def test_balance_loss_hand_value_fails_if_softmaxed_twice():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -2.0, 0.0]])
    p = logits.softmax(-1)
    f = torch.tensor([2, 1, 1]) / 4.0  # top-1 picks: 0, 1, 2, 0
    expect = 3 * (f * p.mean(0)).sum()
    twice = 3 * (f * p.softmax(-1).mean(0)).sum()
    assert abs(expect - twice) > 1e-2  # the test can tell the two apart
    assert balance_loss(*one_site(logits)).item() == pytest.approx(expect.item(), abs=1e-6)


def test_balance_loss_ignores_padding(tmp_path):
    hf_tiny(tmp_path)
    model = add_lora_moe(load_model(str(tmp_path)), LoRAMoEConfig(num_experts=4, rank=2, top_k=2, dropout=0.0), verbose=False)
    x = torch.randint(0, 1000, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False
    a = balance_loss(*forward_records(model, x, mask))
    # change only the padding tokens: valid-token routing is the same (positions count from real tokens)
    x2 = x.clone()
    x2[0, :3] = (x2[0, :3] + 7) % 1000
    rec, weight = forward_records(model, x2, mask)
    b = balance_loss(rec, weight)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(balance_loss(rec, torch.ones_like(weight)), b, atol=1e-6)  # counting padding would


def test_balance_loss_gradient_reaches_only_the_router():
    # within a site the loss depends on the router alone: f carries no gradient, P = softmax(router(x))
    torch.manual_seed(0)
    layer = LoRAMoELinear(torch.nn.Linear(16, 16), LoRAMoEConfig(num_experts=4, rank=2, top_k=2, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    model = torch.nn.Module()
    model.site = layer
    x = torch.randn(2, 5, 16)
    with record_routing(model) as recs:
        layer(x)
    rec = stack_records(recs)
    weight = torch.ones(2, 5)
    (balance_loss(rec, weight) + 1e-3 * z_loss(rec, weight)).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    # and the gradient is that of E * sum(f.detach() * P): f is a constant
    w = layer.router.weight.detach().clone().requires_grad_(True)
    p = (x.reshape(-1, 16) @ w.T).softmax(-1)
    f = torch.bincount(p.topk(2, -1).indices.reshape(-1), minlength=4).float() / p.shape[0] / 2
    z = ((x.reshape(-1, 16) @ w.T).logsumexp(-1) ** 2).mean()
    (4 * (f * p.mean(0)).sum() + 1e-3 * z).backward()
    assert torch.allclose(w.grad, layer.router.weight.grad, atol=1e-6)


def test_every_site_gets_gradients(tmp_path):
    hf_tiny(tmp_path, layers=2)
    model = add_lora_moe(load_model(str(tmp_path)), LoRAMoEConfig(num_experts=4, rank=2, top_k=2, dropout=0.0), verbose=False)
    x = torch.randint(0, 1000, (2, 8))
    model(x)[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None]).mean().neg().backward()
    for name, m in sites(model):
        # step 0: B = 0, so A and the router get exactly zero gradient; B's is nonzero
        assert m.lora_B.grad.abs().sum() > 0, name
        assert m.lora_A.grad is None or m.lora_A.grad.abs().sum() == 0, name
    randomize_b(model)
    model.zero_grad()
    model(x)[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None]).mean().neg().backward()
    for name, m in sites(model):
        for p in (m.lora_A, m.lora_B, m.router.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_routing_stats(tmp_path):
    hf_tiny(tmp_path)
    model = add_lora_moe(load_model(str(tmp_path)), LoRAMoEConfig(num_experts=4, rank=2, top_k=2), verbose=False)
    rec, _ = forward_records(model, torch.randint(0, 1000, (2, 8)))
    stats = routing_stats([n for n, _ in sites(model)], rec.topk_idx, rec.probs)
    assert len(stats) == 2  # per layer
    for s in stats.values():
        assert sum(s["load"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= s["load_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-4


def test_save_load_adapter_roundtrip_and_mismatch(tmp_path):
    hf_tiny(tmp_path / "base")
    a = add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=4, rank=2, top_k=2, dropout=0.0), verbose=False)
    randomize_b(a)
    save_adapter(a, str(tmp_path / "ad"))
    b = load_model(str(tmp_path / "base"))
    load_adapter(b, str(tmp_path / "ad"))
    x = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    hf_tiny(tmp_path / "other", hidden=32, head_dim=16)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(load_model(str(tmp_path / "other")), str(tmp_path / "ad"))
    c = add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=2, rank=2, top_k=1), verbose=False)
    with pytest.raises(ValueError, match="num_experts"):
        load_adapter(c, str(tmp_path / "ad"))


def test_routing_stats_never_count_padding():
    from conftest import forward_records
    from lora_moe import sites

    model = tiny_adapted()
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


def test_topk_gates_are_renormalized():
    from lora_moe import LoRAMoEConfig, LoRAMoELinear, route

    layer = LoRAMoELinear(torch.nn.Linear(8, 8), LoRAMoEConfig(num_experts=5, rank=2, top_k=2, dropout=0.0))
    rec = route(layer.router(torch.randn(4, 8)), layer.top_k)
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

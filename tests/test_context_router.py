"""Context routers (``--router context``): W x_t + W_c m_t, m_t the mean of the site's inputs over the real
tokens t sees. Every path that is not a whole right-padded forward (left padding, KV-cache decoding, scoring's
prefix cache and candidate tries) must give each token the mean of that whole forward."""
import torch

import scoring as sc
from conftest import tiny_adapted
from generate import generate
from lora_moe import LoRAMoEConfig, LoRAMoELinear, record_routing, sites
from router_context import SequenceContext, new_context, read_in_context


def randomize(model, seed=0):
    """Context weights and experts that matter: a wrong mean then changes the routing and the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sites(model):
            m.router_ctx.copy_(torch.randn(m.router_ctx.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model.eval()


def test_a_site_starts_as_the_token_router_and_reads_only_the_past():
    """W_c = 0 at init: the output of the token-router site with the same weights; then the logits are
    W x_t + W_c mean_{i<=t} x_i by hand, and a token's do not depend on later tokens."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tok = LoRAMoELinear(torch.nn.Linear(6, 5), LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0))
    torch.manual_seed(0)
    ctx = LoRAMoELinear(torch.nn.Linear(6, 5), LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0, router="context"))
    x = torch.randn(2, 5, 6, generator=g)
    with torch.no_grad():
        tok.lora_B.normal_(generator=g)
        ctx.lora_B.copy_(tok.lora_B)
        assert torch.equal(ctx(x), tok(x))
        ctx.router_ctx.normal_(generator=g)
    want = x @ ctx.router.weight.T + torch.stack([x[:, :t + 1].mean(1) for t in range(5)], 1) @ ctx.router_ctx.T
    model = torch.nn.Sequential(ctx)
    with record_routing(model) as recs:
        model(x)
    torch.testing.assert_close(recs[0].logits, want)
    later = x.clone()
    later[:, 3:] = torch.randn(2, 2, 6, generator=g)
    torch.testing.assert_close(ctx(later)[:, :3], ctx(x)[:, :3])


def whole_logits(model, row):
    with torch.no_grad():
        return model(torch.tensor([row]))[0]  # (T, V): one unpadded sequence from its first token


def test_left_padded_kv_cache_decoding_equals_whole_forwards():
    """generate() on a left-padded batch (prefill, then one token a step from the KV cache): every row's greedy
    tokens are those of re-reading the row whole, unpadded, at each step; and the context did matter."""
    model = randomize(tiny_adapted(router="context"))
    rows = [[5, 9, 11, 3, 7, 2], [8, 1], [4, 4, 6, 10]]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    got = generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_id=None)
    for r, out in zip(rows, got.tolist()):
        seq = list(r)
        for _ in range(6):
            seq.append(int(whole_logits(model, seq)[-1].argmax()))
        assert out == seq[len(r):]
    token = tiny_adapted(router="context")
    token.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _, m in sites(token):
            m.router_ctx.zero_()
    assert (whole_logits(model, rows[0]) - whole_logits(token, rows[0])).abs().max() > 0.1


def test_scoring_prefix_cache_and_tries_equal_whole_forwards():
    """scoring's fast path (a prefix read once, right-padded question rests, candidate tries whose nodes see
    the prompt and their ancestors) gives each candidate the log-probability of reading it whole."""
    model = randomize(tiny_adapted(router="context"), seed=1)
    prefix, rests = [3, 14, 15, 9, 2], [[6, 5, 3], [5, 8, 9, 7, 9, 3]]
    cands = [[10], [10, 11, 1], [10, 12, 1], [11, 12, 1], [12, 1]]
    trie = sc.candidate_trie(cands)
    root, nodes = sc._forward_batch(model, sc._prefill(model, prefix), rests, [trie, trie])
    for b, rest in enumerate(rests):
        fast = torch.tensor([sc._path_score(p, root[b], nodes[b]) for p in trie[3]])
        slow = sc.answer_string_logprob(model, prefix + rest, cands, pad_id=0)
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
        whole = whole_logits(model, prefix + rest)[-1].float().log_softmax(-1)
        torch.testing.assert_close(root[b], whole, atol=1e-4, rtol=0)
    left = sc.next_token_logprobs(model, [prefix + r for r in rests], pad_id=0)  # left-padded
    torch.testing.assert_close(left, root, atol=1e-4, rtol=0)


def test_a_context_holds_only_real_tokens_and_repeats_row_zero():
    """read_in_context adds a forward's real tokens to the sums (not a tree forward's); repeat copies row 0."""
    model = randomize(tiny_adapted(router="context"))
    assert new_context(tiny_adapted(), 2) is None  # token routers: nothing to carry
    ctx = new_context(model, 2)
    assert ctx.sums.shape == (len(sites(model)), 2, 4)
    with torch.no_grad(), read_in_context(model, ctx, weight=torch.tensor([[0, 1, 1], [1, 1, 1]])):
        model(torch.tensor([[0, 5, 6], [4, 5, 6]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert ctx.count.flatten().tolist() == [2.0, 3.0] and ctx.sums.abs().sum() > 0
    before = ctx.sums.clone()
    with torch.no_grad(), read_in_context(model, ctx, tree=torch.eye(2, dtype=torch.bool).expand(2, 2, 2)):
        model.model(torch.tensor([[1, 2], [1, 2]]))
    assert torch.equal(ctx.sums, before) and ctx.count.flatten().tolist() == [2.0, 3.0]
    rep = SequenceContext(ctx.sums[:, 1:], ctx.count[1:]).repeat(3)
    assert torch.equal(rep.sums, ctx.sums[:, 1:].expand(-1, 3, -1)) and rep.count.flatten().tolist() == [3.0] * 3


def test_adapters_round_trip_and_older_configs_are_token_routers(tmp_path):
    import json

    from adapter_io import load_adapter, read_adapter_config, save_adapter

    model = randomize(tiny_adapted(router="context"))
    save_adapter(model, str(tmp_path / "a"))
    loaded = tiny_adapted(router="context")  # the same base, W_c still 0
    load_adapter(loaded, str(tmp_path / "a"))
    for (_, a), (_, b) in zip(sites(model), sites(loaded)):
        assert torch.equal(a.router_ctx, b.router_ctx) and a.router_ctx.abs().sum() > 0
    save_adapter(tiny_adapted(), str(tmp_path / "old"))
    cfg_file = tmp_path / "old" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    assert raw.pop("router") == "token"
    cfg_file.write_text(json.dumps(raw))  # as saved before --router existed
    assert read_adapter_config(str(tmp_path / "old")).router == "token"

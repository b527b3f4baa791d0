"""train.py: the loss falls, atomic checkpoints, exact resume, ranks and accumulation equal one big batch, the
golden defaults curve, gradient checkpointing, compile, bf16, the queue and each loss switch."""
import json
import os

import pytest
import torch

from conftest import ROOT, run_at_once, small_cfg
from config import TrainConfig


def test_loss_falls_and_metrics_are_written(tiny_dir, tmp_path):
    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "run", steps=12, lr=5e-3, save_every=100))
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == 12 and {"lm", "balance", "contrastive", "lr", "tokens_per_s"} <= set(lines[0])
    assert [i + 1 for i, l in enumerate(lines) if "routing" in l] == [10, 12]  # every ROUTING_EVERY steps, the last
    assert all(v is not None for v in (lines[0]["balance"], lines[0]["contrastive"]))
    assert sum(h["lm"] for h in hist[-3:]) < sum(h["lm"] for h in hist[:3])


@pytest.mark.parametrize("kw", [{}, {"router": "token"}, {"queue": 16}])
def test_resume_continues_exactly(tiny_dir, tmp_path, kw):
    from safetensors.torch import load_file
    from train import train

    full = train(small_cfg(tiny_dir, tmp_path / "a", **kw))
    train(small_cfg(tiny_dir, tmp_path / "b", steps=3, **kw))
    resumed = train(small_cfg(tiny_dir, tmp_path / "b", resume=str(tmp_path / "b"), **kw))
    assert [h["step"] for h in resumed] == [4, 5, 6]
    for x, y in zip(full[3:], resumed):
        for k in ("lm", "balance", "contrastive"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), k
    a = load_file(tmp_path / "a" / "ckpt-000006" / "adapter.safetensors")
    b = load_file(tmp_path / "b" / "ckpt-000006" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("queue.") for k in a) == ("queue" in kw)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_failed_save_leaves_last_checkpoint_loadable(tiny_dir, tmp_path, monkeypatch):
    import checkpoint
    from adapter_io import load_adapter
    from model import load_model
    from train import train

    real = checkpoint.write_training_state

    def crash_at_step_6(path, state):  # a crash in the middle of the second save, after the adapter files
        if state["step"] == 6:
            raise RuntimeError("injected failure")
        real(path, state)

    monkeypatch.setattr(checkpoint, "write_training_state", crash_at_step_6)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(small_cfg(tiny_dir, tmp_path / "r"))
    monkeypatch.setattr(checkpoint, "write_training_state", real)
    assert open(tmp_path / "r" / "latest").read() == "ckpt-000003"
    assert not os.path.exists(tmp_path / "r" / "ckpt-000006")
    load_adapter(load_model(tiny_dir), str(tmp_path / "r" / "ckpt-000003"))  # intact and loadable
    train(small_cfg(tiny_dir, tmp_path / "r", resume=str(tmp_path / "r")))  # and training goes on from it
    assert open(tmp_path / "r" / "latest").read() == "ckpt-000006"


def test_frozen_head_ce_equals_plain_cross_entropy():
    from objective import FrozenHeadCE

    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(101, 16, dtype=torch.float64)
    y = torch.randint(0, 101, (37,))
    got = FrozenHeadCE.apply(h, W, y, 8)  # 37 rows in chunks of 8: a ragged last chunk
    want = torch.nn.functional.cross_entropy(h @ W.T, y, reduction="sum")
    assert torch.allclose(got, want, atol=1e-9)
    (g1,) = torch.autograd.grad(got * 0.5, h)
    (g2,) = torch.autograd.grad(want * 0.5, h)
    assert torch.allclose(g1, g2, atol=1e-9)


def train_cli(args, out, nproc: int = 1) -> list[dict]:
    """train.py ``args`` into ``out`` (under torchrun, gloo, when ``nproc`` > 1; one thread per process, so
    runs compare float for float); its metrics.jsonl records."""
    return train_clis((args, out, nproc))[0]


def train_clis(*runs) -> list[list[dict]]:
    """``train_cli`` for several (args, out, nproc) at once (``run_at_once``), each in its own processes; their
    records in order."""
    def argv(args, out, nproc):
        launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return launch + ["train.py", *args, "--out", str(out)]

    for r in run_at_once(*(argv(*run) for run in runs), env={**os.environ, "OMP_NUM_THREADS": "1"}):
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    return [[json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))] for _, out, _ in runs]


def equal_length_args(tiny_dir, tmp_path) -> list[str]:
    """Flags for 4 short steps of LoRA-MoE (E = 4, r = 4, top-2) on equal-length data written to tmp_path."""
    equal_length_data(tmp_path / "eq.jsonl")
    return ["--model", tiny_dir, "--data", str(tmp_path / "eq.jsonl"), "--max-len", "40", "--steps", "4",
            "--warmup", "1", "--lr", "5e-3", "--num-experts", "4", "--rank", "4", "--top-k", "2", "--keep", "10"]


def equal_length_data(path, n=16):
    """n examples that all truncate to exactly --max-len tokens (40, or 160), with answer tokens left in each.

    why equal lengths: the balance and contrastive losses are means over each rank's tokens, and DDP/FSDP
    average those means; only with equal token counts per rank is that the mean over the global batch."""
    advice = "患者应注意休息，多喝水，按时服药，如有不适及时就医。" * 4  # long enough for --max-len 160 too
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"问题{i}：头痛怎么办？", "response": f"第{i}条建议：" + advice * 3},
                               ensure_ascii=False) + "\n")


@pytest.mark.parametrize("mode", ["ddp", "ddp-accum", "fsdp", "ddp-default", "ddp-default-accum"])
def test_two_ranks_equal_one_process_with_the_doubled_batch(tiny_dir, tmp_path, mode):
    """torchrun --nproc_per_node=2 (gloo) == 1 process holding both ranks' sequences: the same per-step losses
    and, after 4 AdamW steps, the same adapters and queue. ddp / ddp-accum: LM + balance (the contrastive term
    off), 2 ranks x batch 2 == 1 x batch 4 (the balance term's slot counts are summed over ranks); -accum: 2
    micro-batches a step (DDP's no_sync on the first). fsdp / ddp-default(-accum): train.py's defaults with the
    queue, balance off, where 2 ranks == 1 process with twice the accumulation (the contrastive negatives are
    the micro-batch's own sequences; the queue is pushed after each step); balance is off there because its
    token counts are shared by the ranks of a micro-step, not by micro-steps (docs/design.md). ddp also resumes
    the 1-process run at step 2 on 2 ranks."""
    from safetensors.torch import load_file

    common = equal_length_args(tiny_dir, tmp_path) + ["--dropout", "0", "--save-every", "1"]
    cl = mode not in ("ddp", "ddp-accum")
    common += ["--queue", "64", "--lambda-bal", "0"] if cl else ["--lambda-cl", "0"]
    b1, b2 = {"ddp-accum": (["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "1", "--grad-accum", "2"]),
              "ddp-default": (["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "2"]),
              "fsdp": (["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "2"]),
              "ddp-default-accum": (["--batch-size", "2", "--grad-accum", "4"],
                                    ["--batch-size", "2", "--grad-accum", "2"])
              }.get(mode, (["--batch-size", "4"], ["--batch-size", "2"]))
    m1, m2 = train_clis((common + b1, tmp_path / "one", 1),
                        (common + b2 + (["--fsdp"] if mode == "fsdp" else []), tmp_path / "two", 2))
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):
        assert (a["balance"] is None) == (b["balance"] is None) == cl
        assert (a["contrastive"] is None) == (b["contrastive"] is None) == (not cl)
        for k in ("lm", "contrastive", "grad_norm") if cl else ("lm", "balance", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
        assert a["padding_share"] == b["padding_share"] == 0.0
    assert m1[-1]["lm"] < m1[0]["lm"]  # the steps really trained something
    a = load_file(tmp_path / "one" / "ckpt-000004" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "ckpt-000004" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("queue.") for k in a) == cl
    for k in a:
        if not a[k].is_floating_point():  # the queue's labels and write pointer
            assert torch.equal(a[k], b[k]), k
        else:  # why by norm: a few A_e entries get a step-2 gradient at float-noise level (measured 8e-11 vs
            # -1e-9; median 7e-6), which Adam turns into ~lr apart (0.0018 in one entry); a wrong gather or
            # scaling moves whole tensors by O(their update), 100x this bound
            assert (a[k] - b[k]).norm() <= 1e-2 * a[k].norm() + 5e-3 / 20, (k, (a[k] - b[k]).norm(), a[k].norm())
    # the gradients themselves: after step 1, Adam's first moment is (1 - beta1) * the (clipped) gradient
    from checkpoint import read_training_state
    sa = read_training_state(str(tmp_path / "one" / "ckpt-000001"))["optimizer"]["state"]
    sb = read_training_state(str(tmp_path / "two" / "ckpt-000001"))["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len([k for k in a if not k.startswith("queue.")])
    # why not elementwise: contrastive gradients are sums of many nearly cancelling fp32 terms (some sites'
    # sum to ~1e-7 from terms ~1e-5), so summation order alone moves those ~1e-3 relative
    # to themselves. Bound: 1e-4 of each tensor's own norm + 1e-6 of the largest gradient's norm. A wrong
    # gather, offset or scaling moves gradients by O(1) of their norm.
    scale = max(s["exp_avg"].norm().item() for s in sa.values())
    for k in sa:
        ga, gb = sa[k]["exp_avg"], sb[k]["exp_avg"]
        assert (ga - gb).norm() <= 1e-4 * ga.norm() + 1e-6 * scale, (k, (ga - gb).norm(), ga.norm(), scale)
    if mode == "ddp":  # the 1-process checkpoint at step 2 resumed on 2 ranks continues the same run
        import shutil
        shutil.copytree(tmp_path / "one" / "ckpt-000002", tmp_path / "mixed" / "ckpt-000002")
        m3 = train_cli(common + b2 + ["--resume", str(tmp_path / "mixed")], tmp_path / "mixed", nproc=2)
        assert [x["step"] for x in m3] == [3, 4]
        for x, y in zip(m1[2:], m3):
            for k in ("lm", "balance", "contrastive"):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)


GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def test_golden_loss_curve(tiny_dir, tmp_path):
    """train.py's defaults (small_cfg), 20 steps, fixed seed, the bundled data: the per-step losses match the
    checked-in curve to 1e-4 relative. A changed default fails it until it is regenerated.
    Measured: 1 vs 2 threads differ by <= 2e-7 here; at this lr the run is not chaotic (at lr 2e-2 flipped
    top-k choices made 1 vs 2 threads differ by 20% after 13 steps). The LM loss falls by ~0.1 nats and the
    contrastive loss visibly over these steps, 100x and more the tolerance.
    Regenerate (only after an intended change): SPARSEDOCTOR_REGEN_GOLDEN=1 pytest -k golden_loss_curve"""
    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "g", steps=20, lr=5e-3, save_every=100, max_len=128, batch_size=4))
    got = [{k: h[k] for k in ("step", "lm", "balance", "contrastive")} for h in hist]
    path = os.path.join(GOLDEN_DIR, "loss_curve_defaults.json")
    if os.environ.get("SPARSEDOCTOR_REGEN_GOLDEN"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"config": "tests/conftest.py::small_cfg(steps=20, lr=5e-3, max_len=128, batch_size=4) "
                                 "on tiny_dir (hidden 32, 2 layers, seed 0), samples/med_sample.jsonl",
                       "torch": torch.__version__, "curve": got}, f, indent=1)
        pytest.skip("golden curve regenerated: nothing to compare it with in this run")
    want = json.load(open(path, encoding="utf-8"))["curve"]
    assert len(got) == len(want) == 20
    for g, w in zip(got, want):
        for k in ("lm", "balance", "contrastive"):
            assert g[k] == pytest.approx(w[k], rel=1e-4), (g["step"], k, g[k], w[k])
    assert want[-1]["lm"] < want[0]["lm"] - 0.05


def test_grad_checkpointing_changes_nothing_but_memory(tiny_dir, tmp_path):
    """--grad-checkpointing recomputes each block in backward (dropout RNG replayed): same losses, same adapters."""
    from safetensors.torch import load_file
    from train import train

    a = train(small_cfg(tiny_dir, tmp_path / "a", steps=3, save_every=3))
    b = train(small_cfg(tiny_dir, tmp_path / "b", steps=3, save_every=3, grad_checkpointing=True))
    for x, y in zip(a, b):
        for k in ("lm", "balance", "contrastive", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-5), k
    ta = load_file(tmp_path / "a" / "ckpt-000003" / "adapter.safetensors")
    tb = load_file(tmp_path / "b" / "ckpt-000003" / "adapter.safetensors")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


@pytest.mark.parametrize("checkpointing,router", [(False, "token"), (True, "token"), (False, "context")])
def test_compiled_layers_equal_eager_without_a_graph_break(checkpointing, router):
    """--compile (train.compile_layers): the default objective's loss parts and every adapter gradient equal the
    eager model's, the routing records survive compilation, and each layer is one graph with no break (a break
    per site would give back most of what compiling wins). aot_eager: dynamo's capture without inductor's
    minutes of C++ compiling; the inductor numbers are bench/compile_step.py's."""
    import torch._dynamo as dynamo
    from conftest import tiny_adapted
    from config import TrainConfig
    from objective import HybridLoss
    from train import compile_layers

    dynamo.reset()
    dynamo.utils.counters.clear()
    eager, compiled = tiny_adapted(router=router), tiny_adapted(router=router)
    compile_layers(compiled, backend="aot_eager")
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels, mask = ids.clone(), torch.ones_like(ids, dtype=torch.bool)
    outs = []
    for model in (eager, compiled):
        model.model.gradient_checkpointing = checkpointing
        micro = HybridLoss(model.train(), TrainConfig(dropout=0.0))(ids, labels, mask, 33.0, 1, None,
                                                                     torch.Generator().manual_seed(1))
        micro.loss.backward()
        outs.append((micro.parts, [p.grad for p in model.parameters() if p.requires_grad]))
    (pe, ge), (pc, gc) = outs
    assert torch.allclose(pe, pc, atol=1e-6) and (pe[1:] != 0).sum() == 2  # lm, balance, contrastive (z off)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ge, gc))
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= len(compiled.model.layers)


def test_bf16_base_with_fp32_adapters_trains(tiny_dir, tmp_path, monkeypatch):
    """The GPU configuration (bf16 frozen base, fp32 adapters and losses), run on CPU: finite, falling, fp32 adapters."""
    from safetensors.torch import load_file

    import train as T

    monkeypatch.setattr(T, "resolve_dtype", lambda name, device: torch.bfloat16)  # what CUDA gets
    hist = T.train(small_cfg(tiny_dir, tmp_path / "bf", steps=8, lr=5e-3, save_every=8))
    assert all(torch.isfinite(torch.tensor([h["lm"], h["balance"], h["contrastive"]])).all() for h in hist)
    assert sum(h["lm"] for h in hist[-3:]) < sum(h["lm"] for h in hist[:3])
    saved = load_file(tmp_path / "bf" / "ckpt-000008" / "adapter.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved.values())


def test_the_queue_through_train_py_holds_one_unit_routing_per_sequence(tiny_dir, tmp_path):
    """With --queue 64, each site's queue holds one E-dimensional unit routing per sequence seen (2 steps x 2
    sequences), and the term is in the loss with its weight."""
    from safetensors.torch import load_file

    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "s", steps=2, save_every=2, queue=64))
    saved = load_file(tmp_path / "s" / "ckpt-000002" / "adapter.safetensors")
    keys, labels = saved["queue.keys"][0], saved["queue.labels"][0]  # site 0's entries
    assert keys.shape == (64, 4) and int((labels >= 0).sum()) == 4
    assert torch.allclose(keys[:4].norm(dim=-1), torch.ones(4), atol=1e-5)
    h = hist[0]
    assert h["contrastive"] > 0 and h["loss"] == pytest.approx(h["lm"] + 0.01 * h["balance"] + 1.0 * h["contrastive"])


def test_two_rank_resume_continues_each_ranks_own_sampling_and_dropout(tiny_dir, tmp_path):
    """2 ranks, contrastive tokens sampled (2 x 160 tokens > 256 a site) and dropout on: resuming the step-2 checkpoint
    gives steps 3-4 of the uninterrupted run exactly, because every rank gets back its own RNG streams (with
    rank 0's streams on both ranks, rank 1 would sample other tokens and draw other dropout masks)."""
    import shutil

    common = equal_length_args(tiny_dir, tmp_path) + ["--dropout", "0.1", "--max-len", "160",
                                                      "--batch-size", "2", "--save-every", "2"]
    m1 = train_cli(common, tmp_path / "full", nproc=2)
    shutil.copytree(tmp_path / "full" / "ckpt-000002", tmp_path / "resumed" / "ckpt-000002")
    m2 = train_cli(common + ["--resume", str(tmp_path / "resumed")], tmp_path / "resumed", nproc=2)
    assert [x["step"] for x in m2] == [3, 4]
    for x, y in zip(m1[2:], m2):
        for k in ("lm", "balance", "contrastive", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (x["step"], k)


def step_once(tiny_dir, out, batches):
    """One real train_step over ``batches`` (LM only); returns (metrics, the gradients it applied)."""
    import train as T
    from objective import HybridLoss

    cfg = small_cfg(tiny_dir, out, dropout=0.0, lambda_bal=0.0, lambda_cl=0.0)
    T.seed_everything(0)
    model, queue, gen = T.build_model(cfg, tiny_dir, torch.device("cpu"), 0, verbose=False)
    state = T.build_state(HybridLoss(model, cfg), queue, gen, cfg, torch.device("cpu"))
    grads = []
    state.opt.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(p.grad.clone() for p in state.params))
    rec, _ = T.train_step(state, batches)
    return rec, grads


def test_grad_accumulation_equals_the_doubled_batch(tiny_dir, tmp_path):
    """--grad-accum 2 x B == --grad-accum 1 x 2B: the LM loss is normalized by the whole step's answer tokens."""
    from data import collate, encode_all, read_jsonl
    from tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir)
    items = encode_all(read_jsonl(os.path.join(ROOT, "samples", "med_sample.jsonl"))[:40], tok, 96)[0][:4]
    lengths = [sum(y != -100 for y in lab) for _, lab in items]
    assert lengths[0] + lengths[1] != lengths[2] + lengths[3]  # unequal halves: a per-micro-batch mean would differ
    two, g2 = step_once(tiny_dir, tmp_path / "a", [collate(items[:2], tok.pad_id), collate(items[2:], tok.pad_id)])
    one, g1 = step_once(tiny_dir, tmp_path / "b", [collate(items, tok.pad_id)])
    assert two["lm"] == pytest.approx(one["lm"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for a, b in zip(g2, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("switch, value, gone", [("queue", 0, "queue."), ("lambda_cl", 0.0, None),
                                                 ("lambda_bal", 0.0, None)])
def test_each_loss_switch_removes_its_part(tiny_dir, tmp_path, switch, value, gone):
    """--queue 0: no queue (no buffers saved, in-batch negatives only); --lambda-cl 0: no term; --lambda-bal 0:
    no balance term. The full run has all three."""
    from safetensors.torch import load_file

    from train import train

    full = train(small_cfg(tiny_dir, tmp_path / "full", steps=2, save_every=2, queue=64))
    extra = {} if switch == "lambda_cl" else {"queue": 64}  # the queue needs the term it serves
    off = train(small_cfg(tiny_dir, tmp_path / "off", steps=2, save_every=2, **{**extra, switch: value}))
    saved_full = load_file(tmp_path / "full" / "ckpt-000002" / "adapter.safetensors")
    saved_off = load_file(tmp_path / "off" / "ckpt-000002" / "adapter.safetensors")
    assert any(k.startswith("queue.") for k in saved_full)
    if gone:
        assert not any(k.startswith(gone) for k in saved_off)
    key = {"queue": "contrastive", "lambda_cl": "contrastive", "lambda_bal": "balance"}[switch]
    if switch == "queue":  # the term stays, but without the queue's negatives it is another number
        assert off[1][key] is not None and off[1][key] != pytest.approx(full[1][key], rel=1e-6)
    else:
        assert off[0][key] is None and full[0][key] is not None
        other = "balance" if key == "contrastive" else "contrastive"
        assert off[0][other] > 0.1  # the other term stays on, with its value
        assert off[0]["loss"] == pytest.approx(off[0]["lm"] + 0.01 * (off[0]["balance"] or 0) + (off[0]["contrastive"] or 0))


def test_z_loss_is_its_own_term(tiny_dir, tmp_path):
    """--lambda-z adds lambda_z * mean(logsumexp(logits)^2), logged as "z", also with the balance term off."""
    from train import train

    a = train(small_cfg(tiny_dir, tmp_path / "a", steps=1))
    b = train(small_cfg(tiny_dir, tmp_path / "b", steps=1, lambda_z=0.5, lambda_bal=0.0))
    assert "z" not in a[0] and b[0]["z"] > 0 and b[0]["lm"] == pytest.approx(a[0]["lm"], rel=1e-6)
    assert b[0]["loss"] == pytest.approx(b[0]["lm"] + 0.5 * b[0]["z"] + 1.0 * b[0]["contrastive"], rel=1e-6)


def test_keep_prunes_to_the_newest(tiny_dir, tmp_path):
    from train import train

    train(small_cfg(tiny_dir, tmp_path / "k", steps=6, save_every=2, keep=1))
    assert sorted(d for d in os.listdir(tmp_path / "k") if d.startswith("ckpt-")) == ["ckpt-000006"]


def test_batch_size_1_with_the_queue_trains(tiny_dir, tmp_path):
    """The accept side of the --batch-size 1 refusal: with --queue K the contrastive term has negatives from the
    second step on (the first step's queue is empty: its term is 0, log 1), and the queue fills one view a step."""
    from safetensors.torch import load_file

    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "b1", steps=3, batch_size=1, queue=8, save_every=3))
    assert hist[0]["contrastive"] == pytest.approx(0.0, abs=1e-6) and hist[2]["contrastive"] > 0.01
    labels = load_file(tmp_path / "b1" / "ckpt-000003" / "adapter.safetensors")["queue.labels"]
    assert ((labels >= 0).sum(1) == 3).all()


def test_the_lr_schedule_by_hand():
    """Linear warmup to --lr over --warmup steps (step 0 already takes 1 / warmup), then cosine down to 0.1 x --lr
    at --steps, flat after."""
    from train import lr_at

    cfg = TrainConfig(warmup=4, steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0) and lr_at(9, cfg) == pytest.approx(0.55)
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(20, cfg) == pytest.approx(0.1)

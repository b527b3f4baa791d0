"""train.py and data.py: assistant-only labels, bad input, atomic checkpoints, exact resume."""
import json
import os
import random

import pytest
import torch

from conftest import ROOT, run_at_once, small_cfg

from config import TrainConfig
from tokenizer import IM_END, Tokenizer
from data import IGNORE, DataError, collate, encode_all, read_jsonl, tokenize


def test_assistant_only_labels_golden(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    msgs = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "答案：C"}]
    ids, labels = tokenize(msgs, tok)
    from tokenizer import apply_chat_template
    assert ids == tok.encode(apply_chat_template(msgs))  # turn-by-turn tokenization == whole-text tokenization
    supervised = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    assert supervised == "A1<|im_end|>答案：C<|im_end|>"  # answers + their <|im_end|>, nothing else
    assert all(y in (IGNORE, t) for t, y in zip(ids, labels))
    assert labels.count(IM_END) == 2


def test_truncation_and_padding_never_carry_loss(qwen_tok_dir):
    tok = Tokenizer(qwen_tok_dir)
    long_prompt = [{"role": "user", "content": "头痛" * 200}, {"role": "assistant", "content": "休息"}]
    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "好的，请多喝水。"}]
    items, counts = encode_all([long_prompt, short], tok, max_len=64)
    assert counts == {"truncated": 1, "dropped_no_target": 1}  # the answer was cut away: dropped, counted
    items, _ = encode_all([short, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]], tok, 64)
    ids, labels, mask = collate(items, tok.pad_id)
    assert (labels[~mask] == IGNORE).all()
    assert ((labels != IGNORE) <= mask).all()


@pytest.mark.parametrize("content,needle", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', "bad.jsonl:2: "),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "bad.jsonl:2: no assistant turn"),
    ('{"prompt": 3, "response": "x"}', "bad.jsonl:2: prompt/response"),
    ('{"question": "x"}', "bad.jsonl:2: unknown shape"),
    ('[1, 2]', "bad.jsonl:2: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "q", "response": "a"}\n' + content + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(str(p))
    assert needle in str(e.value)
    examples, bad = read_jsonl(str(p), skip_bad=True)
    assert len(examples) == 1 and bad == 1


def test_empty_file_and_other_shapes(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no usable examples"):
        read_jsonl(str(p))
    p.write_text('{"instruction": "i", "input": "x", "output": "o"}\n', encoding="utf-8")
    (msgs,), _ = read_jsonl(str(p))
    assert msgs == [{"role": "user", "content": "i\n\nx"}, {"role": "assistant", "content": "o"}]


def test_loss_falls_and_metrics_are_written(tiny_dir, tmp_path):
    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "run", steps=12, lr=5e-3, save_every=100))
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == 12 and {"lm", "balance", "contrastive", "lr", "tokens_per_s", "routing"} <= set(lines[0])
    assert all(v is not None for v in (lines[0]["balance"], lines[0]["contrastive"]))
    assert sum(h["lm"] for h in hist[-3:]) < sum(h["lm"] for h in hist[:3])


@pytest.mark.parametrize("kw", [{}, {"cl_views": "expert", "queue_momentum": 0.9}, {"router": "context"},
                                {"cl_views": "sequence", "lambda_cl": 1.0, "queue": True, "tokens_per_site": 16}])
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
    assert a.keys() == b.keys() and any(k.startswith("queue.") for k in a)
    assert any(k.startswith("heads.key.") for k in a) == ("queue_momentum" in kw)  # EMA key heads saved, restored
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


def test_cli_reports_bad_data_clearly(tmp_path, tiny_dir):
    import subprocess
    import sys

    p = tmp_path / "d.jsonl"
    p.write_text("{oops\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "train.py", "--data", str(p), "--model", tiny_dir, "--out", str(tmp_path / "o")],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
    assert r.returncode == 2 and f"error: {p}:1:" in r.stderr


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
            "--warmup", "1", "--lr", "5e-3", "--num-experts", "4", "--rank", "4", "--top-k", "2", "--no-progress",
            "--keep", "10"]


def equal_length_data(path, n=16):
    """n examples that all truncate to exactly max_len=40 tokens, with answer tokens left in each.

    why equal lengths: the balance and contrastive losses are means over each rank's tokens, and DDP/FSDP
    average those means; only with equal token counts per rank is that the mean over the global batch."""
    advice = "患者应注意休息，多喝水，按时服药，如有不适及时就医。"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"问题{i}：头痛怎么办？", "response": f"第{i}条建议：" + advice * 3},
                               ensure_ascii=False) + "\n")


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-accum", "ddp-default", "ddp-default-accum"])
def test_two_ranks_equal_one_process_with_the_doubled_batch(tiny_dir, tmp_path, mode):
    """torchrun --nproc_per_node=2 (gloo) == 1 process holding both ranks' sequences: the same per-step losses
    and, after 4 AdamW steps, the same adapters, heads and queues. ddp / fsdp / ddp-accum: the mixture reading
    with heads and the queue, balance on, 2 ranks x batch 2 == 1 x batch 4 (its keys are gathered over ranks);
    *-accum: 2 micro-batches a step (DDP's no_sync on the first). ddp-default(-accum): train.py's defaults (the
    sequence reading, no heads) with the queue, where 2 ranks == 1 process with twice the accumulation (its
    negatives are the micro-batch's own sequences; the queue is written after each step), balance off (its
    token counts are shared by the ranks of a micro-step, not by micro-steps: docs/design.md). ddp also resumes
    the 1-process run at step 2 on 2 ranks."""
    from safetensors.torch import load_file

    common = equal_length_args(tiny_dir, tmp_path) + ["--dropout", "0", "--queue-size", "64", "--proj-dim", "16",
                                                      "--tokens-per-site", "100000", "--save-every", "1", "--queue"]
    heads = not mode.startswith("ddp-default")
    common += ["--cl-views", "mixture", "--lambda-cl", "0.1"] if heads else ["--lambda-bal", "0"]
    b1, b2 = {"ddp-accum": (["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "1", "--grad-accum", "2"]),
              "ddp-default": (["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "2"]),
              "ddp-default-accum": (["--batch-size", "2", "--grad-accum", "4"],
                                    ["--batch-size", "2", "--grad-accum", "2"])
              }.get(mode, (["--batch-size", "4"], ["--batch-size", "2"]))
    m1, m2 = train_clis((common + b1, tmp_path / "one", 1),
                        (common + b2 + (["--fsdp"] if mode == "fsdp" else []), tmp_path / "two", 2))
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):
        assert (a["balance"] is None) == (b["balance"] is None) == (not heads)
        for k in ("lm", "balance", "contrastive", "grad_norm") if heads else ("lm", "contrastive", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
        assert a["padding_share"] == b["padding_share"] == 0.0
    assert m1[-1]["lm"] < m1[0]["lm"]  # the steps really trained something
    a = load_file(tmp_path / "one" / "ckpt-000004" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "ckpt-000004" / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("heads.") for k in a) == heads and any(k.startswith("queue.") for k in a)
    for k in a:  # why lr/20: Adam's step m/sqrt(v) turns float noise in a near-zero gradient into ~lr
        if not a[k].is_floating_point():  # the queue's labels and write pointer
            assert torch.equal(a[k], b[k]), k
        elif heads:
            assert torch.allclose(a[k], b[k], atol=5e-3 / 20), (k, (a[k] - b[k]).abs().max())
        else:  # why by norm: without the heads' gradient, a few A_e entries get a step-2 gradient at float-noise
            # level (measured 8e-11 vs -1e-9; median 7e-6), which Adam turns into ~lr apart (0.0018 in one entry);
            # a wrong gather or scaling moves whole tensors by O(their update), 100x this bound
            assert (a[k] - b[k]).norm() <= 1e-2 * a[k].norm() + 5e-3 / 20, (k, (a[k] - b[k]).norm(), a[k].norm())
    # the gradients themselves: after step 1, Adam's first moment is (1 - beta1) * the (clipped) gradient
    from checkpoint import read_training_state
    sa = read_training_state(str(tmp_path / "one" / "ckpt-000001"))["optimizer"]["state"]
    sb = read_training_state(str(tmp_path / "two" / "ckpt-000001"))["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len([k for k in a if not k.startswith("queue.")])
    # why not elementwise: contrastive gradients are sums of many nearly cancelling fp32 terms (the heads of
    # the down_proj sites sum to ~1e-7 from terms ~1e-5), so summation order alone moves those ~1e-3 relative
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
# train.py's defaults for the loss terms and the routers (read from TrainConfig, so that changing one of them
# fails the defaults curve until it is regenerated): sequence, 1.0, no queue, 256, context, 0.2, 0.125
DEFAULTS = {k: getattr(TrainConfig(), k) for k in ("cl_views", "lambda_cl", "queue", "tokens_per_site", "router",
                                                   "temperature", "cl_debias")}


@pytest.mark.parametrize("name, kw", [("loss_curve.json", {}), ("loss_curve_defaults.json", DEFAULTS)])
def test_golden_loss_curve(tiny_dir, tmp_path, name, kw):
    """20 steps, fixed seed, all three losses on, the bundled data: the per-step losses match the checked-in
    curve to 1e-4 relative. Two curves: the first reading (mixture, queue, lambda_cl 0.1; kept since round 1)
    and train.py's defaults (sequence reading, no queue, lambda_cl 1.0, 256 tokens sampled per site, context
    routers, tau 0.2; regenerated when each became the default).
    Measured: 1 vs 2 threads differ by <= 2e-7 here; at this lr the run is not chaotic (at lr 2e-2 flipped
    top-k choices made 1 vs 2 threads differ by 20% after 13 steps). The LM loss falls by ~0.1 nats and the
    contrastive loss visibly over these steps, 100x and more the tolerance.
    Regenerate (only after an intended change): SPARSEDOCTOR_REGEN_GOLDEN=1 pytest -k golden_loss_curve"""
    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "g", steps=20, lr=5e-3, save_every=100, max_len=128, batch_size=4,
                           **kw))
    got = [{k: h[k] for k in ("step", "lm", "balance", "contrastive")} for h in hist]
    path = os.path.join(GOLDEN_DIR, name)
    if os.environ.get("SPARSEDOCTOR_REGEN_GOLDEN"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"config": f"tests/conftest.py::small_cfg(steps=20, lr=5e-3, max_len=128, batch_size=4, **{kw}) "
                                 "on tiny_dir (hidden 32, 2 layers, seed 0), data/med_sample.jsonl",
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
        loss, parts, _, _ = HybridLoss(model.train(), None, TrainConfig(dropout=0.0))(
            ids, labels, mask, 33.0, 1, None, torch.Generator().manual_seed(1))
        loss.backward()
        outs.append((parts, [p.grad for p in model.parameters() if p.requires_grad]))
    (pe, ge), (pc, gc) = outs
    assert all(torch.allclose(pe[k], pc[k], atol=1e-6) for k in ("lm", "balance", "contrastive"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ge, gc))
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= len(compiled.model.layers)


def test_bf16_base_with_fp32_adapters_trains(tiny_dir, tmp_path):
    """The GPU configuration (bf16 frozen base, fp32 adapters and losses), run on CPU: finite, falling, fp32 adapters."""
    from safetensors.torch import load_file
    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "bf", steps=8, lr=5e-3, save_every=8, dtype="bfloat16"))
    assert all(torch.isfinite(torch.tensor([h["lm"], h["balance"], h["contrastive"]])).all() for h in hist)
    assert sum(h["lm"] for h in hist[-3:]) < sum(h["lm"] for h in hist[:3])
    saved = load_file(tmp_path / "bf" / "ckpt-000008" / "adapter.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved.values())


def test_sequence_reading_trains_without_heads_and_queues_routings(tiny_dir, tmp_path):
    """The default reading through train.py: no heads saved; with --queue, each site's queue holds one
    E-dimensional unit routing per sequence seen (2 steps x 2 sequences), and the term is in the loss."""
    from safetensors.torch import load_file

    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "s", steps=2, save_every=2, cl_views="sequence", lambda_cl=1.0))
    saved = load_file(tmp_path / "s" / "ckpt-000002" / "adapter.safetensors")
    assert not any(k.startswith("heads.") for k in saved)
    keys, labels = saved["queue.keys"][0], saved["queue.labels"][0]  # site 0's entries
    assert keys.shape == (64, 4) and int((labels >= 0).sum()) == 4
    assert torch.allclose(keys[:4].norm(dim=-1), torch.ones(4), atol=1e-5)
    h = hist[0]
    assert h["contrastive"] > 0 and h["loss"] == pytest.approx(h["lm"] + 0.01 * h["balance"] + 1.0 * h["contrastive"])


def test_two_rank_resume_continues_each_ranks_own_sampling_and_dropout(tiny_dir, tmp_path):
    """2 ranks, contrastive tokens sampled (--tokens-per-site 8) and dropout on: resuming the step-2 checkpoint
    gives steps 3-4 of the uninterrupted run exactly, because every rank gets back its own RNG streams (with
    rank 0's streams on both ranks, rank 1 would sample other tokens and draw other dropout masks)."""
    import shutil

    common = equal_length_args(tiny_dir, tmp_path) + ["--dropout", "0.1", "--tokens-per-site", "8",
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

    cfg = small_cfg(tiny_dir, out, dropout=0.0, lambda_bal=0.0, lambda_cl=0.0, queue=False, clip=0.0)
    T.seed_everything(0)
    model, heads, queue, gen = T.build_model(cfg, tiny_dir, torch.device("cpu"), 0, verbose=False)
    body = HybridLoss(model, heads, cfg)
    params, opt, sched = T.make_optimizer(body, cfg, torch.device("cpu"))
    grads = []
    opt.step = lambda: grads.extend(p.grad.clone() for p in params)
    rec, _ = T.train_step(body, body, batches, queue, gen, params, opt, sched, cfg, False, torch.device("cpu"), 0)
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


def test_a_steps_pieces_do_not_depend_on_the_split():
    """batch_order: the pieces of --batch-size sequences of every step are the same for 1 process x accumulation
    4, 2 ranks x 2 and 4 ranks x 1 (micro-step j of rank r = piece j * world + r), and the ranks of one micro-step
    hold what 1 rank x world * batch-size holds in that micro-step."""
    from data import batch_order

    lengths = [random.Random(1).randint(5, 90) for _ in range(100)]

    def pieces(world, accum, B=3):
        per_rank = [batch_order(lengths, B, 7, 0, r, world, accum) for r in range(world)]
        return [[per_rank[r][s * accum + j] for j in range(accum) for r in range(world)]
                for s in range(len(per_rank[0]) // accum)]

    one = pieces(1, 4)
    assert len(one) == 8 and one == pieces(2, 2) == pieces(4, 1)
    wide = pieces(1, 2, B=6)  # 2 ranks x 3 sequences per micro-step == 1 rank x 6
    assert [[a + b for a, b in zip(s[::2], s[1::2])] for s in pieces(2, 2)] == wide


def test_router_warmup_trains_the_routers_alone_first(tiny_dir, tmp_path):
    """--router-warmup 2: after 2 steps every expert is exactly its init (A as drawn, B = 0) while the routers
    have moved; step 3 trains the experts too."""
    from safetensors.torch import load_file

    from train import build_model, train

    cfg = small_cfg(tiny_dir, tmp_path / "w", steps=3, save_every=1, cl_views="sequence", lambda_cl=1.0, queue=False,
                    router_warmup=2)
    train(cfg)
    model = build_model(cfg, tiny_dir, torch.device("cpu"), 0, verbose=False)[0]
    init = {k: v for k, v in model.state_dict().items() if "lora_" in k or "router" in k}
    step = {n: load_file(tmp_path / "w" / f"ckpt-{n:06d}" / "adapter.safetensors") for n in (2, 3)}
    experts = [k for k in init if "lora_" in k]
    routers = [k for k in init if "router" in k]
    assert experts and routers and all(k in step[2] for k in init)
    assert all(torch.equal(step[2][k], init[k]) for k in experts)
    assert all(not torch.equal(step[2][k], init[k]) for k in routers)
    assert all(not torch.equal(step[3][k], init[k]) for k in experts if "lora_B" in k)

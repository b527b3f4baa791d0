"""Host work of one training step, counted with torch.profiler: leaf aten ops, and the ops that make the host
wait for the GPU, for train.py (defaults; with token routers; plain LoRA) and a transformers + peft LoRA loop, at
a chosen depth.

    python bench/host_ops.py [--layers 36] [--batch 2] [--seq 128]

Why count and not time: on a GPU the host launches kernels while the GPU runs earlier ones. Every extra small
op is launch time, and every op whose result decides a shape or a Python branch (``nonzero`` from a boolean
mask, ``unique``, ``bincount``, ``masked_select``, ``.item()``) stops the host until the GPU catches up. Both are
properties of the code, not of the machine, so a CPU profile counts them exactly. Small widths (hidden 64),
real Qwen vocabulary, ``--layers`` deep (36: Qwen3-4B's 36 x 7 = 252 adapted projections), the bundled data.
Each arm's second step is profiled (the first warms up). Two counts:
- leaf ops: aten ops with no aten op inside them (every dispatch the host makes, views included);
- kernel ops: the innermost ops that compute (not METADATA: views, allocation, no-op casts), about the kernels
  a GPU launches.
A ``_foreach_*`` / ``_fused_*`` op counts once in both: on a GPU it is one multi-tensor launch (per chunk of
tensors), on CPU torch loops over the tensors inside it. Every arm steps a fused AdamW and clips with foreach,
as train.py does and as torch does on a GPU by default (foreach; peft users get it without asking).
Host waits are counted by name, leaf or not.
``_local_scalar_dense`` (``.item()``, ``float(t)``) is listed apart: on CPU it also counts reads of CPU
tensors (AdamW's step counters), which cost nothing on a GPU.
"""
import argparse
import collections
import os
import sys
import tempfile

import torch

from common import ROOT, table

WAITS = ("aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::bincount",
         "aten::masked_select", "aten::nonzero_static")
ITEM = "aten::_local_scalar_dense"
# ops that launch no kernel of their own: views and other metadata, allocation, composites that only call other
# ops (``linear`` -> ``mm``, ``to`` -> ``copy_`` or nothing), and the host reads counted apart
METADATA = set("""view _unsafe_view _reshape_alias reshape as_strided t transpose permute expand expand_as unsqueeze
    squeeze select slice narrow split split_with_sizes unbind chunk alias detach detach_ lift_fresh resolve_conj
    resolve_neg result_type empty empty_strided empty_like resize_ to _to_copy contiguous flatten unflatten view_as
    matmul linear numpy_T item _local_scalar_dense is_same_size size stride""".split())
SHAPE = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rope_theta=1_000_000.0, max_position_embeddings=4096, tie_word_embeddings=True)


def make_base(path: str, layers: int) -> str:
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights, save_model, write_qwen_tokenizer

    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        save_model(init_weights(Qwen3(Qwen3Config(**SHAPE, num_hidden_layers=layers))), path)
        write_qwen_tokenizer(path)
    return path


def computes(ev) -> bool:
    """Whether an aten op computes something itself (it is not one of METADATA)."""
    return ev.name.startswith("aten::") and ev.name[6:] not in METADATA


def inner_compute(ev) -> bool:
    """Whether an op inside ev computes (a multi-tensor op is one launch: nothing inside it counts)."""
    return not is_multi_tensor(ev) and any(computes(c) or inner_compute(c) for c in ev.cpu_children)


def is_multi_tensor(ev) -> bool:
    return ev.name.startswith(("aten::_foreach_", "aten::_fused_"))


def in_multi_tensor(ev) -> bool:
    """Whether ev is (inside) an op inside a ``_foreach_*`` / ``_fused_*`` op. why not counted: on a GPU such an
    op is one multi-tensor launch per chunk of tensors; on CPU torch loops over the tensors inside it."""
    while ev is not None:
        if is_multi_tensor(ev):
            return True
        ev = ev.cpu_parent
    return False


def count(fn) -> dict:
    """Run fn once under the profiler: {"leaf": n, "kernels": n, "waits": Counter(name), "items": n}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    leaf, kernels, waits, items = 0, 0, collections.Counter(), 0
    for ev in prof.events():
        if in_multi_tensor(ev.cpu_parent):
            continue
        if ev.name in WAITS:  # leaf or not (nonzero allocates its output inside itself)
            waits[ev.name] += 1
        items += ev.name == ITEM
        if ev.name.startswith("aten::") and (is_multi_tensor(ev) or not any(c.name.startswith("aten::")
                                                                            for c in ev.cpu_children)):
            leaf += 1
        kernels += computes(ev) and not inner_compute(ev)  # the innermost op that computes: a kernel
    return {"leaf": leaf, "kernels": kernels, "waits": waits, "items": items}


def train_py_step(path, batches, **kw):
    """train.py's own step (train_step: forward, backward, clip, AdamW), built as train.py builds it."""
    import train as T
    from objective import HybridLoss

    cfg = T.TrainConfig(model=path, out=tempfile.mkdtemp(), dropout=0.0, **kw)
    T.seed_everything(0)
    dev = torch.device("cpu")
    model, queue, gen = T.build_model(cfg, path, dev, 0, verbose=False)
    state = T.build_state(HybridLoss(model, cfg), queue, gen, cfg, dev)
    return lambda b: T.train_step(state, b)


def peft_step(path, batches):
    """transformers Qwen3ForCausalLM + peft LoRA r=16 on all 7 projections: loss, backward, clip, AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"])).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(b):
        ids, labels, mask = b[0]
        model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "sparsedoctor_host_ops"))
    a = ap.parse_args()
    from data import batch_order, collate, encode_all, read_jsonl
    from tokenizer import load_tokenizer

    path = make_base(f"{a.dir}_{a.layers}l", a.layers)
    tok = load_tokenizer(path)
    items, _ = encode_all(read_jsonl(os.path.join(ROOT, "samples", "med_sample.jsonl")), tok, a.seq)
    order = batch_order([len(i[0]) for i in items], a.batch, 0, 0)
    steps = [[collate([items[i] for i in order[s]], tok.pad_id)] for s in range(2)]
    arms = {"transformers + peft LoRA r16": lambda: peft_step(path, steps),
            "train.py plain LoRA (E=1, r=16)": lambda: train_py_step(path, steps, num_experts=1, top_k=1, rank=16,
                                                                     alpha=32),
            "train.py, --router token": lambda: train_py_step(path, steps, router="token"),
            "train.py defaults (E=8, top-2, context routers, balance + sequence contrastive)":
                lambda: train_py_step(path, steps)}
    res = {}
    for name, build in arms.items():
        step = build()
        step(steps[0])
        res[name] = count(lambda: step(steps[1]))
        print(f"  {name}: {res[name]['leaf']} leaf ops, {res[name]['kernels']} kernel ops, waits "
              f"{dict(res[name]['waits'])}", file=sys.stderr)
    ref = res["transformers + peft LoRA r16"]
    print(f"one training step, {a.layers} layers x 7 adapted projections, hidden 64, Qwen vocabulary, "
          f"batch {a.batch} x <= {a.seq} tokens, fp32 CPU, torch {torch.__version__}")
    rows = [[name, r["leaf"], f"{r['leaf'] / ref['leaf']:.2f}x", r["kernels"], f"{r['kernels'] / ref['kernels']:.2f}x",
             sum(r["waits"].values()),
             ", ".join(f"{n.split('::')[1]} {c}" for n, c in r["waits"].most_common()) or "-", r["items"]]
            for name, r in res.items()]
    print(table(rows, ["step", "leaf aten ops", "vs peft", "kernel ops", "vs peft", "host waits", "by name", "item() (CPU counters incl.)"]))


if __name__ == "__main__":
    main()

"""A miniature ablation that can tell: does the expert contrastive loss make LoRA-MoE routers specialize, and
what is specialization worth here?

    python bench/ablation.py                   # every arm x 3 seeds through train.py's loop
    python bench/ablation.py --quick           # 2 arms x 1 seed, a few steps: the CI smoke version
    python bench/ablation.py --jobs 4          # 4 runs at once (each its own process, cores shared out)
    python bench/ablation.py --plots           # also draw PNGs (pip install -e ".[plots]")
    python bench/ablation.py --arms cl-seq-ctx-db --seeds 0 --set lambda_cl=3.0 --out runs/abl-cl3   # probe one knob

The task (synthetic, so the right routing is known): D = 8 domains, each a different random permutation
sigma_d of the 26 letters, named by its own prefix word. A prompt ``"<word_d> <n>: x"`` asks for the chain
``sigma_d(x) sigma_d(sigma_d(x)) ...`` of exactly n (6-10) letters. A perfect model reaches exact match 1 and
loss 0 (the length is in the prompt), and the 8 x 26 conflicting transitions crowd a shared low-rank adapter.

Arms (same data, steps, lr, seed; E = 8 experts of rank 4, top-2, alpha / r = 2; token routers, tau 0.07 and
plain InfoNCE unless the arm says otherwise; see ARMS). Arms of readings and knobs that lost were removed from
the product; docs/results.md gives their rows and the commit that reproduces them.
  lora           plain LoRA, rank 32 = E * r (parameter-matched in the experts), no router
  moe            LoRA-MoE, LM loss only            moe+bal    + load balancing
  cl-seq         + balance + contrastive, with the queue (K = --queue-size)
  cl-seq-q16     the same with a queue of 16 (one step's sequences at batch 4 x accumulation 4)
  cl-seq-nq      the same without the queue
  oracle         control: every token of domain d forced onto expert d (top-1), no router learning
  oracle-l0      the same except at layer 0's q/k/v, whose input at an answer token holds no domain: there each
                 site keeps its own router (what a token router could be told)
  supervised     control: + balance + a router cross-entropy to the domain (lambda 0.1)
  cl-seq-ctx     cl-seq-nq with context routers (each also reads the causal mean of its site's inputs)
  moe+bal-ctx    moe+bal with context routers
  cl-seq-ctx-t2  cl-seq-ctx at InfoNCE temperature 0.2
  cl-seq-ctx-db  train.py's defaults: cl-seq-ctx-t2 with the debiased InfoNCE, tau+ = 1/8

Measured on a held-out sample of fresh prompts by ``ablation_metrics`` (its docstring lists them): loss,
exact match, per-layer NMI(domain; top-1 expert) and routing entropies, the contrastive term's router gradient
share, and for the --ablate-seeds seeds (default 0) two ablation matrices, each summarized by its specificity
(1: a drop hurts every domain alike; D: one domain only). ``expert_ablation`` drops expert index e at every
site; ``routed_ablation`` drops, site by site, the expert each domain is routed to (mapped on a separate
sample, --eval-seed + 1), since expert indices mean nothing across sites unless training ties them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # why last: bench/contrastive.py must not shadow ours
# after the path (bench/ runs from anywhere): the measurements, and the task with its controls
from ablation_metrics import (expert_ablation, measure, probe_ceiling, routed_ablation,  # noqa: E402
                              router_gradient_share, specificity)
from ablation_task import (DOMAINS, control_objective, install_control, make_base, make_examples,  # noqa: E402
                           permutations)

E, R, TOP_K = 8, 4, 2
LAMBDA_SUP = 0.1  # the supervised control's router cross-entropy weight (--lambda-sup)
ARMS = {
    "lora": dict(num_experts=1, top_k=1, rank=E * R, alpha=2.0 * E * R, lambda_bal=0.0, lambda_cl=0.0),
    "moe": dict(lambda_bal=0.0, lambda_cl=0.0),
    "moe+bal": dict(lambda_cl=0.0),
    "cl-seq": dict(queue=None),  # None: --queue-size
    "cl-seq-q16": dict(queue=16),
    "cl-seq-nq": dict(),
    "oracle": dict(top_k=1, lambda_bal=0.0, lambda_cl=0.0),
    "oracle-l0": dict(top_k=1, lambda_bal=0.0, lambda_cl=0.0),
    "supervised": dict(lambda_cl=0.0),
    "cl-seq-ctx": dict(router="context"),  # routers that see the sequence so far
    "moe+bal-ctx": dict(lambda_cl=0.0, router="context"),
    "cl-seq-ctx-t2": dict(router="context", temperature=0.2),
    "cl-seq-ctx-db": dict(router="context", temperature=0.2, cl_debias=0.125),  # train.py's defaults
}
QUICK_ARMS = ("lora", "cl-seq-ctx-db")  # plain LoRA and the defaults


# ----------------------------------------------------------------------------------------------------------
# One (arm, seed) run, in its own process (clean peak memory)


def run_config(arm: str, seed: int, a, data: str, work: str):
    """One run's TrainConfig: the common settings, E experts of rank R, the arm's own, then ``--set`` (later
    ones win, so ``--set`` can override anything)."""
    from train import TrainConfig

    run = dict(model=a.model, data=data, out=work, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
               warmup=max(1, a.steps // 10), max_len=64, dropout=0.0, seed=seed, save_every=a.eval_every,
               keep=10_000, overwrite=True)
    # alpha / rank = 2 in every arm; token routers, tau 0.07 and plain InfoNCE unless the arm says otherwise (as
    # the earlier rows ran), so a changed train.py default does not change what a row measured
    moe = dict(num_experts=E, rank=R, alpha=2.0 * R, top_k=TOP_K, router="token", temperature=0.07, cl_debias=0.0)
    arm_kw = {k: (a.queue_size if k == "queue" and v is None else v) for k, v in ARMS[arm].items()}
    return TrainConfig(**{**run, **moe, **arm_kw, **overrides(a.set)})


def run_one(arm: str, seed: int, a) -> dict:
    from checkpoint import load_checkpoint
    from common import peak_rss_mb
    from tokenizer import load_tokenizer
    from train import build_model, train

    perms = permutations()
    work = os.path.join(a.out, f"{arm}-seed{seed}")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "train.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for _, msgs in make_examples(a.train_size, 10_000 + seed, perms):
            f.write(json.dumps({"messages": msgs}) + "\n")
    held_out = make_examples(a.eval_size, a.eval_seed, perms)  # the same held-out sample for every run
    cfg = run_config(arm, seed, a, data, work)
    tok = load_tokenizer(a.model)
    hist = train(cfg, objective=control_objective(arm, tok, a.lambda_sup))
    # the run's model and queue once (as train.py builds them); each checkpoint refills them
    model, queue, _ = build_model(cfg, a.model, torch.device("cpu"), 0, verbose=False)
    install_control(arm, model, tok)  # the arm's own routers, as training had them
    over_steps = []
    for step in range(a.eval_every, a.steps + 1, a.eval_every):
        load_checkpoint(os.path.join(work, f"ckpt-{step:06d}"), model, queue, torch.device("cpu"))
        share = router_gradient_share(model, tok, held_out, cfg, queue) if cfg.uses_contrastive else None
        r = measure(model, tok, held_out)
        over_steps.append({"step": step, "loss": r["loss"], "exact_mean": r["exact_mean"], "router_grad_share": share,
                           "nmi_mean": float(np.mean(r["nmi"])) if "nmi" in r else None})
    final = {**r, "router_grad_share": share}  # the last checkpoint is the end of training
    final.pop("top1_counts", None)
    if seed in [int(x) for x in a.ablate_seeds.split(",") if x] and "nmi" in r:
        final["expert_ablation"] = expert_ablation(model, tok, held_out)
        mapping = make_examples(a.eval_size, a.eval_seed + 1, perms)  # not the held-out sample
        final["routed_ablation"] = routed_ablation(model, tok, held_out, mapping)
    times = [h["step_time"] for h in hist[1:]] or [hist[0]["step_time"]]
    return {"arm": arm, "seed": seed, **final, "over_steps": over_steps,
            "train_curve": [{k: h[k] for k in ("step", "lm", "balance", "contrastive")} for h in hist],
            "step_time_s": float(np.median(times)), "peak_rss_mb": peak_rss_mb()}


def overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE (a TrainConfig field, applied to every arm) -> {field: typed value}."""
    from dataclasses import fields

    from train import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for pair in pairs or []:
        key, _, val = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set {pair}: {key!r} is not a train.py setting ({', '.join(types)})")
        out[key] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(types[key], str)(val)
    return out


# ----------------------------------------------------------------------------------------------------------
# The table


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summarize(runs: list[dict]) -> tuple[dict, str]:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    summary = {}
    head = ["arm", "held-out loss", "exact match", "NMI mean", "NMI best layer", "router entropy", "load entropy",
            "expert cos", "cl grad share", "specificity: index / routed", "s/step", "peak MB"]
    rows = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        s = {"seeds": [r["seed"] for r in rs], "loss": [r["loss"] for r in rs], "exact_mean": [r["exact_mean"] for r in rs],
             "exact": [r["exact"] for r in rs], "nmi": [r.get("nmi") for r in rs],
             "router_entropy": [r.get("router_entropy") for r in rs], "load_entropy": [r.get("load_entropy") for r in rs],
             "expert_cos": [r.get("expert_cos") for r in rs], "router_grad_share": [r.get("router_grad_share") for r in rs],
             "step_time_s": [r["step_time_s"] for r in rs], "peak_rss_mb": [r["peak_rss_mb"] for r in rs],
             "specificity": [[specificity(r[k]) if k in r else None for k in ("expert_ablation", "routed_ablation")]
                             for r in rs]}
        summary[arm] = s
        spec = " / ".join(mean_std([sp[i] for sp in s["specificity"]]) for i in (0, 1))  # the ablated seeds'
        per_layer = lambda key: [float(np.mean(x)) if x else None for x in s[key]]  # noqa: E731
        best = [float(np.max(x)) if x else None for x in s["nmi"]]
        rows.append([arm, mean_std(s["loss"]), mean_std(s["exact_mean"]), mean_std(per_layer("nmi")), mean_std(best),
                     mean_std(per_layer("router_entropy")), mean_std(per_layer("load_entropy")),
                     mean_std(per_layer("expert_cos")), mean_std(s["router_grad_share"]), spec,
                     f"{np.mean(s['step_time_s']):.2f}", f"{np.mean(s['peak_rss_mb']):.0f}"])
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    md = "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])
    # per-layer NMI, the specialization signal, layer by layer
    layers = max((len(x) for s in summary.values() for x in s["nmi"] if x), default=0)
    if layers:
        lh = ["arm"] + [f"NMI layer {i}" for i in range(layers)]
        lrows = [[arm] + [mean_std([x[i] for x in s["nmi"] if x]) for i in range(layers)]
                 for arm, s in summary.items() if any(s["nmi"])]
        md += "\n\n" + "\n".join(["| " + " | ".join(lh) + " |", "|" + "---|" * len(lh)] +
                                 ["| " + " | ".join(r) + " |" for r in lrows])
    return summary, md


def plot(runs: list[dict], out: str):
    """Heat maps (domain x expert, last layer, seed 0), NMI over steps, and training LM loss per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in runs))
    moe = [a for a in arms if any("heatmap_last_layer" in r for r in runs if r["arm"] == a)]
    first = {a: next(r for r in runs if r["arm"] == a) for a in arms}
    fig, axes = plt.subplots(1, len(moe), figsize=(3.2 * len(moe), 3.2), squeeze=False)
    for ax, a in zip(axes[0], moe):
        hm = np.array(first[a]["heatmap_last_layer"])
        ax.imshow(hm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{a} (NMI {first[a]['nmi'][-1]:.2f})", fontsize=9)
        ax.set_xlabel("top-1 expert")
        ax.set_yticks(range(len(DOMAINS)), DOMAINS)
        ax.set_xticks(range(E))
        for (i, j), v in np.ndenumerate(hm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=7)
    fig.suptitle("share of each domain's answer tokens routed to each expert (last layer, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "routing_heatmaps.png"), dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for a in arms:
        rs = [r for r in runs if r["arm"] == a]
        steps = [o["step"] for o in rs[0]["over_steps"]]
        if rs[0]["over_steps"][0]["nmi_mean"] is not None:
            m = np.array([[o["nmi_mean"] for o in r["over_steps"]] for r in rs])
            a1.plot(steps, m.mean(0), marker="o", label=a)
            a1.fill_between(steps, m.mean(0) - m.std(0), m.mean(0) + m.std(0), alpha=0.2)
        lm = np.array([[c["lm"] for c in r["train_curve"]] for r in rs])
        a2.plot(range(1, lm.shape[1] + 1), lm.mean(0), label=a)
    a1.set(xlabel="step", ylabel="NMI(domain; top-1 expert), mean over layers", title="routing specialization")
    a2.set(xlabel="step", ylabel="training LM loss (mean over seeds)", title="loss")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "specialization_and_loss.png"), dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--model", default=None, help="base checkpoint dir (default: make_base's tiny Qwen3)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--queue-size", type=int, default=1024)
    ap.add_argument("--train-size", type=int, default=2048)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=999,
                    help="999: the held-out sample of every reported table; pilots use another (a dev sample)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each in its own process (s/step and peak MB then share the machine)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train.py setting in every arm, e.g. --set lambda_cl=1.0 --set temperature=0.2")
    ap.add_argument("--lambda-sup", type=float, default=LAMBDA_SUP, help="the supervised control's weight")
    ap.add_argument("--ablate-seeds", default="0", metavar="S,S",
                    help="seeds whose final model gets the two expert-ablation matrices ('' = none; default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="2 arms (plain LoRA, the defaults), 1 seed, 6 steps, small data (CI smoke run)")
    ap.add_argument("--plots", action="store_true", help="draw PNGs into --out (needs matplotlib)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: ARM:SEED in this process
    a = ap.parse_args()
    if a.quick:
        a.arms, a.seeds, a.steps, a.eval_every, a.train_size, a.eval_size = ",".join(QUICK_ARMS), "0", 6, 3, 64, 16
    if a.model is None:
        from tiny_qwen import DEFAULT_CACHE
        a.model = make_base(os.path.join(DEFAULT_CACHE, "ablation-base"))
    os.makedirs(a.out, exist_ok=True)
    if a.run:
        arm, seed = a.run.split(":")
        print(json.dumps(run_one(arm, int(seed), a)))
        return
    from tokenizer import load_tokenizer

    probe = probe_ceiling(a.model, load_tokenizer(a.model), make_examples(2 * a.eval_size, 777, permutations()), E)
    todo = [(arm, seed) for arm in a.arms.split(",") for seed in map(int, a.seeds.split(","))]
    common = ["--out", a.out, "--model", a.model, "--steps", str(a.steps), "--eval-every", str(a.eval_every),
              "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--queue-size", str(a.queue_size),
              "--train-size", str(a.train_size), "--eval-size", str(a.eval_size), "--eval-seed", str(a.eval_seed),
              "--lambda-sup", str(a.lambda_sup)] + [f"--set={p}" for p in a.set] \
        + [f"--ablate-seeds={a.ablate_seeds}"]
    env = dict(os.environ)
    if a.jobs > 1 and "OMP_NUM_THREADS" not in env:  # why: n processes each using every core would thrash
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.jobs))
    done, running = {}, []
    while todo or running:
        while todo and len(running) < a.jobs:  # start runs up to --jobs at once, in table order
            arm, seed = todo.pop(0)
            argv = [sys.executable, os.path.abspath(__file__), "--run", f"{arm}:{seed}"] + common
            running.append((arm, seed, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True, cwd=ROOT, env=env)))
        arm, seed, p = running.pop(0)  # wait for the oldest
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"run {arm}:{seed} failed:\n{err[-4000:]}")
        r = done[(arm, seed)] = json.loads(out.strip().splitlines()[-1])
        nmi_mean = np.mean(r["nmi"]) if "nmi" in r else float("nan")
        print(f"{arm:9s} seed {seed}: loss {r['loss']:.3f}, exact {r['exact_mean']:.3f}, NMI {nmi_mean:.3f}, "
              f"{r['step_time_s']:.2f} s/step", flush=True)
    runs = list(done.values())  # table order: runs finish in the order they were started
    summary, md = summarize(runs)
    md += "\n\nProbe ceiling on the frozen base (router inputs at answer positions, held-out half):\n\n" + \
        "| router input | linear probe accuracy | NMI(domain; k-means, k = E) |\n|---|---|---|\n" + \
        "".join(f"| {k} | {v['probe_accuracy']:.3f} | {v['kmeans_nmi']:.3f} |\n" for k, v in probe.items())
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(a).items() if k != "run"}, "arms": ARMS, "runs": runs,
                   "summary": summary, "probe": probe}, f, indent=1)
    with open(os.path.join(a.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n")
    print(md)
    if a.plots:
        plot(runs, a.out)
        print(f"plots in {a.out}")


if __name__ == "__main__":
    main()

"""Draw the routing of any train.py run from its metrics.jsonl: where the tokens go, and how that changes.

    python plot_routing.py runs/sparsedoctor            # writes routing_*.png into the run dir
    python plot_routing.py RUN_DIR --out DIR

Three PNGs (matplotlib: pip install -e ".[plots]"):
  routing_load.png      layer x expert heat map of the expert load (share of top-k slots), averaged over
                        the last 10% of logged steps; a uniform router gives 1/E everywhere
  routing_entropy.png   per layer over steps: the load entropy (nats; log E = balanced) and the mean
                        per-token router entropy (low = confident routing)
  routing_losses.png    LM, balance and contrastive losses over steps
A run's metrics carry no domain labels, so specialization by domain (bench/ablation.py) cannot be drawn here.
"""
from __future__ import annotations

import argparse
import json
import math
import os


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass a train.py run dir (it holds metrics.jsonl)")
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if r.get("routing")]
    if not recs:
        raise ValueError(f"{path} has no routing records (train.py logs them every --log-every steps)")
    return recs


def plot_run(run_dir: str, out: str | None = None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = read_metrics(run_dir)
    out = out or (run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir))
    os.makedirs(out, exist_ok=True)
    layers = sorted(recs[0]["routing"], key=int)
    steps = [r["step"] for r in recs]
    tail = recs[-max(1, len(recs) // 10):]
    load = np.array([[np.mean([r["routing"][L]["load"][e] for r in tail]) for e in range(len(tail[0]["routing"][L]["load"]))]
                     for L in layers])  # (layers, E)
    E = load.shape[1]
    files = []

    fig, ax = plt.subplots(figsize=(2.8 + 0.5 * E, 1.2 + 0.35 * len(layers)))
    im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="expert", ylabel="layer", title=f"expert load, steps {tail[0]['step']}-{tail[-1]['step']}")
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), layers)
    fig.colorbar(im, ax=ax, label=f"share of slots (1/E = {1 / E:.3f})")
    fig.tight_layout()
    files.append(os.path.join(out, "routing_load.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for L in layers:
        a1.plot(steps, [r["routing"][L]["load_entropy"] for r in recs], label=f"layer {L}")
        a2.plot(steps, [r["routing"][L]["token_entropy"] for r in recs], label=f"layer {L}")
    a1.axhline(math.log(E), color="k", ls=":", lw=1)
    a1.set(xlabel="step", ylabel="nats", title=f"expert-load entropy (dotted: log E = {math.log(E):.2f})")
    a2.set(xlabel="step", ylabel="nats", title="mean per-token router entropy")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(os.path.join(out, "routing_entropy.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("lm", "balance", "contrastive")):
        ys = [r.get(key) for r in recs]
        if any(y is not None for y in ys):
            ax.plot(steps, [float("nan") if y is None else y for y in ys])
        ax.set(xlabel="step", title=key if any(y is not None for y in ys) else f"{key} (off)")
    fig.tight_layout()
    files.append(os.path.join(out, "routing_losses.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a train.py --out dir (or its metrics.jsonl)")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default: the run dir)")
    a = ap.parse_args()
    for f in plot_run(a.run_dir, a.out):
        print(f)


if __name__ == "__main__":
    main()

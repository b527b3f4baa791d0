"""Round 10's held-out table from the stored runs: python docs/ablation/round10/combine.py (from the repo root).

The debiased arm and oracle-l0's seeds 3-4 were run in round 10; the default (tau 0.2) is round 9's five seeds,
moe+bal and the oracle rounds 7 and 9, oracle-l0's seeds 0-2 round 7 (commands in docs/ablation.md). +- is the
standard deviation over seeds; the gap's interval resamples each arm's seeds (20,000 draws). The decision rule
(docs/ablation/probes/round10-dev-pilots.md, written before the run): the debiased loss becomes the default if its
seed-paired loss against the default is lower by more than sd / sqrt(5) of the paired differences and its mean
specificity by routing is >= 3."""
import json
import sys

import numpy as np

sys.path.insert(0, "bench")
from ablation_metrics import specificity  # noqa: E402

D = "docs/ablation/"


def runs(path, arm):
    with open(D + path, encoding="utf-8") as f:
        return {r["seed"]: r for r in json.load(f)["runs"] if r["arm"] == arm}


ARMS = {
    "debiased, tau+ 1/8 (cl-seq-ctx-db)": runs("round10/held-out.json", "cl-seq-ctx-t2"),  # run as the switch
    "default, tau 0.2 (cl-seq-ctx-t2)": {**runs("round9/t02-seeds012.json", "cl-seq-ctx"),
                                         **runs("round9/seeds34-t02.json", "cl-seq-ctx")},
    "moe+bal": {**runs("round7/results.json", "moe+bal"), **runs("round9/seeds34-ref.json", "moe+bal")},
    "oracle": {**runs("round7/results.json", "oracle"), **runs("round9/seeds34-ref.json", "oracle")},
    "oracle-l0": {**runs("round7/results.json", "oracle-l0"), **runs("round10/oracle-l0-seeds34.json", "oracle-l0")},
}
SEEDS = [0, 1, 2, 3, 4]
DEB, DEF = list(ARMS)[:2]


def loss(arm):
    return np.array([ARMS[arm][s]["loss"] for s in SEEDS])


def gap_closed(arm, ceiling, rng):
    """(point, 95% interval) of (moe+bal - arm) / (moe+bal - ceiling), each arm's seeds resampled."""
    a, b, c = loss("moe+bal"), loss(ceiling), loss(arm)
    n = len(SEEDS)
    draws = [(a[i].mean() - c[k].mean()) / (a[i].mean() - b[j].mean())
             for i, j, k in (rng.integers(0, n, (3, n)) for _ in range(20_000))]
    return (a.mean() - c.mean()) / (a.mean() - b.mean()), np.percentile(draws, [2.5, 97.5])


def routed(arm):
    return [specificity(ARMS[arm][s]["routed_ablation"]) for s in SEEDS]


def row(arm):
    r, x = ARMS[arm], loss(arm)
    out = f"| {arm} | {x.mean():.3f} ± {x.std():.3f} ({', '.join(f'{v:.3f}' for v in x)}) |"
    if not all("routed_ablation" in r[s] for s in SEEDS):  # the references: ablated on seed 0 only
        return out + f" {np.mean([np.mean(r[s]['nmi']) for s in SEEDS]):.3f} | |"
    nmi = [np.mean(r[s]["nmi"]) for s in SEEDS]
    idx = [specificity(r[s]["expert_ablation"]) for s in SEEDS]
    rt = routed(arm)
    return out + (f" {np.mean(nmi):.3f} ± {np.std(nmi):.3f} | {np.mean(idx):.2f} ± {np.std(idx):.2f} / "
                  f"{np.mean(rt):.2f} ± {np.std(rt):.2f} ({', '.join(f'{v:.2f}' for v in rt)}) |")


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    print("| arm (4 x 4, held-out, seeds 0-4) | loss | NMI mean | specificity index / routed |\n|---|---|---|---|")
    for arm in ARMS:
        print(row(arm))
    print()
    for arm in (DEB, DEF):
        for ceiling in ("oracle", "oracle-l0"):
            p, (lo, hi) = gap_closed(arm, ceiling, rng)
            print(f"{arm}: {p:.0%} of the gap from moe+bal to {ceiling} ({lo:.0%}-{hi:.0%})")
        d = loss(arm) - loss("moe+bal")
        print(f"  seed-paired against moe+bal {d.mean():+.3f} (sd {d.std(ddof=1):.3f})")
    d = loss(DEB) - loss(DEF)
    se = d.std(ddof=1) / np.sqrt(len(d))
    print(f"\ndebiased - default, seed-paired: {np.round(d, 3).tolist()}, mean {d.mean():+.3f}, sd "
          f"{d.std(ddof=1):.3f}, se {se:.3f}; mean specificity by routing {np.mean(routed(DEB)):.2f}")
    passes = d.mean() < -se and np.mean(routed(DEB)) >= 3
    print("rule: " + ("passes, the debiased loss becomes the default" if passes else "fails, the default stays"))

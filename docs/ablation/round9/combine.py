"""Round 9's five-seed table from the stored runs: python docs/ablation/round9/combine.py (from the repo root).

Seeds 0-2 of tau 0.07 are round 8's runs, of moe+bal and the oracle round 7's; seeds 3-4 of every arm and
seeds 0-2 of tau 0.2 were run in round 9 (commands in docs/ablation.md). +- is the standard deviation over
seeds (numpy's default, as in results.md); the gap's interval resamples each arm's seeds (20,000 draws)."""
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
    "tau 0.2 (cl-seq-ctx-t2)": {**runs("round9/t02-seeds012.json", "cl-seq-ctx"),
                                **runs("round9/seeds34-t02.json", "cl-seq-ctx")},
    "tau 0.07 (cl-seq-ctx)": {**runs("round8/results.json", "cl-seq-ctx"),
                              **runs("round9/seeds34-t007.json", "cl-seq-ctx")},
    "moe+bal": {**runs("round7/results.json", "moe+bal"), **runs("round9/seeds34-ref.json", "moe+bal")},
    "oracle": {**runs("round7/results.json", "oracle"), **runs("round9/seeds34-ref.json", "oracle")},
}


def loss(arm, seeds):
    return np.array([ARMS[arm][s]["loss"] for s in seeds])


def gap_closed(arm, seeds, rng):
    """(point, 95% interval) of (moe+bal - arm) / (moe+bal - oracle), each arm's seeds resampled."""
    a, b, c = loss("moe+bal", seeds), loss("oracle", seeds), loss(arm, seeds)
    n = len(seeds)
    draws = [(a[i].mean() - c[k].mean()) / (a[i].mean() - b[j].mean())
             for i, j, k in (rng.integers(0, n, (3, n)) for _ in range(20_000))]
    return (a.mean() - c.mean()) / (a.mean() - b.mean()), np.percentile(draws, [2.5, 97.5])


def row(arm, seeds):
    r, x = ARMS[arm], loss(arm, seeds)
    out = f"| {arm} | {x.mean():.3f} ± {x.std():.3f} ({', '.join(f'{v:.3f}' for v in x)}) |"
    if not all("routed_ablation" in r[s] for s in seeds):  # the references: ablated on seed 0 only
        return out + " | |"
    nmi = [np.mean(r[s]["nmi"]) for s in seeds]
    idx = [specificity(r[s]["expert_ablation"]) for s in seeds]
    routed = [specificity(r[s]["routed_ablation"]) for s in seeds]
    return out + (f" {np.mean(nmi):.3f} ± {np.std(nmi):.3f} | {np.mean(idx):.2f} ± {np.std(idx):.2f} / "
                  f"{np.mean(routed):.2f} ± {np.std(routed):.2f} ({', '.join(f'{v:.2f}' for v in routed)}) |")


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for seeds in ([0, 1, 2], [0, 1, 2, 3, 4]):
        print(f"\nseeds {seeds}\n\n| arm | loss | NMI mean | specificity index / routed |\n|---|---|---|---|")
        for arm in ARMS:
            print(row(arm, seeds))
        for arm in list(ARMS)[:2]:
            p, (lo, hi) = gap_closed(arm, seeds, rng)
            d = loss(arm, seeds) - loss("moe+bal", seeds)
            print(f"\n{arm}: {p:.0%} of the gap from moe+bal to the oracle ({lo:.0%}-{hi:.0%}); seed-paired "
                  f"against moe+bal {d.mean():+.3f} (sd {d.std(ddof=1):.3f})")
        d = loss(list(ARMS)[0], seeds) - loss(list(ARMS)[1], seeds)
        print(f"tau 0.2 - tau 0.07, seed-paired: {np.round(d, 3).tolist()}, mean {d.mean():+.3f} (sd {d.std(ddof=1):.3f})")

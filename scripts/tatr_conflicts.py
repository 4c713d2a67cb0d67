"""Where TATR's dropped coordinates fall on the embedded benchmark, and whose task vector
they carry.

Builds (or reads from the cache) the embedded benchmark, merges its eight task vectors
with zero-shot TATR (Ω from |τ|) at each quantile q, and prints two tables:

- per layer: the share of its coordinates that Ω drops (overall, 1 − q);
- per task: the share of ‖τt‖² on the dropped coordinates, and how often τt's sign
  disagrees with the sum Σ τ there (the conflict TATR means to remove) and everywhere.

If the dropped coordinates carried one task's vector, or coordinates where the tasks
pull apart, dropping them would spare the others; if every task loses about as much and
mostly agrees with the sum there, TATR removes shared signal and behaves like Task
Arithmetic with a slightly smaller λ.

    python scripts/tatr_conflicts.py [--preset default] [--quantiles 0.9 0.99]
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from embedded_models import embedded_models

from mergelab.embedded.scenes import TASKS
from mergelab.engine.pool import ModelPool
from mergelab.engine.trust_region import trust_region_vector


def layer_of(key: str) -> str:
    """``transformer.resblocks.2.mlp.c_fc.weight`` → ``block 2``; the rest by name."""
    found = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return f"block {found.group(1)}" if found else key.split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="embedded preset (default: default)")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.99])
    args = parser.parse_args()

    root, pretrained, finetuned = embedded_models(args.preset)
    pool = ModelPool(pretrained, finetuned)
    keys = pool.merged_keys
    taus = {t: {k: finetuned[t][k].float() - pretrained[k].float() for k in keys} for t in TASKS}
    total = {k: sum(taus[t][k] for t in TASKS) for k in keys}
    print(
        f"embedded benchmark {root.name}: {len(TASKS)} tasks, {pool.num_merged_params} coordinates"
    )

    for q in args.quantiles:
        merged = trust_region_vector(pool, q)
        dropped = {k: (merged.delta[k] == 0) & (total[k] != 0) for k in keys}
        by_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for k in keys:
            by_layer[layer_of(k)][0] += int(dropped[k].sum())
            by_layer[layer_of(k)][1] += dropped[k].numel()
        print(f"\nq = {q}: {100 * (1 - merged.kept_fraction):.2f} % of coordinates dropped")
        print("\n| layer | coordinates | dropped % |\n|---|---|---|")
        for layer, (count, size) in by_layer.items():
            print(f"| {layer} | {size} | {100 * count / size:.2f} |")
        print(
            "\n| task | ‖τ‖² on dropped % | sign against Σ τ: dropped % | all % |"
            "\n|---|---|---|---|"
        )
        count = sum(int(dropped[k].sum()) for k in keys)
        for t in TASKS:
            norm = sum(float(taus[t][k].square().sum()) for k in keys)
            lost = sum(float(taus[t][k][dropped[k]].square().sum()) for k in keys)
            against = {k: (taus[t][k] * total[k]) < 0 for k in keys}
            there = sum(int(against[k][dropped[k]].sum()) for k in keys)
            everywhere = sum(int(against[k].sum()) for k in keys)
            print(
                f"| {t} | {100 * lost / norm:.1f} | {100 * there / max(count, 1):.1f} "
                f"| {100 * everywhere / pool.num_merged_params:.1f} |"
            )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

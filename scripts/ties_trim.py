"""What TIES removes from the embedded benchmark's task vectors, against Task Arithmetic.

Builds (or reads from the cache) the embedded benchmark and prints, per task, the share of
‖τt‖² that TIES's trim keeps (each task's top ``--keep`` magnitudes over the model), the
share of the trimmed vector that the sign election then drops (entries that disagree with
sign(Σ trimmed τ)), and the cosine between TIES's merged vector and Σ τt. On the real
benchmark TIES beats Task Arithmetic because the dropped entries are small or conflicting;
where the trim throws away much of a task's vector, TIES can only lose.

    python scripts/ties_trim.py [--preset default] [--keep 0.2]
"""

from __future__ import annotations

import argparse

import torch
from embedded_models import embedded_models

from mergelab.embedded.scenes import TASKS
from mergelab.engine.parameterwise import TaskVectors
from mergelab.engine.pool import ModelPool
from mergelab.engine.ties import ties_merged_vector, ties_thresholds
from mergelab.merging.ties import trim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="embedded preset (default: default)")
    parser.add_argument("--keep", type=float, default=0.2, help="TIES's kept share (0.2)")
    args = parser.parse_args()

    _, pretrained, finetuned = embedded_models(args.preset)
    pool = ModelPool(pretrained, finetuned)
    vectors = TaskVectors(pool, "cpu")
    thresholds = ties_thresholds(vectors, args.keep)
    merged = ties_merged_vector(vectors, args.keep)
    energy = torch.zeros(len(TASKS), 3, dtype=torch.float64)  # all, trimmed, elected
    dot = delta_norm = total_norm = 0.0  # of TIES's δ (the disjoint sum) and Σ τt
    for key, taus in vectors.walk("measuring"):
        flat = taus.reshape(len(TASKS), -1).double()
        trimmed = trim(taus, thresholds).reshape(len(TASKS), -1).double()
        delta = merged[key].reshape(-1).double()
        elected = torch.where(torch.sign(trimmed) == torch.sign(delta), trimmed, 0)
        for column, part in enumerate((flat, trimmed, elected)):
            energy[:, column] += (part**2).sum(1)
        total = flat.sum(0)
        dot += float(delta @ total)
        delta_norm += float(delta @ delta)
        total_norm += float(total @ total)
    print(f"TIES keep {args.keep}: share of each task's ‖τt‖² that is left")
    print(f"{'task':<12}{'after trim':>12}{'after election':>16}")
    for index, task in enumerate(TASKS):
        kept, elected = (energy[index, 1:] / energy[index, 0]).tolist()
        print(f"{task:<12}{100 * kept:>11.1f}%{100 * elected:>15.1f}%")
    print(f"cosine(TIES δ, Σ τt) = {dot / (delta_norm * total_norm) ** 0.5:.3f}")


if __name__ == "__main__":
    main()

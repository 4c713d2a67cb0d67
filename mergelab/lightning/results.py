"""The results of an evaluation run: the headline, picked on validation (:func:`summarize`),
the metrics logged, and its files: results.json, a markdown table and a bar chart.

results.json (schema ``mergelab.results/1``)::

    {"schema": "mergelab.results/1",
     "stage": "test" | "val",
     "settings": {"method": ..., <method settings>},
     "tasks": [task, ...],
     "accuracy": {variant: {split: {task: top-1 in [0, 1]}}},
     "picked": {task: variant},           # the headline's variant per task
     "picked_on": "val" | null,           # null: nothing to pick, or no validation scores
     "headline": {"accuracy": {task: acc}, "avg_acc": float,
                  "normalized_accuracy": {task: acc / fine-tuned acc},   # if known
                  "avg_normalized_acc": float},                          # if known
     "finetuned_accuracy": {task: acc}}   # if known
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from mergelab.engine.atomic import temporary_path, write_atomically
from mergelab.errors import MissingKey
from mergelab.merging.selection import pick_best

SCHEMA = "mergelab.results/1"


def results_document(results: Mapping) -> dict:
    doc = {"schema": SCHEMA, "stage": results["stage"], "settings": results["variants_description"]}
    doc |= {k: v for k, v in results.items() if k not in ("stage", "variants_description")}
    return doc


def markdown_table(results: Mapping) -> str:
    """Rows: each variant on the split it was scored on for the pick (validation, when the
    settings were picked there; else the stage), then the headline on the stage when it is
    another split or another row; columns: setting, split, tasks, average, normalised."""
    stage, tasks = results["stage"], results["tasks"]
    reference = results.get("finetuned_accuracy")
    split = results.get("picked_on") or stage
    header = ["setting", "split", *tasks, "avg"] + (["normalized avg"] if reference else [])
    rows = []
    for name, by_split in results["accuracy"].items():
        accs = [by_split[split][t] for t in tasks]
        rows.append(_row(name, split, accs, tasks, reference))
    if split != stage or len(results["accuracy"]) > 1:
        label = f"picked on {split}" if results.get("picked_on") else "headline"
        accs = [results["headline"]["accuracy"][t] for t in tasks]
        rows.append(_row(f"**{label}**", stage, accs, tasks, reference))
    method = results["variants_description"].get("method")
    title = f"top-1 accuracy (%) of each setting on {split}, method {method}"
    if split != stage:
        title += f"; last, the pick on {stage}"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _row(name: str, split: str, accs: list[float], tasks: list[str], reference) -> list[str]:
    cells = [name, split, *(f"{100 * a:.1f}" for a in accs), f"{100 * sum(accs) / len(accs):.1f}"]
    if reference:
        normalized = [a / reference[t] for a, t in zip(accs, tasks, strict=True)]
        cells.append(f"{100 * sum(normalized) / len(normalized):.1f}")
    return cells


def bar_chart(results: Mapping, path: Path) -> Path:
    """Per-task accuracy on the stage of what was scored there (every variant without a
    pick, else the pick), and the fine-tuned reference, grouped by task."""
    stage, tasks = results["stage"], results["tasks"]
    if results.get("picked_on"):
        series = {"picked": [results["headline"]["accuracy"][t] for t in tasks]}
    else:
        series = {name: [s[stage][t] for t in tasks] for name, s in results["accuracy"].items()}
    if results.get("finetuned_accuracy"):
        series["fine-tuned"] = [results["finetuned_accuracy"][t] for t in tasks]
    title = f"mergelab: {results['variants_description'].get('method')}"
    return grouped_bars(series, tasks, f"{stage} top-1 accuracy (%)", title, path)


def grouped_bars(
    series: Mapping[str, list[float]], groups: list[str], ylabel: str, title: str, path: Path
) -> Path:
    """A bar chart of accuracies in [0, 1]: one group of bars per label, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 4), 4))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [100 * v for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    # beside the axes: inside, it hides the bars that reach 100 %
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    tmp = temporary_path(path, ".png")  # its suffix tells matplotlib the format
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def picked_setting(results: Mapping) -> str:
    """The headline's variant, or ``per task`` when tasks picked different ones."""
    picked = set(results["picked"].values())
    return picked.pop() if len(picked) == 1 else "per task (val)"


def comparison_table(runs: Mapping[str, Mapping]) -> str:
    """One row per run (its headline on the test split): method, per-task accuracy,
    average, normalised average and the setting picked on validation."""
    tasks = next(iter(runs.values()))["tasks"]
    header = ["method", *tasks, "avg", "normalized avg", "picked"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, results in runs.items():
        headline = results["headline"]
        cells = [method, *(f"{100 * headline['accuracy'][t]:.1f}" for t in tasks)]
        cells.append(f"{100 * headline['avg_acc']:.1f}")
        normalized = headline.get("avg_normalized_acc")
        cells.append("" if normalized is None else f"{100 * normalized:.1f}")
        cells.append(picked_setting(results))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(runs: Mapping[str, Mapping], folder: Path) -> dict[str, Path]:
    """summary.json (each run's results document), summary.md and summary.png."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = next(iter(runs.values()))["tasks"]
    series = {
        method: [r["headline"]["accuracy"][t] for t in tasks] + [r["headline"]["avg_acc"]]
        for method, r in runs.items()
    }
    documents = {method: results_document(r) for method, r in runs.items()}
    return {
        "json": write_atomically(folder / "summary.json", json.dumps(documents, indent=2)),
        "markdown": write_atomically(folder / "summary.md", comparison_table(runs)),
        "plot": grouped_bars(
            series, [*tasks, "avg"], "test top-1 accuracy (%)", "mergelab", folder / "summary.png"
        ),
    }


def write_report(results: Mapping, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stage = results["stage"]
    suffix = "" if stage == "test" else f"_{stage}"
    return {
        "json": write_atomically(
            folder / f"results{suffix}.json", json.dumps(results_document(results), indent=2)
        ),
        "markdown": write_atomically(folder / f"results{suffix}.md", markdown_table(results)),
        "plot": bar_chart(results, folder / f"accuracy{suffix}.png"),
    }


def check_reference(
    reference: Mapping[str, float] | None, tasks: list[str], source: str = "finetuned_accuracy"
) -> None:
    """The fine-tuned accuracies normalise every task: one entry per task."""
    if not reference:
        return
    missing = [t for t in tasks if t not in reference]
    if missing:
        raise MissingKey(f"{source} has no entry for task {missing[0]!r}")


def summarize(
    accuracy: Mapping[str, Mapping[str, Mapping[str, float]]],
    tasks: list[str],
    stage: str,
    choose_per_task: bool,
    reference: Mapping[str, float] | None,
) -> dict:
    """The headline result: the variant(s) picked on validation, scored on ``stage``.

    With validation scores, the pick is the variant with the best validation accuracy,
    per task or on average over tasks (:func:`~mergelab.merging.selection.pick_best`);
    without them (a test run that reports every setting) the first is the headline and
    ``picked_on`` is None.
    """
    names = list(accuracy)
    has_val = all("val" in accuracy[n] for n in names)
    if has_val:
        val = {n: accuracy[n]["val"] for n in names}
        picked = pick_settings(val, tasks, choose_per_task)
    else:
        picked = dict.fromkeys(tasks, names[0])
    headline = {t: accuracy[picked[t]][stage][t] for t in tasks}
    result = {
        "stage": stage,
        "tasks": tasks,
        "accuracy": {n: dict(accuracy[n]) for n in names},
        "picked": picked,
        "picked_on": "val" if has_val else None,
        "headline": {"accuracy": headline, "avg_acc": sum(headline.values()) / len(tasks)},
    }
    if reference:
        check_reference(reference, tasks)
        normalized = {t: headline[t] / reference[t] for t in tasks}
        result["headline"]["normalized_accuracy"] = normalized
        result["headline"]["avg_normalized_acc"] = sum(normalized.values()) / len(tasks)
        result["finetuned_accuracy"] = {t: reference[t] for t in tasks}
    return result


def pick_settings(
    val: Mapping[str, Mapping[str, float]], tasks: list[str], choose_per_task: bool
) -> dict[str, str]:
    """Task → the setting picked on validation (``val``: setting → task → accuracy): each
    task's best, or the best average over tasks, by
    :func:`~mergelab.merging.selection.pick_best`."""
    names = list(val)
    if choose_per_task:
        return {t: pick_best(names, lambda n, t=t: val[n][t]) for t in tasks}
    best = pick_best(names, lambda n: sum(val[n].values()))
    return dict.fromkeys(tasks, best)


def flat_metrics(results: Mapping, stage: str) -> dict[str, float]:
    """Logged names: ``<stage>/<task>/acc``, ``<stage>/avg_acc``, ``<stage>/avg_normalized_acc``
    for the headline, ``<split>/<variant>/<task>/acc`` for every variant scored, and
    ``<split>/<variant>/avg_acc`` for a variant scored on every task of the split."""
    headline = results["headline"]
    metrics = {f"{stage}/{t}/acc": a for t, a in headline["accuracy"].items()}
    metrics[f"{stage}/avg_acc"] = headline["avg_acc"]
    if "avg_normalized_acc" in headline:
        metrics[f"{stage}/avg_normalized_acc"] = headline["avg_normalized_acc"]
    for name, by_split in results["accuracy"].items():
        for split, by_task in by_split.items():
            for task, acc in by_task.items():
                metrics[f"{split}/{name}/{task}/acc"] = acc
            if len(by_task) == len(headline["accuracy"]):
                metrics[f"{split}/{name}/avg_acc"] = sum(by_task.values()) / len(by_task)
    return metrics

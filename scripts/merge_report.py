"""The report of ``bench_merge.py``: the repeats of each method combined, the table, the
targets and the ``RESULT`` line (standard library only)."""

from __future__ import annotations

from harness import MB, print_result
from merge_workloads import METHODS, SVD_RULES

SHORT = {m: m for m in METHODS} | {"task_arithmetic": "ta"}
# (RESULT key, limit): every target is "value <= limit". An SVD method's time is compared
# with its bare SVD calls plus the floor (<rule>_vs_svd_floor); its memory in models.
TARGETS = (
    ("tatr_vs_floor", 3.0),
    ("tatr_rss_models", 3.0),
    ("tall_vs_floor", 4.0),
    ("tall_rss_models", 4.0),
    ("mask_bits_per_param", 1.01),
    ("ties_vs_floor", 2.0),
    ("ties_rss_models", 4.0),
    ("dare_vs_floor", 2.0),
    ("dare_rss_models", 4.0),
    *((f"{rule}_vs_svd_floor", 1.5) for rule in SVD_RULES),
    *((f"{rule}_rss_models", 4.0) for rule in SVD_RULES),
)
# the keys of the RESULT line, in order
RESULT_KEYS = (
    *(key for key, _ in TARGETS),
    *(f"svd_{rule}_calls_s" for rule in SVD_RULES),
    "ta_vs_floor",
    "ta_rss_models",
    "floor_s",
    "floor_rss_models",
    "ta_s",
    "tatr_s",
    "tall_s",
    "model_mb",
    "baseline_rss_models",
    "max_other_load",
)
HEADER = (
    "method",
    "seconds",
    "x floor",
    "cpu s",
    "disk MB",
    "peak RSS MB",
    "RSS/model",
    "after-import MB",
    "(peak-import)/model",
    "import s",
)


def combine(runs: list[dict]) -> dict:
    """Fastest time and largest peak RSS over the repeats of one method."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["cpu_seconds"] = min(r["cpu_seconds"] for r in runs)
    best["other_load"] = best["other_load"] or 0.0  # of the run whose time is reported
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    best["baseline_rss"] = max(r["baseline_rss"] for r in runs)
    best["all_seconds"] = [r["seconds"] for r in runs]
    return best


def table_row(method: str, r: dict, floor: float, model_bytes: int) -> tuple[str, ...]:
    return (
        method,
        f"{r['seconds']:.2f}",
        f"{r['seconds'] / floor:.2f}",
        f"{r['cpu_seconds']:.2f}",
        f"{r['disk_read_bytes'] / MB:.1f}",
        f"{r['peak_rss'] / MB:.1f}",
        f"{r['peak_rss'] / model_bytes:.2f}",
        f"{r['baseline_rss'] / MB:.1f}",
        f"{(r['peak_rss'] - r['baseline_rss']) / model_bytes:.2f}",
        f"{r['import_seconds']:.2f}",
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    """The header and rows, the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)]
    for row in (HEADER, *rows):
        print(
            "  ".join(
                c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
            )
        )


def report(results: dict[str, dict], mask: dict, model_bytes: int, args) -> None:
    floor = results["floor"]["seconds"]
    values: dict[str, float] = {}
    rows = []
    for method in (m for m in METHODS if m in results):
        r = results[method]
        short = SHORT[method]
        values[f"{short}_s"] = r["seconds"]
        values[f"{short}_rss_models"] = r["peak_rss"] / model_bytes
        if method != "floor":
            values[f"{short}_vs_floor"] = r["seconds"] / floor
        rows.append(table_row(method, r, floor, model_bytes))
    for rule in (r for r in SVD_RULES if r in results):
        svd_seconds = results[f"svd_{rule}"]["phases"]["svd"]
        values[f"svd_{rule}_calls_s"] = svd_seconds
        values[f"{rule}_vs_svd_floor"] = results[rule]["seconds"] / (svd_seconds + floor)
    if mask is not None:
        values["mask_bits_per_param"] = mask["mask_bits_per_param"]
    values["max_other_load"] = max(r["other_load"] for r in results.values())
    values["model_mb"] = model_bytes / MB
    values["baseline_rss_models"] = results["floor"]["baseline_rss"] / model_bytes

    threads = results["floor"]["threads"]
    print()
    print(
        f"mergelab merge benchmark: {args.model} image encoder, {args.tasks} tasks, "
        f"{model_bytes / MB:.1f} MB per checkpoint, torch {results['floor']['torch']}, "
        f"{threads} thread(s), best of {args.repeat}, warm page cache"
    )
    print_table(rows)
    if mask is not None:
        print(
            f"TALL masks file: {mask['masks']} mask(s) of {mask['mask_bytes'] / MB:.2f} MB in "
            f"all + τMTL {mask['mtl_bytes'] / MB:.1f} MB; "
            f"{mask['mask_bits_per_param']:.4f} bits per merged parameter per mask"
        )
    if values["max_other_load"] > 0.25:
        print(
            f"WARNING: other processes used up to {values['max_other_load']:.1f} CPU cores "
            "during the reported runs; times (and ratios) are inflated and noisy: rerun on a "
            "quiet machine or with --repeat K."
        )
    for method in (m for m in ("tatr",) if m in results):
        for message in results[method]["log"]:
            print(f"{method}: {message}")
    for method in results:
        if results[method]["phases"]:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in results[method]["phases"].items())
            print(f"{method} phases (s): {phases}")
    if args.repeat > 1:
        for method in results:
            times = ", ".join(f"{s:.2f}" for s in results[method]["all_seconds"])
            print(f"{method} times over repeats: {times}")
    print(
        "MB = 10^6 bytes; a model = the pretrained checkpoint's tensor bytes; cpu s = user+sys "
        "time of the work; disk MB = storage reads during the work (0 = warm page cache)."
    )
    print()
    print(f"{'target':<22}{'value':>9}  {'limit':>8}  status")
    for key, limit in ((k, v) for k, v in TARGETS if k in values):
        value = values[key]
        status = "pass" if value <= limit else "FAIL"
        print(f"{key:<22}{value:>9.4f}  {'<= ' + format(limit, 'g'):>8}  {status}")
    print()
    print_result((key, values[key], ".4f") for key in RESULT_KEYS if key in values)

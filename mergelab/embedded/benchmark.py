"""``mergelab embedded``: the main job on the embedded miniature benchmark.

Builds what is missing (first run: a few minutes, with progress bars), then runs
``mergelab test --config configs/embedded/<method>.yaml`` for every method in this
process, each with its own run folder, and writes one comparison of them all:
``<output>/summary.md`` (printed), ``summary.json`` and ``summary.png``.
``trust_region_gradients`` is two runs: ``mergelab fit`` with
configs/embedded/trust_region_gradients.yaml (the gradient statistics, cached), then the
``trust_region`` test run with ``--merge.method.gradient_stats`` set to them.
``consensus`` takes each task's mask at the λ that the ``tall_masks`` run picked for it
on validation (``--merge.method.tall_results``), as the TALL reference code does; it runs
``tall_masks`` first when that is not among the methods.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from mergelab.embedded.preset import PRESET_ENV, PRESETS

log = logging.getLogger(__name__)

METHODS = (
    "zero_shot",
    "finetuned",
    "task_arithmetic",
    "trust_region",
    "trust_region_gradients",
    "tall_masks",
    "consensus",
)
# configs/ sits beside the package in a source checkout (the README installs it editable)
REPOSITORY_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "embedded"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergelab embedded",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"benchmark size (default: ${PRESET_ENV}, else 'default'; 'test' builds in ~20 s)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the benchmark is built and cached (default: $MERGELAB_CACHE, else "
        "~/.cache/mergelab)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to run, in order (default: all of {', '.join(METHODS)})",
    )
    p.add_argument(
        "--configs",
        type=Path,
        default=REPOSITORY_CONFIGS,
        help="the folder of <method>.yaml run configs (default: the repository's configs/embedded)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("lightning_logs") / "embedded",
        help="where summary.md, summary.json and summary.png go (default: %(default)s)",
    )
    p.add_argument(
        "--rebuild", action="store_true", help="discard the cached benchmark and build it again"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    needed = [
        *args.methods,
        *(["trust_region"] if "trust_region_gradients" in args.methods else []),
        *(["tall_masks"] if "consensus" in args.methods else []),
    ]
    missing = [m for m in needed if not (args.configs / f"{m}.yaml").is_file()]
    if missing:
        raise SystemExit(f"mergelab embedded: no config {args.configs / missing[0]}.yaml")
    if args.preset:
        os.environ[PRESET_ENV] = args.preset  # the runs' `embedded:` references read it
    if args.cache_dir:
        os.environ["MERGELAB_CACHE"] = str(Path(args.cache_dir).resolve())

    from mergelab.embedded.build import EmbeddedBenchmark

    benchmark = EmbeddedBenchmark()
    if args.rebuild:
        benchmark.discard()
    started = time.perf_counter()
    benchmark.ensure()
    log.info(
        "embedded benchmark ready in %.0f s: %s", time.perf_counter() - started, benchmark.root
    )

    runs, folders, seconds = {}, {}, {}
    for method in args.methods:
        log.info("running %s", method)
        method_started = time.perf_counter()
        config = ["--config", str(args.configs / f"{method}.yaml")]
        if method == "trust_region_gradients":
            statistics = _run(["fit", *config])
            gradients = f"--merge.method.gradient_stats={statistics.model.statistics_folder}"
            cli = _run(["test", "--config", str(args.configs / "trust_region.yaml"), gradients])
        elif method == "consensus":
            if "tall_masks" not in folders:  # each task's λ comes from a TALL masks run
                log.info("running tall_masks for consensus's per-task λ")
                tall = _run(["test", "--config", str(args.configs / "tall_masks.yaml")])
                folders["tall_masks"] = tall.trainer.log_dir
            picked = f"--merge.method.tall_results={folders['tall_masks']}"
            cli = _run(["test", *config, picked, "--merge.method.tall_lambda=null"])
        else:
            cli = _run(["test", *config])
        runs[method], folders[method] = cli.model.results, cli.trainer.log_dir
        seconds[method] = time.perf_counter() - method_started
    from mergelab.lightning.results import write_comparison

    paths = write_comparison(runs, args.output)
    print(f"\nembedded benchmark ({benchmark.preset.name} preset), test top-1 accuracy (%):\n")
    print(paths["markdown"].read_text())
    print("seconds per method: " + ", ".join(f"{m} {t:.0f}" for m, t in seconds.items()))
    print(f"written: {paths['markdown']}, {paths['json']}, {paths['plot']}")
    log.info("total %.0f s", time.perf_counter() - started)
    return runs


def _run(args: list[str]):
    """One ``mergelab`` run in this process (its tables not printed); the finished CLI."""
    from mergelab.cli import run

    quiet = ["--report.print_table=false"] if args[0] == "test" else []
    try:
        return run(args + quiet)
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    """Close the run's W&B run, so the next run in this process starts its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()

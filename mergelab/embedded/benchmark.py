"""``mergelab embedded``: the main job on the embedded miniature benchmark.

Builds what is missing (first run: a few minutes; a line as each build step starts and
ends, and Lightning's progress bars when the build runs on one process), then runs
``mergelab test --config configs/embedded/base.yaml --config configs/methods/<method>.yaml``
for every method config in configs/methods/ (mergelab.registry), in this process, each with
its own run folder, and writes one comparison of them all: ``<output>/summary.md``
(printed), ``summary.json`` and ``summary.png``. ``trust_region_gradients`` is two runs:
``mergelab fit`` with configs/embedded/trust_region_gradients.yaml (the gradient
statistics, cached), then the ``trust_region`` test run with
``--merge.method.gradient_stats`` set to them. A consensus method takes each task's mask
at the λ that the TALL masks run over the same τMTL picked for it on validation
(``--merge.method.tall_results``), as the TALL reference code does; that run goes first
(once, and into the table) when it has not run yet.

The console shows the build's progress, one line per method with its seconds, and the
table; Lightning's banners, the runs' progress bars and known harmless warnings are
silenced (``--verbose`` shows them).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from mergelab.embedded.preset import PRESET_ENV, PRESETS
from mergelab.quiet import quiet_console
from mergelab.registry import CONFIGS, METHOD_CONFIGS, MethodConfig, method_configs

log = logging.getLogger(__name__)

GRADIENTS = "trust_region_gradients"  # a fit config of the suite, then trust_region's test
BASE = CONFIGS / "embedded" / "base.yaml"


def benchmark_methods(folder: Path = METHOD_CONFIGS) -> list[str]:
    """Every method config, with TATR's gradient run after zero-shot TATR."""
    names = list(method_configs(folder))
    at = names.index("trust_region") + 1 if "trust_region" in names else len(names)
    return [*names[:at], GRADIENTS, *names[at:]]


def tall_masks_for(consensus: MethodConfig, configs: dict[str, MethodConfig]) -> str:
    """The TALL masks config whose τMTL is the consensus config's."""
    for name, config in configs.items():
        if config.class_name == "TallMasks" and config.multitask == consensus.multitask:
            return name
    raise SystemExit(
        f"mergelab embedded: {consensus.path}: no TALL masks config in {consensus.path.parent} "
        f"with multitask {consensus.multitask}, for its per-task λ"
    )


# the runs' own progress bars and model summary (the build decides its own)
QUIET_RUN = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


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
    methods = benchmark_methods()
    p.add_argument(
        "--methods",
        nargs="+",
        choices=methods,
        default=methods,
        metavar="METHOD",
        help=f"methods to run, in order (default: all of {', '.join(methods)})",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=BASE,
        help="the suite's base config; its folder holds trust_region_gradients.yaml "
        "(default: the repository's configs/embedded/base.yaml)",
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
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Lightning's banners, each run's progress bars and every warning",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    needed = [args.base, *([args.base.parent / f"{GRADIENTS}.yaml"] * (GRADIENTS in args.methods))]
    missing = [path for path in needed if not path.is_file()]
    if missing:
        raise SystemExit(f"mergelab embedded: no config {missing[0]}")
    if args.preset:
        os.environ[PRESET_ENV] = args.preset  # the runs' `embedded:` references read it
    if args.cache_dir:
        os.environ["MERGELAB_CACHE"] = str(Path(args.cache_dir).resolve())

    with quiet_console(args.verbose):
        return _benchmark(args)


def _benchmark(args: argparse.Namespace) -> dict:
    from mergelab.embedded.build import EmbeddedBenchmark

    benchmark = EmbeddedBenchmark()
    if args.rebuild:
        benchmark.discard()
    started = time.perf_counter()
    benchmark.ensure()
    log.info(
        "embedded benchmark ready in %.0f s: %s", time.perf_counter() - started, benchmark.root
    )
    extra = ["--verbose"] if args.verbose else QUIET_RUN
    configs = method_configs()

    def config(name: str) -> list[str]:
        return ["--config", str(args.base), "--config", str(configs[name].path), *extra]

    runs, folders, seconds = {}, {}, {}

    def test_run(name: str, method_config: str, *options: str, since: float | None = None):
        started_at = time.perf_counter() if since is None else since
        cli = _run(["test", *config(method_config), *options])
        runs[name], folders[name] = cli.model.results, cli.trainer.log_dir
        seconds[name] = time.perf_counter() - started_at
        headline = cli.model.results["headline"]
        normalized = headline.get("avg_normalized_acc")
        read, scores = cli.model.scores_read
        log.info(
            "%s: %.0f s, %.1f %% avg%s%s",
            name,
            seconds[name],
            100 * headline["avg_acc"],
            "" if normalized is None else f", {100 * normalized:.1f} % normalized",
            f" ({read} of {scores} scores from the score cache)" if read else "",
        )

    for method in args.methods:
        if method in runs:  # run earlier, for a consensus method's per-task λ
            continue
        if method == GRADIENTS:
            fit_started = time.perf_counter()
            fit_config = str(args.base.parent / f"{GRADIENTS}.yaml")
            statistics = _run(["fit", "--config", fit_config, *extra])
            gradients = f"--merge.method.gradient_stats={statistics.model.statistics_folder}"
            test_run(method, "trust_region", gradients, since=fit_started)
        elif configs[method].class_name == "Consensus":
            tall = tall_masks_for(configs[method], configs)
            if tall not in runs:  # each task's λ comes from a TALL masks run
                log.info("%s: run first, for %s's per-task λ", tall, method)
                test_run(tall, tall)
            picked = f"--merge.method.tall_results={folders[tall]}"
            test_run(method, method, picked, "--merge.method.tall_lambda=null")
        else:
            test_run(method, method)
    from mergelab.lightning.results import write_comparison

    # the methods in the order asked, then the TALL runs only consensus needed
    order = [*args.methods, *(name for name in runs if name not in args.methods)]
    runs = {name: runs[name] for name in order}
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

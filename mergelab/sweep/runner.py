"""``mergelab sweep FILE``: every trial in turn, each in its own folder, then the table."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import shlex
import subprocess
import time
from pathlib import Path

from mergelab.engine.atomic import write_atomically
from mergelab.io.child_process import run_child
from mergelab.sweep.sweep_file import SweepError, SweepFile, load_sweep, settings
from mergelab.sweep.trials import Trial, prepare

log = logging.getLogger("mergelab.sweep")  # the same name under python -m mergelab.sweep


def read_metric(folder: Path, metric: str) -> tuple[float | None, Path | None]:
    """The last value of ``metric`` in the metrics.csv under ``folder``, and the run folder."""
    files = sorted(folder.glob("*/version_*/metrics.csv"))
    if not files:
        return None, None
    value = None
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            if row.get(metric):
                value = float(row[metric])
    return value, files[-1].parent


def run_trial(trial: Trial, metric: str) -> None:
    trial.folder.mkdir(parents=True, exist_ok=True)
    with open(trial.folder / "output.log", "w") as output:
        # Ctrl-C: the trial marks its run folder INTERRUPTED before the sweep stops
        status = run_child(
            [*trial.command, trial.logger_override], stdout=output, stderr=subprocess.STDOUT
        )
    trial.metric, trial.run_dir = read_metric(trial.folder, metric)
    if status != 0:
        trial.status = f"failed (exit {status}, see {trial.folder / 'output.log'})"
    elif trial.metric is None:
        trial.status = f"{metric} not in metrics.csv"
    else:
        trial.status = "ok"


def best_trial(trials: list[Trial], goal: str) -> Trial | None:
    scored = [t for t in trials if t.status == "ok"]
    sign = 1 if goal == "maximize" else -1
    return max(scored, key=lambda t: sign * t.metric, default=None)


def write_table(sweep: SweepFile, trials: list[Trial], output: Path) -> str:
    """results.csv (the metric in full) and results.md (to 4 decimals, the best row in
    bold) in ``output``, one row per trial; returns the markdown table."""
    best = best_trial(trials, sweep.goal)
    header = ["trial", *sweep.parameters, sweep.metric, "status", "run"]

    def row(trial: Trial, metric_format: str) -> list[str]:
        return [
            str(trial.number),
            *(str(trial.setting[name]) for name in sweep.parameters),
            "" if trial.metric is None else format(trial.metric, metric_format),
            "best" if trial is best else trial.status,
            str(trial.run_dir or trial.folder),
        ]

    rows = io.StringIO(newline="")
    csv.writer(rows).writerows([header, *(row(t, "") for t in trials)])
    write_atomically(output / "results.csv", rows.getvalue())
    lines = [
        f"sweep {sweep.name} ({sweep.path}): {sweep.method} search, {sweep.goal} {sweep.metric}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for trial in trials:
        cells = row(trial, ".4f")
        lines.append("| " + " | ".join(f"**{c}**" if trial is best else c for c in cells) + " |")
    table = "\n".join(lines) + "\n"
    write_atomically(output / "results.md", table)
    return table


def default_output(sweep: SweepFile) -> Path:
    """lightning_logs/sweeps/<file name>/version_N, N one past the highest there."""
    root = Path("lightning_logs") / "sweeps" / sweep.path.stem
    versions = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


def run_sweep(sweep: SweepFile, trials: list[Trial]) -> None:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # the bar and the log lines share the terminal: the handlers of the root logger and of
    # the package's (mergelab's console script gives it its own) write through tqdm
    handled = [lg for lg in (logging.root, logging.getLogger("mergelab")) if lg.handlers]
    with logging_redirect_tqdm(handled):
        for trial in tqdm(trials, desc=f"sweep {sweep.name}", unit="trial"):
            log.info("trial %d/%d: %s", trial.number, len(trials), trial.describe())
            start = time.monotonic()
            run_trial(trial, sweep.metric)
            value = "-" if trial.metric is None else f"{trial.metric:.4f}"
            seconds = time.monotonic() - start
            log.info(
                "trial %d: %s = %s, %s (%.0f s)",
                trial.number,
                sweep.metric,
                value,
                trial.status,
                seconds,
            )


def main(argv: list[str] | None = None) -> None:
    """``mergelab sweep FILE`` (or ``python -m mergelab.sweep FILE``); exits with status 1
    if a trial failed, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="mergelab sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="a W&B sweep file (configs/sweeps/*.yaml)")
    parser.add_argument(
        "--count", type=int, help="at most N trials; random search needs it (or run_cap)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random search seed (default 0)")
    parser.add_argument(
        "--output", type=Path, help="default: lightning_logs/sweeps/<file name>/version_N"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the file, print each trial's command"
    )
    args = parser.parse_args(argv)
    log.setLevel(logging.INFO)
    if not log.hasHandlers():  # python -m; the console script `mergelab` sets up its own
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.count is not None and args.count <= 0:
        parser.error(f"--count must be positive, got {args.count}")
    try:
        sweep = load_sweep(args.file)
        output = args.output or default_output(sweep)
        trial_settings = settings(sweep, args.count, args.seed)
        log.info("checking the commands of %d trials with the CLI", len(trial_settings))
        trials = prepare(sweep, trial_settings, output)
    except SweepError as err:
        parser.exit(2, f"mergelab sweep: error: {err}\n")
    if args.dry_run:
        for trial in trials:
            print(shlex.join(trial.command))
        return
    output.mkdir(parents=True, exist_ok=True)
    log.info("%d trials of %s, each in %s/trial_NNN", len(trials), sweep.path, output)
    run_sweep(sweep, trials)
    print(write_table(sweep, trials, output))
    print(f"table written to {output / 'results.md'} and {output / 'results.csv'}")
    best = best_trial(trials, sweep.goal)
    if best is not None and "validate" in best.command:
        # settings are chosen on validation; test data scores the choice, once
        test = [("test" if c == "validate" else c) for c in best.command]
        print(f"best: trial {best.number} ({best.describe()}); score it on test once with:")
        print(f"  {shlex.join(test)}")
    if any(t.status != "ok" for t in trials):
        raise SystemExit(1)

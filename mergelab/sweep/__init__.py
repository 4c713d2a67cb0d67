"""Run a W&B sweep file's grid or random search locally, without a W&B server.

    mergelab sweep configs/sweeps/task_arithmetic.yaml
    mergelab sweep configs/sweeps/trust_region.yaml --count 10 --seed 1
    mergelab sweep configs/sweeps/consensus.yaml --dry-run   (the commands only)

Each trial runs the command W&B's agent would run for the same parameters (built with
wandb's own create_sweep_command and create_sweep_command_args), plus one
``--trainer.logger`` override that keeps the run's loggers but writes them into the
trial's own folder; the sweep's metric is read from the run's metrics.csv.

Before the first trial every trial's command is parsed by the CLI (an unknown parameter or
a value the CLI refuses stops the sweep), and the metric is checked against the names the
run logs (mergelab.lightning.evaluation.flat_metrics: ``val/avg_acc``, ``val/<task>/acc``, ...).

Output, in lightning_logs/sweeps/<file name>/version_N/ (or --output): trial_NNN/ with
the run's folder and its output.log, and results.md / results.csv: one row per trial
(parameters, metric, status), the best marked.
"""

"""The run folder's state (:mod:`mergelab.io.run_folder`), marked as the run goes; and
what a failed run leaves behind: nothing when it failed on bad input before producing
anything, else its folder marked as failed.

Each run folder (a logger's ``log_dir``) gets ``RUNNING`` when the run starts, and the CLI
writes ``COMPLETE`` after the loggers' last file. A run that stops on bad input (the
errors of :mod:`mergelab.errors`) while its folder holds only Lightning's bookkeeping (the
config, the hyper-parameters, the metrics so far) produced nothing: its folder and its
W&B run are removed, so that a corrected rerun is the run's first version. Ctrl-C marks
the folder ``INTERRUPTED`` and says so in one line; any other failure keeps the folder,
with ``FAILED`` in it (the error), and finishes the W&B run with a non-zero exit code,
which W&B shows as failed.
"""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path

import lightning as L

from mergelab.errors import bad_input_in
from mergelab.io.run_folder import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    mark_finished,
    mark_running,
)

log = logging.getLogger(__name__)

# what Lightning and this callback write into a run folder before the run's own files
BOOKKEEPING = {"config.yaml", "hparams.yaml", "metrics.csv", RUNNING}


def run_folders(trainer: L.Trainer) -> list[Path]:
    """The run's folders: each logger's ``log_dir`` (W&B's run has none of its own)."""
    return [Path(lg.log_dir).absolute() for lg in trainer.loggers if isinstance(lg.log_dir, str)]


def mark_complete(trainer: L.Trainer) -> None:
    """``COMPLETE`` in the run's folders: call after the trainer and its loggers are done."""
    if trainer.is_global_zero:
        for folder in run_folders(trainer):
            if folder.is_dir():
                mark_finished(folder, COMPLETE)


class RunFolderMarks(L.Callback):
    """``RUNNING`` in each run folder at the start; on an exception in fit, validate or
    test, the folders removed (bad input, nothing produced) or marked."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for folder in run_folders(trainer):
                mark_running(folder)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not trainer.is_global_zero:
            return
        folders = run_folders(trainer)
        produced = any(
            p.name not in BOOKKEEPING for f in folders if f.is_dir() for p in f.iterdir()
        )
        discard = bad_input_in(exception) is not None and not produced
        roots = [Path(lg.save_dir).absolute() for lg in trainer.loggers if lg.save_dir]
        wandb_folder = _finish_wandb_run_as_failed(roots)
        if discard:
            for folder in [*folders, *([wandb_folder] if wandb_folder else [])]:
                _remove(folder, next(r for r in roots if folder.is_relative_to(r)))
            return
        interrupted = isinstance(exception, KeyboardInterrupt)
        marker = INTERRUPTED if interrupted else FAILED
        summary = "".join(traceback.format_exception_only(type(exception), exception))
        for folder in folders:
            if folder.is_dir():
                mark_finished(folder, marker, "interrupted (Ctrl-C)\n" if interrupted else summary)
                if interrupted:  # Lightning exits quietly; this is the one line that says so
                    log.warning("interrupted: %s is marked %s", folder, INTERRUPTED)


def _finish_wandb_run_as_failed(save_dirs: list[Path]) -> Path | None:
    """Finish this run's W&B run with a non-zero exit code; its local folder, when it lies
    under one of ``save_dirs`` (the run's loggers')."""
    wandb = sys.modules.get("wandb")  # imported only if a WandbLogger ran
    if wandb is None or wandb.run is None:
        return None
    folder = Path(wandb.run.dir).absolute().parent  # <save_dir>/wandb/<run>/files
    wandb.finish(exit_code=1)
    return folder if any(folder.is_relative_to(d) for d in save_dirs) else None


def _remove(folder: Path, root: Path) -> None:
    """``folder``, the links that pointed into it (W&B's latest-run, debug.log), and its
    parents up to ``root`` (a logger's save_dir) while they are empty."""
    if not folder.exists():
        return
    shutil.rmtree(folder)
    parent = folder.parent
    for link in parent.iterdir():
        if link.is_symlink() and not link.exists():
            link.unlink()
    while parent.is_relative_to(root) and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent

"""A quiet console: Lightning's banners, mergelab's per-run notes and the warnings that
every run repeats are silenced for a block, unless the user asks for them (``--verbose``).

Lightning's documented way is used: the level of its loggers. The build's own process
(:mod:`mergelab.embedded.build_process`) is told whether the console is quiet by
:func:`is_quiet` and silences itself the same way.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# Lightning's INFO lines (seed, devices, tips) and mergelab's per-run notes: silenced
# unless --verbose (Lightning's documented way: the level of its loggers)
QUIET_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "mergelab.engine",
    "mergelab.methods",
    "mergelab.lightning",
)
# warnings that every run repeats and that say nothing about the user's input
HARMLESS_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch ≥ 2.10
    r"No seed found, seed set to",  # evaluation draws nothing at random
    # the gradient statistics' fit: a frozen encoder, no optimizer, no validation, and no
    # batches at all when the statistics are cached
    r"Found \d+ module\(s\) in eval mode",
    r"`LightningModule.configure_optimizers` returned `None`",
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r"Total length of `\w+` across ranks is zero",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


HANDLER_NAME = "mergelab-console"


def console_log(level: int = logging.INFO) -> None:
    """mergelab's log lines on today's sys.stderr as ``[mergelab] <message>``, at
    ``level`` (replacing the handler of an earlier call in this process)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[mergelab] %(message)s"))
    handler.set_name(HANDLER_NAME)
    logger = logging.getLogger("mergelab")
    for previous in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
        logger.removeHandler(previous)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a library's root handler would print every line twice


def is_quiet() -> bool:
    """Whether a :func:`quiet_console` block is in force in this process."""
    return logging.getLogger(QUIET_LOGGERS[0]).level >= logging.WARNING


@contextlib.contextmanager
def quiet_console(verbose: bool):
    """Lightning's banners and the harmless warnings off for the block (unless verbose)."""
    if verbose:
        yield
        return
    import datasets
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels when imported)

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    # the build writes and reads its datasets: their per-split bars say nothing
    bars = not datasets.are_progress_bars_disabled()
    with warnings.catch_warnings():
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        if bars:
            datasets.disable_progress_bars()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if bars:
                datasets.enable_progress_bars()

"""The ``mergelab`` console script: LightningCLI's fit, validate and test, and the
``embedded`` and ``sweep`` commands beside them.

Bad input (a setting out of range, a missing or unreadable file, a checkpoint of the
wrong layout: the ValueError, KeyError and OSError families that mergelab's checks raise)
is printed as ``mergelab: error: <message>`` with exit status 2 and no traceback; set
MERGELAB_TRACEBACK=1 to see it. Any other exception is a crash and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys

BAD_INPUT = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
TRACEBACK_ENV = "MERGELAB_TRACEBACK"


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[mergelab] %(message)s"))
    logger = logging.getLogger("mergelab")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's root handler would print every line twice
    try:
        dispatch(sys.argv[1] if len(sys.argv) > 1 else None)
    except BAD_INPUT as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        # a KeyError's str() is its repr; its message is its first argument
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mergelab: error: {message}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see where)", file=sys.stderr)
        raise SystemExit(2) from None


def dispatch(command: str | None) -> None:
    if command == "embedded":
        from mergelab.embedded.benchmark import main as embedded

        embedded(sys.argv[2:])
    elif command == "sweep":
        from mergelab.sweep.runner import main as sweep

        sweep(sys.argv[2:])
    else:
        from mergelab.cli import run

        run()

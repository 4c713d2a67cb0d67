"""The ``mergelab`` console script: LightningCLI's fit, validate and test, and the
``embedded`` and ``sweep`` commands beside them."""

from __future__ import annotations

import logging
import sys


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[mergelab] %(message)s"))
    logger = logging.getLogger("mergelab")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's root handler would print every line twice
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "embedded":
        from mergelab.embedded.benchmark import main as embedded

        embedded(sys.argv[2:])
    elif command == "sweep":
        from mergelab.sweep.runner import main as sweep

        sweep(sys.argv[2:])
    else:
        from mergelab.cli import run

        run()

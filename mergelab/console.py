"""The ``mergelab`` console script: LightningCLI's fit, validate and test, and the
``embedded`` and ``sweep`` commands beside them.

Bad input (a setting out of range, a missing or unreadable file, a checkpoint of the
wrong layout: the :class:`mergelab.errors.BadInput` that mergelab's checks raise) is
printed as ``mergelab: error: <message>`` with exit status 2 and no traceback; set
MERGELAB_TRACEBACK=1 to see it. Any other exception is a crash and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from mergelab.errors import BadValue, bad_input_in, message_of
from mergelab.quiet import console_log

TRACEBACK_ENV = "MERGELAB_TRACEBACK"


def main() -> None:
    console_log()
    try:
        dispatch(sys.argv[1] if len(sys.argv) > 1 else None)
    except Exception as error:
        bad = bad_input_in(error)
        if bad is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise  # a crash: its traceback, never a one-line error
        print(f"mergelab: error: {message_of(bad)}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see where)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C: what was finished stays, and is resumed from
        print("mergelab: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def dispatch(command: str | None) -> None:
    if command in (None, "-h", "--help"):  # without importing Lightning: under a second
        from mergelab.usage import COMMANDS, USAGE

        print(f"usage: mergelab {{{','.join(COMMANDS)}}} [options]\n")
        print(USAGE)
        return
    if command == "embedded":
        from mergelab.embedded.benchmark import main as embedded

        embedded(sys.argv[2:])
    elif command == "merge":
        from mergelab.checkpoint_merge.command import main as merge

        merge(sys.argv[2:])
    elif command == "compress":
        from mergelab.checkpoint_merge.tall_store import compress_main

        compress_main(sys.argv[2:])
    elif command == "retrieve":
        from mergelab.checkpoint_merge.tall_store import retrieve_main

        retrieve_main(sys.argv[2:])
    elif command == "sweep":
        from mergelab.sweep.runner import main as sweep

        sweep(sys.argv[2:])
    else:
        from jsonargparse import ArgumentError

        from mergelab.cli import run

        try:
            run()
        except ArgumentError as error:  # an option the CLI cannot parse: bad input too
            raise BadValue(f"{error} (`mergelab {command} --help` lists the options)") from error

"""The embedded benchmark's build in a process of its own, started by
:meth:`mergelab.embedded.build.EmbeddedBenchmark.ensure` with the environment that fixes
its kernels (:data:`mergelab.embedded.build.BUILD_ENVIRONMENT`): torch reads those
settings once, when it loads, so they cannot be changed inside a running process.

``python -m mergelab.embedded.build_process '<preset as JSON>' <cache folder>`` builds
(or finishes) that preset's benchmark; exit status 130 after Ctrl-C, with the steps done
so far staged for the next build.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mergelab.embedded.build import EmbeddedBenchmark
from mergelab.embedded.preset import Preset
from mergelab.quiet import console_log, quiet_console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergelab.embedded.build_process")
    parser.add_argument("preset", type=json.loads, help="the preset's fields, as JSON")
    parser.add_argument("cache_dir")
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--quiet", action="store_true", help="as `mergelab embedded` is")
    args = parser.parse_args(argv)
    console_log(args.log_level)
    benchmark = EmbeddedBenchmark(Preset(**args.preset), args.cache_dir)
    try:
        with quiet_console(verbose=not args.quiet):
            benchmark.build_locked()
    except KeyboardInterrupt:
        return 130  # the parent says so; the staged steps stay for the next build
    return 0


if __name__ == "__main__":
    sys.exit(main())

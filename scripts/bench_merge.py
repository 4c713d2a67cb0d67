"""Time and peak memory of mergelab's file-to-file merges, against just reading the models.

What is measured
----------------
A random-weight open_clip ViT-B-32 image encoder (``create_model(...).visual``, no
download) plays the pretrained model θ0; ``--tasks`` fine-tuned copies are θ0 plus small
seeded Gaussian noise (``--noise`` × each tensor's std). All of them are written as
safetensors files into a work folder. Then, each in a fresh child process, from the files:

``floor``
    read every checkpoint once, tensor by tensor, with ``mergelab.SafetensorsCheckpoint``
    and sum them: the unavoidable cost of any merge that reads all models;
``task_arithmetic``
    ``mergelab.task_arithmetic(θ0, {task: θt}, 0.3)``: the merged model, in memory, as an
    evaluation uses it;
``tatr``
    zero-shot trust region, ``mergelab.trust_region(..., 0.3, threshold_quantile=0.99)``,
    the merged model in memory;
``tall``
    ``TallMasks.build(..., lambdas=[0.4], output=file)`` (every task's mask, streamed
    into one file), then ``masks.retrieve(θ0, task, 0.4, reuse=model)`` once per task,
    in memory, each into the tensors of the one before (as the evaluation loop does);
``ties``, ``dare``
    ``mergelab.ties(..., 0.3, keep=0.2)`` and ``mergelab.dare(..., 0.3, 0.5, seed 0)`` on
    the CPU, the merged model in memory (targets: 2× the floor);
``tsv``, ``iso_c``, ``iso_cts``
    ``mergelab.task_singular_vectors`` and ``mergelab.isotropic`` (Iso-CTS with a common
    subspace of 0.8) on the CPU, the merged model in memory; each against ``svd_<rule>``,
    the bare ``torch.linalg.svd`` calls of the same shapes that its rule needs for every
    2-D parameter (timed alone, in the same run): target, the method within 1.5× of
    those SVDs plus the floor. ``--methods`` picks a subset (the SVD methods of ViT-B/32
    at 20 tasks take many minutes on two cores).

Each child reports the wall time of its work alone (``time.perf_counter`` after the
imports: torch, mergelab and, for ``tall``, ``ties`` and ``dare``, their numba kernels
(``mergelab.merging.*_kernels``); the import seconds are shown too), the seconds of the
TALL build and of each retrieval, its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` at
the end) and, for information, its RSS right after the imports (torch alone is about
0.5 GB). Peak RSS is divided by the pretrained checkpoint's tensor bytes ("models"), and
times by the floor's. The TALL mask file's ``mask/...`` tensors give the storage cost of
a mask in bits per merged parameter.

Why it is run this way
----------------------
* One fresh process per method: ``ru_maxrss`` is a high-water mark that never goes down,
  so methods measured in one process would hide each other's peaks. The children import
  only torch and mergelab (never open_clip or lightning) because imports count in RSS.
* The parent itself imports neither torch nor open_clip (the generator runs in a child
  too): on Linux a child's ``ru_maxrss`` starts at its parent's RSS at the time of the
  ``exec``, so a heavy parent would inflate every measurement.
* The floor runs once first as a page-cache warm-up (discarded), so every method then
  reads the checkpoints from memory and the comparison is of compute and copies, not of
  the disk. Some machines page cold file pages out again after a few idle seconds, so
  the parent also re-reads the checkpoints (through a small buffer) right before each
  measured child; the "disk MB" column (``ru_inblock``) shows what a child still had
  to read from storage. ``--repeat K`` runs the whole sequence K times and keeps each
  method's fastest time (and its largest peak RSS).
* Some virtual machines hand memory freed in the guest back to their host, and touching
  it again costs a hypervisor fault per page (on the VM this was tuned on, a 440 MB file
  took 0.6-1.0 s to write into such memory instead of 0.1 s). Reading into reused
  buffers, the floor never pays this; TALL, which writes a 440 MB file and a model, would
  pay it at random. So each child fills and frees 6 models' worth of memory (at most
  2 GB) right before its work and resets its peak RSS (see ``warm_free_memory``);
  ``--cold-memory`` measures without this.
* Wall time is what the targets are about, but it is only meaningful on an otherwise
  idle machine: the table also gives each method's CPU time, and the parent measures,
  from /proc/stat, how many cores other processes kept busy meanwhile (``max_other_load``
  in RESULT), with a warning when that exceeds a quarter of a core.

The targets (``merge_report.TARGETS``) are for a 2-core, 24 GB, GPU-less machine; the
script only reports them (pass/fail) and exits 0 whether or not they are met. Its last
line is ``RESULT`` followed by ``key=value`` pairs for scripts to parse.

Where the code is
-----------------
This file parses the options and runs the sequence; ``synthetic_checkpoints.py`` writes
the checkpoints, ``merge_workloads.py`` is what each child process runs (the hidden
sub-command ``_child``), ``merge_report.py`` prints the table and the RESULT line, and
``harness.py`` holds the child-process, RSS, load and RESULT helpers that the other
benchmark scripts share.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import synthetic_checkpoints
from harness import (
    CHILD,
    MB,
    BenchError,
    child_command,
    peak_rss_bytes,
    run_child,
    run_measured_child,
    warm_page_cache,
)
from merge_report import TARGETS, combine, report
from merge_workloads import METHODS, child_main

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]

log = logging.getLogger("bench_merge")


def workload_ready(workdir: Path, args: argparse.Namespace) -> bool:
    """True when ``workdir`` already holds the checkpoints this run asks for."""
    return synthetic_checkpoints.checkpoints_ready(
        workdir, args.model, args.tasks, args.noise, args.seed
    )


def run_generation(workdir: Path, args: argparse.Namespace) -> None:
    (workdir / synthetic_checkpoints.MANIFEST).unlink(missing_ok=True)
    extra = ["--model", args.model, "--tasks", str(args.tasks)]
    extra += ["--noise", repr(args.noise), "--seed", str(args.seed)]
    # stderr is inherited so that the generator's progress shows as it goes
    command = child_command(SCRIPT, "generate", "--workdir", str(workdir), *extra)
    run_child("generate", command, cwd=ROOT)


def run_method(method: str, workdir: Path, args: argparse.Namespace, profile: bool) -> dict:
    pretrained, finetuned = synthetic_checkpoints.checkpoint_paths(workdir)
    log.debug("  page cache re-read in %.2f s", warm_page_cache([pretrained, *finetuned.values()]))
    extra = []
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.keep:
        extra += ["--keep"]
    if profile and args.profile is not None:
        extra += ["--profile", str(args.profile.resolve())]
    if args.cold_memory:
        extra += ["--cold-memory"]
    command = child_command(SCRIPT, method, "--workdir", str(workdir), *extra)
    record = run_measured_child(method, command, cwd=ROOT)
    if record["forbidden_imports"]:
        log.warning(
            "%s child imported %s: its RSS is inflated", method, record["forbidden_imports"]
        )
    if record["vm_hwm"] and abs(record["peak_rss"] - record["vm_hwm"]) > 0.05 * record["vm_hwm"]:
        log.warning(
            "%s: ru_maxrss %.0f MB but VmHWM %.0f MB (parent RSS leaking into the child?)",
            method,
            record["peak_rss"] / MB,
            record["vm_hwm"] / MB,
        )
    for message in record["log"]:
        log.debug("  %s: %s", method, message)
    if record["other_load"] is not None and record["other_load"] > 0.25:
        log.warning(
            "  other processes used %.1f of %d cores during the %s run: its time is inflated",
            record["other_load"],
            os.cpu_count() or 0,
            method,
        )
    log.info(
        "  %-16s %7.2f s (cpu %6.2f s, disk read %6.1f MB)  peak RSS %7.1f MB"
        "  (after imports %6.1f MB)",
        method,
        record["seconds"],
        record["cpu_seconds"],
        record["disk_read_bytes"] / MB,
        record["peak_rss"] / MB,
        record["baseline_rss"] / MB,
    )
    return record


def measured_methods(asked: list[str]) -> list[str]:
    """``asked`` in METHODS's order, with the floor and each SVD method's bare SVDs."""
    wanted = {"floor", *asked, *(f"svd_{m}" for m in asked if f"svd_{m}" in METHODS)}
    return [method for method in METHODS if method in wanted]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=SCRIPT.name,
        description=(
            "Benchmark mergelab's Task Arithmetic, zero-shot TATR, TALL masks, TIES, DARE, "
            "TSV-M, Iso-C and Iso-CTS on a "
            "random-weight open_clip image encoder and N noisy fine-tuned copies, each merge "
            "run from safetensors files in a fresh process; reports wall time and peak RSS "
            "against the floor of just reading and summing the checkpoints."
        ),
        epilog=(
            "The last line printed is 'RESULT key=value ...'. Targets (2-core CPU): "
            + ", ".join(f"{k} <= {v:g}" for k, v in TARGETS)
            + ". Missed targets are reported, not turned into a failing exit status."
        ),
    )
    parser.add_argument(
        "--model", default="ViT-B-32", help="open_clip model name (default: %(default)s)"
    )
    parser.add_argument(
        "--tasks", type=int, default=8, help="number of fine-tuned copies (default: %(default)s)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the checkpoints (created if missing, never deleted; its checkpoints "
        "are reused when they match --model/--tasks/--noise/--seed); default: a fresh "
        "temporary folder, removed at the end unless --keep",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder and the merged outputs (ta/tatr/tall files in out/)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads in the measuring children (default: torch's)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="K",
        default=1,
        help="run every method K times and keep the fastest (default: %(default)s)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=1e-3,
        help="fine-tuning noise, relative to each tensor's std (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and the noise (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also run each method once more under cProfile (not timed) and write "
        "DIR/<method>.prof and DIR/<method>.txt",
    )
    parser.add_argument(
        "--cold-memory",
        action="store_true",
        help="do not fill and free memory in each child right before its work (see "
        "warm_free_memory): on a VM that hands freed memory back to its host, methods "
        "that write models or files then pay the host's page faults, the floor does not",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help="the methods to measure (default: all of %(choices)s; the floor always runs, "
        "an SVD method's bare SVDs (svd_<rule>) with it)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show children's log lines")
    args = parser.parse_args(argv)
    if args.tasks < 2:
        parser.error("--tasks must be at least 2 (trust region and TALL need two tasks)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        return child_main(argv[1:], SCRIPT.name)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="[bench_merge] %(message)s"
    )
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_merge_")) if temporary else args.workdir
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def cleanup() -> None:
        if not args.keep:
            shutil.rmtree(workdir / "out", ignore_errors=True)
        if temporary and not args.keep and workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            log.info("removed %s", workdir)
        elif workdir.exists():
            log.info("kept %s", workdir)

    try:
        if workload_ready(workdir, args):
            log.info("reusing the checkpoints in %s", workdir)
        else:
            log.info("generating %d+1 checkpoints in %s", args.tasks, workdir)
            run_generation(workdir, args)
        log.info("warm-up: floor run to fill the page cache, tall run to compile (discarded)")
        first = run_method("floor", workdir, args, profile=False)
        if "tall" in args.methods:  # numba caches its kernels on disk
            run_method("tall", workdir, args, profile=False)
        model_bytes = first["model_bytes"]
        runs: dict[str, list[dict]] = {method: [] for method in measured_methods(args.methods)}
        for repeat in range(args.repeat):
            log.info("measuring, round %d/%d", repeat + 1, args.repeat)
            for method in runs:
                runs[method].append(run_method(method, workdir, args, profile=False))
        if args.profile is not None:
            log.info("profiling each method once (cProfile) into %s", args.profile)
            for method in runs:
                run_method(method, workdir, args, profile=True)
        results = {method: combine(r) for method, r in runs.items()}
        mask = None
        if "tall" in results:
            mask = {k: results["tall"][k] for k in ("masks", "mask_bytes", "mtl_bytes")}
            mask["mask_bits_per_param"] = results["tall"]["mask_bits_per_param"]
        log.info(
            "parent peak RSS %.1f MB (stays small: children inherit it)", peak_rss_bytes() / MB
        )
    except BenchError as err:
        log.error("%s", err)
        cleanup()
        return 1
    except BaseException:
        cleanup()
        raise
    cleanup()
    logging.shutdown()
    sys.stderr.flush()
    report(results, mask, model_bytes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

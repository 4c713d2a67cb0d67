"""Time and peak memory of ``mergelab merge CONFIG.yaml`` on a Llama-shaped model, against
just reading the models.

What is measured
----------------
A synthetic bfloat16 base model of Llama shape (Hugging Face key names, ``--params``
parameters, ``--shards`` shards with their index, see ``llama_checkpoints.py``) and
``--tasks`` fine-tuned copies (base + small seeded noise) are written as model folders under
the work folder, once: a second run with the same settings reuses them. Then, each in a
fresh child process:

``floor``
    read every file of the base and the fine-tuned folders once, front to back, in 64 MiB
    reads into one reused buffer: the unavoidable cost of any merge that reads all models;
``task_arithmetic``, ``ties``, ``trust_region_zero_shot``
    ``mergelab merge CONFIG.yaml`` (the console script, as a user runs it: start-up and
    imports included) with Task Arithmetic (λ 0.3), TIES (λ 0.3, keep 0.2) or zero-shot
    TATR (λ 0.3, quantile 0.99), writing a bfloat16 model folder; its output is then
    checked to hold the base's tensor names, shapes and dtype, and deleted.

Why it is run this way
----------------------
* The page cache: before each measured child, the parent flushes and drops the inputs'
  pages (``posix_fadvise(DONTNEED)`` per file), so the floor and every merge read the
  models from storage ("cold"); the "disk GB" column (``ru_inblock``) shows that they
  did. At the default size the models (~27 GB) do not fit in the page cache of a 24 GB
  machine anyway, so cold is the one state both can share. Where the models fit in half
  the available memory, the floor is also measured warm, for information. Where the
  drop does not take (no ``posix_fadvise``, or the cold floor read nothing from disk),
  the inputs are instead re-read right before each child and the ratios are warm ones.
* Peak RSS: a measuring child of this script (standard library only) starts the merge
  command, waits for it and reads ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the merge
  is its only child, so the peak is that merge's alone. The parent imports neither torch
  nor safetensors (the generator runs in a child too) and stays small.
* The merge command runs with this checkout on PYTHONPATH (the benchmark measures this
  tree's mergelab, installed or not), from the work folder.

The targets: each merge within 2× the floor's seconds, and a peak RSS under 3 GB whatever
the number of tasks. They are reported, not turned into a failing exit status; a merge
that fails is, with exit status 1. The last line
printed is ``RESULT`` followed by ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_checkpoints as llama
from harness import (
    CHILD,
    BenchError,
    child_command,
    emit,
    peak_rss_bytes,
    print_result,
    run_child,
    run_measured_child,
    time_work,
    warm_page_cache,
)

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
GB = 1e9
TIME_TARGET = 2.0  # × the read floor
RSS_TARGET = 3 * GB
METHODS = {
    "task_arithmetic": ("mergelab.methods.TaskArithmetic", "{scaling_factor: 0.3}"),
    "ties": ("mergelab.methods.Ties", "{scaling_factor: 0.3, keep: 0.2}"),
    "trust_region_zero_shot": (
        "mergelab.methods.TrustRegion",
        "{scaling_factor: 0.3, threshold_quantile: 0.99}",
    ),
}

log = logging.getLogger("bench_model_merge")


# --- the children ------------------------------------------------------------------------


def merge_command(config: Path) -> list[str]:
    """``mergelab merge CONFIG``: the console script of this Python, else the one on PATH,
    else the console's ``main`` through ``python -c``."""
    beside = Path(sys.executable).parent / "mergelab"
    script = str(beside) if beside.is_file() else shutil.which("mergelab")
    if script:
        return [script, "merge", str(config)]
    return [sys.executable, "-c", "from mergelab.console import main; main()", "merge", str(config)]


def read_floor(paths: list[Path]) -> int:
    buffer = bytearray(64 << 20)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{SCRIPT.name} {CHILD}")
    parser.add_argument("work", choices=["generate", "floor", "merge"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--params", type=float)
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--shards", type=int)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench_model_merge] %(message)s")
    if args.work == "generate":
        sys.path.insert(1, str(ROOT))  # this checkout's mergelab, installed or not
        shape = llama.llama_shape(args.params)
        seconds = llama.write_checkpoints(args.workdir, shape, args.shards, 0, args.tasks)
        emit({"seconds": seconds, "peak_rss": peak_rss_bytes()})
    elif args.work == "floor":
        base, finetuned = llama.model_folders(args.workdir, args.tasks)
        paths = [p for folder in (base, *finetuned.values()) for p in llama.model_files(folder)]
        total, cost = time_work(lambda: read_floor(paths), None, "floor")
        emit({**cost, "bytes": total})
    else:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        proc = subprocess.run(
            merge_command(args.config), capture_output=True, text=True, cwd=args.workdir, env=env
        )
        seconds = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the merge's alone
        record = {
            "seconds": seconds,
            "returncode": proc.returncode,
            "stderr": "\n".join(proc.stderr.splitlines()[-15:]),
            "peak_rss": usage.ru_maxrss * 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "disk_read_bytes": 512 * usage.ru_inblock,
        }
        if proc.returncode == 0:
            tensors = llama.read_manifest(args.workdir)["tensors"]
            if not args.output.is_dir():
                record["mismatch"] = f"no output folder {args.output}"
            else:
                record["mismatch"] = llama.tensor_mismatch(args.output, tensors)
        emit(record)
    return 0


# --- the parent --------------------------------------------------------------------------


def drop_page_cache(paths: list[Path]) -> bool:
    """Flush and drop the files' pages from the page cache; False where not possible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_config(workdir: Path, method: str, tasks: int, output: Path) -> Path:
    base, finetuned = llama.model_folders(workdir, tasks)
    class_path, init_args = METHODS[method]
    lines = [f"base: {json.dumps(str(base))}", "models:"]
    lines += [f"  {task}: {json.dumps(str(folder))}" for task, folder in finetuned.items()]
    lines += ["method:", f"  class_path: {class_path}", f"  init_args: {init_args}"]
    lines += ["dtype: bfloat16", f"output: {json.dumps(str(output))}"]
    config = workdir / "configs" / f"{method}.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text("\n".join(lines) + "\n")
    return config


def run_merge(method: str, workdir: Path, args, inputs: list[Path], cold: bool) -> dict:
    output = workdir / "out" / method
    shutil.rmtree(output, ignore_errors=True)
    config = write_config(workdir, method, args.tasks, output)
    if cold:
        drop_page_cache(inputs)
    else:
        warm_page_cache(inputs)
    extra = ["--config", str(config), "--output", str(output)]
    command = child_command(SCRIPT, "merge", "--workdir", str(workdir), *extra)
    try:
        record = run_measured_child(method, command, cwd=ROOT)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    status, stderr = record["returncode"], record["stderr"]
    if status != 0:
        killed = " (SIGKILL: the OOM killer?)" if status == -9 else ""
        record["error"] = f"exited with {status}{killed}"
        log.error("%s: `mergelab merge %s` %s\n%s", method, config, record["error"], stderr)
    elif record["mismatch"]:
        record["error"] = "output differs from the base"
        log.error("%s: the merged model differs from the base: %s", method, record["mismatch"])
    log.info(
        "  %-24s %8.2f s (cpu %7.2f s, disk read %6.2f GB)  peak RSS %5.2f GB",
        method,
        record["seconds"],
        record["cpu_seconds"],
        record["disk_read_bytes"] / GB,
        record["peak_rss"] / GB,
    )
    return record


def report(floor: dict, warm_floor: dict | None, merges: dict[str, dict], cold: bool) -> None:
    state = "cold" if cold else "warm"
    print(f"\n{'':26}{'seconds':>9} {'× floor':>8} {'peak RSS GB':>12} {'disk GB':>8}  targets")
    rows = [(f"read floor ({state})", floor)]
    rows += [("read floor (warm)", warm_floor)] if warm_floor else []
    for name, record in [*rows, *merges.items()]:
        ratio = record["seconds"] / floor["seconds"]
        verdict = ""
        if name in merges and "error" in record:
            verdict = f"FAILED: {record['error']}"
        elif name in merges:
            fast = "ok" if ratio <= TIME_TARGET else "MISSED"
            small = "ok" if record["peak_rss"] < RSS_TARGET else "MISSED"
            verdict = f"time {fast}, RSS {small}"
        print(
            f"{name:26}{record['seconds']:9.2f} {ratio:8.2f} {record['peak_rss'] / GB:12.2f}"
            f" {record['disk_read_bytes'] / GB:8.2f}  {verdict}"
        )
    print(
        f"targets: ≤ {TIME_TARGET:g}× the {state} read floor ({floor['bytes'] / GB:.2f} GB at "
        f"{floor['bytes'] / floor['seconds'] / GB:.2f} GB/s), peak RSS < {RSS_TARGET / GB:g} GB\n"
    )
    values = [
        ("floor_seconds", floor["seconds"], ".3f"),
        ("floor_gbps", floor["bytes"] / floor["seconds"] / GB, ".3f"),
        ("cold", int(cold), "d"),
    ]
    if warm_floor:
        values.append(("warm_floor_seconds", warm_floor["seconds"], ".3f"))
    done = {method: record for method, record in merges.items() if "error" not in record}
    values.append(("failed", len(merges) - len(done), "d"))
    for method, record in done.items():
        values.append((f"{method}_seconds", record["seconds"], ".3f"))
        values.append((f"{method}_ratio", record["seconds"] / floor["seconds"], ".3f"))
        values.append((f"{method}_peak_rss_gb", record["peak_rss"] / GB, ".3f"))
    if done:
        values.append(
            ("max_ratio", max(r["seconds"] for r in done.values()) / floor["seconds"], ".3f")
        )
        values.append(("max_peak_rss_gb", max(r["peak_rss"] for r in done.values()) / GB, ".3f"))
    print_result(values)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=SCRIPT.name,
        description="Benchmark `mergelab merge CONFIG.yaml` (Task Arithmetic, TIES, zero-shot "
        "TATR) on a synthetic bfloat16 Llama-shaped model and N noisy fine-tuned copies in "
        "sharded safetensors folders: wall time and peak RSS of each merge, in a fresh "
        "process, against the floor of reading every file once.",
        epilog="The last line printed is 'RESULT key=value ...'. Targets: each merge within "
        f"{TIME_TARGET:g}x the read floor, peak RSS < {RSS_TARGET / GB:g} GB.",
    )
    parser.add_argument(
        "--params", type=float, default=1.5e9, help="parameters per model (default: 1.5e9)"
    )
    parser.add_argument(
        "--tasks", type=int, default=8, help="fine-tuned copies (default: %(default)s)"
    )
    parser.add_argument(
        "--shards", type=int, default=3, help="safetensors shards per model (default: 3)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help="the merges to measure (default: all of %(choices)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for the models (created if missing, never deleted; models of the same "
        "--params/--shards are reused); default: a temporary folder, removed at the end "
        "unless --keep",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.tasks < 2:
        parser.error("--tasks must be at least 2 (TIES and trust region need two tasks)")
    if args.shards < 1 or args.params < 1e5:
        parser.error("--shards must be at least 1 and --params at least 1e5")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench_model_merge] %(message)s")
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_model_merge_")) if temporary else args.workdir
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shape = llama.llama_shape(args.params)
    try:
        missing = llama.folders_to_write(workdir, shape, args.shards, 0, args.tasks)
        # the folders to write, one merged model at a time, and some slack
        needed = int(shape.nbytes * 1.01 + 1e6) * (len(missing) + 1) + GB // 2
        free = shutil.disk_usage(workdir).free
        if needed > free:
            raise BenchError(
                f"{workdir} has {free / GB:.1f} GB free, this run needs {needed / GB:.1f} GB "
                f"({len(missing)} models of {shape.nbytes / GB:.2f} GB to write, one merged "
                "model at a time); free space, pick another --workdir or lower --params/--tasks"
            )
        if missing:
            log.info("writing %s into %s", ", ".join(missing), workdir / llama.MODELS)
            extra = ["--params", repr(args.params), "--tasks", str(args.tasks)]
            command = child_command(SCRIPT, "generate", "--workdir", str(workdir), *extra)
            command += ["--shards", str(args.shards)]
            generated = run_child("generate", command, cwd=ROOT)
            log.info(
                "generation took %.1f s (generator peak RSS %.2f GB)",
                generated["seconds"],
                generated["peak_rss"] / GB,
            )
        else:
            log.info("reusing the models in %s", workdir / llama.MODELS)
        base, finetuned = llama.model_folders(workdir, args.tasks)
        folders = [base, *finetuned.values()]
        inputs = [path for folder in folders for path in llama.model_files(folder)]
        total = sum(llama.folder_bytes(folder) for folder in folders)
        log.info(
            "%d models of %.3f G parameters: %.2f GB on disk (%d files)",
            len(folders),
            shape.params / 1e9,
            total / GB,
            len(inputs),
        )
        floor_command = child_command(
            SCRIPT, "floor", "--workdir", str(workdir), "--tasks", str(args.tasks)
        )
        cold = drop_page_cache(inputs)
        floor = run_measured_child("floor", floor_command, cwd=ROOT)
        if cold and floor["disk_read_bytes"] < floor["bytes"] / 2:
            log.warning("the page cache drop did not take (nothing read from disk): warm ratios")
            cold = False
        log.info(
            "read floor (%s): %.2f s, %.2f GB/s (disk read %.2f GB)",
            "cold" if cold else "page cache",
            floor["seconds"],
            floor["bytes"] / floor["seconds"] / GB,
            floor["disk_read_bytes"] / GB,
        )
        warm_floor = None
        if cold and total < available_memory() / 2:
            warm_page_cache(inputs)
            warm_floor = run_measured_child("floor", floor_command, cwd=ROOT)
            log.info(
                "read floor (warm): %.2f s, %.2f GB/s",
                warm_floor["seconds"],
                warm_floor["bytes"] / warm_floor["seconds"] / GB,
            )
        elif cold:
            log.info(
                "warm floor skipped: %.1f GB of models, not under half the free memory", total / GB
            )
        merges = {}
        for method in args.methods:
            merges[method] = run_merge(method, workdir, args, inputs, cold)
    except BenchError as err:
        log.error("%s", err)
        return 1
    finally:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            log.info("removed %s", workdir)
        else:
            log.info("kept %s", workdir)
    report(floor, warm_floor, merges, cold)
    return 1 if any("error" in record for record in merges.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

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
    in memory, each into the tensors of the one before (as the evaluation loop does).

Each child reports the wall time of its work alone (``time.perf_counter`` after the
imports: torch, mergelab and, for ``tall``, the numba kernels of
``mergelab.merging.tall_kernels``; the import seconds are shown too), the seconds of the
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

The targets below are for a 2-core, 24 GB, GPU-less machine; the script only reports
them (pass/fail) and exits 0 whether or not they are met. Its last line is ``RESULT``
followed by ``key=value`` pairs for scripts to parse.
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

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
CHILD = "_child"  # hidden sub-command: python bench_merge.py _child METHOD --workdir DIR
MANIFEST = "manifest.json"
METHODS = ("floor", "task_arithmetic", "tatr", "tall")
SHORT = {"floor": "floor", "task_arithmetic": "ta", "tatr": "tatr", "tall": "tall"}
SCALING = 0.3
TATR_QUANTILE = 0.99
TALL_LAMBDA = 0.4
# (RESULT key, limit): every target is "value <= limit".
TARGETS = (
    ("tatr_vs_floor", 3.0),
    ("tatr_rss_models", 3.0),
    ("tall_vs_floor", 4.0),
    ("tall_rss_models", 4.0),
    ("mask_bits_per_param", 1.01),
)
FORBIDDEN_IMPORTS = ("open_clip", "lightning", "pytorch_lightning")
# memory each child fills and frees before its work, in models (TALL touches about 2.5
# models of new memory: its file and a retrieved model), at most WARM_MAX_BYTES
WARM_MODELS = 6
WARM_MAX_BYTES = 2_000_000_000
MB = 1e6

log = logging.getLogger("bench_merge")


class BenchError(RuntimeError):
    """A child process failed or answered something unreadable."""


# --- small helpers shared by parent and children (standard library only) ---------------


def peak_rss_bytes() -> int:
    """This process's peak RSS; ``ru_maxrss`` is in KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...), None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def usage() -> dict:
    """CPU seconds and filesystem reads of this process so far (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": r.ru_utime + r.ru_stime, "inblock": r.ru_inblock, "majflt": r.ru_majflt}


def emit(record: dict) -> None:
    """The one JSON line a child hands back to the parent, on stdout."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# --- children: generation --------------------------------------------------------------


def generate(workdir: Path, model: str, tasks: int, noise: float, seed: int) -> dict:
    """Write θ0 and ``tasks`` noisy copies as safetensors; the only step that imports open_clip."""
    start = time.perf_counter()
    import open_clip
    import torch
    from safetensors.torch import save_file

    log.info("building a random-weight open_clip %s image encoder (no download)", model)
    torch.manual_seed(seed)
    pretrained = {
        key: tensor.detach().contiguous().clone()
        for key, tensor in open_clip.create_model(model).visual.state_dict().items()
    }
    nbytes = sum(t.numel() * t.element_size() for t in pretrained.values())
    log.info(
        "%d tensors, %.1f M parameters, %.1f MB per checkpoint; writing %d checkpoints",
        len(pretrained),
        sum(t.numel() for t in pretrained.values()) / 1e6,
        nbytes / MB,
        tasks + 1,
    )
    save_file(pretrained, str(workdir / "pretrained.safetensors"))
    # Per-tensor noise scale: the tensor's std; constant tensors (LayerNorm weights of 1,
    # zero biases) use their mean magnitude, or 1, so that every tensor moves a little.
    scales = {}
    for key, tensor in pretrained.items():
        if not tensor.dtype.is_floating_point:
            continue
        std = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
        scales[key] = noise * (std or float(tensor.float().abs().mean()) or 1.0)
    finetuned = {}
    for index in range(tasks):
        task = f"task{index}"
        generator = torch.Generator().manual_seed(seed + 1 + index)
        state = {}
        for key, tensor in pretrained.items():
            if key in scales:
                bump = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                state[key] = tensor + bump.mul_(scales[key])
            else:
                state[key] = tensor.clone()
        name = f"finetuned_{task}.safetensors"
        save_file(state, str(workdir / name))
        del state
        finetuned[task] = name
        log.info("  fine-tuned %d/%d written (%s)", index + 1, tasks, name)
    manifest = {
        "model": model,
        "tasks": tasks,
        "noise": noise,
        "seed": seed,
        "pretrained": "pretrained.safetensors",
        "finetuned": finetuned,
    }
    (workdir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("generation done in %.1f s", time.perf_counter() - start)
    return {"seconds": time.perf_counter() - start, "bytes_per_checkpoint": nbytes}


# --- children: measurements -------------------------------------------------------------


class Workload:
    """Paths of one benchmark run, read from the work folder's manifest."""

    def __init__(self, workdir: Path):
        manifest = json.loads((workdir / MANIFEST).read_text())
        self.workdir = workdir
        self.pretrained = workdir / manifest["pretrained"]
        self.finetuned = {task: workdir / name for task, name in manifest["finetuned"].items()}
        self.outdir = workdir / "out"

    def output(self, method: str) -> Path:
        return self.outdir / f"{method}.safetensors"


def work_floor(w: Workload) -> dict:
    from mergelab import SafetensorsCheckpoint

    pretrained = SafetensorsCheckpoint(w.pretrained)
    finetuned = [SafetensorsCheckpoint(path) for path in w.finetuned.values()]
    for key in pretrained:
        total = pretrained[key]  # a fresh tensor (the reader clones)
        for checkpoint in finetuned:
            total.add_(checkpoint[key])
        del total
    return {}


def work_task_arithmetic(w: Workload) -> dict:
    import mergelab

    merged = mergelab.task_arithmetic(w.pretrained, w.finetuned, SCALING)
    del merged
    return {}


def work_tatr(w: Workload) -> dict:
    import mergelab

    merged = mergelab.trust_region(
        w.pretrained, w.finetuned, SCALING, threshold_quantile=TATR_QUANTILE
    )
    del merged
    return {}


def work_tall(w: Workload) -> dict:
    """The masks, then every task's model; returns the seconds of each phase."""
    from mergelab import TallMasks

    start = time.perf_counter()
    masks = TallMasks.build(
        w.pretrained, w.finetuned, lambdas=[TALL_LAMBDA], output=w.output("tall"), overwrite=True
    )
    phases = {"build": time.perf_counter() - start}
    model = None
    for task in masks.tasks:
        start = time.perf_counter()
        model = masks.retrieve(w.pretrained, task, TALL_LAMBDA, reuse=model)
        phases[f"retrieve {task}"] = time.perf_counter() - start
    return phases


WORK = {
    "floor": work_floor,
    "task_arithmetic": work_task_arithmetic,
    "tatr": work_tatr,
    "tall": work_tall,
}


def checkpoint_stats(w: Workload) -> dict:
    """Sizes read from the pretrained checkpoint's header (no tensor data is read)."""
    from mergelab import SafetensorsCheckpoint

    pretrained = SafetensorsCheckpoint(w.pretrained)
    specs = [pretrained.spec(key) for key in pretrained]
    return {
        "model_bytes": sum(s.numel * s.dtype.itemsize for s in specs),
        "params": sum(s.numel for s in specs),
        "merged_params": sum(s.numel for s in specs if s.dtype.is_floating_point),
        "tensors": len(specs),
    }


def mask_stats(path: Path, merged_params: int) -> dict:
    """Bits per merged parameter of one TALL mask, from the masks file's header."""
    from mergelab import SafetensorsCheckpoint

    store = SafetensorsCheckpoint(path)
    mask_bytes = mtl_bytes = 0
    masks = set()
    for key in store:
        spec = store.spec(key)
        size = spec.numel * spec.dtype.itemsize
        if key.startswith("mask/"):
            mask_bytes += size
            masks.add(tuple(key[len("mask/") :].split("/", 2)[:2]))  # (task, λ)
        elif key.startswith("mtl/"):
            mtl_bytes += size
    return {
        "masks": len(masks),
        "mask_bytes": mask_bytes,
        "mtl_bytes": mtl_bytes,
        "file_bytes": path.stat().st_size,
        "mask_bits_per_param": 8 * mask_bytes / (merged_params * max(len(masks), 1)),
    }


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def measure(
    method: str,
    workdir: Path,
    threads: int | None,
    profile: Path | None,
    keep: bool,
    cold_memory: bool,
):
    """Body of a measurement child: imports, then the timed work, then the report."""
    started = time.perf_counter()
    sys.path.insert(1, str(ROOT))  # this checkout's mergelab, installed or not
    import torch

    import mergelab

    if method == "tall":
        # TALL's compiled kernels are a module of their own, imported on first use (numba's
        # start-up is about 0.5 s and 125 MB, which the other methods should not pay); it is
        # imported here so that, like torch's, its import is not part of the timed work
        from mergelab.merging import tall_kernels  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    captured = _ListHandler()
    logging.getLogger("mergelab").addHandler(captured)
    logging.getLogger("mergelab").setLevel(logging.INFO)
    w = Workload(workdir)
    w.outdir.mkdir(exist_ok=True)
    baseline = peak_rss_bytes()
    baseline_now = proc_status_bytes("VmRSS")
    import_seconds = time.perf_counter() - started
    sizes = checkpoint_stats(w)
    if not cold_memory:
        warm_free_memory(min(WARM_MODELS * sizes["model_bytes"], WARM_MAX_BYTES))

    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    before = usage()
    start = time.perf_counter()
    phases = WORK[method](w)
    seconds = time.perf_counter() - start
    after = usage()
    if profiler is not None:
        profiler.disable()
    peak = peak_rss_bytes()
    hwm = proc_status_bytes("VmHWM")

    record = {
        "method": method,
        "seconds": seconds,
        "cpu_seconds": after["cpu"] - before["cpu"],
        # ru_inblock counts 512-byte blocks read from storage: 0 means a warm page cache
        "disk_read_bytes": 512 * (after["inblock"] - before["inblock"]),
        "major_faults": after["majflt"] - before["majflt"],
        "peak_rss": peak,
        "vm_hwm": hwm,
        "baseline_rss": baseline,
        "baseline_vm_rss": baseline_now,
        "import_seconds": import_seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mergelab": getattr(mergelab, "__file__", "?"),
        "phases": phases,
        "forbidden_imports": sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_IMPORTS),
        "log": captured.messages,
    }
    record.update(sizes)
    if method == "tall":
        record.update(mask_stats(w.output("tall"), record["merged_params"]))
    if profiler is not None:
        import pstats

        profile.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(profile / f"{method}.prof")
        with open(profile / f"{method}.txt", "w") as out:
            stats = pstats.Stats(profiler, stream=out).strip_dirs()
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(20)
    if not keep:
        w.output(method).unlink(missing_ok=True)
    emit(record)


def warm_free_memory(size: int) -> None:
    """Fill ``size`` bytes, free them, then reset this process's peak RSS.

    Some virtual machines hand memory freed in the guest back to their host a few seconds
    later (virtio-balloon free page reporting), and the next first touch of such a page
    costs a fault in the hypervisor. On the 2-core VM this script was tuned on, writing a
    440 MB file took 0.6-1.0 s into such memory, 0.1 s into memory the writing process
    had just freed (and memory freed by another process that had just exited did not
    help as much: 0.6 s). The floor reads into buffers it keeps reusing and never pays
    this; a method that writes a file or builds a model would pay it at random, depending
    on what ran or idled before. So each child fills and frees ``size`` bytes right before
    its work, and resets its peak RSS (/proc/self/clear_refs, "5") so that the filling is
    not counted; ``--cold-memory`` skips this.
    """
    import numpy as np

    np.ones(size // 8)  # every page written, then freed at once
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as err:
        raise BenchError(f"cannot reset the peak RSS ({err}); rerun with --cold-memory") from err


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{SCRIPT.name} {CHILD}")
    parser.add_argument("method", choices=("generate", *METHODS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--cold-memory", action="store_true")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--noise", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.method == "generate":
        # open_clip logs its model building at INFO: keep only this script's progress
        logging.basicConfig(level=logging.WARNING, format="[bench_merge] %(message)s")
        log.setLevel(logging.INFO)
        emit(generate(args.workdir, args.model, args.tasks, args.noise, args.seed))
    else:
        measure(args.method, args.workdir, args.threads, args.profile, args.keep, args.cold_memory)
    return 0


# --- parent --------------------------------------------------------------------------


def child_command(method: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), CHILD, method, "--workdir", str(workdir), *extra]


def parse_record(method: str, proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").splitlines()[-30:])
        raise BenchError(f"{method}: child exited with {proc.returncode}\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{method}: child printed no JSON line:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def workload_ready(workdir: Path, args: argparse.Namespace) -> bool:
    """True when ``workdir`` already holds the checkpoints this run asks for."""
    try:
        manifest = json.loads((workdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    wanted = {"model": args.model, "tasks": args.tasks, "noise": args.noise, "seed": args.seed}
    if any(manifest.get(k) != v for k, v in wanted.items()):
        return False
    names = [manifest["pretrained"], *manifest["finetuned"].values()]
    return all((workdir / name).is_file() for name in names)


def run_generation(workdir: Path, args: argparse.Namespace) -> None:
    (workdir / MANIFEST).unlink(missing_ok=True)
    extra = ["--model", args.model, "--tasks", str(args.tasks)]
    extra += ["--noise", repr(args.noise), "--seed", str(args.seed)]
    # stderr is inherited so that the generator's progress shows as it goes
    proc = subprocess.run(
        child_command("generate", workdir, *extra), stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    parse_record("generate", proc)


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy so far (/proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def warm_page_cache(workdir: Path) -> float:
    """Read every checkpoint once more, through a small buffer; returns the seconds taken.

    The floor's warm-up run fills the page cache, but a machine may page cold file
    pages out again after some idle seconds (e.g. a DAMON pageout scheme), so the parent
    re-reads the inputs right before each measured child. A fixed 8 MiB buffer keeps the
    parent's RSS, which the children inherit in ``ru_maxrss``, small.
    """
    manifest = json.loads((workdir / MANIFEST).read_text())
    buffer = bytearray(8 << 20)
    start = time.perf_counter()
    for name in [manifest["pretrained"], *manifest["finetuned"].values()]:
        with open(workdir / name, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


def run_method(method: str, workdir: Path, args: argparse.Namespace, profile: bool) -> dict:
    log.debug("  page cache re-read in %.2f s", warm_page_cache(workdir))
    extra = []
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.keep:
        extra += ["--keep"]
    if profile and args.profile is not None:
        extra += ["--profile", str(args.profile.resolve())]
    if args.cold_memory:
        extra += ["--cold-memory"]
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        child_command(method, workdir, *extra), capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    record = parse_record(method, proc)
    # CPU that other processes of the machine used meanwhile, in cores on average
    busy_after = busy_cpu_seconds()
    record["other_load"] = (
        None
        if busy is None or busy_after is None
        else max(0.0, (busy_after - busy) - (own_cpu_seconds() - own)) / wall
    )
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


def combine(runs: list[dict]) -> dict:
    """Fastest time and largest peak RSS over the repeats of one method."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["cpu_seconds"] = min(r["cpu_seconds"] for r in runs)
    best["other_load"] = best["other_load"] or 0.0  # of the run whose time is reported
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    best["baseline_rss"] = max(r["baseline_rss"] for r in runs)
    best["all_seconds"] = [r["seconds"] for r in runs]
    return best


def report(results: dict[str, dict], mask: dict, model_bytes: int, args) -> None:
    floor = results["floor"]["seconds"]
    values: dict[str, float] = {}
    rows = []
    for method in METHODS:
        r = results[method]
        short = SHORT[method]
        values[f"{short}_s"] = r["seconds"]
        values[f"{short}_rss_models"] = r["peak_rss"] / model_bytes
        if method != "floor":
            values[f"{short}_vs_floor"] = r["seconds"] / floor
        rows.append(
            (
                method,
                f"{r['seconds']:.2f}",
                f"{r['seconds'] / floor:.2f}",
                f"{r['cpu_seconds']:.2f}",
                f"{r['disk_read_bytes'] / MB:.1f}",
                f"{r['peak_rss'] / MB:.1f}",
                f"{r['peak_rss'] / model_bytes:.2f}",
                f"{r['baseline_rss'] / MB:.1f}",
                f"{(r['peak_rss'] - r['baseline_rss']) / model_bytes:.2f}",
                f"{r['import_seconds']:.2f}",
            )
        )
    values["mask_bits_per_param"] = mask["mask_bits_per_param"]
    values["max_other_load"] = max(r["other_load"] for r in results.values())
    values["model_mb"] = model_bytes / MB
    values["baseline_rss_models"] = results["floor"]["baseline_rss"] / model_bytes

    threads = results["floor"]["threads"]
    print()
    print(
        f"mergelab merge benchmark: {args.model} image encoder, {args.tasks} tasks, "
        f"{model_bytes / MB:.1f} MB per checkpoint, torch {results['floor']['torch']}, "
        f"{threads} thread(s), best of {args.repeat}, warm page cache"
    )
    header = (
        "method",
        "seconds",
        "x floor",
        "cpu s",
        "disk MB",
        "peak RSS MB",
        "RSS/model",
        "after-import MB",
        "(peak-import)/model",
        "import s",
    )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(
        "  ".join(
            h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)
        )
    )
    for row in rows:
        print(
            "  ".join(
                c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
            )
        )
    print(
        f"TALL masks file: {mask['masks']} mask(s) of {mask['mask_bytes'] / MB:.2f} MB in all "
        f"+ τMTL {mask['mtl_bytes'] / MB:.1f} MB; "
        f"{mask['mask_bits_per_param']:.4f} bits per merged parameter per mask"
    )
    if values["max_other_load"] > 0.25:
        print(
            f"WARNING: other processes used up to {values['max_other_load']:.1f} CPU cores "
            "during the reported runs; times (and ratios) are inflated and noisy: rerun on a "
            "quiet machine or with --repeat K."
        )
    for method in ("tatr",):
        for message in results[method]["log"]:
            print(f"{method}: {message}")
    for method in METHODS:
        if results[method]["phases"]:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in results[method]["phases"].items())
            print(f"{method} phases (s): {phases}")
    if args.repeat > 1:
        for method in METHODS:
            times = ", ".join(f"{s:.2f}" for s in results[method]["all_seconds"])
            print(f"{method} times over repeats: {times}")
    print(
        "MB = 10^6 bytes; a model = the pretrained checkpoint's tensor bytes; cpu s = user+sys "
        "time of the work; disk MB = storage reads during the work (0 = warm page cache)."
    )
    print()
    print(f"{'target':<22}{'value':>9}  {'limit':>8}  status")
    for key, limit in TARGETS:
        value = values[key]
        status = "pass" if value <= limit else "FAIL"
        print(f"{key:<22}{value:>9.4f}  {'<= ' + format(limit, 'g'):>8}  {status}")
    print()
    order = [
        "tatr_vs_floor",
        "tatr_rss_models",
        "tall_vs_floor",
        "tall_rss_models",
        "mask_bits_per_param",
        "ta_vs_floor",
        "ta_rss_models",
        "floor_s",
        "floor_rss_models",
        "ta_s",
        "tatr_s",
        "tall_s",
        "model_mb",
        "baseline_rss_models",
        "max_other_load",
    ]
    sys.stdout.flush()
    print("RESULT " + " ".join(f"{key}={values[key]:.4f}" for key in order), flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=SCRIPT.name,
        description=(
            "Benchmark mergelab's Task Arithmetic, zero-shot TATR and TALL masks on a "
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
        return child_main(argv[1:])
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
        run_method("tall", workdir, args, profile=False)  # numba caches its kernels on disk
        model_bytes = first["model_bytes"]
        runs: dict[str, list[dict]] = {method: [] for method in METHODS}
        for repeat in range(args.repeat):
            log.info("measuring, round %d/%d", repeat + 1, args.repeat)
            for method in METHODS:
                runs[method].append(run_method(method, workdir, args, profile=False))
        if args.profile is not None:
            log.info("profiling each method once (cProfile) into %s", args.profile)
            for method in METHODS:
                run_method(method, workdir, args, profile=True)
        results = {method: combine(r) for method, r in runs.items()}
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

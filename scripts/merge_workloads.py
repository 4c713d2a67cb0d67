"""The child side of ``bench_merge.py``: what one fresh process measures.

``python scripts/bench_merge.py _child METHOD --workdir DIR [...]`` lands in
``child_main``: ``generate`` writes the synthetic checkpoints; any of ``METHODS`` imports
torch and mergelab, then times that method's work on the work folder's checkpoints (see
``measure``) and hands back one JSON record on stdout.

Only the standard library is imported at module level: the parent imports this module for
its names, and torch and mergelab are imported by the measuring child alone.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from pathlib import Path

import synthetic_checkpoints
from harness import (
    CHILD,
    LogCapture,
    emit,
    peak_rss_bytes,
    proc_status_bytes,
    time_work,
    warm_free_memory,
)

ROOT = Path(__file__).resolve().parents[1]
# each SVD method's rule, and the bare torch.linalg.svd calls that rule makes ("svd_<rule>")
SVD_RULES = ("tsv", "iso_c", "iso_cts")
METHODS = (
    "floor",
    "task_arithmetic",
    "tatr",
    "tall",
    "ties",
    "dare",
    *SVD_RULES,
    *(f"svd_{rule}" for rule in SVD_RULES),
)
SCALING = 0.3
TIES_KEEP = 0.2
DARE_DROP = 0.5
ISO_CTS_COMMON = 0.8
TATR_QUANTILE = 0.99
TALL_LAMBDA = 0.4
FORBIDDEN_IMPORTS = ("open_clip", "lightning", "pytorch_lightning")
# memory each child fills and frees before its work, in models (TALL touches about 2.5
# models of new memory: its file and a retrieved model), at most WARM_MAX_BYTES
WARM_MODELS = 6
WARM_MAX_BYTES = 2_000_000_000


class Workload:
    """Paths of one benchmark run, read from the work folder's manifest."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.pretrained, self.finetuned = synthetic_checkpoints.checkpoint_paths(workdir)
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


def work_ties(w: Workload) -> dict:
    import mergelab

    merged = mergelab.ties(w.pretrained, w.finetuned, SCALING, keep=TIES_KEEP, device="cpu")
    del merged
    return {}


def work_dare(w: Workload) -> dict:
    import mergelab

    merged = mergelab.dare(w.pretrained, w.finetuned, SCALING, DARE_DROP, 0, device="cpu")
    del merged
    return {}


def work_tsv(w: Workload) -> dict:
    import mergelab

    merged = mergelab.task_singular_vectors(w.pretrained, w.finetuned, 1.0, device="cpu")
    del merged
    return {}


def work_iso_c(w: Workload) -> dict:
    import mergelab

    merged = mergelab.isotropic(w.pretrained, w.finetuned, 1.0, device="cpu")
    del merged
    return {}


def work_iso_cts(w: Workload) -> dict:
    import mergelab

    merged = mergelab.isotropic(
        w.pretrained, w.finetuned, 1.0, common_subspace=ISO_CTS_COMMON, device="cpu"
    )
    del merged
    return {}


def svd_shapes(rule: str, rows: int, cols: int, tasks: int) -> list[tuple[int, int]]:
    """The shapes of the SVDs that ``rule`` takes for one [rows, cols] matrix and ``tasks``
    task vectors (mergelab/merging/task_singular_vectors.py and isotropic.py): a thin SVD
    per task vector or residual, of Σ τt, and of the concatenated U and Vᵀ it
    orthogonalises."""
    rank = min(rows, cols)
    if rule == "iso_c":
        return [(rows, cols)]
    if rule == "tsv":
        kept = tasks * (rank // tasks)
        return [(rows, cols)] * tasks + [(rows, kept), (kept, cols)]
    return [(rows, cols)] * (tasks + 1) + [(rows, rank), (rank, cols)]


def bare_svds(w: Workload, rule: str) -> dict:
    """The floor of an SVD method: ``torch.linalg.svd`` on random float32 matrices of the
    shapes its rule decomposes for every 2-D parameter, timed alone (the drawing is not)."""
    import torch

    from mergelab import SafetensorsCheckpoint

    pretrained = SafetensorsCheckpoint(w.pretrained)
    generator = torch.Generator().manual_seed(0)
    seconds = 0.0
    for key in pretrained:
        spec = pretrained.spec(key)
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            continue
        for shape in svd_shapes(rule, *spec.shape, len(w.finetuned)):
            matrix = torch.randn(shape, generator=generator)
            start = time.perf_counter()
            torch.linalg.svd(matrix, full_matrices=False)
            seconds += time.perf_counter() - start
    return {"svd": seconds}


WORK = {
    "floor": work_floor,
    "task_arithmetic": work_task_arithmetic,
    "tatr": work_tatr,
    "tall": work_tall,
    "ties": work_ties,
    "dare": work_dare,
    "tsv": work_tsv,
    "iso_c": work_iso_c,
    "iso_cts": work_iso_cts,
    **{f"svd_{rule}": functools.partial(bare_svds, rule=rule) for rule in SVD_RULES},
}
# the methods whose rules call compiled kernels, and their modules (mergelab.merging.*)
KERNELS = {
    "tall": ["tall_kernels"],
    "ties": ["ties_kernels", "magnitude_kernels", "finite_kernels"],
    "dare": ["dare_kernels", "finite_kernels"],
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

    if method in KERNELS:
        # TALL's, TIES's and DARE's compiled kernels are modules of their own, imported on
        # first use (numba's start-up is about 0.5 s and 125 MB, which the other methods
        # should not pay); imported here so that, like torch's, it is not timed work
        from mergelab.merging.compiled import kernels

        for module in KERNELS[method]:
            kernels(module)

    if threads:
        torch.set_num_threads(threads)
    captured = LogCapture("mergelab")
    w = Workload(workdir)
    w.outdir.mkdir(exist_ok=True)
    baseline = peak_rss_bytes()
    baseline_now = proc_status_bytes("VmRSS")
    import_seconds = time.perf_counter() - started
    sizes = checkpoint_stats(w)
    if not cold_memory:
        warm_free_memory(min(WARM_MODELS * sizes["model_bytes"], WARM_MAX_BYTES))

    phases, cost = time_work(lambda: WORK[method](w), profile, method)

    record = {
        "method": method,
        **cost,
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
    if not keep:
        w.output(method).unlink(missing_ok=True)
    emit(record)


def child_main(argv: list[str], prog: str) -> int:
    """The hidden ``_child`` sub-command of bench_merge.py."""
    parser = argparse.ArgumentParser(prog=f"{prog} {CHILD}")
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
        synthetic_checkpoints.log.setLevel(logging.INFO)
        emit(
            synthetic_checkpoints.write_checkpoints(
                args.workdir, args.model, args.tasks, args.noise, args.seed
            )
        )
    else:
        measure(args.method, args.workdir, args.threads, args.profile, args.keep, args.cold_memory)
    return 0

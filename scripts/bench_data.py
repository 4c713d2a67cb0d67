"""What decoding costs the evaluation, and what the decoded-image cache gives back.

Writes ``--tasks`` tasks of ``--per-task`` JPEG images each, 256–512 px on a side (smooth
random fields with noise, quality 90), in the hub's parquet layout with a task file each,
then measures in one run:

- (a) decoding: images/s the data module delivers with ``--data.decoded_cache=false``
  (JPEG decode, bicubic resize, crop, normalise; ``--workers`` worker processes);
- the cache's first write (the same decoding, once);
- (b) reading the cache: images/s the data module delivers from it (0 workers and
  ``--workers``; the faster is (b));
- (c) the test loop (``MergeEvaluator`` under ``Trainer.test`` with ``--precision`` on
  ``--device``) over ``--scored-per-task`` images a task, read from the cache, and the same
  loop decoding (the share of its time spent decoding);
- (d) a bare forward loop over the same images as tensors in memory (bench_eval's).

The model is ``--model`` with random weights: speed only. The last line is
``RESULT cache_vs_decoding=<b ÷ a> loop_vs_forward=<d ÷ c in seconds, ≥ 1 is slower>
decoding_share=<1 − cached loop time ÷ decoding loop time>`` (targets: ≥ 10 on a CPU,
≤ 1.2). A batch above glibc's 32 MiB mmap threshold (64 images at 224 px are 38.5 MiB)
is allocated in fresh pages each time, which costs reading the cache most: the script
says so, and ``MALLOC_MMAP_THRESHOLD_`` lifts it.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from bench_eval import LoopTimer, bare_loop
from PIL import Image

from mergelab.io.hub_layout import write_image_split
from mergelab.lightning.data import TaskDataModule
from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.methods import Variants
from mergelab.quiet import quiet_console

from harness import print_result

CLASSES = 10
# glibc serves larger blocks by mmap, fresh pages each time (DEFAULT_MMAP_THRESHOLD_MAX)
GLIBC_MMAP_MAX = 32 << 20


def jpeg(rng: np.random.Generator) -> bytes:
    """One JPEG of a random size in 256–512 px: a smooth random field with some noise."""
    width, height = rng.integers(256, 513, size=2)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((int(width), int(height)), Image.BICUBIC), np.int16)
    noisy = smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_tasks(root: Path, tasks: int, per_task: int) -> list[str]:
    """Task files of ``tasks`` datasets in the hub layout under ``root`` (kept if there)."""
    paths = []
    for t in range(tasks):
        path = root / f"task{t}.yaml"
        if not path.is_file():
            rng = np.random.default_rng(t)
            images = [{"bytes": jpeg(rng), "path": None} for _ in range(per_task)]
            labels = rng.integers(0, CLASSES, per_task)
            write_image_split(root / f"task{t}", "test", images, labels)
            spec = {
                "name": f"task{t}",
                "dataset": str(root / f"task{t}"),
                "classnames": [f"class {c}" for c in range(CLASSES)],
                "templates": ["a photo of a {c}."],
            }
            path.write_text(yaml.safe_dump(spec))
        paths.append(str(path))
    return paths


def served_rate(module: TaskDataModule) -> tuple[float, int]:
    """Images per second over every test loader of ``module``, to the last batch."""
    start, count = time.perf_counter(), 0
    for loader in module.test_dataloader():
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=2000, help="images a task")
    parser.add_argument("--scored-per-task", type=int, default=32, help="images a task, (c)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="for (a) and (b)")
    parser.add_argument("--folder", type=Path, default=None, help="data kept here (default: temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as scratch, quiet_console(verbose=False):
        root = args.folder or Path(scratch) / "data"
        started = time.perf_counter()
        tasks = write_tasks(root, args.tasks, args.per_task)
        print(f"data: {args.tasks} tasks × {args.per_task} JPEGs in {root}", end=" ")
        print(f"({time.perf_counter() - started:.0f} s)")
        evaluator = MergeEvaluator(model=args.model, pretrained=None, cache_dir=scratch)
        preprocess = evaluator.clip.preprocess_val

        def data(cache, workers: int, per_task: int | None = None) -> TaskDataModule:
            module = TaskDataModule(
                tasks, batch_size=args.batch_size, num_workers=workers,
                max_samples=per_task, decoded_cache=cache,
            )  # fmt: skip
            module.set_transforms(preprocess, preprocess)
            return module

        decoding, count = served_rate(data(False, args.workers))
        cache = str(Path(scratch) / "decoded")
        started = time.perf_counter()
        data(cache, args.workers).test_dataloader()  # writes the cache
        written = time.perf_counter() - started
        reading = {w: served_rate(data(cache, w))[0] for w in sorted({0, args.workers})}
        best_workers = max(reading, key=reading.get)

        def loop(cache) -> float:
            merged = evaluator.pretrained_state()
            evaluator.variants = Variants(["merged"], shared={"merged": merged})
            timer = LoopTimer()
            trainer = L.Trainer(
                accelerator=args.device, devices=1, precision=args.precision, logger=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
            )  # fmt: skip
            workers = best_workers if cache else args.workers
            module = data(cache, workers, args.scored_per_task)
            trainer.test(evaluator, datamodule=module, verbose=False)
            return timer.rate

        cached_loop, decoding_loop = loop(cache), loop(False)
        module = data(cache, 0, args.scored_per_task)
        batches = [batch for loader in module.test_dataloader() for batch in loader]
        weights = evaluator.pretrained_state()
        head = evaluator.head(module.task_names[0])
        autocast = args.precision == "bf16-mixed"
        seconds, images = bare_loop(
            evaluator.encoder, weights, head, evaluator.logit_scale, batches, args.device, autocast
        )
        forward = images / seconds

    size = sum(p.stat().st_size for p in root.rglob("*.parquet")) if args.folder else None
    print(f"{count} images{f', {size / 2**20:.0f} MiB of parquet' if size else ''}")
    print(f"{'':<46}{'images/s':>10}")
    print(f"{'(a) data module, decoding':<46}{decoding:>10.1f}")
    print(f"{'    first write of the cache':<46}{count / written:>10.1f}")
    for workers, rate in reading.items():
        print(f"{f'(b) data module, cache, {workers} workers':<46}{rate:>10.1f}")
    print(f"{'(c) test loop, cache':<46}{cached_loop:>10.1f}")
    print(f"{'    test loop, decoding':<46}{decoding_loop:>10.1f}")
    print(f"{'(d) bare forward loop, tensors in memory':<46}{forward:>10.1f}")
    cache_gain = reading[best_workers] / decoding
    loop_cost = forward / cached_loop
    share = 1 - decoding_loop / cached_loop
    print(f"cache_vs_decoding = {cache_gain:.1f} (target >= 10)")
    print(f"loop_vs_forward = {loop_cost:.2f} (target <= 1.2)")
    print(f"decoding_share = {share:.2f} of the decoding loop's time")
    print(
        f"on {args.device}, {args.precision}, {args.model}, batch {args.batch_size}, "
        f"{args.workers} workers for decoding, {best_workers} for the cache"
    )
    image = batches[0][0][0]
    batch_bytes = args.batch_size * image.numel() * image.element_size()
    if batch_bytes > GLIBC_MMAP_MAX and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print(
            f"a batch is {batch_bytes / 2**20:.0f} MiB, above glibc's {GLIBC_MMAP_MAX >> 20} MiB "
            "mmap threshold: each is fresh pages, faulted in as it is written; compare "
            "MALLOC_MMAP_THRESHOLD_=1073741824 (README, running on GPUs)"
        )
    print_result(
        [
            ("cache_vs_decoding", cache_gain, ".1f"),
            ("loop_vs_forward", loop_cost, ".2f"),
            ("decoding_share", share, ".2f"),
        ]
    )


if __name__ == "__main__":
    main()

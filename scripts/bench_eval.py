"""How much the Lightning test loop costs over a bare forward loop.

Scores one merged open_clip ViT-B-32 image encoder (random weights) on synthetic,
already-preprocessed batches twice in one run: through mergelab's test loop
(``MergeEvaluator`` under ``Trainer.test``, with its dataloaders, functional_call and
torchmetrics) and through a bare ``torch.no_grad`` loop over the same batches computing
the same logits and accuracy. Both are timed from the first batch to the last, after a
warm-up batch. The last line is ``RESULT eval_vs_forward=<loop images/s ÷ bare images/s>``
(target ≥ 0.9).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import TensorDataset

from mergelab.lightning.data import TaskDataModule
from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.methods import Variants
from mergelab.models.logits import zero_shot_logits

from harness import print_result


class SyntheticTasks(TaskDataModule):
    """The task data module with every split replaced by the same synthetic tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        super().__init__(tasks=["mnist"], batch_size=batch_size, num_workers=0, decoded_cache=False)
        self.dataset = TensorDataset(images, labels)

    def split(self, task, name):
        return self.dataset


class LoopTimer(L.Callback):
    """Wall time of the test loop from its second batch to its last, over all its
    dataloaders (the first batch is warm-up)."""

    def __init__(self):
        self.start = self.end = 0.0
        self.images = self.batches = 0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batches += 1
        if self.batches == 2:
            self.start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.batches >= 2:
            self.images += len(batch[0])
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.images / (self.end - self.start)


@torch.no_grad()
def bare_loop(
    encoder, weights, head, scale, batches, device: str = "cpu", autocast: bool = False
) -> tuple[float, int]:
    """The test loop's work without the loop: each batch moved to ``device`` (under
    bfloat16 autocast if asked), encoded, scored. Timed from the second batch."""
    encoder.load_state_dict(weights)
    encoder.to(device)
    head = head.to(device)
    images = 0
    start = 0.0
    for i, (x, y) in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
            logits = zero_shot_logits(encoder(x), head, scale)
        int((logits.argmax(-1) == y).sum())  # the accuracy update the test loop makes
        if i >= 1:
            images += len(x)
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--batches", type=int, default=9, help="batches (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as cache:
        module = MergeEvaluator(model=args.model, pretrained=None, cache_dir=cache)
        size = module.clip.model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        count = args.batches * args.batch_size
        images = torch.randn(count, 3, size, size)
        labels = torch.randint(0, 10, (count,))
        merged = {k: v + 1e-3 * torch.randn_like(v) for k, v in module.pretrained_state().items()}
        module.variants = Variants(["merged"], shared={"merged": merged})
        data = SyntheticTasks(images, labels, args.batch_size)
        timer = LoopTimer()
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.test(module, datamodule=data, verbose=False)
        loop_rate = timer.rate

        batches = list(
            zip(images.split(args.batch_size), labels.split(args.batch_size), strict=True)
        )
        head = module.head("mnist")
        seconds, counted = bare_loop(module.encoder, merged, head, module.logit_scale, batches)
        bare_rate = counted / seconds

    print(f"{'loop':<22}{'images/s':>10}")
    print(f"{'Lightning test loop':<22}{loop_rate:>10.1f}")
    print(f"{'bare forward loop':<22}{bare_rate:>10.1f}")
    ratio = loop_rate / bare_rate
    print(f"eval_vs_forward = {ratio:.3f} (target >= 0.9: {'pass' if ratio >= 0.9 else 'FAIL'})")
    print_result(
        [
            ("eval_vs_forward", ratio, ".3f"),
            ("loop_images_per_s", loop_rate, ".1f"),
            ("bare_images_per_s", bare_rate, ".1f"),
        ]
    )


if __name__ == "__main__":
    main()

"""TATR's gradient statistics under ``mergelab fit``, and the merge built from them.

For each task t, ḡt = the mean over the task's train samples (at most ``data.max_samples``,
a seeded choice; TATR uses 128) of |∇θ CE(logit_scale · normalize(f(x; θ0)) @ headtᵀ, y)|,
the absolute value taken per sample, the pretrained encoder in eval mode, for every
merged parameter (mergelab.models.per_sample_gradients computes it from batched passes).

    mergelab fit --config configs/vit_b32/trust_region_gradients.yaml
    mergelab test -c configs/vit_b32/base.yaml -c configs/methods/trust_region.yaml \\
        --merge.method.gradient_stats=<folder>

``fit`` walks every task's train split once (no optimizer steps; with several devices
each rank takes a disjoint, unpadded share and the sums and counts are all-reduced once
at the end), saves ḡt as ``<statistics>/<task>.safetensors`` (metadata: task, sample
count, the pretrained model's and the samples' fingerprints), and at the end of fit the
merge callback builds TATR with them and saves ``merged_task_vector.safetensors`` in the run folder
(θ = θ0 + λ·δ), logging the threshold and each parameter's mask density. A later run
with the same model and the same samples loads the saved statistics instead of
recomputing them.
``test --merge.method.gradient_stats=<statistics>`` scores TATR with them on every task (the
merge itself is streamed and takes seconds).

Samples are preprocessed with the model's evaluation transform, not the training one
(random crops): the statistics are then a function of the data, the same on any number
of devices and in any later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from mergelab.engine.checkpoints import check_writable, save_state_dict
from mergelab.errors import BadValue
from mergelab.io.cache import cache_root
from mergelab.io.gradient_statistics import (
    KIND,
    read_statistics,
    statistics_data,
    statistics_file,
    statistics_samples,
)
from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.models.per_sample_gradients import accumulate_abs_gradients

log = logging.getLogger(__name__)


class GradientStatistics(MergeEvaluator):
    """TATR's ḡt of every task of the data module (``mergelab fit``); see the module help.

    Args:
        model: open_clip architecture name.
        pretrained: open_clip pretrained tag or a local weights file.
        finetuned: task name → fine-tuned image encoder (merged at the end of fit).
        cache_dir: where converted checkpoints, zero-shot heads and, by default, the
            statistics are cached (default $MERGELAB_CACHE or ~/.cache/mergelab).
        model_config: an open_clip model config JSON registered before loading ``model``.
        statistics: the folder of the per-task statistics files, read if present (and
            checked against this model) and written otherwise; default
            ``<cache>/gradient_stats/<model fingerprint>-<samples fingerprint>``.
        chunk_size: samples whose per-sample gradients of one parameter are held at once.
    """

    run_name = "gradient_stats"  # lightning_logs/gradient_stats/version_N
    # statistics only: no validation loop during fit
    validation_step = L.LightningModule.validation_step

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        finetuned: dict[str, str] | None = None,
        cache_dir: str | None = None,
        model_config: str | None = None,
        statistics: str | None = None,
        chunk_size: int = 8,
    ):
        if chunk_size < 1:
            raise BadValue(f"chunk_size must be ≥ 1, got {chunk_size}")
        # it scores nothing: no score cache
        super().__init__(model, pretrained, finetuned, None, cache_dir, model_config, False)
        self.automatic_optimization = False
        self.encoder.requires_grad_(True)  # the parameters whose gradients are taken
        self.statistics = statistics
        self.chunk_size = chunk_size
        self._todo: list[str] = []
        self.statistics_folder: Path | None = None

    def configure_optimizers(self):
        return None  # nothing is trained

    # fp16 per-sample gradients underflow (no loss scaling: nothing is trained); under
    # bf16-mixed they are computed in bfloat16 where autocast says, summed in float32
    PRECISIONS = ("32-true", "bf16-mixed")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.datamodule
        dm.set_transforms(self.clip.preprocess_val, self.clip.preprocess_val)
        # every train split is loaded (and a task without one named) before anything else
        samples = {spec.name: len(dm.split(spec, "train")) for spec in dm.specs}
        self.pool = self.model_pool(dm.task_names)
        parameters = dict(self.encoder.named_parameters())
        buffers = [k for k in self.pool.merged_keys if k not in parameters]
        if buffers:
            raise BadValue(f"merged tensor {buffers[0]!r} is not a parameter: it has no gradient")
        fingerprint = self.pool.fingerprint()
        # the samples and the loss's head too: a cache keyed by the encoder alone would
        # serve statistics of other data (a rebuilt dataset, another max_samples) or of
        # another zero-shot head (other class names or templates, another text tower) as
        # if they were these
        self._data = {
            spec.name: _digest(
                dm.samples_fingerprint(spec, "train"),
                hashlib.sha256(
                    self._heads[spec.name].cpu().contiguous().numpy().tobytes()
                ).hexdigest(),
                repr(float(self.logit_scale)),
                self.trainer.precision,
            )
            for spec in dm.specs
        }
        data = _digest(*(self._data[name] for name in sorted(self._data)))[:12]
        default = cache_root(self.cache_dir) / "gradient_stats" / f"{fingerprint}-{data}"
        self.statistics_folder = Path(self.statistics) if self.statistics else default
        self._todo = []
        for task, count in samples.items():
            path = statistics_file(self.statistics_folder, task)
            if path.is_file():
                saved = read_statistics(path, task, fingerprint)
                if statistics_data(saved) != self._data[task]:
                    raise BadValue(
                        f"{path}: statistics over other samples or another zero-shot head "
                        f"of {task!r} than this run's ({statistics_samples(saved)} samples "
                        f"saved, {count} now: another dataset, data.max_samples, task file, "
                        "text tower or precision); delete the file or choose another "
                        "model.statistics folder"
                    )
                log.info("gradient statistics of %s loaded from %s", task, path)
            else:
                check_writable(path, overwrite=False)
                self._todo.append(task)
        dm.serve_train_once(self._todo)
        self._fingerprint = fingerprint

    def on_train_start(self) -> None:
        ddp = self.trainer.strategy.model
        if isinstance(ddp, DistributedDataParallel):
            # no gradient reaches DDP (the sums stay on each rank until the end) and the
            # ranks may take different numbers of batches: no per-step synchronisation
            ddp.require_backward_grad_sync = ddp.require_forward_param_sync = False
        tasks, size = len(self._todo), self.pool.num_merged_params
        # one flat buffer: every task's sums, then the sample counts (all-reduced at once)
        self._flat = torch.zeros(tasks * (size + 1), device=self.device)
        sums, self._counts = self._flat.split([tasks * size, tasks])
        self._sums = {
            task: self._unflatten(row)
            for task, row in zip(self._todo, sums.view(tasks, size), strict=True)
        }
        self._seconds = dict.fromkeys(self._todo, 0.0)
        for task in self._todo:
            self._heads[task] = self._heads[task].to(self.device)

    def training_step(self, batch, batch_idx: int) -> None:
        parts, _ = batch  # (a batch or None per task, the step): TaskDataModule.serve_train_once
        for i, (task, part) in enumerate(zip(self._todo, parts, strict=True)):
            if part is None:
                continue  # this task's split is done
            images, labels = part
            start = time.perf_counter()
            accumulate_abs_gradients(
                self.encoder, self._heads[task], self.logit_scale, images, labels,
                self._sums[task], self.chunk_size,
            )  # fmt: skip
            self._counts[i] += len(labels)
            self._seconds[task] += time.perf_counter() - start
        self.log("samples", self._counts.sum(), prog_bar=True, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        """All-reduce once, divide by the exact counts, save; one pass only."""
        self.trainer.should_stop = True
        total = self.trainer.strategy.reduce(self._flat, reduce_op="sum")
        sums, counts = total.split([total.numel() - len(self._todo), len(self._todo)])
        dm = self.datamodule
        by_name = {spec.name: spec for spec in dm.specs}
        metrics = {}
        for task, row, count in zip(
            self._todo, sums.view(len(self._todo), -1), counts.tolist(), strict=True
        ):
            expected = len(dm.split(by_name[task], "train"))
            if int(count) != expected:
                raise RuntimeError(f"task {task!r}: {int(count)} samples counted, {expected} exist")
            mean = row / count
            path = statistics_file(self.statistics_folder, task)
            if self.trainer.is_global_zero:
                self._save(task, mean, expected, path)
            metrics[f"gradients/{task}/seconds"] = self._seconds[task]
            metrics[f"gradients/{task}/samples"] = float(count)
        self.trainer.strategy.barrier()  # the files exist for every rank from here on
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat buffer as the merged parameters, in order."""
        keys, specs = self.pool.merged_keys, self.pool.specs
        parts = flat.split([specs[k].numel for k in keys])
        return {k: part.view(specs[k].shape) for k, part in zip(keys, parts, strict=True)}

    def _save(self, task: str, mean: torch.Tensor, samples: int, path: Path) -> None:
        state = {k: v.cpu() for k, v in self._unflatten(mean).items()}
        meta = {
            "mergelab": json.dumps(
                {
                    "kind": KIND,
                    "task": task,
                    "samples": samples,
                    "model": self._fingerprint,
                    "data": self._data[task],
                    "clip": self.clip.identity,
                    "tasks": self.datamodule.task_names,
                }
            )
        }
        save_state_dict(state, path, meta, overwrite=False)
        log.info("gradient statistics of %s (%d samples) saved to %s", task, samples, path)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()

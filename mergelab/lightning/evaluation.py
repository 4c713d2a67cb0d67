"""The Lightning evaluation loop: every weight variant of the image encoder on every task.

A *variant* is one set of image-encoder weights (:class:`~mergelab.methods.Variants`). The
:class:`~mergelab.lightning.callbacks.MergeCallback` attaches a merge method's variants before
the loop starts; the module holds one encoder structure and runs each batch through
every variant's weights with ``torch.func.functional_call``, so several settings are
scored in one pass over the data. Variants that depend on the task (TALL, fine-tuned)
are built when that task's first batch arrives and dropped after its last.

A test run that scores several settings on ``[val, test]`` walks every task's validation
data first and scores every setting there; at its first test batch it picks on those
scores and scores only the picked setting on test, as the TALL reference code does
(github nik-dim/tall_masks: the λ grid on validation, then the best λ on test).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.func import functional_call

from mergelab.engine.pool import ModelPool
from mergelab.errors import BadValue, MissingFile, MissingKey
from mergelab.io.run_folder import check_finished
from mergelab.lightning.results import flat_metrics, pick_settings, summarize
from mergelab.lightning.scores import CachedScores, Top1, open_score_cache
from mergelab.methods.base import Variants
from mergelab.models.clip import load_clip, load_image_encoder
from mergelab.models.heads import zero_shot_head
from mergelab.models.logits import zero_shot_logits

StateDict = Mapping[str, torch.Tensor]
log = logging.getLogger(__name__)


class MergeEvaluator(L.LightningModule):
    """Scores image-encoder variants with frozen zero-shot heads.

    Args:
        model: open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, or a
            registered config).
        pretrained: open_clip pretrained tag (``openai``) or a local weights file.
        finetuned: task name → fine-tuned image encoder: a hub id of a Hugging Face
            CLIPVisionModel, a folder, or an open_clip state dict file.
        finetuned_accuracy: each task's fine-tuned test accuracy, for the normalised
            average: a mapping, or the results.json of a ``finetuned`` run.
        cache_dir: where converted checkpoints and zero-shot heads are cached
            (default $MERGELAB_CACHE or ~/.cache/mergelab).
        model_config: an open_clip model config JSON registered before loading ``model``
            (its file stem), for architectures open_clip does not ship.
        score_cache: keep each setting's count of right answers on each task split, keyed
            by the weights, the head, the samples and how they were computed, and read it
            instead of running the encoder when the same is scored again: true
            ($MERGELAB_CACHE/scores), a folder, or false. Only splits served from the
            decoded-image cache are kept (their samples have a key).
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        finetuned: dict[str, str] | None = None,
        finetuned_accuracy: dict[str, float] | str | None = None,
        cache_dir: str | None = None,
        model_config: str | None = None,
        score_cache: bool | str = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.score_cache = open_score_cache(score_cache)
        self.clip = load_clip(model, pretrained, cache_dir, model_config)
        self.encoder = self.clip.model.visual
        self.encoder.requires_grad_(False)
        self.logit_scale = float(self.clip.model.logit_scale.detach().exp())
        self.finetuned_sources = dict(finetuned or {})
        _warn_shared_sources(self.finetuned_sources)
        self.finetuned_accuracy = _reference_accuracy(finetuned_accuracy)
        self.finetuned_accuracy_source = (
            f"finetuned_accuracy ({finetuned_accuracy})"
            if isinstance(finetuned_accuracy, str)
            else "finetuned_accuracy"
        )
        self.cache_dir = cache_dir
        self.variants: Variants | None = None
        self.results: dict = {}
        self._heads: dict[str, torch.Tensor] = {}
        self._plan: list[tuple[str, str]] = []
        self._picked: dict[str, str] | None = None  # task -> setting, once picked on val
        self._picks_on_val = False  # this run scores several settings on val, then test
        self._weights: tuple[str | None, dict[str, dict[str, torch.Tensor]]] | None = None
        self._accuracy: dict[tuple[str, str, str], Top1] = {}
        self._scores: CachedScores | None = None

    # --- models -----------------------------------------------------------------------

    @property
    def datamodule(self):
        return self.trainer.datamodule

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return self.clip.visual_state_dict()

    def model_pool(
        self, tasks: list[str], pretrained: dict[str, torch.Tensor] | None = None
    ) -> ModelPool:
        """θ0 (``pretrained``, default this model's) and the fine-tuned encoders of
        ``tasks``, converted and checked up front."""
        missing = [t for t in tasks if t not in self.finetuned_sources]
        if missing:
            raise MissingKey(f"no fine-tuned model given for task {missing[0]!r} (model.finetuned)")
        pretrained = self.pretrained_state() if pretrained is None else pretrained
        finetuned = {
            t: load_image_encoder(self.finetuned_sources[t], pretrained, self.cache_dir)
            for t in tasks
        }
        return ModelPool(pretrained, finetuned)

    def head(self, task: str) -> torch.Tensor:
        """The frozen zero-shot head of a task, [num_classes, embed_dim]."""
        return self._heads[task]

    # the weights of the variants stay float32 whatever the precision: autocast runs the
    # encoder in half precision on them; a "-true" precision would need them converted
    PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision, self.PRECISIONS, type(self).__name__)
        dm = self.datamodule
        dm.set_transforms(self.clip.preprocess_train, self.clip.preprocess_val)
        for spec in dm.specs:
            if spec.name not in self._heads:
                self._heads[spec.name] = zero_shot_head(self.clip, spec, self.cache_dir)

    # --- evaluation loop --------------------------------------------------------------

    def _start(self, stage: str) -> None:
        if self.variants is None:
            raise RuntimeError("no model variants to evaluate: add mergelab's MergeCallback")
        self._plan = self.datamodule.plan(stage)
        self._weights = None
        self._picked = None
        splits = {split for _, split in self._plan}
        self._picks_on_val = {"val", "test"} <= splits and len(self.variants.names) > 1
        # the test metrics of a run that picks on validation are made once it has picked
        self._accuracy = {
            (name, task, split): Top1().to(self.device)
            for task, split in self._plan
            if not (split == "test" and self._picks_on_val)
            for name in self.variants.names
        }
        for task in {t for t, _ in self._plan}:
            self._heads[task] = self._heads[task].to(self.device)
        self._scores = (
            None
            if self.score_cache is None
            else CachedScores(self.score_cache, self._computation())
        )

    def _computation(self) -> dict:
        """What turns weights and images into logits, besides the weights and the head."""
        config = self.hparams.model_config
        device = self.device
        return {
            "model": self.hparams.model,
            "model_config": Path(config).read_text() if config else None,
            "transform": repr(self.clip.preprocess_val),
            "precision": self.trainer.precision,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{device.type} {torch.backends.cpu.get_cpu_capability()}",
            # what else can change a float32 product's rounding: TF32 or bf16 passes for
            # float32 matmuls (torch.set_float32_matmul_precision), and how a CPU kernel
            # splits its sums over threads
            "matmul_precision": torch.get_float32_matmul_precision(),
            "threads": torch.get_num_threads(),
            "batch_size": self.datamodule.batch_size,
        }

    @property
    def scores_read(self) -> tuple[int, int]:
        """(scores read from the score cache, scores) of this process's last loop."""
        scores = self._scores
        return (0, 0) if scores is None else (len(scores.read), len(scores.keys))

    def _read_from_cache(self, name: str, task: str, split: str, weights: StateDict) -> bool:
        """Whether this (setting, task, split)'s counts were read from the score cache
        (looked up on its first batch) instead of being computed."""
        entry, scores = (name, task, split), self._scores
        if scores is None:
            return False
        if not scores.looked_up(entry):
            samples = self.datamodule.served_samples(task, split)
            key = None
            if samples is not None:
                # a task's own models are built anew for test: digested anew
                owner = (name,) if self.variants.shared is not None else (name, task, split)
                head = {"head": self._heads[task], "logit_scale": torch.tensor(self.logit_scale)}
                key = scores.key(scores.digest(owner, weights), scores.digest(task, head), samples)
            scores.look_up(entry, key, self._accuracy[entry])
        return entry in scores.read

    def _weights_for(self, task: str, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The weights of the variants ``names`` on the device. Shared ones are moved once
        per run; a task's own are built for the names asked (on test after a pick on
        validation, the picked one alone)."""
        shared = self.variants.shared is not None
        owner = None if shared else (task, tuple(names))
        if self._weights is None or self._weights[0] != owner:
            self._weights = None  # drop the previous task's models before building these
            models = self.variants.for_task(task, None if shared else names)
            on_device = {
                name: {k: v.to(self.device) for k, v in weights.items()}
                for name, weights in models.items()
            }
            self._weights = (owner, on_device)
        return {name: self._weights[1][name] for name in names}

    def _picked_on_val(self, task: str) -> str:
        """The setting that scores ``task`` on test: picked on every task's validation
        scores (all validation batches come first; in a distributed run ``compute()``
        adds up every rank's counts, and every rank picks the same)."""
        if self._picked is None:
            val = {name: {} for name in self.variants.names}
            for (name, val_task, split), metric in self._accuracy.items():
                if split == "val":
                    val[name][val_task] = float(metric.compute())
            tasks = [t for t, split in self._plan if split == "test"]
            self._picked = pick_settings(val, tasks, self.variants.choose_per_task)
            for test_task in tasks:
                name = self._picked[test_task]
                self._accuracy[name, test_task, "test"] = Top1().to(self.device)
        return self._picked[task]

    def _step(self, batch, dataloader_idx: int) -> None:
        task, split = self._plan[dataloader_idx]
        images, labels = batch
        head = self._heads[task]
        names = self.variants.names
        if split == "test" and self._picks_on_val:
            names = [self._picked_on_val(task)]
        for name, weights in self._weights_for(task, names).items():
            if self._read_from_cache(name, task, split, weights):
                continue
            features = functional_call(self.encoder, weights, (images,))
            logits = zero_shot_logits(features, head, self.logit_scale)
            self._accuracy[name, task, split].update(logits, labels)

    def on_test_start(self) -> None:
        self._start("test")

    def on_validation_start(self) -> None:
        self._start("val")

    @torch.no_grad()
    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, dataloader_idx)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def _finish(self, stage: str) -> None:
        if self._scores is not None:
            self._scores.write(self._accuracy)
        accuracy: dict[str, dict[str, dict[str, float]]] = {}
        for (name, task, split), metric in self._accuracy.items():
            accuracy.setdefault(name, {}).setdefault(split, {})[task] = float(metric.compute())
        self._weights = None
        self.results = summarize(
            accuracy,
            tasks=list(dict.fromkeys(t for t, _ in self._plan)),
            stage=stage,
            choose_per_task=self.variants.choose_per_task,
            reference=self.finetuned_accuracy,
        )
        self.results["variants_description"] = self.variants.description
        self.results["picked_settings"] = {
            task: self.variants.settings.get(name, {})
            for task, name in self.results["picked"].items()
        }
        # straight to the loggers: self.log would file every metric under each dataloader
        metrics = flat_metrics(self.results, stage)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)


def check_precision(precision: str, supported: tuple[str, ...], module: str) -> None:
    """Refuse a Lightning precision that ``module`` does not compute with, before any work."""
    if precision not in supported:
        raise BadValue(
            f"{module} runs with --trainer.precision {' or '.join(supported)}, not {precision!r}"
        )


def _warn_shared_sources(sources: Mapping[str, str]) -> None:
    """Two tasks given the same fine-tuned model: legal, but rarely meant (a copy-paste
    in a config), and it weighs that model twice."""
    by_source: dict[str, list[str]] = {}
    for task, source in sources.items():
        key = str(Path(source).resolve()) if Path(source).exists() else str(source)
        by_source.setdefault(key, []).append(task)
    for source, tasks in by_source.items():
        if len(tasks) > 1:
            log.warning("tasks %s are given the same fine-tuned model %s", tasks, source)


def _reference_accuracy(value: dict[str, float] | str | None) -> dict[str, float] | None:
    """Fine-tuned accuracies given directly (fractions) or read from the results.json of a
    ``finetuned`` run; anything else is refused naming the file or the task."""
    if value is None or isinstance(value, Mapping):
        return _fractions(dict(value), "finetuned_accuracy") if value else None
    path = Path(value)
    if not path.is_file():
        raise MissingFile(f"finetuned_accuracy: {path} not found")
    check_finished(path.parent, "finetuned_accuracy")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BadValue(f"finetuned_accuracy: {path} is not JSON ({error})") from None
    if not isinstance(data, Mapping):
        raise BadValue(f"finetuned_accuracy: {path} holds no mapping of task accuracies")
    if "headline" not in data:  # a plain mapping of task → fraction
        return _fractions(data, f"finetuned_accuracy: {path}")
    method = data.get("settings", {}).get("method")
    if method != "finetuned":
        raise BadValue(
            f"finetuned_accuracy: {path} is the results of a {method!r} run; the reference "
            "is a 'finetuned' run's (configs/methods/finetuned.yaml)"
        )
    return _fractions(dict(data["headline"]["accuracy"]), f"finetuned_accuracy: {path}")


def _fractions(accuracy: dict, source: str) -> dict[str, float]:
    """Accuracies as fractions in (0, 1], one number per task."""
    for task, value in accuracy.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 0 < value <= 1:
            raise BadValue(
                f"{source}: the accuracy of task {task!r} is {value!r}; accuracies are "
                "fractions in (0, 1] (0.912, not 91.2)"
            )
    return {task: float(value) for task, value in accuracy.items()}

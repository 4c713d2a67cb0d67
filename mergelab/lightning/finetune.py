"""Fine-tuning one task's image encoder with its frozen zero-shot head (``mergelab fit``).

The protocol of task_vectors (src/finetune.py): AdamW (lr 1e-5, weight decay 0.1), a
cosine schedule with a linear warm-up of 500 steps, stepped per optimizer step, and
cross-entropy on logits = logit_scale.exp() · normalise(image features) · headᵀ with the
head frozen. Batch size, epochs and gradient clipping are the trainer's and the data
module's settings (configs/finetune/<task>.yaml). At the end of fit the image encoder is
written as an open_clip image-encoder safetensors file, which ``model.finetuned`` of a
merge run accepts as it is.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from mergelab.engine.checkpoints import check_writable, save_state_dict
from mergelab.engine.pool import fingerprint
from mergelab.errors import BadValue
from mergelab.lightning.scores import Top1
from mergelab.models.clip import load_clip
from mergelab.models.heads import zero_shot_head
from mergelab.models.logits import zero_shot_logits
from mergelab.tasks import load_task

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based), as task_vectors'
    ``cosine_lr``: (step + 1) / warmup during the warm-up, then a cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


class FineTuner(L.LightningModule):
    """Fine-tunes the image encoder of an open_clip model on one task.

    Args:
        task: the built-in task name or the path of a task YAML file; the data module
            must hold exactly this task (``data.tasks: [<task>]``).
        model: open_clip architecture name (``ViT-B-32-quickgelu``, ...).
        pretrained: open_clip pretrained tag (``openai``) or a local weights file.
        cache_dir: where zero-shot heads are cached (default $MERGELAB_CACHE or
            ~/.cache/mergelab).
        model_config: an open_clip model config JSON registered before loading ``model``.
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's weight decay.
        warmup_steps: optimizer steps of linear warm-up before the cosine decay.
        output: where the fine-tuned image encoder is written (safetensors); default
            ``<log dir>/<task>.safetensors``.
    """

    run_name = "finetune"  # lightning_logs/finetune/version_N

    def __init__(
        self,
        task: str,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        cache_dir: str | None = None,
        model_config: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        output: str | None = None,
    ):
        super().__init__()
        if lr <= 0:
            raise BadValue(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise BadValue(f"weight_decay must be ≥ 0, got {weight_decay}")
        if warmup_steps < 0:
            raise BadValue(f"warmup_steps must be ≥ 0, got {warmup_steps}")
        self.save_hyperparameters()
        self.spec = load_task(task)
        self.clip = load_clip(model, pretrained, cache_dir, model_config)
        self.clip.model.requires_grad_(False)
        self.encoder = self.clip.model.visual
        self.encoder.requires_grad_(True)
        self.pretrained_fingerprint = fingerprint(self.encoder.state_dict())
        self.logit_scale = float(self.clip.model.logit_scale.detach().exp())
        self.cache_dir = cache_dir
        self.output = output
        self.register_buffer("head", torch.empty(0), persistent=False)
        self.train_acc = Top1()
        self.val_acc = Top1()
        self.saved_to: Path | None = None

    @property
    def task(self) -> str:
        return self.spec.name

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        names = getattr(dm, "task_names", None)
        if names != [self.task]:
            raise BadValue(
                f"FineTuner trains task {self.task!r}: the data module must hold exactly that "
                f"task (data.tasks: [{self.task}]), got {names}"
            )
        dm.set_transforms(self.clip.preprocess_train, self.clip.preprocess_val)
        if self.head.numel() == 0:
            head = zero_shot_head(self.clip, dm.specs[0], self.cache_dir)
            self.head = head.to(self.device)
        if stage == "fit":
            check_writable(self.output_path(), overwrite=True)  # fail before training

    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return log_dir / f"{self.task}.safetensors"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(self.encoder(images), self.head, self.logit_scale)

    @staticmethod
    def _unwrap(batch):
        """One task's (images, labels): the data module serves a list of one loader."""
        if isinstance(batch, (list, tuple)) and len(batch) == 1:
            return batch[0]
        return batch

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = self._unwrap(batch)
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        self.val_acc(self(images), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, add_dataloader_idx=False)

    def configure_optimizers(self):
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup_steps
        scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}

    def on_train_start(self) -> None:
        # load_clip returns the model in eval mode, and Lightning keeps each submodule's mode
        self.encoder.train()

    def on_train_end(self) -> None:
        path = self.output_path()
        if self.trainer.is_global_zero:
            meta = {
                "mergelab": json.dumps(
                    {
                        "kind": "finetuned_image_encoder",
                        "task": self.task,
                        "model": self.clip.name,
                        # a tag, or the weights file's name and content: no folder, so
                        # that the file is the same wherever it was built
                        "pretrained": Path(str(self.clip.pretrained)).name,
                        "pretrained_fingerprint": self.pretrained_fingerprint,
                        "steps": self.global_step,
                    }
                )
            }
            save_state_dict(self.encoder_state(), path, meta, overwrite=True)
            log.info("fine-tuned %s image encoder saved to %s", self.task, path)
        self.saved_to = path

"""Contrastive pretraining of the miniature CLIP on captioned scenes (open_clip's loss).

The pairs come from every task's domain, and each caption names all eight factors, so
the text tower learns the words the tasks' class names and templates use: its zero-shot
heads then classify the tasks above chance, as a real CLIP's do, and fine-tuning has
something to improve.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import Dataset

from mergelab.embedded.scenes import TASKS, caption, render, sample_factors


class CaptionedScenes(Dataset):
    """``count`` (image, tokens) pairs, the tasks' domains in turn, rendered once."""

    def __init__(self, count: int, seed: int, transform: Callable, tokenizer: Callable):
        rng = np.random.default_rng([seed, len(TASKS)])  # apart from the tasks' own splits
        scenes = [sample_factors(rng, TASKS[i % len(TASKS)]) for i in range(count)]
        self.images = [render(scene, rng) for scene in scenes]
        self.tokens = tokenizer([caption(scene) for scene in scenes])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.tokens[i]


class ContrastivePretrainer(L.LightningModule):
    """Trains a whole open_clip model with the CLIP loss; AdamW with a one-cycle schedule."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.1):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.loss = ClipLoss()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        image_features, text_features, logit_scale = self.model(images, tokens)
        loss = self.loss(image_features, text_features, logit_scale)
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            self.lr,
            total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=0.1,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

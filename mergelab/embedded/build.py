"""Builds the embedded benchmark once per preset and cache folder, and finds its assets.

The build writes into ``<cache>/embedded/<preset key>.partial``: the eight tasks' datasets
and task files, the miniature CLIP's config and pretrained weights, one fine-tuned image
encoder per task, and the fine-tuned models' test accuracy. Each step's outputs are
written atomically and marked done, so an interrupted build resumes where it stopped
(the preset key fixes what every step yields). A manifest with every file's size and
SHA-256 is written last and the folder renamed to ``<preset key>``: a cache folder is
either complete or absent. On first use in a process the manifest is checked again; a
cache that no longer matches it is moved aside and rebuilt, never used in part.

The build runs in a process of its own (:mod:`mergelab.embedded.build_process`) whose
kernels do not depend on the CPU's vector unit (:data:`BUILD_ENVIRONMENT`), so that every
machine builds the same files, byte for byte, and prints the same table. Its steps are
shared out among one process per core (:mod:`mergelab.embedded.build_steps`), which
changes no file.

The assets are ordinary files in the layouts the real benchmark uses, read by the same
loaders; configs name them as ``embedded:<asset>``, which the applications expand into
paths (:func:`mergelab.embedded.expand`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import torch

from mergelab.embedded.build_steps import MARKERS, Step, build_workers, run_steps
from mergelab.embedded.preset import MODEL_NAME, Preset, get_preset
from mergelab.embedded.scenes import TASKS
from mergelab.errors import MissingKey, NotPermitted
from mergelab.io.child_process import run_child

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# torch threads of the build, whatever the machine's cores (see EmbeddedBenchmark.build)
BUILD_THREADS = 2
# The build process's kernels, whatever the CPU (each measured to change the build's
# files when left to the CPU: an AVX-512 machine and the same machine told to use AVX2
# kernels trained different weights). ATen's vectorised kernels (layer norm, softmax,
# AdamW, the random normal draw, ...) in their portable version (torch's documented
# ATEN_CPU_CAPABILITY); MKL's matrix products on its AVX2 code path (MKL's conditional
# numerical reproducibility); oneDNN's convolutions at most AVX2. About 12 % slower a
# training step on this machine's AVX-512 CPU.
BUILD_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# ... and, unless the user set them, settings that change no file: OpenMP's idle threads
# sleep instead of spinning, which lets the build's workers share the cores (two workers
# of two spinning threads each on two cores: four times slower)
BUILD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
MANIFEST_SCHEMA = "mergelab.embedded/1"


def _asset_files(preset_tasks: tuple[str, ...]) -> dict[str, str]:
    """Asset name → path inside the cache folder."""
    files = {
        "model_config": f"{MODEL_NAME}.json",
        "pretrained": "pretrained.safetensors",
        "finetuned_accuracy": "finetuned/results.json",
    }
    for task in preset_tasks:
        files[f"tasks/{task}"] = f"tasks/{task}.yaml"
        files[f"finetuned/{task}"] = f"finetuned/{task}.safetensors"
    return files


ASSETS = _asset_files(TASKS)


class EmbeddedBenchmark:
    """The embedded benchmark of one preset in one cache folder.

    Args:
        preset: the sizes to build (default: $MERGELAB_EMBEDDED_PRESET, else ``default``).
        cache_dir: the cache root (default $MERGELAB_CACHE, else ~/.cache/mergelab); the
            benchmark lives in ``<cache_dir>/embedded/<preset key>``.
    """

    _verified: ClassVar[set[Path]] = set()  # folders checked against their manifest here

    def __init__(self, preset: Preset | str | None = None, cache_dir: str | None = None):
        from mergelab.io.cache import cache_root

        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        self.cache_dir = cache_root(cache_dir)
        self.root = self.cache_dir / "embedded" / self.preset.key
        self._progress_bars = True  # Lightning's bars in the build's steps

    @property
    def staging(self) -> Path:
        return self.root.with_name(self.root.name + ".partial")

    def asset(self, name: str) -> Path:
        """The path of an asset (``pretrained``, ``tasks/<task>``, ...), building first if
        the cache does not hold a complete, intact benchmark."""
        if name not in ASSETS:
            raise MissingKey(f"unknown embedded asset {name!r}; assets are {sorted(ASSETS)}")
        return self.ensure() / ASSETS[name]

    def ensure(self) -> Path:
        """The complete benchmark's folder, built (or rebuilt) first if needed."""
        if self.root in self._verified:
            return self.root
        problem = self.check()
        if problem is None:
            self._verified.add(self.root)
            return self.root
        if problem != "missing":
            log.warning("embedded benchmark at %s is unusable (%s): rebuilding", self.root, problem)
        self._writable()
        self._build_in_own_process()
        problem = self.check()
        if problem is not None:
            raise RuntimeError(
                f"the embedded benchmark's build left {self.root} unusable: {problem}"
            )
        self._verified.add(self.root)
        return self.root

    def _build_in_own_process(self) -> None:
        """:meth:`build_locked` in a child process with :data:`BUILD_ENVIRONMENT`, printing
        to this process's console. Ctrl-C stops both and leaves the staged steps for the
        next build."""
        from mergelab.quiet import is_quiet

        command = [sys.executable, "-m", "mergelab.embedded.build_process"]
        command += [json.dumps(asdict(self.preset)), str(self.cache_dir)]
        command += ["--log-level", str(log.getEffectiveLevel())]
        command += ["--quiet"] * is_quiet()
        status = run_child(command, env={**BUILD_DEFAULTS, **os.environ, **BUILD_ENVIRONMENT})
        if status == -signal.SIGINT or status == 128 + signal.SIGINT:
            raise KeyboardInterrupt
        if status != 0:
            raise RuntimeError(
                f"the embedded benchmark's build failed (exit status {status}); "
                "its traceback is printed above"
            )

    def build_locked(self) -> None:
        """The build, unless another process finished it while this one waited for the
        cache folder's lock."""
        with self._lock():
            if self.check() is not None:
                self._discard(self.root)
                self.build()

    def check(self) -> str | None:
        """None if the folder holds exactly what its manifest lists; else what is wrong."""
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            return "missing" if not self.root.exists() else f"no {MANIFEST}"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as err:
            return f"unreadable {MANIFEST}: {err}"
        for relative, (size, digest) in files.items():
            path = self.root / relative
            if not path.is_file():
                return f"{relative} is missing"
            if path.stat().st_size != size or _sha256(path) != digest:
                return f"{relative} differs from the manifest"
        return None

    def _writable(self) -> None:
        folder = self.root.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise NotPermitted(
                f"cannot build the embedded benchmark: the cache folder {folder} is not "
                f"writable ({err.strerror or err}); choose another with --cache-dir or "
                "$MERGELAB_CACHE"
            ) from err

    @contextlib.contextmanager
    def _lock(self):
        """One build per cache folder at a time, across processes."""
        with open(self.root.with_name(self.root.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def discard(self) -> None:
        """Remove the built benchmark (the next use builds it again)."""
        self._writable()
        with self._lock():
            self._discard(self.root)
        self._verified.discard(self.root)

    @staticmethod
    def _discard(folder: Path) -> None:
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.discarded-{os.getpid()}")
            os.replace(folder, aside)
            shutil.rmtree(aside)

    # --- the build --------------------------------------------------------------------

    def build(self) -> None:
        """Every step into the staging folder (resuming finished steps), then the manifest
        and the rename that publishes it."""
        staging = self.staging
        staging.mkdir(parents=True, exist_ok=True)
        made = ("datasets", "pretrained")
        steps = [Step("datasets", self._datasets), Step("pretrained", self._pretrain)]
        steps += [Step(f"finetuned/{task}", self._finetuner(task), made) for task in TASKS]
        tuned = tuple(f"finetuned/{task}" for task in TASKS)
        steps += [Step("finetuned_accuracy", self._finetuned_accuracy, tuned)]
        workers = build_workers(steps)
        log.info(
            "building the embedded benchmark (preset %s, %d process%s) in %s",
            self.preset.name,
            workers,
            "es" * (workers > 1),
            staging,
        )
        started = time.perf_counter()
        _import_step_modules()  # once, before the workers are forked
        self._progress_bars = workers == 1  # side by side, bars would draw over each other
        threads = torch.get_num_threads()
        # the same arithmetic on any machine: float reductions split over another number
        # of threads would round differently, and the build's files would differ
        torch.set_num_threads(BUILD_THREADS)
        try:
            run_steps(steps, staging, workers)
        finally:
            torch.set_num_threads(threads)
        shutil.rmtree(staging / MARKERS)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "preset": self.preset.name,
            "files": {str(p.relative_to(staging)): [p.stat().st_size, _sha256(p)] for p in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(staging, self.root)
        log.info("embedded benchmark built in %.0f s: %s", time.perf_counter() - started, self.root)

    def _datasets(self, folder: Path) -> None:
        from mergelab.embedded.scenes import write_tasks

        sizes = {"train": self.preset.train_per_task, "test": self.preset.test_per_task}
        write_tasks(folder, sizes, self.preset.seed)

    def _pretrain(self, folder: Path) -> None:
        import lightning as L
        import open_clip
        from torch.utils.data import DataLoader

        from mergelab.embedded.pretrain import CaptionedScenes, ContrastivePretrainer
        from mergelab.engine.checkpoints import save_state_dict

        preset = self.preset
        L.seed_everything(preset.seed, verbose=False)
        (folder / ASSETS["model_config"]).write_text(json.dumps(preset.model_config()))
        open_clip.add_model_config(folder / ASSETS["model_config"])
        # open_clip warns that the model starts from random weights: here, on purpose
        disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
        finally:
            logging.disable(disabled)
        pairs = CaptionedScenes(
            preset.pretrain_pairs, preset.seed, preprocess, open_clip.get_tokenizer(MODEL_NAME)
        )
        loader = DataLoader(pairs, batch_size=preset.pretrain_batch_size, shuffle=True)
        trainer = _trainer(preset.pretrain_steps, len(loader), self._progress_bars)
        trainer.fit(ContrastivePretrainer(model, preset.pretrain_lr), loader)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        meta = {"mergelab": json.dumps({"kind": "embedded_pretrained", "preset": preset.key})}
        save_state_dict(state, folder / ASSETS["pretrained"], meta, overwrite=True)

    def _finetuner(self, task: str):
        def finetune(folder: Path) -> None:
            import lightning as L

            from mergelab.lightning.data import TaskDataModule
            from mergelab.lightning.finetune import FineTuner
            from mergelab.tasks.splits import protocol_split

            preset = self.preset
            L.seed_everything(preset.seed, verbose=False)
            module = FineTuner(
                task=str(folder / ASSETS[f"tasks/{task}"]),
                model=MODEL_NAME,
                pretrained=str(folder / ASSETS["pretrained"]),
                cache_dir=str(self.cache_dir),
                model_config=str(folder / ASSETS["model_config"]),
                lr=preset.finetune_lr,
                weight_decay=preset.finetune_weight_decay,
                warmup_steps=preset.finetune_warmup_steps,
                output=str(folder / ASSETS[f"finetuned/{task}"]),
            )
            data = TaskDataModule(
                tasks=[module.hparams.task], batch_size=preset.finetune_batch_size, num_workers=0
            )
            train, _ = protocol_split(preset.train_per_task)
            batches = math.ceil(len(train) / preset.finetune_batch_size)
            trainer = _trainer(
                preset.finetune_steps, batches, self._progress_bars, gradient_clip_val=1.0
            )
            trainer.fit(module, datamodule=data)

        return finetune

    def _finetuned_accuracy(self, folder: Path) -> None:
        """Each fine-tuned model's test accuracy, through the test loop (the reference of
        the normalised accuracy)."""
        from mergelab.lightning.callbacks import MergeCallback
        from mergelab.lightning.data import TaskDataModule
        from mergelab.lightning.evaluation import MergeEvaluator
        from mergelab.lightning.results import write_report
        from mergelab.methods import Finetuned

        module = MergeEvaluator(
            model=MODEL_NAME,
            pretrained=str(folder / ASSETS["pretrained"]),
            finetuned={t: str(folder / ASSETS[f"finetuned/{t}"]) for t in TASKS},
            cache_dir=str(self.cache_dir),
            model_config=str(folder / ASSETS["model_config"]),
        )
        data = TaskDataModule(
            tasks=[str(folder / ASSETS[f"tasks/{t}"]) for t in TASKS], batch_size=256, num_workers=0
        )
        callback = MergeCallback(Finetuned(), save_artifact=False)
        trainer = _trainer(None, None, self._progress_bars, callbacks=[callback])
        trainer.test(module, datamodule=data, verbose=False)
        write_report(module.results, (folder / ASSETS["finetuned_accuracy"]).parent)


def _trainer(max_steps: int | None, batches: int | None, progress_bar: bool, **kwargs):
    """A quiet Trainer for ``max_steps`` (None: one pass); with ``batches`` per epoch, the
    epochs that those steps span, so that the progress bar counts them (the steps stop
    the training, as without it)."""
    import lightning as L

    epochs = -1 if max_steps is None or batches is None else math.ceil(max_steps / batches)
    return L.Trainer(
        max_steps=max_steps if max_steps is not None else -1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _import_step_modules() -> None:
    """The modules the steps import, imported here: forked workers then share them."""
    import lightning  # noqa: F401
    import open_clip  # noqa: F401

    import mergelab.embedded.pretrain
    import mergelab.embedded.scenes
    import mergelab.lightning.evaluation
    import mergelab.lightning.finetune  # noqa: F401


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""TALL masks and consensus merging over whole models, streamed parameter by parameter.

A :class:`TallMasks` holds τMTL and, for every task and every λ of the grid, that task's
mask packed at one bit per parameter. In a file they live together in one safetensors
checkpoint (``mtl/<param>`` and ``mask/<task>/<λ>/<param>``) whose metadata names the
tasks, the λ grid, the parameter shapes, the pretrained model's fingerprint and, once
chosen, each task's λ.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mergelab.engine.checkpoints import (
    AtomicWriter,
    SafetensorsCheckpoint,
    SafetensorsWriter,
    TensorSpec,
    check_writable,
    read_into,
    save_state_dict,
    tensor_spec,
)
from mergelab.engine.model_files import open_checkpoint
from mergelab.engine.parameterwise import TaskVectors
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import (
    StateDict,
    as_factor_list,
    build_models,
    fill_model,
    output_paths,
    progress,
    single_or_list,
)
from mergelab.engine.tall_layout import (
    DEFAULT_LAMBDAS,
    FORMAT,
    check_consensus_k,
    check_multitask_vector,
    checked_lambdas,
    lambda_name,
    mask_key,
    mtl_key,
)
from mergelab.engine.tensor_selection import STRICT, TensorSelection
from mergelab.engine.ties import ties_merged_vector
from mergelab.engine.workspace import BlockWorkers, Workspace, empty
from mergelab.errors import BadValue, MissingKey
from mergelab.merging.consensus import consensus_mask
from mergelab.merging.selection import pick_best
from mergelab.merging.tall_masks import (
    add_masked,
    apply_mask,
    pack_tall_masks,
    unpack_mask,
)
from mergelab.merging.task_arithmetic import task_vector_sum
from mergelab.merging.ties import check_keep_fraction

# Retrieval blocks, in ModelPool chunks (so a multiple of 8, as the packed masks need): a
# retrieval does little work per element, so larger blocks keep the call overhead small.
RETRIEVE_BLOCKS = 4


class TallMasks:
    """τMTL and per-task TALL masks over a λ grid; see the module docstring for the layout."""

    def __init__(self, store: Mapping[str, torch.Tensor], info: Mapping):
        self.store = store
        self.tasks: list[str] = list(info["tasks"])
        self.lambdas: list[float] = [float(v) for v in info["lambdas"]]
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(s) for k, s in info["params"].items()}
        self.model: str = info["model"]
        self.ties: float | None = info.get("ties")
        self.multitask: dict | None = info.get("multitask")
        self.chosen: dict[str, float] = {t: float(v) for t, v in info.get("chosen", {}).items()}

    # --- construction ---------------------------------------------------------------

    @classmethod
    def build(
        cls,
        pretrained: CheckpointSource,
        finetuned: Mapping[str, CheckpointSource],
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        ties: float | None = None,
        output: str | os.PathLike | None = None,
        overwrite: bool = False,
        multitask: Mapping[str, torch.Tensor] | None = None,
        multitask_settings: Mapping | None = None,
        task_lambdas: Mapping[str, float] | None = None,
        selection: TensorSelection = STRICT,
    ) -> TallMasks:
        """Masks of every task for every λ, from one streamed pass over the models.

        τMTL is Σt τt by default, or the merged task vector of another single-model method
        (``multitask``, e.g. TIES's or TSV-M's δ, unscaled; ``multitask_settings`` names its
        method and settings in the file). ``ties``: the share of each task vector TIES
        keeps (0.2 in the paper), a shorthand for ``multitask`` = TIES's δ (the same rule
        as the TIES method), which costs two more passes.
        ``output``: a safetensors path to stream the masks into (kept out of memory).
        ``task_lambdas``: instead of a grid, each task's own λ, whose mask alone is kept
        (one bit per parameter per task), recorded as chosen. ``selection``: which
        tensors are merged (see :class:`TensorSelection`); the others have no masks.
        """
        pool = ModelPool(pretrained, finetuned, selection)
        pool.require_tasks(2, "TALL masks")
        if task_lambdas is not None:
            missing = [task for task in pool.tasks if task not in task_lambdas]
            if missing:
                raise MissingKey(f"no TALL λ for task {missing[0]!r}")
            lambdas = sorted(set(as_factor_list(list(task_lambdas.values()), "task λ")))
        lambdas = checked_lambdas(lambdas)
        kept = {(task, lambda_name(lam)) for task in pool.tasks for lam in lambdas}
        if task_lambdas is not None:
            kept = {(task, lambda_name(task_lambdas[task])) for task in pool.tasks}
        if ties is not None:
            check_keep_fraction(ties)
        if ties is not None and multitask is not None:
            raise BadValue("TALL masks: give ties or a multitask vector, not both")
        if multitask is not None:
            check_multitask_vector(pool, multitask)
        if output is not None:
            check_writable(output, overwrite)
        if ties is not None:
            multitask = ties_merged_vector(TaskVectors(pool, "cpu"), ties)
            multitask_settings = {"method": "ties", "keep": ties}
        info = {
            "format": FORMAT,
            "tasks": pool.tasks,
            "lambdas": lambdas,
            "params": {key: list(pool.specs[key].shape) for key in pool.merged_keys},
            "model": pool.fingerprint(),
            "ties": ties,
            "multitask": None if multitask is None else dict(multitask_settings or {}),
            "chosen": {} if task_lambdas is None else dict(task_lambdas),
        }
        specs: dict[str, TensorSpec] = {}
        for key in pool.merged_keys:
            spec = pool.specs[key]
            specs[mtl_key(key)] = TensorSpec(spec.shape, pool.compute_dtype(key))
            packed = TensorSpec(((spec.numel + 7) // 8,), torch.uint8)
            for task in pool.tasks:
                for lam in lambdas:
                    if (task, lambda_name(lam)) in kept:
                        specs[mask_key(task, lam, key)] = packed

        in_memory = output is None
        metadata = {"mergelab": json.dumps(info)}
        sink = {} if in_memory else SafetensorsWriter(output, specs, metadata, overwrite)
        workspace = Workspace()

        def build_block(
            key: str, mtl: torch.Tensor, packed: torch.Tensor, workers: BlockWorkers, part: slice
        ) -> None:
            scratch = workers.workspace()
            taus = pool.read_task_vectors(key, part, scratch)
            block = task_vector_sum(taus, out=mtl[part])
            pool.check_finite(key, taus, block)
            if multitask is not None:
                block.copy_(multitask[key].reshape(-1)[part])
            # blocks start at multiples of 8, so packed blocks concatenate exactly
            bits = slice(part.start // 8, (part.stop + 7) // 8)
            pack_tall_masks(taus, block, lambdas, packed[:, :, bits], scratch)

        def store(key: str, mtl: torch.Tensor, packed: torch.Tensor) -> None:
            sink[mtl_key(key)] = mtl.view(pool.specs[key].shape)
            for t, task in enumerate(pool.tasks):
                for lam, rows in zip(lambdas, packed, strict=True):
                    if (task, lambda_name(lam)) in kept:
                        sink[mask_key(task, lam, key)] = rows[t]

        try:
            # a writer thread stores each parameter while the workers compute the next one,
            # in the other of two sets of buffers (a fresh file's pages are slow to fill)
            stored: list[Future | None] = [None, None]
            with BlockWorkers() as workers, ThreadPoolExecutor(1) as writer:
                for index, key in enumerate(progress(pool.merged_keys, "TALL masks")):
                    spec, slot = pool.specs[key], index % 2
                    if stored[slot] is not None:
                        stored[slot].result()
                    mtl_shape = (spec.numel,)
                    packed_shape = (len(lambdas), len(pool.tasks), (spec.numel + 7) // 8)
                    if in_memory:
                        mtl = empty(mtl_shape, pool.compute_dtype(key))
                        packed = empty(packed_shape, torch.uint8)
                    else:
                        mtl = workspace.get(f"multitask{slot}", mtl_shape, pool.compute_dtype(key))
                        packed = workspace.get(f"packed{slot}", packed_shape, torch.uint8)
                    work = functools.partial(build_block, key, mtl, packed, workers)
                    workers.run(work, pool.blocks(key))
                    stored[slot] = writer.submit(store, key, mtl, packed)
                for write in stored:
                    if write is not None:
                        write.result()
        except BaseException:
            if isinstance(sink, SafetensorsWriter):
                sink.abort()
            raise
        if isinstance(sink, SafetensorsWriter):
            return cls(SafetensorsCheckpoint(sink.close()), info)
        return cls(sink, info)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TallMasks:
        store = SafetensorsCheckpoint(path)
        try:
            info = json.loads(store.metadata["mergelab"])
            if info.get("format") != FORMAT:
                raise BadValue(f"format {info.get('format')!r}")
        except (KeyError, ValueError) as err:
            raise BadValue(f"{path} is not a mergelab TALL masks file ({err})") from err
        return cls(store, info)

    def _info(self) -> dict:
        return {
            "format": FORMAT,
            "tasks": self.tasks,
            "lambdas": self.lambdas,
            "params": {k: list(s) for k, s in self.shapes.items()},
            "model": self.model,
            "ties": self.ties,
            "multitask": self.multitask,
            "chosen": self.chosen,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write masks, τMTL and the chosen λ (if any) to one safetensors file."""
        return save_state_dict(self.store, path, {"mergelab": json.dumps(self._info())}, overwrite)

    # --- access -----------------------------------------------------------------------

    def _check(self, task: str, lam: float) -> None:
        if task not in self.tasks:
            raise MissingKey(f"no TALL masks for task {task!r}; tasks: {self.tasks}")
        if lambda_name(lam) not in {lambda_name(v) for v in self.lambdas}:
            raise MissingKey(f"no TALL mask for λ={lam}; built for {self.lambdas}")
        if self.shapes and mask_key(task, lam, next(iter(self.shapes))) not in self.store:
            raise MissingKey(f"no TALL mask for task {task!r} at λ={lam}: only its chosen one")

    def lambda_for(self, task: str, lam: float | None = None) -> float:
        """``lam`` if given, else the λ chosen for ``task``."""
        if lam is None:
            if task not in self.chosen:
                raise MissingKey(f"no λ chosen for task {task!r}; pass lam or call choose_lambdas")
            lam = self.chosen[task]
        self._check(task, lam)
        return lam

    def mask(self, task: str, lam: float, key: str) -> torch.Tensor:
        return unpack_mask(self.store[mask_key(task, lam, key)], self.shapes[key])

    def multitask_vector(self, key: str) -> torch.Tensor:
        """τMTL of one parameter, a tensor of the caller's own (safe to modify)."""
        vector = self.store[mtl_key(key)]
        # a file store reads a fresh tensor; an in-memory one would hand out its own
        return vector if isinstance(self.store, SafetensorsCheckpoint) else vector.clone()

    def _masked(self, key: str, mask: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        """m ⊙ τMTL of one parameter, as a workspace view (τMTL read into another)."""
        name, shape = mtl_key(key), self.shapes[key]
        dtype = tensor_spec(self.store, name).dtype
        if isinstance(self.store, SafetensorsCheckpoint):
            source = self.store.read_into(name, workspace.get("multitask", shape, dtype))
        else:
            source = self.store[name]
        return apply_mask(source, mask, workspace.get("masked", shape, dtype))

    def density(self, task: str, lam: float | None = None) -> dict[str, float]:
        """Share of each parameter's coordinates that task's mask keeps."""
        lam = self.lambda_for(task, lam)
        return {key: self.mask(task, lam, key).float().mean().item() for key in self.shapes}

    @property
    def bits_per_param(self) -> float:
        """Storage of one mask per coordinate, in bits (1 plus the padding of each parameter)."""
        packed = sum((math.prod(s) + 7) // 8 for s in self.shapes.values())
        return 8 * packed / sum(math.prod(s) for s in self.shapes.values())

    def _check_pretrained(self, pretrained: Mapping[str, torch.Tensor]) -> None:
        for key, shape in self.shapes.items():
            if key not in pretrained:
                raise MissingKey(f"the pretrained model lacks {key!r}, which the masks cover")
            if tensor_spec(pretrained, key).shape != shape:
                raise BadValue(
                    f"the pretrained model's {key!r} is {tensor_spec(pretrained, key).shape}, "
                    f"the masks' {shape}"
                )

    # --- models -------------------------------------------------------------------------

    def retrieve(
        self,
        pretrained: CheckpointSource,
        task: str,
        lam: float | None = None,
        output: str | os.PathLike | AtomicWriter | None = None,
        overwrite: bool = False,
        reuse: StateDict | None = None,
    ) -> StateDict | Path:
        """θ̂t = θ0 + mt ⊙ τMTL for one task, without building any other task's model.

        ``output``: a safetensors path to write the model to (or a writer declared with
        θ0's layout, which this closes), else it is returned in memory,
        in new tensors or in those of ``reuse`` (e.g. the previous task's retrieved model,
        which is overwritten), so that retrieving task after task allocates one model.
        """
        lam = self.lambda_for(task, lam)
        pretrained = open_checkpoint(pretrained)
        self._check_pretrained(pretrained)
        is_writer = isinstance(output, AtomicWriter)
        [path] = [output] if is_writer else output_paths(output, 1, overwrite)
        return fill_model(
            pretrained,
            self.shapes,
            functools.partial(self._retrieve_block, pretrained, task, lam),
            RETRIEVE_BLOCKS * ModelPool.chunk,
            path,
            overwrite,
            desc=f"retrieve {task}",
            reuse=reuse,
        )

    def _retrieve_block(
        self,
        pretrained: Mapping[str, torch.Tensor],
        task: str,
        lam: float,
        key: str,
        out: torch.Tensor,
        part: slice,
        scratch: Workspace,
    ) -> None:
        """θ0 + mt ⊙ τMTL of the flat elements ``part`` of one parameter into ``out`` (flat):
        θ0 is read straight into ``out`` (into a buffer first where its dtype is not τMTL's,
        the one computed in) and the masked τMTL added in place."""
        name = mtl_key(key)
        dtype = tensor_spec(self.store, name).dtype
        size = part.stop - part.start
        direct = out.dtype == dtype
        target = out[part] if direct else scratch.get("pretrained", (size,), dtype)
        read_into(pretrained, key, target, part.start, part.stop)
        vector = scratch.get("multitask", (size,), dtype)
        read_into(self.store, name, vector, part.start, part.stop)
        # blocks start at multiples of 8, so each has whole bytes of the packed mask
        start, stop = part.start // 8, (part.stop + 7) // 8
        packed = scratch.get("packed", (stop - start,), torch.uint8)
        read_into(self.store, mask_key(task, lam, key), packed, start, stop)
        add_masked(target, vector, packed, scratch)
        if not direct:
            out[part] = target

    def choose_lambdas(self, scores: Mapping[str, Mapping[float, float]]) -> dict[str, float]:
        """Each task's λ with the best validation score (on a tie the first of the grid, as
        :func:`~mergelab.merging.selection.pick_best` picks every setting)."""
        chosen = {}
        for task in self.tasks:
            if task not in scores:
                raise MissingKey(f"no validation scores for task {task!r}")
            by_name = {lambda_name(float(lam)): s for lam, s in scores[task].items()}
            missing = [lam for lam in self.lambdas if lambda_name(lam) not in by_name]
            if missing:
                raise MissingKey(f"no validation score for task {task!r} at λ={missing[0]}")
            score = {lam: by_name[lambda_name(lam)] for lam in self.lambdas}
            chosen[task] = pick_best(self.lambdas, score.__getitem__)
        self.chosen = chosen
        return chosen

    def consensus_delta_fn(
        self, k: int, lambdas: Mapping[str, float] | None = None
    ) -> Callable[[str], torch.Tensor]:
        """key ↦ mcons ⊙ τMTL, from each task's mask at its chosen (or given) λ."""
        check_consensus_k(k)
        per_task = {task: self.lambda_for(task, (lambdas or {}).get(task)) for task in self.tasks}
        workspace = Workspace()

        def delta_of(key: str) -> torch.Tensor:
            masks = (self.mask(task, lam, key) for task, lam in per_task.items())
            return self._masked(key, consensus_mask(masks, k), workspace)

        return delta_of

    def consensus(
        self,
        pretrained: CheckpointSource,
        k: int = 2,
        scaling_factor: float | Sequence[float] = 0.3,
        lambdas: Mapping[str, float] | None = None,
        output=None,
        overwrite: bool = False,
    ):
        """θ = θ0 + α·(mcons ⊙ τMTL); a list of α gives a list of independent models."""
        pretrained = open_checkpoint(pretrained)
        self._check_pretrained(pretrained)
        factors = as_factor_list(scaling_factor, "scaling_factor")
        outputs = output_paths(output, len(factors), overwrite)
        delta_of = self.consensus_delta_fn(k, lambdas)
        results = build_models(
            pretrained,
            self.shapes,
            delta_of,
            factors,
            outputs,
            overwrite,
            desc="consensus",
        )
        return single_or_list(results, scaling_factor)

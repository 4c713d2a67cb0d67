"""Model weights as users give them: an in-memory state dict, a file (safetensors or
``torch.save``), or a Hugging Face model folder, whose weights are one
``model.safetensors`` or shards named by ``model.safetensors.index.json`` (its
``weight_map``: the shard that holds each tensor). :func:`open_checkpoint` opens any of
them as a state dict that reads each tensor when it is indexed.

:class:`ShardedCheckpoint` reads such a folder as one lazy state dict (a tensor is read
from its shard when indexed, as :class:`SafetensorsCheckpoint` reads one file), once the
index and the shards are checked to agree. :class:`ShardedWriter` writes one tensor by
tensor, into shards of at most a given size named as ``save_pretrained`` names them, in a
temporary folder that is renamed into place when complete: a reader never sees a
half-written model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mergelab.engine.atomic import temporary_path
from mergelab.engine.checkpoints import (
    AtomicWriter,
    LazyCheckpoint,
    SafetensorsCheckpoint,
    SafetensorsWriter,
    TensorSpec,
)
from mergelab.errors import BadValue, FileInTheWay, MissingFile, MissingKey, NotPermitted

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLED_FILE = "pytorch_model.bin"  # the older save_pretrained's one file
# save_pretrained's shard names: model-00001-of-00003.safetensors
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)-of-(?P<total>\d+)\.safetensors$")


def shard_name(number: int, total: int) -> str:
    return SINGLE_FILE if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"


class ShardedCheckpoint(LazyCheckpoint):
    """A read-only, lazy state dict over a folder of safetensors shards and their index.

    Checked when opened: the index is JSON with a ``weight_map``; every shard it names is
    in the folder; each shard holds exactly the tensors the index places in it; no shard
    of a numbered set (``-00002-of-00003``) is left out of the index. Each error names the
    index, the shard and the tensor.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = self.location = Path(folder)
        self.index_path = self.folder / INDEX
        weight_map = _read_index(self.index_path)
        shards = {}
        for name in sorted(set(weight_map.values())):  # numbered shards in their order
            if Path(name).name != name:
                raise BadValue(f"{self.index_path}: shard {name!r} is not a file in its folder")
            if not (self.folder / name).is_file():
                raise MissingFile(
                    f"{self.index_path} names shard {name!r}, which is not in {self.folder}"
                )
            shards[name] = SafetensorsCheckpoint(self.folder / name)
        _check_numbered_shards(self.index_path, list(shards))
        for key, name in weight_map.items():
            if key not in shards[name]:
                raise MissingKey(
                    f"{self.index_path} places {key!r} in {name}, which does not hold it"
                )
        for name, shard in shards.items():
            unplaced = [key for key in shard if weight_map.get(key) != name]
            if unplaced:
                raise BadValue(
                    f"{shard.path} holds {unplaced[0]!r}, which {self.index_path} does not "
                    "place there"
                )
        # the shards' own order: a walk over the model reads each file front to back
        self._shard_of = {key: shard for shard in shards.values() for key in shard}
        self._specs = {key: shard.spec(key) for key, shard in self._shard_of.items()}
        self.shards = list(shards.values())

    def read_into(
        self, key: str, out: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        self.spec(key)  # an unknown key: named with the folder
        return self._shard_of[key].read_into(key, out, start, stop)

    def read_ahead(self, key: str, start: int, stop: int) -> None:
        self.spec(key)
        self._shard_of[key].read_ahead(key, start, stop)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _read_index(path: Path) -> dict[str, str]:
    """An index file's weight map: tensor → shard file."""
    if not path.is_file():
        raise MissingFile(f"{path} not found")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadValue(f"{path}: not JSON ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(value, str) for value in weight_map.values()
    ):
        raise BadValue(f"{path}: no 'weight_map' from tensor names to shard files")
    return weight_map


def _check_numbered_shards(index_path: Path, names: list[str]) -> None:
    """Refuse an index that leaves out a shard of a numbered set: its tensors would be
    missing from the model without a word."""
    sets: dict[tuple[str, str], set[int]] = {}
    for name in names:
        match = _SHARD_NAME.match(name)
        if match:
            sets.setdefault((match["stem"], match["total"]), set()).add(int(match["number"]))
    for (stem, total), numbers in sets.items():
        missing = sorted(set(range(1, int(total) + 1)) - numbers)
        if missing:
            width = len(total)
            name = f"{stem}-{missing[0]:0{width}d}-of-{total}.safetensors"
            raise BadValue(
                f"{index_path} places no tensor in shard {name} ({len(numbers)} of the "
                f"{int(total)} shards named): the index is incomplete"
            )


# what torch.load raises for a file that is not a readable state dict: a corrupt or
# truncated archive (RuntimeError, EOFError), a pickle that weights_only refuses or cannot
# parse, a file of another format
UNREADABLE_CHECKPOINT = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError)


def open_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping:
    """A state dict from a mapping (returned as is), a model folder or a file path (read
    lazily).

    Safetensors files and folders are read tensor by tensor; other files are loaded with
    ``torch.load(mmap=True)``, which pages tensors in on use.
    """
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        return open_model_folder(path)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path)
    if not path.is_file():
        raise MissingFile(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except UNREADABLE_CHECKPOINT as err:  # torch's messages name neither file nor fix
        raise BadValue(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); give a .safetensors or "
            "torch.save state dict file"
        ) from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BadValue(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def open_model_folder(folder: str | os.PathLike) -> Mapping:
    """The weights of a Hugging Face model folder: its sharded safetensors (with the
    index), its single ``model.safetensors``, or an older ``pytorch_model.bin``."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        return ShardedCheckpoint(folder)
    if (folder / SINGLE_FILE).is_file():
        return SafetensorsCheckpoint(folder / SINGLE_FILE)
    if (folder / PICKLED_FILE).is_file():
        return open_checkpoint(folder / PICKLED_FILE)
    raise MissingFile(f"{folder}: no {INDEX}, {SINGLE_FILE} or {PICKLED_FILE}")


def shard_plan(specs: Mapping[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """The tensors in order, cut into shards of at most ``max_shard_bytes`` each (a
    larger tensor alone in its shard), as ``save_pretrained`` cuts them."""
    if max_shard_bytes < 1:
        raise BadValue(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        nbytes = spec.numel * spec.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


class ShardedWriter(AtomicWriter):
    """Writes a model folder of safetensors shards and their index, tensor by tensor.

    As with :class:`SafetensorsWriter`, every tensor's shape and dtype is declared up
    front and the tensors are then written in that order (``writer[key] = tensor``); one
    shard file is open at a time. ``shards`` is the most bytes a shard holds (cut as
    :func:`shard_plan` cuts), or the tensors of each shard (another model's layout).
    Everything goes to a hidden temporary folder beside ``folder`` (other files too,
    through :attr:`staging`), renamed into place by :meth:`close`; an exception inside a
    ``with`` block removes it. A model that fits in one shard is written as
    ``model.safetensors`` without an index, as ``save_pretrained`` writes it.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        shards: int | Sequence[Sequence[str]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        if self.folder.exists():
            raise FileInTheWay(f"{self.folder} exists; choose a new output folder")
        parent = self.folder.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise NotPermitted(f"cannot write into {parent}")
        self._specs = dict(specs)
        self._metadata = dict(metadata or {})
        if isinstance(shards, int):
            self._plan = shard_plan(self._specs, shards)
        else:
            self._plan = [list(keys) for keys in shards if keys]
            if [key for keys in self._plan for key in keys] != list(self._specs):
                raise BadValue(f"{self.folder}: the shards must hold the tensors once, in order")
        self._shard_of = {key: number for number, keys in enumerate(self._plan) for key in keys}
        self._begin()

    def _begin(self) -> None:
        self.staging = temporary_path(self.folder)
        self.staging.mkdir()
        self._shard = -1
        self._writer: SafetensorsWriter | None = None
        self._shards: list[SafetensorsWriter] = []
        self._written = 0

    def restart(self) -> None:
        """Drop everything written so far, to write every tensor again (other files in
        :attr:`staging` too: a new staging folder)."""
        self.abort()
        self._begin()

    def _open_next_shard(self) -> None:
        self._shard += 1
        name = shard_name(self._shard + 1, len(self._plan))
        keys = self._plan[self._shard]
        specs = {key: self._specs[key] for key in keys}
        self._writer = SafetensorsWriter(self.staging / name, specs, self._metadata)
        self._shards.append(self._writer)

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        self._shard_for(key)[key] = tensor
        self._written += 1

    def write_parts(self, key: str, parts: Iterable[torch.Tensor]) -> None:
        """Write ``key`` from consecutive pieces of its flat data (see
        :meth:`SafetensorsWriter.write_parts`)."""
        self._shard_for(key).write_parts(key, parts)
        self._written += 1

    def patch(self, key: str, positions: np.ndarray, values: torch.Tensor) -> None:
        """Overwrite elements of a tensor already written (see
        :meth:`SafetensorsWriter.patch`)."""
        number = self._shard_of.get(key)
        if number is None:
            raise MissingKey(f"{self.folder}: {key!r} patched, but it was never declared")
        if number >= len(self._shards):
            raise MissingKey(f"{self.folder}: {key!r} patched before it was written")
        self._shards[number].patch(key, positions, values)

    def _shard_for(self, key: str) -> SafetensorsWriter:
        """The writer of the shard the next tensor goes to (the next shard when full)."""
        if self._writer is None or self._written == len(self._plan[self._shard]):
            if self._writer is not None:
                self._writer.close()
            if self._shard + 1 == len(self._plan):
                raise MissingKey(f"{self.folder}: wrote {key!r} after every declared tensor")
            self._open_next_shard()
            self._written = 0
        return self._writer

    def close(self) -> Path:
        """Check that every tensor was written, write the index and rename the folder."""
        written = sum(len(keys) for keys in self._plan[: self._shard]) + self._written
        if written != len(self._specs):
            missing = list(self._specs)[written]
            self.abort()
            raise RuntimeError(f"{self.folder}: closed before {missing!r} was written")
        if self._writer is not None:
            self._writer.close()
        total = len(self._plan)
        if total > 1:
            weight_map = {
                key: shard_name(number, total)
                for number, keys in enumerate(self._plan, start=1)
                for key in keys
            }
            size = sum(spec.numel * spec.dtype.itemsize for spec in self._specs.values())
            index = {"metadata": {"total_size": size}, "weight_map": weight_map}
            (self.staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.folder.exists():  # made while this one was written
            self.abort()
            raise FileInTheWay(f"{self.folder} appeared while it was written; nothing replaced")
        os.rename(self.staging, self.folder)
        return self.folder

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        shutil.rmtree(self.staging, ignore_errors=True)

"""Reading and writing state dicts without holding whole checkpoints in memory.

A checkpoint is any ``Mapping[str, Tensor]``. A :class:`LazyCheckpoint` knows every
tensor's shape and dtype without reading it and reads a tensor only when it is indexed,
so merge code can walk a model parameter by parameter: :class:`SafetensorsCheckpoint`
over one file, :class:`mergelab.engine.sharded.ShardedCheckpoint` over a folder of shards.
:class:`SafetensorsWriter` is the other direction: it writes tensors one at a time into
a temporary file, in an order fixed up front, and renames it into place when complete.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from mergelab.engine.atomic import temporary_path
from mergelab.engine.workspace import empty
from mergelab.errors import BadValue, FileInTheWay, MissingFile, MissingKey, NotAFile, NotPermitted

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec).
_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
# a reading thread's reused staging buffer, per checkpoint, for reads that convert
STAGING_BYTES = 1 << 22


class TensorSpec(NamedTuple):
    """Shape and dtype of a tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only state dict whose tensors stay on disk until read: a subclass sets
    ``location`` (its file or folder) and ``_specs`` (every tensor's shape and dtype, in
    its order) and reads with :meth:`read_into`."""

    location: Path
    _specs: dict[str, TensorSpec]

    def spec(self, key: str) -> TensorSpec:
        """Shape and dtype of ``key``, without reading its data."""
        if key not in self._specs:
            raise MissingKey(f"{key!r} is not in {self.location}")
        return self._specs[key]

    @abc.abstractmethod
    def read_into(
        self, key: str, out: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Read the flat elements [start, stop) of ``key`` into ``out`` (converted if the
        dtypes differ); all of it by default."""

    def read_ahead(self, key: str, start: int, stop: int) -> None:
        """Ask the operating system to start reading the flat elements [start, stop) of
        ``key``, so that a later :meth:`read_into` finds them in memory: for reads
        scattered over a file, which its sequential read-ahead does not foresee (nothing
        where the storage takes no such request)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        spec = self.spec(key)
        return self.read_into(key, empty(spec.shape, spec.dtype))

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.location)!r}, {len(self)} tensors)"


class SafetensorsCheckpoint(LazyCheckpoint):
    """A read-only, lazy state dict backed by a ``.safetensors`` file.

    The header is checked once with the safetensors library; each tensor is then read
    with one positioned read into a fresh (or a caller's) tensor. Nothing is memory
    mapped, so tensors already used do not stay resident: a loop over all parameters of
    several checkpoints holds only the tensors it keeps.
    """

    def __init__(self, path: str | os.PathLike):
        self._fd: int | None = None  # before any check: __del__ runs after a failed init too
        self._local = threading.local()
        self.path = self.location = Path(path)
        if not self.path.is_file():
            raise MissingFile(f"checkpoint not found: {self.path}")
        try:
            with safe_open(self.path, framework="pt") as f:
                self.metadata: dict[str, str] = f.metadata() or {}
                specs = {}
                for key in f.keys():  # noqa: SIM118 -- safe_open is not iterable
                    view = f.get_slice(key)
                    specs[key] = TensorSpec(tuple(view.get_shape()), _CODE_DTYPES[view.get_dtype()])
            with open(self.path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size))
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise BadValue(f"{self.path}: not a readable safetensors file ({err})") from err
        self._specs = specs
        self._offsets = {k: 8 + header_size + header[k]["data_offsets"][0] for k in specs}

    def _descriptor(self) -> int:
        """One read-only descriptor, opened on first read (a merge reads each file often)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # a merge reads each file front to back
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fd

    def read_ahead(self, key: str, start: int, stop: int) -> None:
        if hasattr(os, "posix_fadvise"):
            size = self.spec(key).dtype.itemsize
            offset, length = self._offsets[key] + start * size, (stop - start) * size
            os.posix_fadvise(self._descriptor(), offset, length, os.POSIX_FADV_WILLNEED)

    def close(self, _close=os.close) -> None:
        # os.close bound at definition: __del__ may run at interpreter exit, after the
        # os module's globals are cleared
        if self._fd is not None:
            _close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def read_into(
        self, key: str, out: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        spec = self.spec(key)
        stop = spec.numel if stop is None else stop
        if out.numel() != stop - start or not 0 <= start <= stop <= spec.numel:
            raise BadValue(
                f"{self.path}: cannot read elements {start}:{stop} of {key!r} "
                f"({spec.numel} values) into {out.numel()}"
            )
        target = out if out.dtype == spec.dtype and out.is_contiguous() else None
        buffer = target if target is not None else self._staging(stop - start, spec.dtype)
        if stop > start:
            view = _bytes(buffer)
            offset = self._offsets[key] + start * buffer.element_size()
            if os.preadv(self._descriptor(), [view], offset) != view.nbytes:
                raise BadValue(f"{self.path}: truncated data for {key!r}")
        if target is None:
            convert_into(out, buffer)
        return out

    def _staging(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Where a read lands before its conversion: a buffer of the calling thread's,
        reused up to :data:`STAGING_BYTES` (a fresh one's pages would fault in on every
        block read), a new tensor beyond."""
        if numel * dtype.itemsize > STAGING_BYTES:
            return torch.empty(numel, dtype=dtype)
        buffers = self._local.__dict__.setdefault("staging", {})
        buffer = buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[dtype] = torch.empty(STAGING_BYTES // dtype.itemsize, dtype=dtype)
        return buffer[:numel]


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, writable (numpy's view where it has the dtype:
    a few microseconds less a read, which a merge makes T + 1 times a block)."""
    if tensor.dtype in _NUMPY_TYPES:
        return memoryview(tensor.numpy()).cast("B")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# a dtype of each width that numpy has, to move any tensor's bits
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# numpy's types of the dtypes it converts between
_NUMPY_TYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def convert_into(out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``out[...] = source`` (flat, as many elements) in ``out``'s dtype, in numpy where it
    can: torch's conversion, called from several block threads at once, makes them wait on
    its one thread team. bfloat16 to float32 is exact as a shift of its bits (bfloat16 is
    float32's upper half)."""
    if out.is_contiguous() and source.is_contiguous():
        flat = out.view(-1)
        if source.dtype == torch.bfloat16 and out.dtype == torch.float32:
            bits = source.view(torch.int16).numpy().view(np.uint16).reshape(-1)
            wide = flat.view(torch.int32).numpy().view(np.uint32)
            np.left_shift(bits, 16, out=wide, dtype=np.uint32)
            return out
        if source.dtype in _NUMPY_TYPES and out.dtype in _NUMPY_TYPES:
            np.copyto(flat.numpy(), source.numpy().reshape(-1), casting="unsafe")
            return out
    return out.copy_(source.reshape(out.shape))


def read_into(
    checkpoint: Mapping[str, torch.Tensor],
    key: str,
    out: torch.Tensor,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Flat elements [start, stop) of ``checkpoint[key]`` copied into ``out``; straight
    from the file for a lazy checkpoint."""
    if isinstance(checkpoint, LazyCheckpoint):
        return checkpoint.read_into(key, out, start, stop)
    flat = checkpoint[key].detach().reshape(-1)[start:stop]
    return out.copy_(flat.reshape(out.shape))


def tensor_spec(checkpoint: Mapping[str, torch.Tensor], key: str) -> TensorSpec:
    """Shape and dtype of ``checkpoint[key]``, read from the header where possible."""
    if isinstance(checkpoint, LazyCheckpoint):
        return checkpoint.spec(key)
    tensor = checkpoint[key]
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early, before any long work, if ``path`` cannot be written as asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileInTheWay(f"{path} exists; pass overwrite=True to replace it")
    if path.is_dir():
        raise NotAFile(f"{path} is a directory, expected a file path")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise NotPermitted(f"cannot write into {parent}")
    return path


class AtomicWriter(abc.ABC):
    """A writer used in a ``with`` block: closed (complete, renamed into place) when the
    block ends, aborted (nothing left behind) when it raises."""

    @abc.abstractmethod
    def close(self) -> Path: ...

    @abc.abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(AtomicWriter):
    """Writes a safetensors file one tensor at a time, then renames it into place.

    The header needs every tensor's shape and dtype, so they are declared up front; the
    tensors must then be written in that order (``writer[key] = tensor``). Data goes to a
    hidden temporary file beside ``path``; :meth:`close` checks that every declared
    tensor arrived and renames the file, and any exception inside a ``with`` block
    removes the temporary file, so a reader never sees a half-written checkpoint.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ):
        self.path = check_writable(path, overwrite)
        self._order = list(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._specs = dict(specs)
        offset = 0
        for key, spec in specs.items():
            nbytes = spec.numel * spec.dtype.itemsize
            header[key] = {
                "dtype": _DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as upstream writes it
        start = 8 + len(encoded)  # the header's length, then the header
        self._data_offsets = {key: start + header[key]["data_offsets"][0] for key in specs}
        self._tmp = temporary_path(self.path)
        # unbuffered: each tensor goes to the file in one call, without a copy in between
        self._file = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 -- closed in close()/abort()
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(key)
        if spec is not None and tuple(tensor.shape) != spec.shape:
            raise BadValue(
                f"{self.path}: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {spec.shape} {spec.dtype}"
            )
        self.write_parts(key, [tensor])

    def write_parts(self, key: str, parts: Iterable[torch.Tensor]) -> None:
        """Write ``key`` from consecutive pieces of its flat data (each in its declared
        dtype), so that a large tensor never needs to be whole in memory."""
        if self._next >= len(self._order) or self._order[self._next] != key:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise MissingKey(f"{self.path}: wrote {key!r}, expected {expected!r} next")
        spec = self._specs[key]
        written = 0
        for part in parts:
            if part.dtype != spec.dtype:
                raise BadValue(f"{self.path}: {key!r} is {part.dtype}, declared {spec.dtype}")
            flat = part.detach().cpu().contiguous().reshape(-1)
            data = memoryview(flat.view(torch.uint8).numpy())
            while data.nbytes:
                data = data[self._file.write(data) :]
            written += part.numel()
        if written != spec.numel:
            raise BadValue(f"{self.path}: {key!r} got {written} values, declared {spec.shape}")
        self._next += 1

    def patch(self, key: str, positions: np.ndarray, values: torch.Tensor) -> None:
        """Overwrite the flat elements ``positions`` of a tensor already written with
        ``values`` (in its declared dtype), before or after :meth:`close` (a file in a
        folder still being written)."""
        spec = self._specs[key]
        if self._order.index(key) >= self._next:
            raise MissingKey(f"{self.path}: {key!r} patched before it was written")
        if values.dtype != spec.dtype or values.shape != positions.shape:
            raise BadValue(
                f"{self.path}: {key!r} patched with {values.numel()} {values.dtype} values "
                f"at {positions.size} positions, declared {spec.dtype}"
            )
        bits = values.detach().cpu().contiguous().view(_SAME_WIDTH[spec.dtype.itemsize])
        path = self.path if self._file.closed else self._tmp
        data = np.memmap(path, bits.numpy().dtype, "r+", self._data_offsets[key], (spec.numel,))
        data[positions] = bits.numpy()
        data.flush()

    def close(self) -> Path:
        if self._next != len(self._order):
            missing = self._order[self._next]
            self.abort()
            raise RuntimeError(f"{self.path}: closed before {missing!r} was written")
        # no fsync: the rename keeps readers from ever seeing a partial file, which is the
        # guarantee needed here; flushing to stable storage would cost as much as the writing
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state_dict`` to ``path`` atomically, one tensor at a time."""
    specs = {key: tensor_spec(state_dict, key) for key in state_dict}
    with SafetensorsWriter(path, specs, metadata, overwrite) as writer:
        for key in specs:
            writer[key] = state_dict[key]
    return Path(path)

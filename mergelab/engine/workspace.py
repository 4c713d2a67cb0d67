"""Reusable scratch buffers for the per-parameter loops, and threads that share the blocks.

A merge touches every parameter of T + 1 models; allocating a fresh [T, *shape] block per
parameter makes the allocator map and fault in new pages every time (tens of MB for a
ViT-B/32 MLP weight), which costs far more than the arithmetic. A :class:`Workspace`
keeps one flat buffer per name, grown to the largest request, and hands out views.

:class:`BlockWorkers` runs the blocks of one parameter on several threads, each with a
workspace of its own. The work inside a block is file reads and numpy arithmetic, which
release the GIL and never start threads of their own, so the threads share the cores
without torch's intra-op thread teams waiting on each other (which, on a machine that
other processes keep busy, costs several times the work itself).
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import numpy as np
import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

# numpy integer types by width, to allocate any torch dtype's memory through numpy
_NUMPY_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Like ``torch.empty``, but allocated by numpy: numpy advises the kernel to back
    allocations of 4 MiB and more with transparent huge pages (its ``madvise_hugepage``,
    on by default on Linux) and torch's CPU allocator does not, unless the environment
    variable THP_MEM_ALLOC_ENABLE was set before it started. Filling a new ViT-B/32 model
    then takes one page fault per 2 MiB instead of per 4 KiB of its large tensors.
    """
    if dtype.itemsize not in _NUMPY_OF_WIDTH:
        return torch.empty(shape, dtype=dtype)
    memory = np.empty(math.prod(shape), dtype=_NUMPY_OF_WIDTH[dtype.itemsize])
    return torch.from_numpy(memory).view(dtype).view(shape)


def sparse_zeros(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """Zeros in an anonymous mapping of 4 KiB pages, each faulted in only when first
    written (untouched pages read as the kernel's one zero page): for count arrays, per
    bucket or per piece, whose entries are mostly never touched. ``np.zeros`` of 4 MiB
    and more asks for huge pages, and a scattered first write into each 2 MiB then
    zeroes all of it: on the VM this was measured on, TIES's sample at 20 tasks touched
    1,800 4 KiB pages of each thread's 80 MB of counts, and first writes into huge pages
    cost it 0.3 s, as much as reading the sample (see :func:`empty`'s note)."""
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: even where THP is "always"
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype, count).reshape(shape)


def release_freed_heap() -> None:
    """Hand the pages of the C heap's free chunks back to the system (glibc's public
    ``malloc_trim``; nothing elsewhere). glibc raises its mmap threshold after a large
    block is freed, so later large temporaries come from the heap, and the freed holes
    between the tensors that are kept remain resident: the rules that take whole
    matrices (an SVD's factors and LAPACK's workspace, parameter after parameter) then
    grow the peak RSS. Iso-CTS of ViT-B/32 with 20 tasks (scripts/bench_merge.py) peaked
    at 4.05 models, and at 3.93 trimmed after each parameter (3.41 with glibc's threshold
    fixed by MALLOC_MMAP_THRESHOLD_, which a user may set: it makes every fresh large
    tensor pay its page faults, the read floor 4x slower)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    # the process's own symbols (dlopen of NULL): glibc's malloc_trim where it is linked
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


class Workspace:
    """Named scratch tensors; a view handed out is valid until the next request of its name."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = empty((numel,), dtype)  # huge pages: a block's buffer faults in at once
            self._buffers[name, dtype] = buffer
        return buffer[:numel].view(shape)


class BlockWorkers:
    """Threads for the blocks of a parameter: as many as torch's intra-op threads.

    Use as a context manager; :meth:`run` calls a function on every block and returns
    when all are done, and :meth:`workspace` gives the calling thread its own buffers.
    """

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
        self._local = threading.local()
        # the calling thread takes a share of the blocks itself
        self._executor = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def workspace(self) -> Workspace:
        """The calling thread's workspace."""
        workspace = getattr(self._local, "workspace", None)
        if workspace is None:
            workspace = self._local.workspace = Workspace()
        return workspace

    def run(self, work: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        """``work(item)`` for every item (a block, or a parameter and a block), the results
        in the items' order; re-raises the first error once all have ended.

        The items are cut into one run of neighbours per thread (one hand-over per
        thread rather than per item, which costs as much as a small block's work).
        """
        items = list(items)
        share = max(1, -(-len(items) // self.threads))  # no items: one empty run
        runs = [items[i : i + share] for i in range(0, len(items), share)]

        def run_items(run: list[Item]) -> list[Result]:
            return [work(item) for item in run]

        if self._executor is None or len(runs) <= 1:
            return run_items(items)
        # autograd modes are per thread: the others run in the caller's (under a Lightning
        # test loop, inference mode, whose tensors only it may update in place)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run_in_callers_mode(run: list[Item]) -> list[Result]:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return run_items(run)

        others = [self._executor.submit(run_in_callers_mode, run) for run in runs[1:]]
        try:
            results = run_items(runs[0])
        finally:
            wait(others)
        for future in others:
            results += future.result()
        return results

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()

    def __enter__(self) -> BlockWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ThreadTotals:
    """Counts that the block threads add up without a lock on the way: each thread adds
    into an array of its own (the first into ``out`` itself, which may hold counts
    already; the others in :func:`sparse_zeros`: histograms are mostly untouched);
    :meth:`total` adds the others into ``out`` once they have all ended."""

    def __init__(self, out: np.ndarray):
        self.out = out
        self._arrays: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def mine(self) -> np.ndarray:
        """The calling thread's array."""
        counts = self._arrays.get(threading.get_ident())
        if counts is None:
            with self._lock:
                counts = sparse_zeros(self.out.shape, self.out.dtype) if self._arrays else self.out
                self._arrays[threading.get_ident()] = counts
        return counts

    def parts(self) -> list[np.ndarray]:
        """Every thread's array, ``out`` among them, once they have all ended."""
        return list(self._arrays.values()) or [self.out]

    def total(self) -> np.ndarray:
        """``out`` with every thread's counts in it."""
        for counts in self._arrays.values():
            if counts is not self.out:
                self.out += counts
        self._arrays = {}
        return self.out

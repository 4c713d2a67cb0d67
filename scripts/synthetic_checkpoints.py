"""Synthetic checkpoints for the benchmarks: a random-weight open_clip image encoder plays
the pretrained model θ0, and its "fine-tuned" copies are θ0 plus small seeded Gaussian
noise (``noise`` × each tensor's std). ``write_checkpoints`` writes them as safetensors
files with a ``manifest.json`` that says what they are, so a later run can reuse them.

torch, safetensors and open_clip are imported inside the functions that need them: a
benchmark's parent process imports this module and must stay small.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

MANIFEST = "manifest.json"
MB = 1e6

log = logging.getLogger(__name__)


def random_encoder(model: str, seed: int):
    """open_clip ``model``'s image encoder with random weights (no download), after seeding
    torch's global generator with ``seed``."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    return open_clip.create_model(model).visual


def noise_scales(pretrained: dict, noise: float) -> dict[str, float]:
    """Per-tensor noise scale: ``noise`` × the tensor's std; constant tensors (LayerNorm
    weights of 1, zero biases) use their mean magnitude, or 1, so that every tensor moves a
    little. Tensors that are not floating point get none."""
    scales = {}
    for key, tensor in pretrained.items():
        if not tensor.dtype.is_floating_point:
            continue
        std = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
        scales[key] = noise * (std or float(tensor.float().abs().mean()) or 1.0)
    return scales


def noisy_copy(pretrained: dict, scales: dict[str, float], seed: int) -> dict:
    """``pretrained`` plus seeded Gaussian noise of the given per-tensor scales."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in pretrained.items():
        if key in scales:
            bump = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            state[key] = tensor + bump.mul_(scales[key])
        else:
            state[key] = tensor.clone()
    return state


def write_checkpoints(workdir: Path, model: str, tasks: int, noise: float, seed: int) -> dict:
    """Write θ0 and ``tasks`` noisy copies as safetensors, then the manifest."""
    start = time.perf_counter()
    from safetensors.torch import save_file

    log.info("building a random-weight open_clip %s image encoder (no download)", model)
    pretrained = {
        key: tensor.detach().contiguous().clone()
        for key, tensor in random_encoder(model, seed).state_dict().items()
    }
    nbytes = sum(t.numel() * t.element_size() for t in pretrained.values())
    log.info(
        "%d tensors, %.1f M parameters, %.1f MB per checkpoint; writing %d checkpoints",
        len(pretrained),
        sum(t.numel() for t in pretrained.values()) / 1e6,
        nbytes / MB,
        tasks + 1,
    )
    save_file(pretrained, str(workdir / "pretrained.safetensors"))
    scales = noise_scales(pretrained, noise)
    finetuned = {}
    for index in range(tasks):
        task = f"task{index}"
        state = noisy_copy(pretrained, scales, seed + 1 + index)
        name = f"finetuned_{task}.safetensors"
        save_file(state, str(workdir / name))
        del state
        finetuned[task] = name
        log.info("  fine-tuned %d/%d written (%s)", index + 1, tasks, name)
    manifest = {
        "model": model,
        "tasks": tasks,
        "noise": noise,
        "seed": seed,
        "pretrained": "pretrained.safetensors",
        "finetuned": finetuned,
    }
    (workdir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("generation done in %.1f s", time.perf_counter() - start)
    return {"seconds": time.perf_counter() - start, "bytes_per_checkpoint": nbytes}


def checkpoint_paths(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """θ0's file and each task's fine-tuned file, from the work folder's manifest."""
    manifest = json.loads((workdir / MANIFEST).read_text())
    finetuned = {task: workdir / name for task, name in manifest["finetuned"].items()}
    return workdir / manifest["pretrained"], finetuned


def checkpoints_ready(workdir: Path, model: str, tasks: int, noise: float, seed: int) -> bool:
    """True when ``workdir`` already holds the checkpoints these settings ask for."""
    try:
        manifest = json.loads((workdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    wanted = {"model": model, "tasks": tasks, "noise": noise, "seed": seed}
    if any(manifest.get(k) != v for k, v in wanted.items()):
        return False
    names = [manifest["pretrained"], *manifest["finetuned"].values()]
    return all((workdir / name).is_file() for name in names)

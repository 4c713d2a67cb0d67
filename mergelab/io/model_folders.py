"""The files of a Hugging Face model folder beside its weights (config, tokenizer,
generation settings), carried over to a model derived from it, and the sizes its
weights are cut into."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from pathlib import Path

import torch

from mergelab.engine.model_files import INDEX
from mergelab.errors import BadValue

# the weights and what describes them: written anew, never copied
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", INDEX, "*.bin.index.json")
CARD = "README.md"  # the model card, written anew for the derived model
CONFIG = "config.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def companion_files(folder: Path) -> list[Path]:
    """The top-level files of ``folder`` other than weights, the model card and hidden
    files, by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.name != CARD
        and not any(fnmatch.fnmatch(path.name, pattern) for pattern in WEIGHT_PATTERNS)
    )


def copy_companions(folder: Path, target: Path, dtype: torch.dtype | None) -> list[str]:
    """The companion files of ``folder`` copied into ``target``; a ``config.json`` that
    states the weights' dtype is told ``dtype`` (when given). Returns the names copied."""
    names = []
    for path in companion_files(folder):
        if path.name == CONFIG and dtype is not None:
            (target / CONFIG).write_text(_config_with_dtype(path, dtype))
        else:
            shutil.copy2(path, target / path.name)
        names.append(path.name)
    return names


def _config_with_dtype(path: Path, dtype: torch.dtype) -> str:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadValue(f"{path}: not JSON ({err})") from err
    name = str(dtype).removeprefix("torch.")
    # transformers writes torch_dtype (and, since 4.56, dtype): both say what the weights are
    for field in ("torch_dtype", "dtype"):
        if field in config:
            config[field] = name
    return json.dumps(config, indent=2) + "\n"


def parse_size(size: str | int) -> int:
    """Bytes of ``size``: an integer, or a number with a unit as ``save_pretrained``'s
    ``max_shard_size`` takes it ("5GB" = 5·10⁹, "2GiB" = 2·2³⁰)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if match is None:
            raise BadValue(f"max_shard_size: {size!r} is not a size such as '5GB' or '500MiB'")
        value = int(float(match[1]) * _UNITS[(match[2] or "B").upper()])
    if value < 1:
        raise BadValue(f"max_shard_size must be positive, got {size!r}")
    return value

"""Where a model named by the user lives: a local file or folder, or a Hugging Face hub
id (``org/name``) resolved to its snapshot in the hub cache by ``snapshot_download``,
which honours HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE as the hub's own tools do."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mergelab.errors import MissingFile

# suffixes of weights files: a source with one is a path, never a hub id
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# a model folder's weights, config and tokenizer: what a merge reads and copies; the
# older pytorch_model.bin only where a repository has no safetensors (many have both)
MODEL_FOLDER_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
PICKLED_WEIGHTS = "*.bin"


def looks_like_a_path(source: str) -> bool:
    """A local path rather than a hub id (``org/name``): absolute, relative with ``./``
    or ``../``, in the home folder, or a weights file's name."""
    return source.startswith(("/", "./", "../", "~")) or source.endswith(WEIGHT_SUFFIXES)


def hub_snapshot(repo_id: str, role: str, allow_patterns: Sequence[str]) -> Path:
    """The local snapshot of hub model ``repo_id`` (downloaded unless offline), the files
    of ``allow_patterns`` only; ``role`` names the model in errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns)))
    except HFValidationError as err:
        raise MissingFile(f"{role} {repo_id!r} is neither a local path nor a hub id") from err
    except OSError as err:  # offline, unknown repo, no network (the hub's errors are OSErrors)
        raise MissingFile(
            f"cannot reach the {role} {repo_id!r} on the Hugging Face hub "
            f"(offline or missing: {type(err).__name__}); download it or give a local path"
        ) from err


def model_source(
    source: str | os.PathLike, role: str, allow_patterns: Sequence[str] = MODEL_FOLDER_FILES
) -> Path:
    """The local file or folder of ``source``: itself when it exists, else its hub
    snapshot; a path that does not exist is refused naming ``role``."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_a_path(str(source)):
        raise MissingFile(f"{role} {str(source)!r}: no such file or folder")
    snapshot = hub_snapshot(str(source), role, allow_patterns)
    if PICKLED_WEIGHTS not in allow_patterns and not any(snapshot.glob("*.safetensors")):
        snapshot = hub_snapshot(str(source), role, (*allow_patterns, PICKLED_WEIGHTS))
    return snapshot

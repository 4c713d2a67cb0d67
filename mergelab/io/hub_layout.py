"""Image classification datasets written in the Hugging Face hub's parquet layout.

``<folder>/data/<split>-00000-of-00001.parquet`` (or ``<folder>/<config>/...`` with the
README front matter that declares the config), which ``datasets.load_dataset(folder)``
reads exactly as it reads the hub's own copies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mergelab.engine.atomic import temporary_path
from mergelab.errors import BadValue


def write_image_split(
    folder: str | os.PathLike,
    split: str,
    images: Sequence,
    labels: Sequence[int],
    config: str | None = None,
    label_column: str = "label",
) -> Path:
    """One split (PIL images and integer labels) as a parquet file, written atomically."""
    import datasets

    if len(images) != len(labels):
        raise BadValue(f"{len(images)} images but {len(labels)} labels for split {split!r}")
    subdir = Path(folder) / (config or "data")
    subdir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), label_column: datasets.Value("int64")})
    table = datasets.Dataset.from_dict(
        {"image": list(images), label_column: [int(v) for v in labels]}, features=features
    )
    path = subdir / f"{split}-00000-of-00001.parquet"
    tmp = temporary_path(path)
    table.to_parquet(str(tmp))
    os.replace(tmp, path)
    return path


def declare_config(folder: str | os.PathLike, config: str, splits: Sequence[str]) -> Path:
    """The README front matter that makes ``<folder>/<config>/`` the named config."""
    files = "\n".join(f"  - split: {split}\n    path: {config}/{split}-*" for split in splits)
    readme = Path(folder) / "README.md"
    readme.write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}\n---\n")
    return readme

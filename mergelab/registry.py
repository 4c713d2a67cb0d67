"""The shipped methods: one file per method in configs/methods/ (its ``merge:`` section and
any data setting it needs), given after a suite's base config::

    mergelab test --config configs/vit_b32/base.yaml --config configs/methods/ties.yaml

The embedded benchmark, the sweeps and the tests list the methods from here, so adding a
method's config file adds it everywhere. The reference rows (zero-shot, fine-tuned) come
first, then every other method by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from mergelab.errors import BadValue

# configs/ sits beside the package in a source checkout (the README installs it editable)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHOD_CONFIGS = CONFIGS / "methods"
REFERENCES = ("zero_shot", "finetuned")


@dataclass(frozen=True)
class MethodConfig:
    """One configs/methods/<name>.yaml: its merge method's class path and settings."""

    name: str
    path: Path
    class_path: str
    init_args: dict

    @property
    def class_name(self) -> str:
        return self.class_path.rpartition(".")[2]

    @property
    def multitask(self) -> dict | None:
        """The τMTL method of a TALL masks or consensus config (None: Σ τt)."""
        return self.init_args.get("multitask")


def read_method_config(path: Path) -> MethodConfig:
    """A method config file, with a clear error when it holds no merge method."""
    document = yaml.safe_load(path.read_text()) or {}
    method = (document.get("merge") or {}).get("method")
    if not isinstance(method, dict) or "class_path" not in method:
        raise BadValue(f"{path}: no merge.method.class_path")
    return MethodConfig(path.stem, path, method["class_path"], method.get("init_args") or {})


def method_configs(folder: Path = METHOD_CONFIGS) -> dict[str, MethodConfig]:
    """Every method config of ``folder`` by name, the references first."""
    configs = {p.stem: read_method_config(p) for p in sorted(folder.glob("*.yaml"))}
    order = [n for n in REFERENCES if n in configs] + [n for n in configs if n not in REFERENCES]
    return {name: configs[name] for name in order}

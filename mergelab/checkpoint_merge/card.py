"""The model card (README.md) of a merged checkpoint: how it was made, from what, and
which tensors were not merged, with the configuration that makes it again."""

from __future__ import annotations

from collections.abc import Mapping

import yaml


def model_card(
    title: str,
    base: str,
    models: Mapping[str, str],
    description: Mapping,
    dtype: str,
    merged_count: int,
    copied: Mapping[str, str],
    config_yaml: str,
) -> str:
    """Markdown with Hugging Face front matter. ``description``: the method's name and
    settings (``MergeMethod.describe()``); ``copied``: each tensor taken from the base
    unmerged, with the reason."""
    front = {"base_model": [base, *models.values()], "tags": ["mergelab", "merge"]}
    settings = {k: v for k, v in description.items() if k != "method"}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"A merge of {len(models)} fine-tuned models of `{base}`, made with mergelab's "
        f"`{description['method']}` in {dtype}.",
        "",
        "## Method",
        "",
        f"- method: `{description['method']}`",
        *(f"- {name}: `{value!r}`" for name, value in settings.items()),
        "",
        "## Sources",
        "",
        "| role | name | model |",
        "|---|---|---|",
        f"| base | | `{base}` |",
        *(f"| fine-tuned | {name} | `{source}` |" for name, source in models.items()),
        "",
        "## Tensors",
        "",
        f"{merged_count} tensors merged, {len(copied)} copied from the base unmerged"
        + (":" if copied else "."),
        "",
    ]
    if copied:
        lines += ["| tensor | why |", "|---|---|"]
        lines += [f"| `{key}` | {reason} |" for key, reason in copied.items()]
        lines.append("")
    lines += [
        "## Configuration",
        "",
        "`mergelab merge` with this file makes the same model:",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)

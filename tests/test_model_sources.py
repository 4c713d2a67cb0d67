"""Where a named model lives: a local path, or a hub snapshot fetched with the files a
merge needs (pickled weights only where a repository has no safetensors)."""

from __future__ import annotations

import re

import huggingface_hub
import pytest

from mergelab.errors import MissingFile
from mergelab.io.model_sources import model_source


@pytest.mark.parametrize("has_safetensors", [True, False])
def test_pickled_weights_are_fetched_only_without_safetensors(
    tmp_path, monkeypatch, has_safetensors
):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / ("model.safetensors" if has_safetensors else "pytorch_model.bin")).touch()
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(sorted(allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert model_source("org/model", "base model") == snapshot
    assert "*.safetensors" in asked[0] and "*.bin" not in asked[0]
    assert len(asked) == (1 if has_safetensors else 2)
    if not has_safetensors:
        assert "*.bin" in asked[1]


def test_a_local_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(MissingFile, match=re.escape("model 'alpha' './nowhere': no such file")):
        model_source("./nowhere", "model 'alpha'")

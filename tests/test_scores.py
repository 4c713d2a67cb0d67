"""The score cache: counts of right answers kept per (weights, head, samples, computation)
and read instead of running the encoder. Top-1 as torchmetrics computes it; digests that
change with any byte, name, dtype or shape; entries refused by name when edited; and a
later ``mergelab test`` on the embedded test preset that scores the same without running
the encoder, while another batch size runs it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import wandb
from hypothesis import given
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassAccuracy

from mergelab.cli import run
from mergelab.errors import BadValue, NotAFolder
from mergelab.io.scores import ScoreCache, ScoreKey, tensors_digest
from mergelab.lightning import evaluation
from mergelab.lightning.scores import Top1

ROOT = Path(__file__).resolve().parents[1]


@given(
    classes=st.integers(2, 6),
    batches=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_top1_is_torchmetrics_micro_accuracy(classes, batches, seed):
    """Logits of few distinct values (ties, broken towards the first class by both), in
    batches; counts of the later batches added as read give the same value."""
    generator = torch.Generator().manual_seed(seed)
    reference, ours, added = MulticlassAccuracy(classes, average="micro"), Top1(), Top1()
    for i, size in enumerate(batches):
        logits = torch.randint(0, 3, (size, classes), generator=generator).float()
        labels = torch.randint(0, classes, (size,), generator=generator)
        reference.update(logits, labels)
        ours.update(logits, labels)
        if i == 0:
            added.update(logits, labels)
        else:
            right = int((logits.argmax(dim=1) == labels).sum())
            added.update(counts=(right, size))
    expected = float(reference.compute())
    assert float(ours.compute()) == expected and float(added.compute()) == expected
    assert ours.counts() == added.counts()


@st.composite
def state_dicts(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(n, 2, generator=generator) for i, n in enumerate(sizes)}


@given(tensors=state_dicts(), data=st.data())
def test_the_weights_digest_changes_with_any_byte_name_dtype_or_shape(tensors, data):
    digest = tensors_digest(tensors)
    assert tensors_digest(dict(reversed(tensors.items()))) == digest  # order: not part of it
    key = data.draw(st.sampled_from(sorted(tensors)))
    flat = tensors[key].reshape(-1)
    i = data.draw(st.integers(0, flat.numel() - 1))
    changed = flat.clone()
    changed[i] = torch.nextafter(changed[i], torch.tensor(float("inf")))  # one ulp
    variants = [
        {**tensors, key: changed.reshape(tensors[key].shape)},
        {**{k: v for k, v in tensors.items() if k != key}, key + "_": tensors[key]},
        {**tensors, key: tensors[key].view(torch.int32)},  # same bytes, another dtype
        {**tensors, key: tensors[key].reshape(-1)},  # same bytes, another shape
    ]
    assert len({digest, *(tensors_digest(v) for v in variants)}) == 1 + len(variants)


KEY = ScoreKey(weights="w", head="h", samples="s shard 0 of 1", computation="c")


def test_an_entry_is_read_back_only_for_its_own_key(tmp_path):
    cache = ScoreCache(tmp_path / "scores")
    assert cache.read(KEY) is None
    cache.write(KEY, 7, 16)
    assert cache.read(KEY) == (7, 16)
    assert cache.read(ScoreKey("w", "h", "s shard 1 of 2", "c")) is None
    assert [p.name for p in cache.path(KEY).parent.iterdir()] == [cache.path(KEY).name]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a score entry"),
        (lambda entry: {**entry, "key": {**entry["key"], "weights": "x"}}, "another key"),
        (lambda entry: {**entry, "right": 17}, "counts 17 of 16"),
    ],
)
def test_an_edited_entry_is_refused_by_name(tmp_path, content, message):
    cache = ScoreCache(tmp_path)
    cache.write(KEY, 7, 16)
    path = cache.path(KEY)
    entry = json.loads(path.read_text())
    path.write_text(content if isinstance(content, str) else json.dumps(content(entry)))
    with pytest.raises(BadValue, match=message) as error:
        cache.read(KEY)
    assert str(path) in str(error.value)


def test_a_cache_folder_where_a_file_stands_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotAFolder, match="the score cache"):
        ScoreCache(tmp_path / "file" / "scores")


RUN = ["-c", "configs/embedded/base.yaml", "-c", "configs/methods/task_arithmetic.yaml",
       "--merge.method.scaling_factor=[0.3, 0.5]", "--report.print_table=false",
       "--trainer.enable_progress_bar=false", "--trainer.logger=false"]  # fmt: skip


def test_a_later_run_reads_its_scores_and_another_batch_size_computes_them(
    embedded_cache, monkeypatch, tmp_path
):
    """Two λ on validation, the pick on test: 24 entries. The same run again scores the
    same with no encoder pass and writes nothing; at another batch size the encoder runs
    again (a key of its own), with the same results."""
    monkeypatch.setenv("MERGELAB_CACHE", str(embedded_cache))
    monkeypatch.setenv("MERGELAB_EMBEDDED_PRESET", "test")
    monkeypatch.chdir(ROOT)
    passes = []
    logits = evaluation.zero_shot_logits

    def counted(features, head, scale):
        passes.append(len(features))
        return logits(features, head, scale)

    monkeypatch.setattr(evaluation, "zero_shot_logits", counted)
    scores = tmp_path / "scores"

    def scored(name: str, *options: str) -> tuple[dict, int]:
        passes.clear()
        run(["test", *RUN, f"--model.score_cache={scores}",
             f"--trainer.default_root_dir={tmp_path / name}", *options])  # fmt: skip
        wandb.finish()
        [results] = (tmp_path / name).rglob("results.json")
        data = json.loads(results.read_text())
        return {k: data[k] for k in ("accuracy", "picked", "headline")}, sum(passes)

    first, images = scored("first")
    entries = {p: p.stat().st_mtime_ns for p in scores.rglob("*.json")}
    tasks = len(first["picked"])
    assert len(entries) == tasks * 3 and images > 0  # 2 settings on val, 1 on test
    again, images_again = scored("again")
    assert again == first and images_again == 0
    assert {p: p.stat().st_mtime_ns for p in scores.rglob("*.json")} == entries
    other, images_other = scored("other", "--data.batch_size=5")
    assert other == first and images_other == images
    assert len(list(scores.rglob("*.json"))) == 2 * len(entries)

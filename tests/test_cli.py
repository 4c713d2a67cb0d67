"""``mergelab test`` / ``validate`` end to end, through the installed console script, on local
mirrors of the hub (tests/mirror.py): a tiny registered open_clip model, three built-in
tasks read from parquet mirrors, fine-tuned encoders given as a hub id (served from a hub
cache offline), a Hugging Face folder and an open_clip safetensors file."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import mirror
from console import needs_cli, run_console, run_mergelab

from mergelab.registry import CONFIGS, method_configs

TASKS = mirror.THREE_TASKS
pytestmark = needs_cli


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return mirror.write_merge_run(tmp_path_factory.mktemp("mirror"))


def mergelab(assets: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_mergelab(assets, *args, expect_ok=expect_ok, HF_HUB_CACHE=str(assets / "hub"))


def run_dir(assets: Path, method: str) -> Path:
    versions = sorted((assets / "lightning_logs" / method).glob("version_*"))
    return versions[-1]


# each method's class (what --merge.method names) and its run folder's name
METHODS = {
    "zero_shot": "ZeroShot",
    "finetuned": "Finetuned",
    "task_arithmetic": "TaskArithmetic",
    "trust_region": "TrustRegion",
    "tall_masks": "TallMasks",
    "consensus": "Consensus",
}


def scored(assets: Path, method: str, *args: str) -> tuple[Path, dict]:
    """``mergelab test`` with a method: the run's folder and its results.json."""
    mergelab(assets, "test", "-c", "base.yaml", f"--merge.method={METHODS[method]}", *args)
    folder = run_dir(assets, method)
    return folder, json.loads((folder / "results.json").read_text())


def test_task_arithmetic_picks_on_validation_and_writes_every_output(assets):
    folder, results = scored(
        assets,
        "task_arithmetic",
        "--merge.method.scaling_factor=[0.3, 0.6]",
        "--data.test_splits=[val, test]",
    )
    assert results["schema"] == "mergelab.results/1"
    assert results["tasks"] == TASKS
    assert set(results["accuracy"]) == {"task_arithmetic@0.3", "task_arithmetic@0.6"}
    assert results["picked_on"] == "val"
    picked = set(results["picked"].values())
    assert len(picked) == 1  # one λ for all tasks: the best average validation accuracy
    best = max(results["accuracy"], key=lambda n: sum(results["accuracy"][n]["val"].values()))
    assert picked == {best}
    assert results["headline"]["accuracy"] == results["accuracy"][best]["test"]
    # only the pick is scored on test, with the numbers a run of that setting alone gives
    assert [n for n, by_split in results["accuracy"].items() if "test" in by_split] == [best]
    alone = best.split("@")[1]
    _, single = scored(assets, "task_arithmetic", f"--merge.method.scaling_factor={alone}")
    assert single["headline"]["accuracy"] == results["headline"]["accuracy"]
    assert "| task_arithmetic@0.3 |" in (folder / "results.md").read_text()
    assert (folder / "accuracy.png").stat().st_size > 1000
    with open(folder / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["test/mnist/acc"]) == pytest.approx(results["headline"]["accuracy"]["mnist"])
    assert "test/avg_acc" in row
    delta = folder / "merged_task_vector.safetensors"
    assert delta.is_file()
    # zero-shot heads and converted encoders are cached for the next run
    heads = sorted(p.name.split("-")[0] for p in (assets / "cache" / "heads").iterdir())
    assert heads == sorted(TASKS)
    assert len(list((assets / "cache" / "encoders").iterdir())) == 2  # the two HF models
    assert list((assets / "lightning_logs" / "wandb").glob("offline-run-*"))


def test_zero_shot_accuracy_matches_a_direct_computation(assets):
    import datasets
    import open_clip

    _, results = scored(assets, "zero_shot")

    open_clip.add_model_config(assets / "clip" / f"{mirror.TINY}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        mirror.TINY, pretrained=str(assets / "clip" / f"{mirror.TINY}.pt")
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(mirror.TINY)
    from mergelab.tasks import load_task

    spec = load_task("mnist")
    with torch.no_grad():
        head = []
        for name in spec.classnames:
            texts = [template.format(c=name) for template in spec.templates]
            emb = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(0)
            head.append(F.normalize(emb, dim=-1))
        head = torch.stack(head)
        data = datasets.load_dataset(str(assets / "data" / "ylecun/mnist"), split="test")
        images = torch.stack([preprocess(row["image"].convert("RGB")) for row in data])
        features = F.normalize(model.encode_image(images), dim=-1)
        predictions = (model.logit_scale.exp() * features @ head.T).argmax(-1)
    accuracy = (predictions == torch.tensor(data["label"])).float().mean().item()
    assert results["accuracy"]["zero_shot"]["test"]["mnist"] == pytest.approx(accuracy)


def test_tall_masks_pick_lambda_per_task(assets):
    folder, results = scored(
        assets, "tall_masks", "--merge.method.lambdas=[0.2, 0.6]", "--data.test_splits=[val, test]"
    )
    for task in TASKS:
        val = {n: results["accuracy"][n]["val"][task] for n in results["accuracy"]}
        assert val[results["picked"][task]] == max(val.values())
    from mergelab import TallMasks

    masks = TallMasks.load(folder / "tall_masks.safetensors")
    assert masks.tasks == TASKS and masks.lambdas == [0.2, 0.6]


def test_finetuned_then_consensus_normalized_by_it(assets):
    mergelab(assets, "test", "-c", "base.yaml", "--merge.method=Finetuned")
    reference = run_dir(assets, "finetuned") / "results.json"
    # a random tiny model may score 0 on a task, which cannot normalise anything
    document = json.loads(reference.read_text())
    for task, value in document["headline"]["accuracy"].items():
        document["headline"]["accuracy"][task] = value or 0.5
    reference.write_text(json.dumps(document))
    mergelab(
        assets, "test", "-c", "base.yaml", "--merge.method=Consensus", "--merge.method.k=2",
        "--merge.method.tall_lambda=0.6",
        f"--model.finetuned_accuracy={reference}",
    )  # fmt: skip
    results = json.loads((run_dir(assets, "consensus") / "results.json").read_text())
    finetuned = json.loads(reference.read_text())["headline"]["accuracy"]
    assert results["finetuned_accuracy"] == finetuned
    headline = results["headline"]
    expected = {t: headline["accuracy"][t] / finetuned[t] for t in TASKS}
    for task, value in expected.items():
        assert headline["normalized_accuracy"][task] == pytest.approx(value)


def test_validate_scores_validation_splits(assets):
    mergelab(assets, "validate", "-c", "base.yaml", "--merge.method=TrustRegion")
    folder = run_dir(assets, "trust_region")
    results = json.loads((folder / "results_val.json").read_text())
    assert results["stage"] == "val"
    assert set(results["accuracy"]["trust_region@0.3"]) == {"val"}


def test_an_unknown_task_is_refused():
    from mergelab.lightning.data import TaskDataModule

    with pytest.raises(KeyError, match="no_such_task"):
        TaskDataModule(tasks=["mnist", "no_such_task"])


def test_unreachable_hub_id_is_named(assets):
    from mergelab.models.clip import load_image_encoder

    visual = mirror.pretrained_visual(assets / "clip" / f"{mirror.TINY}.pt")
    with pytest.raises(FileNotFoundError, match="mergelab-test/not_mirrored"):
        load_image_encoder("mergelab-test/not_mirrored", visual, assets / "cache")


def test_dataset_without_label_column_and_labels_outside_classes(tmp_path):
    from mergelab.tasks import load_task
    from mergelab.tasks.splits import load_split

    mirror.write_dataset(tmp_path, "ylecun/mnist", 10, {"train": 20}, label_column="y")
    with pytest.raises(ValueError, match=r"'mnist'.*no column 'label'"):
        load_split(load_task("mnist"), "train", tmp_path)
    mirror.write_dataset(tmp_path, "tanganke/eurosat", 12, {"train": 60}, seed=3)
    with pytest.raises(ValueError, match=r"'eurosat'.*label 1[01] outside its 10 classes"):
        load_split(load_task("eurosat"), "train", tmp_path)


SUITES = sorted(p.parent for p in CONFIGS.glob("vit_*/base.yaml"))
GRADIENT_CONFIGS = [suite / "trust_region_gradients.yaml" for suite in SUITES]
SHIPPED_METHODS = method_configs()


def printed_config(subcommand: str, configs: list[Path], capsys) -> dict:
    from mergelab.cli import run

    with pytest.raises(SystemExit) as exit_:
        run([subcommand, *(f"--config={c}" for c in configs), "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def assert_composed(printed: dict, method) -> None:
    assert printed["merge"]["method"]["class_path"] == method.class_path
    assert list(printed["model"]["finetuned"]) == printed["data"]["tasks"]


@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.name)
def test_every_suite_base_composes_with_a_method(suite, capsys):
    method = SHIPPED_METHODS["task_arithmetic"]
    assert_composed(printed_config("test", [suite / "base.yaml", method.path], capsys), method)


@pytest.mark.parametrize("name", list(SHIPPED_METHODS))
def test_every_method_config_composes_with_a_base(name, capsys):
    """Each configs/methods file over a real suite's base: its class and settings, the
    base's model and tasks; a method's own data setting (test_splits) over the base's."""
    method = SHIPPED_METHODS[name]
    printed = printed_config("test", [CONFIGS / "vit_b32" / "base.yaml", method.path], capsys)
    assert_composed(printed, method)
    assert printed["model"]["model"] == "ViT-B-32-quickgelu"
    for key, value in method.init_args.items():
        given = printed["merge"]["method"]["init_args"][key]
        assert given == value or (
            isinstance(value, dict) and given["class_path"] == value["class_path"]
        )
    expected_splits = ["test"] if name in ("zero_shot", "finetuned") else ["val", "test"]
    assert printed["data"]["test_splits"] == expected_splits


@pytest.mark.parametrize("config", GRADIENT_CONFIGS, ids=str)
def test_every_gradient_statistics_config_parses(config, capsys):
    printed = printed_config("fit", [config], capsys)
    assert printed["model"]["class_path"] == "mergelab.lightning.gradient_stats.GradientStatistics"
    assert list(printed["model"]["init_args"]["finetuned"]) == printed["data"]["tasks"]
    assert printed["data"]["max_samples"] == 128  # TATR's setting
    assert printed["merge"]["method"]["class_path"] == "mergelab.methods.TrustRegion"


USER_METHOD = '''
from mergelab.errors import BadValue
from mergelab.methods import MergeMethod, Variants


class WeightAverage(MergeMethod):
    """The fine-tuned models' mean, θ = Σt θt / T (a user's method, outside mergelab).

    Args:
        shrink: the share of the average's task vector kept.
    """

    min_tasks = 2

    def __init__(self, shrink: float = 1.0):
        if not 0 < shrink <= 1:
            raise BadValue(f"shrink must be in (0, 1], got {shrink}")  # bad input: exit 2
        self.shrink = shrink

    def variants(self, context):
        pool = context.pool()
        model = {}
        for key, theta0 in pool.pretrained.items():
            if key in pool.merged_keys:
                mean = sum(pool.finetuned[t][key] for t in pool.tasks) / len(pool.tasks)
                model[key] = theta0 + self.shrink * (mean - theta0)
            else:
                model[key] = theta0.clone()
        return Variants([self.name], shared={self.name: model})
'''


def test_a_users_own_method_plugs_in_by_class_path(assets, monkeypatch, capsys):
    (assets / "user_methods.py").write_text(USER_METHOD)
    path = {"PYTHONPATH": str(assets)}
    method = "--merge.method=user_methods.WeightAverage"
    monkeypatch.syspath_prepend(str(assets))  # what PYTHONPATH does for the console script
    code, help_text, _ = run_console(monkeypatch, capsys, assets, "test", "--merge.method.help",
                                     "user_methods.WeightAverage")  # fmt: skip
    assert code == 0
    assert "--merge.method.shrink" in help_text and "scaling_factor" not in help_text
    code, _, error = run_console(monkeypatch, capsys, assets, "test", "-c", "base.yaml", method,
                                 "--merge.method.shrink=2")  # fmt: skip
    assert code == 2 and "shrink must be in (0, 1], got 2" in error
    run_mergelab(assets, "test", "-c", "base.yaml", method, "--merge.method.shrink=0.5",
                 HF_HUB_CACHE=str(assets / "hub"), **path)  # fmt: skip
    results = json.loads((run_dir(assets, "weight_average") / "results.json").read_text())
    assert results["settings"] == {"method": "weight_average", "shrink": 0.5}
    assert set(results["accuracy"]) == {"weight_average"}


RECORDING_METHOD = """
import json

from mergelab.methods import MergeMethod, Variants


class RecordsBuilds(MergeMethod):
    \"\"\"θ0 and each task's fine-tuned model as two settings chosen per task, writing
    which models each task's build was asked for.\"\"\"

    def __init__(self, record: str):
        self.record = record

    def variants(self, context):
        pool = context.pool()

        def per_task(task, names):
            with open(self.record, "a") as handle:
                handle.write(json.dumps([task, names]) + "\\n")
            models = {"records_builds@0": pool.pretrained, "records_builds@1": pool.finetuned[task]}
            return {name: dict(models[name].items()) for name in names}

        return Variants(["records_builds@0", "records_builds@1"], per_task=per_task)
"""


def test_a_test_run_builds_only_the_picked_model_of_a_task_for_test(assets):
    (assets / "recording_methods.py").write_text(RECORDING_METHOD)
    record = assets / "builds.jsonl"
    record.unlink(missing_ok=True)
    method = "--merge.method=recording_methods.RecordsBuilds"
    run_mergelab(assets, "test", "-c", "base.yaml", method, f"--merge.method.record={record}",
                 "--data.test_splits=[val, test]", HF_HUB_CACHE=str(assets / "hub"),
                 PYTHONPATH=str(assets))  # fmt: skip
    results = json.loads((run_dir(assets, "records_builds") / "results.json").read_text())
    builds = [json.loads(line) for line in record.read_text().splitlines()]
    everything = ["records_builds@0", "records_builds@1"]
    # every task's validation first, with both settings; then its test, the pick alone
    expected = [[t, everything] for t in TASKS] + [[t, [results["picked"][t]]] for t in TASKS]
    assert builds == expected
    for task in TASKS:
        on_test = {n for n in everything if task in results["accuracy"][n].get("test", {})}
        assert on_test == {results["picked"][task]}


@pytest.mark.parametrize(
    "method, own, others",
    [
        ("TaskArithmetic", ["scaling_factor"], ["threshold_quantile", "lambdas", "k"]),
        (
            "TrustRegion",
            ["scaling_factor", "threshold_quantile", "gradient_stats", "ties"],
            ["lambdas", "k"],
        ),
        ("TallMasks", ["lambdas", "multitask"], ["scaling_factor", "k"]),
        (
            "Consensus",
            ["k", "tall_lambda", "tall_results", "scaling_factor", "multitask"],
            ["lambdas"],
        ),
        ("Ties", ["scaling_factor", "keep", "disjoint_mean"], ["lambdas", "drop_rate"]),
        ("Dare", ["scaling_factor", "drop_rate", "seed", "ties"], ["keep", "lambdas"]),
        ("TaskSingularVectors", ["scaling_factor"], ["keep", "common_subspace"]),
        ("Isotropic", ["scaling_factor", "common_subspace"], ["keep", "lambdas"]),
    ],
)
def test_help_of_a_method_lists_exactly_its_settings(method, own, others, capsys):
    from mergelab.cli import run

    with pytest.raises(SystemExit):
        run(["test", "--merge.method.help", method])
    options = set(re.findall(r"--merge\.method\.(\w+)", capsys.readouterr().out)) - {"help"}
    assert options == set(own) and not options & set(others)


@pytest.mark.parametrize(
    "words, verbose, parsed",
    [
        (["test", "-c", "a.yaml"], False, ["test", "--verbose=false", "-c", "a.yaml"]),
        (["test", "--verbose"], True, ["test", "--verbose=true"]),
        (["fit", "--verbose", "false", "-c", "a"], False, ["fit", "--verbose", "false", "-c", "a"]),
        (["test", "--verbose=True"], True, ["test", "--verbose=True"]),
        (["test", "--verbose", "-c", "a"], True, ["test", "--verbose=true", "-c", "a"]),
    ],
)
def test_verbose_is_read_from_the_command_line_and_spelled_for_the_parser(words, verbose, parsed):
    from mergelab.cli import verbosity

    assert verbosity(words) == (verbose, parsed)

"""The README's Python examples run as written, and its commands are the ones CI runs."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_choose_lambdas_output_is_true(capsys):
    block = next(b for b in BLOCKS if "choose_lambdas" in b)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "{'mnist': 0.3, 'svhn': 0.4, 'dtd': 0.2}" in printed


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    test_command = commands.splitlines()[1].split("#")[0].strip()
    assert "pytest" in test_command
    ci_lines = (README.parent / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


@pytest.mark.parametrize("name", ["README.md", "mergelab/usage.py"])
def test_every_config_named_in_the_docs_exists(name):
    """The config files the README and ``mergelab --help`` tell users to run are there."""
    text = (README.parent / name).read_text()
    named = set(re.findall(r"configs/[\w./-]+\.yaml", text))
    assert named, f"{name} names no config file"
    missing = sorted(path for path in named if not (README.parent / path).is_file())
    assert not missing, f"{name} names {missing}, which are not in configs/"

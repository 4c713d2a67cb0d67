"""Test setup: no network, a bounded hypothesis budget, the repository importable."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# deadline=None: the first example of a test pays torch's warm-up; 40 examples per
# property keep the whole suite within about a minute on two cores. Under CI (CI=true)
# the examples are the same on every run, so that a submission lands or not on its own
# merits; elsewhere each run draws new ones.
settings.register_profile(
    "mergelab",
    deadline=None,
    max_examples=40,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mergelab"))


@pytest.fixture(scope="session", autouse=True)
def _cache_of_the_session(tmp_path_factory):
    """mergelab's default cache (decoded images, converted checkpoints) in a folder of
    this session, not the user's ~/.cache/mergelab; tests that need their own set it."""
    os.environ.setdefault("MERGELAB_CACHE", str(tmp_path_factory.mktemp("mergelab-cache")))


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """A cache folder holding the embedded benchmark's ``test`` preset, built once per
    session. Runs find it with MERGELAB_CACHE=<folder> MERGELAB_EMBEDDED_PRESET=test."""
    from mergelab.embedded.build import EmbeddedBenchmark

    cache = tmp_path_factory.mktemp("embedded-cache")
    EmbeddedBenchmark("test", str(cache)).ensure()
    return cache


@pytest.fixture(scope="session")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A tiny bf16 Llama base and three fine-tuned copies in shards (tests.tiny_transformers)."""
    from tests.tiny_transformers import tiny_llamas

    return tiny_llamas(tmp_path_factory.mktemp("llamas"))


def embedded_env(cache: Path) -> dict[str, str]:
    """The environment of a subprocess that uses the ``test`` preset in ``cache``."""
    return dict(os.environ, MERGELAB_CACHE=str(cache), MERGELAB_EMBEDDED_PRESET="test")


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test starts from the same environment: what a run in this process sets
    (Lightning's global seed, W&B's quiet default, the embedded preset) would otherwise
    reach the later tests' runs and their subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

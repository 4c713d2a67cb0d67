"""The decoded-image cache: written once, then read instead of decoding, giving exactly
the tensors a decoding read gives; keyed by the data, the rows and the preprocessing; a
copied or damaged entry and a cache folder that is a file are named."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).parent))
import mirror

from mergelab.errors import BadValue, NotAFolder
from mergelab.lightning.data import TaskDataModule

DECODED = []  # one entry per image the pixel steps decode


class CountedResize(transforms.Resize):
    """Resize that counts its calls (its repr is Resize's: the settings key the cache)."""

    def forward(self, image):
        DECODED.append(1)
        return super().forward(image)


def clip_like(size: int = 24) -> transforms.Compose:
    """open_clip's evaluation transform, at a small size."""
    return transforms.Compose(
        [
            CountedResize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
        ]
    )


def scored(root: Path, cache, transform=None, **options) -> list[tuple[torch.Tensor, int]]:
    """Every test sample of mnist and eurosat as the test dataloaders serve them."""
    module = TaskDataModule(
        ["mnist", "eurosat"], batch_size=7, num_workers=0, dataset_root=str(root),
        decoded_cache=cache, **options,
    )  # fmt: skip
    transform = transform or clip_like()
    module.set_transforms(transform, transform)
    return [
        (image, int(label))
        for loader in module.test_dataloader()
        for images, labels in loader
        for image, label in zip(images, labels, strict=True)
    ]


def test_a_second_read_decodes_nothing_and_serves_the_same_tensors(tmp_path):
    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    cache = tmp_path / "cache"
    DECODED.clear()
    decoding = scored(tmp_path / "data", False)
    assert len(DECODED) == 46
    DECODED.clear()
    first = scored(tmp_path / "data", str(cache))
    assert len(DECODED) == 46 + 2  # written once, and each split's first for its size
    DECODED.clear()
    second = scored(tmp_path / "data", str(cache))
    assert DECODED == []  # read back, not decoded
    for a, b, c in zip(decoding, first, second, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[1] == b[1] == c[1]
    entries = sorted(p.parent.relative_to(cache) for p in cache.rglob("meta.json"))
    assert [str(p.parent) for p in entries] == ["eurosat", "mnist"]
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]  # no temporaries

    # other rows, another preprocessing, the data rewritten: an entry of their own
    DECODED.clear()
    scored(tmp_path / "data", str(cache), max_samples=11)
    assert len(DECODED) == 22 + 2
    DECODED.clear()
    scored(tmp_path / "data", str(cache), transform=clip_like(20))
    assert len(DECODED) == 46 + 2
    mirror.write_dataset(tmp_path / "data", "ylecun/mnist", 10, {"train": 30, "test": 23}, seed=7)
    DECODED.clear()
    rewritten = scored(tmp_path / "data", str(cache))
    assert len(DECODED) == 23 + 1  # mnist again, eurosat read back
    assert not torch.equal(rewritten[0][0], first[0][0])
    assert len(list(cache.rglob("meta.json"))) == 7


def test_a_moved_dataset_folder_keeps_its_entries(tmp_path):
    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    scored(tmp_path / "data", str(tmp_path / "cache"))
    (tmp_path / "data").rename(tmp_path / "moved")
    DECODED.clear()
    scored(tmp_path / "moved", str(tmp_path / "cache"))
    assert DECODED == []


def test_a_copied_or_damaged_entry_is_named(tmp_path):
    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    cache = tmp_path / "cache"
    scored(tmp_path / "data", str(cache))
    meta_file = next((cache / "mnist").glob("test-*/meta.json"))
    meta = json.loads(meta_file.read_text())
    meta["key"]["dataset"] = "0123456789abcdef"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BadValue, match=rf"{meta_file}: decoded images of dataset '0123456789ab"):
        scored(tmp_path / "data", str(cache))

    images = next((cache / "eurosat").glob("test-*/images.npy"))
    images.write_bytes(images.read_bytes()[:-100])  # cut short
    meta_file.unlink()  # mnist is written again; eurosat is read and refused
    with pytest.raises(BadValue, match=rf"{images}: holds uint8 \(23, 24, 24, 3\)"):
        scored(tmp_path / "data", str(cache))


def test_a_cache_folder_that_is_a_file_is_refused_before_any_data_is_read(tmp_path):
    (tmp_path / "cache").write_text("")
    with pytest.raises(NotAFolder, match=rf"decoded-image cache {tmp_path / 'cache'}/entries"):
        TaskDataModule(["mnist"], decoded_cache=str(tmp_path / "cache" / "entries"))


class CropByContent:
    """A pixel step whose output size depends on the image: nothing one array can hold."""

    def __call__(self, image):
        side = 8 + int(np.asarray(image).mean()) % 5
        return image.crop((0, 0, side, side))

    def __repr__(self) -> str:
        return "CropByContent()"


def test_images_of_several_sizes_are_named_and_leave_no_entry(tmp_path):
    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    varying = transforms.Compose([CropByContent(), transforms.ToTensor()])
    with pytest.raises(BadValue, match=r"task 'mnist' test: image \d+ preprocesses to uint8"):
        scored(tmp_path / "data", str(tmp_path / "cache"), transform=varying)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_transform_whose_settings_are_hidden_is_not_cached(tmp_path):
    """A step without a repr of its settings cannot key the cache: decoded on every read."""

    class Hidden:
        def __call__(self, image):
            DECODED.append(1)
            return image

    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    hidden = transforms.Compose([Hidden(), transforms.ToTensor()])
    DECODED.clear()
    scored(tmp_path / "data", str(tmp_path / "cache"), transform=hidden)
    scored(tmp_path / "data", str(tmp_path / "cache"), transform=hidden)
    assert len(DECODED) == 92
    assert not (tmp_path / "cache").exists()


def test_tensor_steps_other_than_to_tensor_and_normalize_run_image_by_image(tmp_path):
    """Steps after ToTensor other than open_clip's Normalize: the same tensors as decoding."""
    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    steps = [*clip_like().transforms[:3], transforms.Normalize((0.5,), (0.2,)), torch.tanh]
    transform = transforms.Compose(steps)
    decoding = scored(tmp_path / "data", False, transform=transform)
    scored(tmp_path / "data", str(tmp_path / "cache"), transform=transform)
    cached = scored(tmp_path / "data", str(tmp_path / "cache"), transform=transform)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(decoding, cached, strict=True))


def test_a_writer_that_fails_still_releases_the_processes_waiting_for_it(tmp_path):
    """In a distributed run the other processes wait at a barrier for the one that
    decodes: when decoding fails, it reaches the barrier before raising, and they find no
    entry and stop too, instead of waiting until the strategy's timeout."""
    from mergelab.io.decoded_images import DecodedImageCache
    from mergelab.lightning.decoded import serve_decoded

    mirror.write_three_tasks(tmp_path / "data", {"train": 30, "test": 23})
    module = TaskDataModule(["mnist"], num_workers=0, dataset_root=str(tmp_path / "data"),
                            decoded_cache=str(tmp_path / "cache"))  # fmt: skip
    varying = transforms.Compose([CropByContent(), transforms.ToTensor()])
    module.set_transforms(varying, varying)
    spec = module.specs[0]
    request = module._decode_request(spec, "test", module.split(spec, "test"))
    cache, waited = DecodedImageCache(tmp_path / "cache"), []
    with pytest.raises(BadValue, match="preprocesses to uint8"):
        serve_decoded(cache, [request], 0, writes=True, wait=lambda: waited.append("writer"))
    with pytest.raises(RuntimeError, match="was not written: the process that decodes"):
        serve_decoded(cache, [request], 0, writes=False, wait=lambda: waited.append("other"))
    assert waited == ["writer", "other"]

"""Datasets: the bundled faces/digits, and the on-disk cifar10 / celeba / lsun / folder:PATH loaders
(checked on tiny fake copies of each layout written to tmp_path; nothing is downloaded)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deqlit.data.faces import face_split_indices, load_digits, load_faces
from deqlit.data.folders import (CELEBA_CROP_BOX, DatasetNotFoundError, dataset_path,
                                 expected_layout, load_local_dataset)
from deqlit.data.registry import load_images


def assert_unit_range(images: torch.Tensor, min_span: float = 1.5) -> None:
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.max() - images.min() >= min_span  # uses most of [-1, 1], not a squashed range


# --- bundled sets ------------------------------------------------------------------------------

def test_faces_shapes_range_and_channels():
    train, test = load_faces("train", 32, 1), load_faces("test", 32, 1)
    assert train.shape == (84, 1, 32, 32) and test.shape == (16, 1, 32, 32)
    assert_unit_range(train)
    assert_unit_range(test)
    rgb = load_faces("test", 32, 3)
    assert rgb.shape == (16, 3, 32, 32)
    assert torch.equal(rgb[:, 0], rgb[:, 2]) and torch.equal(rgb[:, :1], test)


def test_faces_split_is_disjoint_and_fixed():
    train, test = face_split_indices("train"), face_split_indices("test")
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(100))
    assert face_split_indices("train") == train and face_split_indices("test") == test


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_shapes_and_range(resolution):
    train, test = load_digits("train", resolution, 1), load_digits("test", resolution, 1)
    assert train.shape == (1617, 1, resolution, resolution)
    assert test.shape == (180, 1, resolution, resolution)
    assert_unit_range(train)


# --- cifar10 -----------------------------------------------------------------------------------

def write_cifar(root: Path, per_batch: int = 3) -> Path:
    """The python-version layout: one pickled dict per batch, b'data' uint8 (N, 3072).

    Image k of the whole set (train batches, then test) has red = k, green = 255, blue = 0.
    """
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((per_batch, 3, 1024), np.uint8)
        data[:, 0] = np.arange(b * per_batch, (b + 1) * per_batch)[:, None]
        data[:, 1] = 255
        batch = {b"batch_label": name.encode(), b"labels": [b % 10] * per_batch,
                 b"data": data.reshape(per_batch, 3072),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    return folder


def test_cifar10_reads_the_python_batches(tmp_path):
    write_cifar(tmp_path)
    train = load_local_dataset("cifar10", "train", 32, 3, tmp_path)
    test = load_local_dataset("cifar10", "test", 32, 3, tmp_path)
    assert train.shape == (15, 3, 32, 32) and test.shape == (3, 3, 32, 32)
    # Channel order: the first 1024 bytes of a row are red, then green, then blue.
    assert torch.allclose(train[:, 0, 0, 0], torch.arange(15.0) / 127.5 - 1)
    assert (train[:, 1] == 1).all() and (train[:, 2] == -1).all()
    assert torch.allclose(test[:, 0, 5, 7], torch.arange(15.0, 18.0) / 127.5 - 1)
    gray = load_images("cifar10", "train", 16, 1, str(tmp_path), limit=2)
    assert gray.shape == (2, 1, 16, 16)


def test_cifar10_limit_opens_only_the_batches_needed(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    assert load_local_dataset("cifar10", "train", 32, 3, tmp_path, limit=4).shape[0] == 4
    with pytest.raises(ValueError, match="data_batch_3"):
        load_local_dataset("cifar10", "train", 32, 3, tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but any callable here would run on a plain pickle.load


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode()}))
    with pytest.raises(ValueError, match="test_batch.*refusing"):
        load_local_dataset("cifar10", "test", 32, 3, tmp_path)


# --- celeba ------------------------------------------------------------------------------------

def write_celeba(root: Path, partitions=(0, 0, 0, 1, 2, 2)) -> Path:
    """178x218 JPEGs: blue, with DDIM's crop region red and green = 40 * (file number)."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lines = []
    for k, part in enumerate(partitions, start=1):
        pixels = np.zeros((218, 178, 3), np.uint8)
        pixels[..., 2] = 255
        left, top, right, bottom = CELEBA_CROP_BOX
        pixels[top:bottom, left:right] = (255, 40 * k, 0)
        Image.fromarray(pixels).save(folder / "img_align_celeba" / f"{k:06d}.jpg",
                                     quality=100, subsampling=0)
        lines.append(f"{k:06d}.jpg {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_celeba_crop_resize_and_split(tmp_path):
    write_celeba(tmp_path)
    train = load_local_dataset("celeba", "train", 64, 3, tmp_path)
    valid = load_local_dataset("celeba", "valid", 64, 3, tmp_path)
    test = load_local_dataset("celeba", "test", 64, 3, tmp_path)
    assert train.shape == (3, 3, 64, 64) and valid.shape[0] == 1 and test.shape[0] == 2
    assert load_local_dataset("celeba", "all", 64, 3, tmp_path).shape[0] == 6
    # The crop is exactly the red box: no blue background anywhere (JPEG leaves a few levels).
    assert train[:, 0].min() > 0.9 and train[:, 2].max() < -0.9
    # The split follows list_eval_partition.txt, in file order: test = files 5 and 6.
    green = (test[:, 1].mean(dim=(1, 2)) + 1) * 127.5
    assert torch.allclose(green, torch.tensor([200.0, 240.0]), atol=3)
    assert load_local_dataset("celeba", "train", 64, 3, tmp_path, limit=2).shape[0] == 2


def test_celeba_rejects_other_image_sizes(tmp_path):
    folder = write_celeba(tmp_path)
    Image.new("RGB", (200, 200)).save(folder / "img_align_celeba" / "000001.jpg")
    with pytest.raises(ValueError, match="000001.jpg.*178x218"):
        load_local_dataset("celeba", "train", 64, 3, tmp_path)


def test_celeba_listed_file_missing(tmp_path):
    folder = write_celeba(tmp_path)
    (folder / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="000002.jpg"):
        load_local_dataset("celeba", "train", 64, 3, tmp_path)


# --- lsun / folder:PATH ------------------------------------------------------------------------

def write_folder(folder: Path, count: int = 12) -> None:
    """`count` PNGs of odd sizes in nested folders; each wide image's center square is red."""
    for k in range(count):
        width, height = (60 + k, 30 + k) if k % 2 else (31 + k, 57 + k)
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 2] = 255
        if k % 2:  # wide: its centered height x height square is red, the side strips blue
            left = (width - height) // 2
            pixels[:, left:left + height] = (255, 0, 0)
        path = folder / f"part{k % 3}" / f"img{k:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("name", ["lsun-bedroom", "lsun-church"])
def test_lsun_square_resize_and_split(tmp_path, name):
    write_folder(tmp_path / name)
    (tmp_path / name / ".hidden.png").write_bytes(b"macOS metadata, not an image")
    train = load_local_dataset(name, "train", 24, 3, tmp_path)
    test = load_local_dataset(name, "test", 24, 3, tmp_path)
    everything = load_local_dataset(name, "all", 24, 3, tmp_path)
    assert train.shape == (10, 3, 24, 24) and test.shape == (2, 3, 24, 24)
    assert everything.shape == (12, 3, 24, 24)
    assert_unit_range(everything)
    # Sorted paths part0/img00, part0/img03, ...; 'test' is sorted files 0 and 10, 'train' the rest.
    order = sorted(f"part{k % 3}/img{k:02d}" for k in range(12))
    assert torch.equal(test, everything[[0, 10]])
    assert torch.equal(train, everything[[i for i in range(12) if i not in (0, 10)]])
    wide = everything[[i for i, p in enumerate(order) if int(p[-2:]) % 2]]
    assert wide[:, 0].min() > 0.9 and wide[:, 2].max() < -0.9  # center crop kept only red


def test_folder_path_and_limit_reads_only_what_it_needs(tmp_path):
    write_folder(tmp_path / "mine", count=5)
    (tmp_path / "mine" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 truncated")  # sorts last
    name = f"folder:{tmp_path / 'mine'}"
    assert dataset_path(name, "ignored") == tmp_path / "mine"
    images = load_images(name, "all", 20, 1, root="ignored", limit=5)
    assert images.shape == (5, 1, 20, 20)
    with pytest.raises(ValueError, match="zz_corrupt.jpg"):
        load_local_dataset(name, "all", 20, 3)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    folder = tmp_path / "lsun-bedroom"
    folder.mkdir()
    good = Image.new("RGB", (40, 40), (9, 9, 9))
    good.save(folder / "a.jpg")
    data = (folder / "a.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="a.jpg"):
        load_local_dataset("lsun-bedroom", "all", 16, 3, tmp_path)
    (folder / "a.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image .*a.jpg"):
        load_local_dataset("lsun-bedroom", "all", 16, 3, tmp_path)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py", "data_batch_1", "test_batch", "cifar.html"]),
    ("celeba", ["img_align_celeba", "list_eval_partition.txt", "Align&Cropped", "CelebA"]),
    ("lsun-bedroom", ["*.jpg", "bedroom", "lsun"]),
    ("lsun-church", ["*.jpg", "church_outdoor", "lsun"]),
])
def test_missing_data_names_path_layout_and_source(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as caught:
        load_images(name, "test", 32, 3, root=str(tmp_path))
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert str(tmp_path / name) in message and expected_layout(name, tmp_path) in message
    assert "never downloads" in message
    for text in expected:
        assert text in message
    assert caught.value.path == tmp_path / name


def test_extraction_hints_and_empty_folder(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="extract it"):
        load_local_dataset("cifar10", "train", 32, 3, tmp_path)
    (tmp_path / "lsun-church" / "empty_sub").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=f"folder {tmp_path / 'lsun-church'} holds no"):
        load_local_dataset("lsun-church", "train", 32, 3, tmp_path)


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="faces, digits, cifar10, celeba, lsun-bedroom, "
                                         "lsun-church, folder:PATH"):
        load_images("imagenet", "train", 32, 3, root=str(tmp_path))
    write_folder(tmp_path / "lsun-bedroom", count=2)
    with pytest.raises(ValueError, match="'valid'"):
        load_local_dataset("lsun-bedroom", "valid", 32, 3, tmp_path)
    single = tmp_path / "single"  # one image: it is 'test', so 'train' is empty
    single.mkdir()
    Image.new("RGB", (8, 8)).save(single / "only.png")
    with pytest.raises(ValueError, match="empty.*'all'"):
        load_local_dataset(f"folder:{single}", "train", 32, 3)

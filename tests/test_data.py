"""Datasets: image folders with subfolder labels, Fashion-MNIST IDX files, the procedural set, missing data."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import run
from lightning_modules import data
from lightning_modules.data import (DataNotFoundError, FashionMNISTDataset, ImageFolderDataset, ProceduralDataset,
                                    find_fashion_mnist, read_idx)


def write_idx(path, array: np.ndarray):
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_fashion_mnist(folder, n=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_read_idx_round_trip(tmp_path):
    images, labels = write_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "ints.gz", ints)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.gz"), ints)
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_dataset(tmp_path):
    images, labels = write_fashion_mnist(tmp_path)
    assert find_fashion_mnist(tmp_path, search=(), download_root=None) == tmp_path
    native = FashionMNISTDataset(tmp_path, 28)
    x, y = native[3]
    assert x.shape == (1, 28, 28) and y.item() == labels[3]
    torch.testing.assert_close(x[0], torch.from_numpy(images[3]).float() / 127.5 - 1)
    resized = FashionMNISTDataset(tmp_path, 16, channels=3)
    x, _ = resized[3]
    assert x.shape == (3, 16, 16) and len(resized) == 5
    assert x.min() >= -1 and x.max() <= 1
    # bilinear resizing keeps the mean brightness roughly, and gray is copied to every channel
    assert abs(x.mean().item() - native[3][0].mean().item()) < 0.1
    torch.testing.assert_close(x[0], x[2])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    with pytest.raises(DataNotFoundError) as info:
        find_fashion_mnist(tmp_path / "nowhere", search=(str(tmp_path / "also-not"),), download_root=None)
    message = str(info.value)
    for hint in ("apt-get install dataset-fashion-mnist", "data.path=", "data.name=procedural", "nowhere"):
        assert hint in message
    # through the command line: a message on stderr, no traceback, exit code 2
    monkeypatch.setattr(data, "FASHION_MNIST_SEARCH", ())
    monkeypatch.chdir(tmp_path)  # where a download attempt may create data/
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert run.main(["fit", f"data.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_dataset_labels_resize_and_crop(tmp_path):
    # a 30x10 image: dark | bright | dark thirds; the centre crop of the 10x10 resize keeps the bright third
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255
    write_png(tmp_path / "cats" / "a.png", wide)
    write_png(tmp_path / "cats" / "deeper" / "b.png", np.full((12, 12, 3), 128, dtype=np.uint8))
    write_png(tmp_path / "dogs" / "c.png", np.full((40, 20), 0, dtype=np.uint8))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")

    ds = ImageFolderDataset(tmp_path, resolution=10, class_labels=True)
    assert len(ds) == 3 and ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    items = [ds[i] for i in range(3)]
    assert [y.item() for _, y in items] == [0, 0, 1]
    assert all(x.shape == (3, 10, 10) for x, _ in items)
    assert items[0][0].min() > 0.95  # the bright centre third
    assert items[2][0].max() < -0.99  # a gray file becomes RGB
    gray = ImageFolderDataset(tmp_path, resolution=6, channels=1)
    x, y = gray[1]
    assert x.shape == (1, 6, 6) and y.item() == -1
    torch.testing.assert_close(x, torch.full_like(x, 128 / 127.5 - 1))


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="not a folder"):
        ImageFolderDataset(tmp_path / "missing", 8)
    with pytest.raises(DataNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path, 8)
    write_png(tmp_path / "loose.png", np.zeros((8, 8, 3), dtype=np.uint8))
    assert len(ImageFolderDataset(tmp_path, 8)) == 1
    with pytest.raises(DataNotFoundError, match="loose.png"):
        ImageFolderDataset(tmp_path, 8, class_labels=True)


def test_procedural_is_deterministic_and_labelled():
    a, b = ProceduralDataset(16, size=8), ProceduralDataset(16, size=8)
    for i in range(8):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya.item() == yb.item() == i % 4
        assert xa.shape == (3, 16, 16) and xa.min() >= -1 and xa.max() <= 1
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], ProceduralDataset(16, size=8, seed=1)[0][0])


def test_resident_batches_are_the_datasets_images_drawn_by_step_and_sharded_by_rank(tmp_path):
    write_fashion_mnist(tmp_path, n=7)
    fmnist = FashionMNISTDataset(tmp_path, 16, channels=3)
    images, labels = data.stack_dataset(fmnist, batch_size=3)
    for i in range(7):
        torch.testing.assert_close(images[i], fmnist[i][0], rtol=0, atol=0)
        assert labels[i] == fmnist[i][1]

    procedural = ProceduralDataset(8, size=10)
    images, labels = data.stack_dataset(procedural, batch_size=4)
    assert images.shape == (10, 3, 8, 8) and torch.equal(images[6], procedural[6][0])
    stored = images.half()

    def batches(rank, start=0, count=6):
        it = iter(data.ResidentBatches(stored, labels, batch_size=2, seed=3, rank=rank, world=2,
                                       start_step=lambda: start))
        return [next(it) for _ in range(count)]

    rank0, rank1 = batches(0), batches(1)
    # 10 images, 2 ranks, batches of 2: two batches a rank per epoch, and in an epoch the ranks' 8 images differ
    first0 = torch.cat([x for x, _ in rank0[:2]])
    first1 = torch.cat([x for x, _ in rank1[:2]])
    rows = [tuple(r.flatten().tolist()) for r in torch.cat([first0, first1])]
    assert len(set(rows)) == 8
    # every batch is made of the dataset's images (float16-rounded), as float32
    x, _ = rank0[3]
    assert x.dtype == torch.float32
    assert all(any(torch.equal(img, ref) for ref in stored.float()) for img in x)
    # epochs reshuffle, and batch s depends only on (seed, rank, s): a resumed iterator continues exactly
    assert not torch.equal(torch.cat([x for x, _ in rank0[:2]]), torch.cat([x for x, _ in rank0[2:4]]))
    for (xa, ya), (xb, yb) in zip(rank0[3:], batches(0, start=3, count=3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="fewer than `data.batch_size`"):
        data.ResidentBatches(stored, labels, batch_size=6, seed=0, world=2)

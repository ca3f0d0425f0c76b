"""Image datasets (a folder of images, Fashion-MNIST, a procedural one for tests) and the DataModule.

Every dataset yields ``(image, label)``: a float image (C, H, W) in [-1, 1] at the run's resolution and
a long label (-1 when the dataset has no classes). Datasets expose ``channels``, ``num_classes`` and
``key`` (a short name that identifies the data for the FID statistics cache).
"""
import glob
import gzip
import hashlib
import math
import struct
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_modules.fid import seed_of

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# training reads only the train split; the t10k files may be absent
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
# where Debian's dataset-fashion-mnist package puts the files, then torchvision's download layout
FASHION_MNIST_SEARCH = ("/usr/share/datasets/fashion-mnist", "/usr/share/datasets/*fashion*mnist*",
                        "data/FashionMNIST/raw")
PROCEDURAL_SIZE = 1024
PROCEDURAL_CLASSES = 4


class DataNotFoundError(FileNotFoundError):
    """The data is not where the config says; the message says how to get it."""


class ImageReadError(DataNotFoundError):
    """An image file that cannot be decoded; the message names it.

    Raised in a DataLoader worker, it reaches the main process rebuilt from one string holding the
    worker's traceback: the first argument is then that string, whose last line carries the message.
    """

    def __init__(self, path, err: BaseException | None = None):
        if err is None:
            last = str(path).strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        else:
            message = (f"cannot read image {str(path)!r} ({type(err).__name__}: {err}); "
                       "delete or replace it, or move it out of `data.path`")
        super().__init__(message)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8-valued images in [0, 255] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), resized so its short side is ``resolution`` and centre-cropped.

    With ``class_labels`` the label is the index of the image's first-level subfolder in sorted order;
    then every image must sit in such a subfolder.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3, class_labels: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(
                f"`data.path`={str(root)!r} is not a folder. Point it at a folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), searched recursively; with data.class_labels=true each "
                f"first-level subfolder is one class (root/cat/1.png, root/dog/2.jpg, ...).")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise DataNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under `data.path`={str(root)!r}")
        # Reading each file's header here, rather than decoding every image, catches files that are not
        # images before training starts at the cost of one small read per file.
        for path in self.files:
            try:
                with Image.open(path):
                    pass
            except (OSError, SyntaxError, ValueError) as err:
                raise ImageReadError(path, err) from None
        self.resolution, self.channels = resolution, channels
        self.labels = None
        self.classes: list[str] = []
        if class_labels:
            rel = [p.relative_to(self.root).parts for p in self.files]
            loose = [str(p) for p, parts in zip(self.files, rel) if len(parts) < 2]
            if loose:
                raise DataNotFoundError(
                    f"data.class_labels=true takes labels from subfolders of {str(root)!r}, but {len(loose)} "
                    f"image(s) sit directly in it (e.g. {loose[0]!r}); move them into a class folder, or set "
                    "data.class_labels=false for an unconditional model")
            self.classes = sorted({parts[0] for parts in rel})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[parts[0]] for parts in rel]
        self.num_classes = len(self.classes)
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        self.key = f"folder-{self.root.name}-{digest}-n{len(self.files)}"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self._load(i)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(self.files[i], err) from None

    def _load(self, i):
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB" if self.channels == 3 else "L")
            w, h = img.size
            scale = self.resolution / min(w, h)
            size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
            img = img.resize(size, Image.BILINEAR)
            left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
            img = img.crop((left, top, left + self.resolution, top + self.resolution))
            arr = np.asarray(img, dtype=np.uint8).reshape(self.resolution, self.resolution, self.channels)
        x = to_unit_range(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        return x, torch.tensor(self.labels[i] if self.labels is not None else -1)


def read_idx(path: str | Path) -> np.ndarray:
    """An array from an IDX file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise ValueError(f"{str(path)!r}: header says shape {shape} but holds {arr.size} values")
    return arr.reshape(shape).astype(arr.dtype.newbyteorder("="))


def _has_fashion_mnist(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FASHION_MNIST_FILES)


def find_fashion_mnist(path: str | Path | None = None, search: tuple[str, ...] | None = None,
                       download_root: str | Path | None = "data") -> Path:
    """The folder holding Fashion-MNIST's training IDX files (``FASHION_MNIST_FILES``): ``path`` when given
    (an error if it does not hold them), else the first of ``search`` (globs allowed) that does, else a
    torchvision download into ``download_root`` (skipped when None). Raises DataNotFoundError saying how to
    get the data. ``search`` defaults to ``FASHION_MNIST_SEARCH``."""
    search = FASHION_MNIST_SEARCH if search is None else search
    if path is not None:
        if _has_fashion_mnist(Path(path)):
            return Path(path)
        absent = [name for name in FASHION_MNIST_FILES if not (Path(path) / name).is_file()]
        raise DataNotFoundError(
            f"`data.path`={str(path)!r} does not hold Fashion-MNIST (no {', '.join(absent)}): set data.path=FOLDER, "
            "the folder with its train .gz files, or leave data.path out to use an installed copy (sudo apt-get "
            "install dataset-fashion-mnist) or a download; data.name=procedural needs no data")
    candidates = []
    for pattern in search:
        candidates += [Path(p) for p in sorted(glob.glob(pattern))]
    for folder in candidates:
        if _has_fashion_mnist(folder):
            return folder
    if download_root is not None:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(download_root), train=True, download=True)
        except Exception:  # no network, or torchvision missing: fall through to the message below
            pass
        folder = Path(download_root) / "FashionMNIST" / "raw"
        if _has_fashion_mnist(folder):
            return folder
    raise DataNotFoundError(
        "Fashion-MNIST not found (looked in " + ", ".join(search) + ", and a download failed).\n"
        "Get it with one of:\n"
        "  sudo apt-get update && sudo apt-get install dataset-fashion-mnist   # Debian/Ubuntu\n"
        f"  data.path=/folder/with/files                    # a folder holding {', '.join(FASHION_MNIST_FILES)}\n"
        "  data.name=folder data.path=/your/images         # any folder of images instead\n"
        "  data.name=procedural                            # synthetic images, no download (for testing)")


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST's 60,000 training images (gray, 28x28), bilinearly resized to ``resolution``."""

    num_classes = 10

    def __init__(self, folder: str | Path, resolution: int, channels: int = 1, split: str = "train"):
        folder = Path(folder)
        prefix = {"train": "train", "test": "t10k"}[split]
        self.images = torch.from_numpy(read_idx(folder / f"{prefix}-images-idx3-ubyte.gz"))  # [n, 28, 28] uint8
        self.labels = torch.from_numpy(read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")).long()
        if len(self.images) != len(self.labels):
            raise ValueError(f"Fashion-MNIST in {str(folder)!r}: {len(self.images)} images but {len(self.labels)} labels")
        self.resolution, self.channels = resolution, channels
        self.key = f"fashion_mnist-{split}"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.batch(torch.tensor([i]))[0][0], self.labels[i]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``indices`` at once, exactly as ``__getitem__`` gives them one by one."""
        x = self.images[indices].float()[:, None]  # [n, 1, 28, 28]
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = x / 127.5 - 1
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return x, self.labels[indices]


class ProceduralDataset(Dataset):
    """Smooth synthetic images for tests: a colour gradient plus ``1 + label`` Gaussian blobs.

    Image ``i`` depends only on ``(seed, i)``; its label is ``i % 4``.
    """

    num_classes = PROCEDURAL_CLASSES

    def __init__(self, resolution: int, channels: int = 3, size: int = PROCEDURAL_SIZE, seed: int = 0):
        self.resolution, self.channels, self.size, self.seed = resolution, channels, size, seed
        self.key = f"procedural-s{seed}-n{size}"

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % PROCEDURAL_CLASSES
        r = self.resolution
        coords = torch.linspace(0, 1, r)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        a, b, base = torch.rand(3, self.channels, 1, 1, generator=g)
        img = 0.5 * base + 0.25 * (a * xx + b * yy)  # [C, r, r]
        for _ in range(1 + label):
            cy, cx, width = torch.rand(3, generator=g)
            color = torch.rand(self.channels, 1, 1, generator=g)
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.05 + 0.15 * width) ** 2))
            img = img + color * blob
        return img.clamp(0, 1) * 2 - 1, torch.tensor(label)


def build_dataset(data_cfg, download_root: str | Path | None = "data") -> Dataset:
    """The training dataset a ``data`` config section describes (``channels`` may be None: the dataset's own)."""
    name, res = data_cfg.name, data_cfg.resolution
    if name == "fashion_mnist":
        folder = find_fashion_mnist(data_cfg.path, download_root=download_root)
        return FashionMNISTDataset(folder, res, channels=data_cfg.channels or 1)
    if name == "folder":
        return ImageFolderDataset(data_cfg.path, res, channels=data_cfg.channels or 3,
                                  class_labels=data_cfg.class_labels)
    if name == "procedural":
        return ProceduralDataset(res, channels=data_cfg.channels or 3)
    raise ValueError(f"`data.name` must be fashion_mnist, folder or procedural, got {name!r}")


def stack_dataset(dataset: Dataset, batch_size: int = 1024, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image (n, C, H, W) and label (n,) of ``dataset``, in index order, as ``dataset[i]`` gives them."""
    n = len(dataset)
    if hasattr(dataset, "batch"):
        chunks = [dataset.batch(torch.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    else:
        chunks = list(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers))
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


class ResidentBatches:
    """Shuffled, drop-last batches of a whole dataset held on one device: no loader processes, no copies.

    Every ``len(images) // world`` images form one epoch per rank: a permutation seeded by ``(seed, epoch)``,
    the same on every rank, of which rank ``r`` takes ``perm[r::world]``. Batch ``s`` of the run (counted
    across epochs) therefore depends only on ``(seed, rank, world, s)``, and iteration starts at batch
    ``start_step()``: a resumed run draws exactly the batches of an uninterrupted one. The iterator never
    ends; the trainer's ``max_steps`` does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, start_step=lambda: 0):
        per_epoch = len(images) // world // batch_size
        if per_epoch < 1:
            raise ValueError(f"the dataset has {len(images)} images, fewer than `data.batch_size`={batch_size} "
                             f"per process ({world} processes); lower data.batch_size")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.seed, self.rank, self.world, self.start_step = seed, rank, world, start_step
        self.per_epoch = per_epoch

    def _shard(self, epoch: int) -> torch.Tensor:
        g = torch.Generator(device=self.images.device).manual_seed(seed_of(self.seed, epoch))
        perm = torch.randperm(len(self.images), generator=g, device=self.images.device)
        return perm[self.rank::self.world]

    def __iter__(self):
        step = self.start_step()
        shard, epoch = None, -1
        while True:
            e, i = divmod(step, self.per_epoch)
            if e != epoch:
                shard, epoch = self._shard(e), e
            idx = shard[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images[idx].float(), self.labels[idx]
            step += 1


def resident_bytes(dataset: Dataset) -> int:
    """Bytes the whole dataset takes on a device as float16."""
    x, _ = dataset[0]
    return len(dataset) * x.numel() * 2


class ImageDataModule(L.LightningDataModule):
    """Shuffled, drop-last batches of ``(images, labels)`` from :func:`build_dataset`.

    With ``data.resident`` (null: on a GPU when the float16 copy fits in ``data.resident_max_gb``) the
    whole dataset is resized once and kept on the training device (:class:`ResidentBatches`); otherwise a
    DataLoader reads it, and under DDP Lightning swaps in a DistributedSampler, so each rank sees its shard.
    """

    def __init__(self, data_cfg, dataset: Dataset | None = None, seed: int = 0):
        super().__init__()
        self.cfg = data_cfg
        self.dataset = dataset
        self.seed = seed

    def setup(self, stage: str | None = None):
        if self.dataset is None:
            self.dataset = build_dataset(self.cfg)

    def resident_on(self, device: torch.device) -> bool:
        if self.cfg.resident is None:
            return device.type == "cuda" and resident_bytes(self.dataset) <= self.cfg.resident_max_gb * 2**30
        return self.cfg.resident

    def train_dataloader(self):
        if len(self.dataset) < self.cfg.batch_size:
            raise ValueError(f"the dataset has {len(self.dataset)} images, fewer than `data.batch_size`="
                             f"{self.cfg.batch_size}; lower data.batch_size")
        trainer = self.trainer
        device = trainer.strategy.root_device
        if self.resident_on(device):
            images, labels = stack_dataset(self.dataset, num_workers=self.cfg.num_workers)
            return ResidentBatches(images.to(device, torch.float16), labels.to(device), self.cfg.batch_size,
                                   self.seed, trainer.global_rank, trainer.world_size,
                                   start_step=lambda: trainer.global_step)
        workers = self.cfg.num_workers
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

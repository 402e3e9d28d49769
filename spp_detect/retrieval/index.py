"""The ``index`` stage: R-MAC / MAC descriptors and quantised maps of a folder of images.

Folder layout (a :mod:`spp_detect.stage_dir` stage folder, keyed by :class:`IndexSettings`):

* ``manifest.json``;
* ``whitening.npz``: PCA-whitening learned on the region vectors of *other* images
  (``whiten_images``; Paris is whitened with Oxford in the paper, here VOC2007 serves),
  plus ``quant_cap``, the activation mapped to the release's clip value 128
  (:func:`spp_detect.retrieval.aml.quantize_levels`), calibrated on the same images;
* ``<image stem>.npz`` per image: ``mac`` ``[C]`` float32 (raw MAC), ``regions``
  ``[R, C]`` float32 (L2-normalised region MACs, before whitening, so both variants can be
  searched), ``levels`` ``[C, h, w]`` uint8 (quantised map, for AML), ``size`` ``(W, H)``.

Rerunning skips images whose file exists; other settings are refused unless forced.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spp_detect.backbones import Normalization, build_trunk, normalization_name, resolve_normalization
from spp_detect.image_trunk import load_image_rgb, prepare_trunk
from spp_detect.retrieval.aml import quantize_levels
from spp_detect.retrieval.descriptors import mac, region_vectors
from spp_detect.retrieval.regions import LEVELS
from spp_detect.retrieval.whitening import Whitening, l2_normalize, learn_pca_whitening
from spp_detect.stage_dir import BadSetting, Progress, atomic_write, open_stage, read_manifest, settings_config, track, weights_field

__all__ = [
    "IMAGE_SUFFIXES",
    "QUANT_PERCENTILE",
    "IndexSettings",
    "IndexSummary",
    "RetrievalIndex",
    "list_images",
    "full_res_maps",
    "run_index",
    "load_index",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
#: The quantisation cap is this percentile of the positive activations of the whitening
#: images (our calibration; the release's 128 is a constant for its VGG16, see aml.py).
QUANT_PERCENTILE: float = 99.9
FORMAT_VERSION = 1
#: Plain settings (weights path, image folder) beside the manifest, which keys by identities.
SETTINGS_FILE = "index_settings.json"


@dataclass(frozen=True)
class IndexSettings:
    """Everything an index is keyed by (``weights`` and ``whiten_images`` as identities)."""

    backbone: str = "squeezenet1_0"
    weights: str = weights_field()
    input_norm: str = "auto"
    levels: int = field(default=LEVELS, metadata={"help": "R-MAC region levels L (paper: 3)."})
    whiten_limit: int = field(default=100, metadata={"help": "Use the first N whitening images."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_norm", normalization_name(self.backbone, self.weights, self.input_norm))


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files directly in ``folder`` (by suffix), sorted by name, at most ``limit``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:limit]


@torch.inference_mode()
def full_res_maps(trunk: nn.Module, norm: Normalization, image: np.ndarray) -> torch.Tensor:
    """The last conv map of ``np.ndarray[H, W, 3]`` uint8 RGB at full resolution, ReLU applied
    (docs/sources.md 5.1): ``Tensor[C, h, w]`` float32 on the trunk's device."""
    device = next(trunk.parameters()).device
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)
    batch = norm(pixels).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return trunk(batch)[0].contiguous().clamp_min(0)


@dataclass
class IndexSummary:
    """What a run did (wall seconds over the images it computed, whitening included)."""

    done: int = 0
    skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def describe(self, out: Path | str) -> str:
        """The line a command prints."""
        per_image = self.bytes_written / max(self.done, 1) / 1e3
        return (f"index: {self.done} image(s) described, {self.skipped} already indexed, "
                f"{per_image:.0f} kB/image, {self.seconds:.1f} s -> {out}")


def run_index(
    images: Sequence[Path],
    out: Path,
    settings: IndexSettings,
    whiten_images: Sequence[Path],
    *,
    device: torch.device,
    force: bool = False,
    progress: Progress | None = None,
) -> IndexSummary:
    """Fill the index folder ``out`` for ``images``; resumable.

    Args:
        images: database image files (their stems name the entries; must be unique).
        out: the index folder.
        settings: backbone and R-MAC settings.
        whiten_images: images of another dataset to learn whitening and the quantisation
            cap on (the first ``settings.whiten_limit`` are used).
        device: where the trunk runs.
        force: recompute even if ``out`` holds another configuration.
        progress: the progress protocol (:class:`spp_detect.stage_dir.Progress`), or None.

    Raises:
        SettingsChanged, ImageReadError, ValueError (duplicate stems, no whitening images).
        BadSetting: a whitening image is also a database image (``whiten-images``): whitening
            must be learned on another dataset (R-MAC's protocol, docs/sources.md 5.1).
    """
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise ValueError("image names must be unique without their extension")
    shared = {Path(p).resolve() for p in images} & {Path(p).resolve() for p in whiten_images}
    if shared:
        raise BadSetting("whiten-images", f"whitening must be learned on another dataset than the indexed one; "
                                          f"{len(shared)} image(s) are in both, e.g. {sorted(shared)[0]}")
    whiten_files = list(whiten_images)[: settings.whiten_limit]
    if len(whiten_files) < 2:
        raise ValueError("need at least 2 whitening images")
    listing = "\n".join(p.name for p in whiten_files)
    config = {**settings_config(settings), "format": FORMAT_VERSION,
              "whiten_images": f"{len(whiten_files)} files, names sha256 {_sha256_text(listing)[:16]}"}
    stage = open_stage(out, "index", config, force=force)
    source = {**asdict(settings), "images": str(Path(images[0]).parent.resolve()) if images else None}
    atomic_write(Path(out) / SETTINGS_FILE, lambda tmp: tmp.write_text(json.dumps(source, indent=2, sort_keys=True)))
    wrap = lambda seq, desc: track(progress, seq, desc)  # noqa: E731
    out = Path(out)
    todo, skipped, _ = stage.todo(images, lambda p: out / f"{p.stem}.npz")
    summary = IndexSummary(skipped=skipped)
    whitening_path = out / "whitening.npz"
    if not todo and whitening_path.is_file():
        return summary
    start = time.perf_counter()
    trunk = prepare_trunk(build_trunk(settings.backbone, settings.weights), device)
    norm = resolve_normalization(settings.backbone, settings.weights, settings.input_norm)
    if not whitening_path.is_file():
        vectors, positives = [], []
        for path in wrap(whiten_files, "whitening"):
            maps = full_res_maps(trunk, norm, load_image_rgb(path))
            vectors.append(region_vectors(maps, settings.levels))
            values = maps.flatten()
            positives.append(values[values > 0][:: 7].cpu().numpy())  # a subsample is plenty
        whitening = learn_pca_whitening(np.concatenate(vectors))
        cap = float(np.percentile(np.concatenate(positives), QUANT_PERCENTILE))

        def write_whitening(tmp: Path) -> None:
            np.savez(tmp, mean=whitening.mean, projection=whitening.projection, eigenvalues=whitening.eigenvalues,
                     num_vectors=np.int64(whitening.num_vectors), quant_cap=np.float64(cap),
                     key=np.array(stage.key))

        atomic_write(whitening_path, write_whitening)
    cap = _read_cap(whitening_path)
    for path in wrap(todo, "index"):
        image = load_image_rgb(path)
        maps = full_res_maps(trunk, norm, image)
        arrays = {
            "mac": mac(maps),
            "regions": region_vectors(maps, settings.levels),
            "levels": quantize_levels(maps, cap).cpu().numpy(),
            "size": np.array([image.shape[1], image.shape[0]], dtype=np.int64),
            "key": np.array(stage.key),
        }
        target = out / f"{path.stem}.npz"
        atomic_write(target, lambda tmp: np.savez_compressed(tmp, **arrays))
        summary.bytes_written += target.stat().st_size
        summary.done += 1
    summary.seconds = time.perf_counter() - start
    return summary


def _read_cap(path: Path) -> float:
    with np.load(path, allow_pickle=False) as data:
        return float(data["quant_cap"])


@dataclass
class RetrievalIndex:
    """An index loaded for search.

    ``names[i]`` is image ``i``'s stem; ``macs`` ``[N, C]`` raw MACs; ``regions`` ``[sum R,
    C]`` L2-normalised region vectors of all images, image ``i``'s at rows
    ``offsets[i]:offsets[i + 1]``; ``sizes`` ``[N, 2]`` image ``(W, H)``; ``whitening`` and
    ``quant_cap`` from ``whitening.npz``; ``config`` the manifest's settings.
    """

    folder: Path
    names: list[str]
    macs: np.ndarray
    regions: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    whitening: Whitening
    quant_cap: float
    config: dict
    settings: dict

    def __len__(self) -> int:
        return len(self.names)

    def levels(self, i: int) -> torch.Tensor:
        """Image ``i``'s quantised map ``Tensor[C, h, w]`` uint8 (read from disk)."""
        with np.load(self.folder / f"{self.names[i]}.npz", allow_pickle=False) as data:
            return torch.from_numpy(data["levels"])

    def image_path(self, i: int) -> Path | None:
        """Image ``i``'s file, if the indexed folder still holds it."""
        folder = self.settings.get("images")
        if not folder:
            return None
        matches = [p for p in Path(folder).glob(f"{self.names[i]}.*") if p.suffix.lower() in IMAGE_SUFFIXES]
        return matches[0] if matches else None

    def bytes_per_image(self) -> float:
        """Mean size of the per-image files on disk."""
        return float(np.mean([(self.folder / f"{n}.npz").stat().st_size for n in self.names]))

    def descriptors(self, method: str, whiten: bool) -> np.ndarray:
        """Database descriptors ``np.ndarray[N, D]`` (unit rows) for ``method`` in
        ``{"mac", "rmac"}``, with or without whitening (test.m's ``vecpostproc`` steps)."""
        white = self.whitening if whiten else None
        if method == "mac":
            vectors = l2_normalize(self.macs)
            return apply_or_normalize(vectors, white)
        if method == "rmac":
            vectors = apply_or_normalize(self.regions, white)
            return l2_normalize(np.add.reduceat(vectors, self.offsets[:-1], axis=0))
        raise ValueError(f"unknown method {method!r}; choose 'mac' or 'rmac'")


def apply_or_normalize(vectors: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """Whiten + L2 when ``whitening`` is given, else L2 only."""
    from spp_detect.retrieval.whitening import apply_whitening

    return apply_whitening(vectors, whitening) if whitening is not None else l2_normalize(vectors)


def load_index(folder: Path) -> RetrievalIndex:
    """Load an index folder made by :func:`run_index`.

    Raises:
        FileNotFoundError: not an index folder, or it holds no image yet.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("stage") != "index":
        raise FileNotFoundError(f"{folder} holds '{manifest.get('stage')}' output, not an index")
    whitening_path = folder / "whitening.npz"
    files = sorted(p for p in folder.glob("*.npz") if p.name != "whitening.npz" and not p.name.startswith("."))
    if not whitening_path.is_file() or not files:
        raise FileNotFoundError(f"{folder}: the index is empty; run `spp-detect index` to fill it")
    names, macs, regions, sizes = [], [], [], []
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            names.append(path.stem)
            macs.append(data["mac"])
            regions.append(data["regions"])
            sizes.append(data["size"])
    counts = np.array([len(r) for r in regions])
    return RetrievalIndex(
        folder=folder,
        names=names,
        macs=np.stack(macs),
        regions=np.concatenate(regions),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        sizes=np.stack(sizes),
        whitening=Whitening.load(whitening_path),
        quant_cap=_read_cap(whitening_path),
        config=manifest["config"],
        settings=json.loads((folder / SETTINGS_FILE).read_text()) if (folder / SETTINGS_FILE).is_file() else {},
    )


def load_index_trunk(folder: Path, device: torch.device) -> tuple[RetrievalIndex, nn.Module, Normalization]:
    """An index folder, and the trunk and normalisation it was made with, on ``device``.

    Raises:
        FileNotFoundError: not an index folder.
        ValueError: the weights file the index was made with is missing or changed.
    """
    from spp_detect.stage_dir import weights_identity

    index = load_index(folder)
    weights = index.settings.get("weights", index.config["weights"])
    if weights not in ("imagenet", "none") and (not Path(weights).is_file() or weights_identity(weights) != index.config["weights"]):
        raise ValueError(f"the index was made with weights {weights} ({index.config['weights'][:20]}...), which are missing or changed")
    trunk = prepare_trunk(build_trunk(index.config["backbone"], weights), device)
    return index, trunk, resolve_normalization(index.config["backbone"], weights, index.config["input_norm"])

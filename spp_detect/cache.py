"""The feature cache written by ``extract`` and read by every later stage.

What it stores, and why. Pooled features are ``C x 50`` numbers per window: for
SqueezeNet's 512 channels and ~2,000 windows that is ~100 MB per image even in fp16, and
the released SPP-net instead cached the conv5 maps (~20 GB for VOC07). We cache the conv
maps too, and pool on read (pooling 2,000 windows costs a fraction of the conv pass, see
``bench/extract.py``). Maps are stored as **fp16, deflate-compressed** (zlib level 1):
after ReLU ~80% of SqueezeNet's fire9 activations are exactly zero, so the five maps of a
500 x 375 image (~8.3 M values, 16.6 MB as raw fp16) take ~4 MB. fp16 rounding is
monotone, so a pooled max read from the cache is the fp16 rounding of the true max:
relative error <= 2^-11 in fp16's normal range (>= 2^-14), absolute error <= 2^-25 below
it (``bench/extract.py`` reports the largest error measured).

One file per image, ``<folder>/<image_id>.npz`` (``np.savez``, no pickles), written
atomically through :func:`spp_detect.stage_dir.atomic_write`:

* ``key``: the manifest key the file was written under (checked on read);
* ``image_size``: int64 ``[2]`` ``(width, height)``;
* ``boxes``: float32 ``[N, 4]`` windows, 0-based xyxy in original image pixels;
* ``is_gt``: bool ``[N]``, ground-truth boxes (listed first) vs proposals;
* ``scale_index``: int64 ``[N]``, the scale each window is pooled at (paper 4.1);
* ``cells``: int64 ``[N, 4]``, inclusive conv-cell ranges on that scale's map;
* ``gt_labels``: int64 ``[G]``, class index (into the manifest's ``classes``) of each of
  the first ``G`` windows, the ground-truth boxes; ``gt_difficult``: bool ``[G]``;
* ``map_shapes``: int64 ``[S, 3]``; ``map_<k>``: uint8, zlib of the C-order fp16 map (read
  and decoded only for the scales :meth:`FeatureCache.load` is asked for).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.backbones import get_backbone
from spp_detect.datasets.voc import VOC_CLASSES
from spp_detect.device import canonical_device, same_device
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.stage_dir import DamagedFile, check_file, read_manifest, write_npz
from spp_detect.windows import scale_factors, windows_to_cells

__all__ = [
    "FORMAT_VERSION",
    "CachedImage",
    "FeatureCache",
    "encode_map",
    "decode_map",
    "write_cached_image",
    "cached_file_problem",
    "record_image_paths",
]

#: Bumped whenever the per-image file layout changes (it is part of the manifest key).
FORMAT_VERSION = 2  # 2: ground-truth labels and difficult flags stored
#: zlib level 1: within 10% of level 6's size on post-ReLU maps, at about 3x the speed.
_ZLIB_LEVEL = 1


def encode_map(feature_map: Tensor) -> np.ndarray:
    """``Tensor[C, H, W]`` float -> uint8 bytes of the zlib-compressed C-order fp16 map."""
    half = feature_map.detach().to("cpu", torch.float16).contiguous().numpy()
    return np.frombuffer(zlib.compress(half.tobytes(), _ZLIB_LEVEL), dtype=np.uint8)


def decode_map(blob: np.ndarray, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`encode_map`: float32 ``Tensor[C, H, W]`` (values exactly the fp16 ones),
    stored channels-last (``permute(1, 2, 0)`` is contiguous), the layout the CPU pooling
    kernel reads; converted and transposed in one pass."""
    channels, height, width = (int(v) for v in shape)
    half = np.frombuffer(bytearray(zlib.decompress(blob.tobytes())), dtype=np.float16).reshape(channels, height, width)
    hwc = torch.empty((height, width, channels), dtype=torch.float32)
    hwc.copy_(torch.from_numpy(half).permute(1, 2, 0))
    return hwc.permute(2, 0, 1)


def write_cached_image(
    path: Path,
    key: str,
    width: int,
    height: int,
    boxes: Tensor,
    is_gt: Tensor,
    scale_index: Tensor,
    cells: Tensor,
    maps: Sequence[Tensor],
    gt_labels: Tensor,
    gt_difficult: Tensor,
) -> int:
    """Write one image's cache file atomically; returns its size in bytes.

    Args: see the module docstring for each array (``boxes`` ``Tensor[N, 4]`` 0-based xyxy
    image pixels, ``cells`` ``Tensor[N, 4]`` inclusive cells, ``maps`` ``[C, h_k, w_k]``).
    """
    arrays = {
        "key": np.asarray(key),
        "image_size": np.asarray([width, height], dtype=np.int64),
        "boxes": boxes.to("cpu", torch.float32).numpy(),
        "is_gt": is_gt.to("cpu", torch.bool).numpy(),
        "scale_index": scale_index.to("cpu", torch.int64).numpy(),
        "cells": cells.to("cpu", torch.int64).numpy(),
        "gt_labels": gt_labels.to("cpu", torch.int64).numpy(),
        "gt_difficult": gt_difficult.to("cpu", torch.bool).numpy(),
        "map_shapes": np.asarray([tuple(m.shape) for m in maps], dtype=np.int64).reshape(-1, 3),
    }
    for k, fmap in enumerate(maps):
        arrays[f"map_{k}"] = encode_map(fmap)
    write_npz(path, arrays)  # atomic, and the same bytes for the same arrays
    return Path(path).stat().st_size


def record_image_paths(folder: Path, images) -> None:
    """Add ``image id -> absolute image file`` of ``images`` (objects with ``image_id`` and
    ``path``) to ``<folder>/images.json``, atomically. Not part of the cache's key: it tells
    a stage that needs the pixels again (conv fine-tuning) where they are."""
    import json

    from spp_detect.stage_dir import atomic_write

    path = Path(folder) / "images.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update({im.image_id: str(Path(im.path).resolve()) for im in images})
    atomic_write(path, lambda p: p.write_text(json.dumps(known, indent=0, sort_keys=True)))


def cached_file_problem(path: Path, key: str) -> str | None:
    """Why the cache file ``path`` cannot be reused under manifest ``key`` (damaged, cut
    short, bytes overwritten, written under another key), or ``None``. Checks the CRC-32 of
    every entry (reads the file once, a few ms per MB) but decodes no map."""
    problem = check_file(path)
    if problem is not None:
        return problem
    try:
        with zipfile.ZipFile(path) as archive:
            bad_entry = archive.testzip()
        if bad_entry is not None:
            return f"damaged ({bad_entry}: bad CRC-32)"
        with np.load(path, allow_pickle=False) as data:
            if "key" not in data.files:
                return "not a feature-cache file (no key)"
            if str(data["key"]) != key:
                return "written under other settings (another manifest key)"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return f"damaged ({exc})"
    return None


@dataclass
class CachedImage:
    """One image's windows and conv maps, read back from the cache.

    Attributes:
        image_id: VOC id.
        width, height: original image size in pixels.
        boxes: ``Tensor[N, 4]`` float32, 0-based xyxy in original image pixels.
        is_gt: ``Tensor[N]`` bool, ground-truth windows (first) vs proposals.
        scale_index: ``Tensor[N]`` int64, index into the cache's scales.
        cells: ``Tensor[N, 4]`` int64, inclusive conv cells on that scale's map.
        maps: one entry per scale ``k``: its float32 ``Tensor[C, h_k, w_k]`` map, or ``None``
            where the map was not decoded (:meth:`FeatureCache.load` with ``scales``).
        map_shapes: ``Tensor[S, 3]`` int64 ``(C, h_k, w_k)`` of every scale's map, decoded
            or not (:meth:`cells_at` needs the sizes).
        levels: the pyramid levels the cache was made for.
        gt_labels: ``Tensor[G]`` int64 class indices of the ``G`` ground-truth windows
            (the first ``G``; ``G == is_gt.sum()``).
        gt_difficult: ``Tensor[G]`` bool, the devkit's difficult flags.
        scale_factors: ``Tensor[S]`` float64 resize factor of each map's scale.
        stride, offset: the trunk's geometry (:class:`spp_detect.backbones.BackboneSpec`),
            to map windows to another scale's cells (:meth:`cells_at`).
    """

    image_id: str
    width: int
    height: int
    boxes: Tensor
    is_gt: Tensor
    scale_index: Tensor
    cells: Tensor
    maps: list[Tensor | None]
    map_shapes: Tensor
    levels: tuple[int, ...]
    gt_labels: Tensor
    gt_difficult: Tensor
    scale_factors: Tensor
    stride: int
    offset: float

    def __post_init__(self) -> None:
        assert len(self.maps) == len(self.map_shapes), "one map_shapes row per map"
        assert all(m is None or tuple(m.shape) == tuple(s) for m, s in zip(self.maps, self.map_shapes.tolist()))

    @property
    def channels(self) -> int:
        """``C``, the maps' channel count."""
        return int(self.map_shapes[0, 0])

    @property
    def decoded_scales(self) -> tuple[int, ...]:
        """Indices of the scales whose map is decoded (all of them unless loaded with ``scales``)."""
        return tuple(k for k, m in enumerate(self.maps) if m is not None)

    @property
    def gt_boxes(self) -> Tensor:
        """``Tensor[G, 4]`` 0-based xyxy ground-truth boxes (the first ``G`` windows)."""
        return self.boxes[: len(self.gt_labels)]

    def cells_at(self, indices: Tensor, scale_index: Tensor) -> Tensor:
        """Inclusive cells ``Tensor[K, 4]`` of windows ``indices`` (``Tensor[K]``) on the maps of
        ``scale_index`` (``Tensor[K]``), e.g. a random scale per window while fine-tuning
        (the release's ``random_scale``). Equal to :attr:`cells` at the windows' own scales.
        Needs only the maps' sizes, not the maps."""
        sizes = self.map_shapes[:, 1:]  # [S, 2] (h_k, w_k)
        return windows_to_cells(
            self.boxes[indices], self.scale_factors[scale_index], self.stride, self.offset, sizes[scale_index]
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "CachedImage":
        """This image with its maps on ``device``, uploaded once (the windows, cells and
        labels stay on the CPU: they index and are small). On a GPU each map goes through
        pinned memory, in its channels-last layout, without blocking the calling thread;
        on the CPU it is ``self``. Pooled values are the same on every device
        (:func:`spp_detect.spp.spatial_pyramid_pool`). Maps not decoded stay ``None``."""
        device = canonical_device(device)
        if all(m is None or same_device(m.device, device) for m in self.maps):
            return self
        maps: list[Tensor | None] = []
        for fmap in self.maps:
            if fmap is None:
                maps.append(None)
                continue
            hwc = fmap.permute(1, 2, 0)  # contiguous for maps from decode_map
            if device.type == "cuda" and hwc.device.type == "cpu":
                hwc = hwc.contiguous().pin_memory()
            maps.append(hwc.to(device, non_blocking=True).permute(2, 0, 1))
        return replace(self, maps=maps)

    def features(
        self,
        indices: Tensor | None = None,
        device: torch.device | str | None = None,
        scale_index: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Pooled SPP features ``Tensor[K, C * sum(n * n)]`` (float32) of the windows ``indices``
        (``Tensor[K]`` int64, default all), in that order, computed on ``device``.

        Each window is pooled on the map of its own scale, or of ``scale_index``
        (``Tensor[K]``) when given; the loop runs over scales, never over windows. ``out``:
        an optional float32 (or bfloat16: values rounded) buffer on ``device`` with at least
        ``K`` rows; its first ``K`` rows are written and returned (a reused buffer spares allocating and page-faulting
        ~100 MB per 1,000 windows).

        Raises:
            ValueError: a window would be pooled on a scale whose map was not decoded
                (:meth:`FeatureCache.load` with ``scales``), or a bad ``out``.
        """
        if device is None:
            decoded = [m for m in self.maps if m is not None]
            device = decoded[0].device if decoded else torch.device("cpu")
        device = canonical_device(device)
        if indices is None:
            indices = torch.arange(len(self))
        indices = indices.to(torch.int64).cpu()
        dim = self.channels * sum(n * n for n in self.levels)
        if out is None:
            out = torch.empty((len(indices), dim), device=device)
        elif (out.shape[0] < len(indices) or out.shape[1:] != (dim,) or not same_device(out.device, device)
              or out.dtype not in (torch.float32, torch.bfloat16)):
            raise ValueError(f"out must be a float32 or bfloat16 buffer of at least {len(indices)} x {dim} on {device}")
        else:
            out = out[: len(indices)]
        if scale_index is None:
            chosen, cells = self.scale_index[indices], self.cells[indices]
        else:
            chosen = scale_index.to(torch.int64).cpu()
            cells = self.cells_at(indices, chosen)
        missing = sorted({int(k) for k in chosen.unique()} - set(self.decoded_scales))
        if missing:
            raise ValueError(f"CachedImage.features: {self.image_id} has windows to pool at scale(s) {missing}, whose "
                             f"maps were not decoded (decoded: {list(self.decoded_scales)}); load it with those scales")
        if len(chosen) < 2 or bool((chosen[1:] >= chosen[:-1]).all()):
            # windows grouped by scale (always so for window_features): pool into slices of out
            bounds = torch.searchsorted(chosen, torch.arange(len(self.maps) + 1)).tolist()
            for k, fmap in enumerate(self.maps):
                if bounds[k + 1] > bounds[k]:  # fmap is decoded: checked above
                    rows = slice(bounds[k], bounds[k + 1])
                    spatial_pyramid_pool(fmap.to(device), cells[rows].to(device), self.levels, out=out[rows])
            return out
        for k, fmap in enumerate(self.maps):
            rows = torch.nonzero(chosen == k).flatten()
            if len(rows):  # fmap is decoded: checked above
                out[rows.to(device)] = spatial_pyramid_pool(fmap.to(device), cells[rows].to(device), self.levels)
        return out

    def iter_features(
        self, batch_size: int = 512, device: torch.device | str | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(indices Tensor[B], features Tensor[B, D])`` over all windows, in order."""
        for start in range(0, len(self), batch_size):
            indices = torch.arange(start, min(start + batch_size, len(self)))
            yield indices, self.features(indices, device)


class FeatureCache:
    """Read access to a folder written by ``spp-detect extract``.

    Example::

        cache = FeatureCache("runs/extract-test")
        for image in cache:                      # CachedImage, in id order
            for idx, feats in image.iter_features(512):
                ...                              # feats: Tensor[B, 512 * 50]
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("stage") != "extract":
            raise ValueError(f"{self.folder} holds '{self.manifest.get('stage')}' output, not an extract cache")
        config = self.manifest["config"]
        self.key: str = self.manifest["key"]
        self.scales: tuple[int, ...] = tuple(config["scales"])
        self.levels: tuple[int, ...] = tuple(config["levels"])
        self.backbone: str = config["backbone"]
        self.mode: str = config.get("mode", "spp")
        #: the trunk weights' identity (``imagenet``, ``none`` or ``sha256:<digest>`` of the file)
        self.weights: str = config.get("weights", "imagenet")
        spec = get_backbone(self.backbone)
        self.stride, self.offset = spec.stride, spec.offset
        self.channels: int = spec.channels
        #: class names the ground-truth labels index, as the dataset gave them to extract;
        #: caches made before extract recorded them hold VOC's 20 (the only source then)
        self.classes: tuple[str, ...] = tuple(config["classes"]) if "classes" in config else VOC_CLASSES

    @property
    def feature_dim(self) -> int:
        """Length of a pooled feature: ``C * sum(n * n)`` (25,600 for SqueezeNet's pyramid)."""
        return self.channels * sum(n * n for n in self.levels)

    @property
    def image_ids(self) -> list[str]:
        """Ids of the images whose file is complete, sorted."""
        return sorted(p.stem for p in self.folder.glob("*.npz") if not p.name.startswith("."))

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npz"

    def load(self, image_id: str, scales: Sequence[int] | None = None) -> CachedImage:
        """Read one image, its maps decoded to float32 on the CPU.

        Args:
            scales: indices into :attr:`scales` of the maps to decode (the others are left
                ``None`` in :attr:`CachedImage.maps`; only the decoded ones are read from the
                file), e.g. ``()`` for the windows and ground truth alone (labelling) or
                ``(0, 3)`` for the scales a fine-tuning pass pools at; ``None``: every map.

        Raises:
            ValueError: a scale index out of range.
            FileNotFoundError: the image is not in the cache (not extracted yet).
            DamagedFile: the file is damaged, cut short or was written under another
                manifest key (stale); one line naming it and ``spp-detect extract``, which
                redoes it on a rerun.
        """
        wanted = range(len(self.scales)) if scales is None else sorted({int(k) for k in scales})
        if any(not 0 <= k < len(self.scales) for k in wanted):
            raise ValueError(f"FeatureCache.load: scale indices must be in [0, {len(self.scales)}) for the scales "
                             f"{self.scales} of {self.folder}, got {list(scales)}")
        path = self.path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"{image_id} is not in the feature cache {self.folder}; run extract first")
        try:
            return self._read(path, image_id, wanted)
        except DamagedFile:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DamagedFile(path, reason, "extract") from None

    def _read(self, path: Path, image_id: str, scales: Sequence[int]) -> CachedImage:
        with np.load(path, allow_pickle=False) as data:  # members are read when indexed
            if str(data["key"]) != self.key:
                raise DamagedFile(path, f"written under other settings than {self.folder}/manifest.json", "extract")
            width, height = (int(v) for v in data["image_size"])
            shapes = data["map_shapes"]  # [S, 3]
            maps = [decode_map(data[f"map_{k}"], shape) if k in scales else None for k, shape in enumerate(shapes)]
            if self.mode == "spp":
                factors = scale_factors(width, height, self.scales)
            else:  # crop-warp: one tiled map, no rescaling
                factors = torch.ones(1, dtype=torch.float64)
            return CachedImage(
                image_id=image_id,
                width=width,
                height=height,
                boxes=torch.from_numpy(data["boxes"]),
                is_gt=torch.from_numpy(data["is_gt"]),
                scale_index=torch.from_numpy(data["scale_index"]),
                cells=torch.from_numpy(data["cells"]),
                maps=maps,
                map_shapes=torch.from_numpy(shapes),
                levels=self.levels,
                gt_labels=torch.from_numpy(data["gt_labels"]),
                gt_difficult=torch.from_numpy(data["gt_difficult"]),
                scale_factors=factors,
                stride=self.stride,
                offset=self.offset,
            )

    def summary(self) -> dict[str, object]:
        """Totals over the finished images, without decoding any map: ``damaged`` (files
        that are cut short or of another key, ``"<name>: <reason>"``; left out), ``images``,
        ``windows_per_image``, ``bytes_per_image``, ``feature_dim`` (``C * sum(n * n)``) and
        ``scale_share`` (fraction of windows pooled at each scale)."""
        ids, damaged = [], []
        windows, size, per_scale, channels = 0, 0, np.zeros(len(self.scales), dtype=np.int64), 0
        for image_id in self.image_ids:
            path = self.path(image_id)
            problem = cached_file_problem(path, self.key)
            if problem is not None:
                damaged.append(f"{path.name}: {problem}")
                continue
            ids.append(image_id)
            size += path.stat().st_size
            with np.load(path, allow_pickle=False) as data:
                scale_index = data["scale_index"]
                channels = int(data["map_shapes"][0, 0])
            windows += len(scale_index)
            per_scale += np.bincount(scale_index, minlength=len(self.scales))
        count = max(len(ids), 1)
        return {
            "damaged": damaged,
            "images": len(ids),
            "windows_per_image": windows / count,
            "bytes_per_image": size / count,
            "feature_dim": channels * sum(n * n for n in self.levels),
            "scale_share": (per_scale / max(windows, 1)).tolist(),
        }

    def __iter__(self) -> Iterator[CachedImage]:
        for image_id in self.image_ids:
            yield self.load(image_id)

    def __len__(self) -> int:
        return len(self.image_ids)

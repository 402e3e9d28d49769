"""The proposals stage driver: selective search over a list of images, or an import.

:func:`run_proposals` runs :func:`proposals.selective_search.propose` on every image in a
process pool (one OpenCV thread per worker) and writes ``<out>/<image_id>.npy`` per image,
atomically, under a keyed manifest (:mod:`spp_detect.stage_dir`). A rerun with the same
settings skips images whose file exists; changed settings raise
:class:`~spp_detect.stage_dir.SettingsChanged` unless ``force``. :func:`import_proposals`
fills a proposals folder from a ``.mat`` file or another proposals folder.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from contextlib import closing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from proposals.io import STAGE, boxes_path, load_proposals, write_boxes
from proposals.selective_search import ENGINE, MODES, R_CNN_MAX_BOXES, R_CNN_MIN_SIZE, VOC_LONGER_SIDE, propose
from spp_detect.distributed import cpus_per_process
from spp_detect.images import ImageReadError, read_image
from spp_detect.stage_dir import Progress, check_file, open_stage, settings_config, source_key, track

__all__ = [
    "BadImageError",
    "ProposalSettings",
    "ProposalsSummary",
    "run_proposals",
    "import_proposals",
]

log = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image could not be read or decoded; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: Path, reason: str, image_id: str | None = None) -> None:
        super().__init__(f"unreadable image {path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.image_id = image_id if image_id is not None else self.path.stem


class ImageLike(Protocol):
    """What :func:`run_proposals` needs of an image (``VOCImage`` has it)."""

    image_id: str
    path: Path
    width: int
    height: int


@dataclass(frozen=True)
class ProposalSettings:
    """Settings of the selective search stage; all of them key the output folder.

    Attributes:
        mode: ``"fast"`` (the paper's fast mode, as R-CNN ran it), ``"opencv-fast"`` or
            ``"opencv-quality"`` (OpenCV's parameter sets on the same engine); see
            :mod:`proposals.selective_search`.
        min_size: drop boxes narrower or shorter than this, in pixels, on an image whose
            longer side is ``min_size_reference`` (R-CNN: 20 on VOC's 500 px images).
        min_size_reference: the longer side ``min_size`` is meant for; a smaller image's
            minimum is scaled down with its longer side (``min_size * L / reference``,
            :func:`proposals.selective_search.scaled_min_size`), a larger image's stays
            ``min_size``. 0: ``min_size`` pixels on every image (R-CNN's fixed rule, and
            the rule of folders made before this setting existed, which are continued
            under it).
        max_boxes: keep the first this many boxes per image (R-CNN, SPP-net: about 2,000).
            Files are ranked best first in the paper's sense: each box's hierarchy
            priority (1 for a hierarchy's last merge, counting up towards its initial
            segments) times a uniform random number, ascending (Uijlings'
            ``Image2HierarchicalGrouping.m``, R-CNN ``selective_search_boxes.m``, IJCV 2013
            section 5; docs/sources.md 1.11), so large merged regions tend to come first.
        seed: seed of the ``np.random.default_rng`` that draws the ranking's random
            factors, made afresh per image (the order depends on the image and seed only).
        max_pixels: larger images are searched on a copy shrunk to this many pixels,
            boxes scaled back (bounded memory; VOC images are at most 0.25 MP).
    """

    mode: str = field(default="fast", metadata={"help": (
        "fast: selective search's fast mode as the paper and R-CNN ran it (HSV+Lab, k=50,100, two strategies;"
        " on VOC07 test the first 100 / 300 / all boxes cover 62% / 80% / 95% of objects at IoU 0.5). "
        "opencv-fast / opencv-quality: OpenCV's parameter sets on the same engine (opencv-fast: "
        "k=150,300,450, ~1,100 boxes, 94%; opencv-quality: five colour spaces, k=150..750, four strategies, "
        "~5x slower).")})
    min_size: float = field(default=R_CNN_MIN_SIZE, metadata={"help": (
        "Drop boxes narrower or shorter than this, in pixels of an image whose longer side is --min-size-reference "
        "(R-CNN: 20 on VOC's 500 px images); scaled down for smaller images.")})
    max_boxes: int = field(default=R_CNN_MAX_BOXES, metadata={"help": (
        "Keep the first N boxes per image. Files are ranked best first as in the paper's selective search: "
        "each box's hierarchy priority (1 = a hierarchy's last merge, the whole image; larger towards its "
        "initial segments) times a uniform random number, ascending (Uijlings et al. IJCV 2013 sec. 5; R-CNN "
        "selective_search_boxes.m), so large merged regions tend to come first (R-CNN: ~2000).")})
    seed: int = field(default=0, metadata={"help": (
        "Seed of the random factor in the ranking (numpy, reset per image: results do not depend on order or "
        "--workers).")})
    min_size_reference: int = field(default=VOC_LONGER_SIDE, metadata={"help": (
        "The longer side --min-size is meant for: an image with a shorter longer side L keeps boxes down to "
        "min-size x L / reference px (e.g. 16 px on a 400 x 300 image), so that its small objects stay reachable; "
        "0: --min-size px on every image (R-CNN's fixed rule).")})
    max_pixels: int = field(default=1_000_000, metadata={"help": (
        "Search larger images on a copy shrunk to this many pixels (boxes scaled back); bounds memory and "
        "time.")})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ProposalSettings: unknown mode {self.mode!r}; choose from {list(MODES)}")
        if self.max_pixels < 1:
            raise ValueError(f"ProposalSettings: need max_pixels >= 1, got {self.max_pixels}")
        if self.min_size_reference < 0:
            raise ValueError(f"ProposalSettings: need min_size_reference >= 0, got {self.min_size_reference}")
        if self.min_size < 0 or self.max_boxes < 1:
            raise ValueError(f"ProposalSettings: need min_size >= 0 and max_boxes >= 1, got {self.min_size}, {self.max_boxes}")


@dataclass
class ProposalsSummary:
    """What a run did. ``boxes_per_image`` covers every finished image in the folder."""

    out: Path
    images: int = 0
    done: int = 0
    skipped: int = 0  # images whose proposals were already in the folder
    bad: list[BadImageError] = field(default_factory=list)
    boxes_per_image: float = 0.0
    seconds: float = 0.0
    seconds_per_image_per_worker: float = 0.0
    workers: int = 1
    action: str = "computed"
    shard: tuple[int, int] = (1, 1)

    def describe(self) -> str:
        """One line for the command line."""
        text = (
            (f"shard {self.shard[0]}/{self.shard[1]}: " if self.shard[1] > 1 else "")
            + f"{self.images} images -> {self.out}: {self.done} {self.action}, {self.skipped} already done, "
            f"{len(self.bad)} bad; {self.boxes_per_image:.1f} boxes/image; {self.seconds:.1f} s"
        )
        if self.seconds_per_image_per_worker:
            text += f" ({self.seconds_per_image_per_worker:.2f} s/image/worker of selective search, {self.workers} workers)"
        return text


@dataclass(frozen=True)
class _Task:
    image_id: str
    path: str
    width: int
    height: int
    out: str
    settings: ProposalSettings


@dataclass(frozen=True)
class _Result:
    image_id: str
    path: str
    num_boxes: int = 0
    seconds: float = 0.0
    error: str | None = None


def run_proposals(
    images: Sequence[ImageLike],
    out: Path,
    settings: ProposalSettings,
    dataset: dict[str, Any] | None = None,
    *,
    workers: int | None = None,
    force: bool = False,
    skip_bad: bool = False,
    progress: Progress | None = None,
    bad: Sequence[Exception] | None = None,
    shard: tuple[int, int] = (1, 1),
) -> ProposalsSummary:
    """Selective search on ``images``, one ``<out>/<image_id>.npy`` per image.

    Args:
        images: the images, each with ``image_id``, ``path`` (a JPEG) and the expected
            ``width``/``height`` in pixels (e.g. ``VOCImage`` from ``read_voc``).
        out: the stage folder.
        settings: selective search settings (they key the folder).
        dataset: extra settings that key the folder, e.g. ``{"year": "2007",
            "image_set": "test"}``.
        workers: worker processes (default: the CPUs, shared among the processes of a
            launched job on this machine); 1 runs in this process.
        force: recompute a folder made with other settings instead of refusing.
        skip_bad: count unreadable images in the summary instead of stopping.
        progress: the progress protocol (:class:`spp_detect.stage_dir.Progress`), or None.
        bad: images found unusable before the run (e.g. by ``read_voc(bad=...)``),
            counted and listed in the summary.
        shard: ``(k, n)``, 1-based: this process takes images ``k-1, k-1+n, ...``; the n
            shards may run at once into the same ``out`` (shard 1 applies ``force``).

    Returns:
        The :class:`ProposalsSummary`.

    Raises:
        SettingsChanged: ``out`` holds results of other settings and ``force`` is false.
        BadImageError: an image cannot be read (unless ``skip_bad``); files already
            finished stay, nothing half-written is left under a final name.
    """
    import cv2

    out = Path(out)
    start = time.perf_counter()
    workers = max(1, min(workers or cpus_per_process(), max(1, len(images))))
    settings, keyed = _continued_rule(out, settings, force)
    config = {
        "source": "selective_search",
        "engine": ENGINE,
        **keyed,
        "opencv": cv2.__version__,
        "dataset": dataset or {},
        "boxes": "npy float32 [N, 4] 0-based continuous (x1, y1, x2, y2) image pixels",
    }
    ids = [image.image_id for image in images]
    if len(set(ids)) != len(ids):
        raise ValueError("run_proposals: image ids repeat")
    stage = open_stage(out, STAGE, config, force=force, shard=shard)
    pending, skipped, _ = stage.todo(images, lambda image: boxes_path(out, image.image_id))
    images, ids = stage.mine(images), stage.mine(ids)
    todo = [_Task(image.image_id, str(image.path), int(image.width), int(image.height), str(out), settings)
            for image in pending]
    summary = ProposalsSummary(out=out, images=len(images) + len(bad or []), skipped=skipped, workers=workers,
                               shard=shard, bad=list(bad or []))
    log.info("proposals: %d images, %d to compute, %d workers, %s", len(images), len(todo), workers, config)

    worker_seconds = 0.0
    with closing(_results(todo, workers)) as results:
        bar = track(progress, results, "proposals", total=len(images), initial=summary.skipped)
        for result in bar:
            if result.error is not None:
                error = BadImageError(Path(result.path), result.error, result.image_id)
                if not skip_bad:
                    raise error
                log.warning("%s (skipped)", error)
                summary.bad.append(error)
                continue
            summary.done += 1
            worker_seconds += result.seconds
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(boxes=result.num_boxes, refresh=False)

    counts = [_num_rows(boxes_path(out, i)) for i in ids if boxes_path(out, i).is_file()]
    summary.boxes_per_image = float(np.mean(counts)) if counts else 0.0
    summary.seconds = time.perf_counter() - start
    summary.seconds_per_image_per_worker = worker_seconds / summary.done if summary.done else 0.0
    return summary


def _continued_rule(out: Path, settings: ProposalSettings, force: bool) -> tuple[ProposalSettings, dict[str, Any]]:
    """``(settings to run with, their manifest form)``. A folder made before
    ``min_size_reference`` existed (its manifest has no such entry) used R-CNN's fixed
    minimum: with the default reference it is continued under that rule and its key (so
    that its boxes, and the caches keyed by it, stay valid); ``force`` starts it afresh
    under the scaled rule. New folders record the setting."""
    config = settings_config(settings)
    manifest = out / "manifest.json"
    if force or settings.min_size_reference != VOC_LONGER_SIDE or not manifest.is_file():
        return settings, config
    try:
        old = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError):
        return settings, config  # a damaged manifest: open_stage says so
    old_config = old.get("config", {}) if isinstance(old, dict) else {}
    if old.get("stage") != STAGE or "min_size_reference" in old_config or "min_size" not in old_config:
        return settings, config
    del config["min_size_reference"]
    return replace(settings, min_size_reference=0), config


def import_proposals(source: Path, out: Path, *, force: bool = False) -> ProposalsSummary:
    """Fill the proposals folder ``out`` from a ``.mat`` file or another proposals folder.

    Boxes are stored as they are (converted to 0-based xyxy), with no filtering; the
    folder is keyed by the source's name and content hash.

    Raises:
        SettingsChanged: ``out`` holds other proposals and ``force`` is false.
        ValueError, FileNotFoundError: ``source`` cannot be read (see ``load_proposals``).
    """
    source, out = Path(source), Path(out)
    start = time.perf_counter()
    proposals = load_proposals(source)  # read fully before touching ``out``
    config = {
        "source": "import",
        "file": source.name,
        "source_key": source_key(source),  # manifest key of a folder, sha256 of a file
        "boxes": "npy float32 [N, 4] 0-based continuous (x1, y1, x2, y2) image pixels",
    }
    open_stage(out, STAGE, config, force=force)
    summary = ProposalsSummary(out=out, images=len(proposals), action="imported")
    for image_id, boxes in proposals.items():
        if _finished(boxes_path(out, image_id)):
            summary.skipped += 1
        else:
            write_boxes(out, image_id, boxes)
            summary.done += 1
    counts = [len(boxes) for boxes in proposals.values()]
    summary.boxes_per_image = float(np.mean(counts)) if counts else 0.0
    summary.seconds = time.perf_counter() - start
    return summary


def _results(todo: list[_Task], workers: int):
    """Yield a :class:`_Result` per task as they finish."""
    if not todo:
        return
    if workers == 1:
        import cv2

        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for task in todo:
                yield _propose_one(task)
        finally:
            cv2.setNumThreads(threads)
        return
    # forkserver/spawn: a clean child, not a fork of a process that may hold OpenMP threads.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        # Keep at most 2 tasks per worker in flight so a stop cancels little work.
        pending: set[Future] = set()
        queue = iter(todo)
        try:
            for task in queue:
                pending.add(pool.submit(_propose_one, task))
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def _init_worker() -> None:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _finished(path: Path) -> bool:
    """The image's file exists and is whole; a damaged one (e.g. a copy cut short) is
    removed, to be redone."""
    if not path.is_file():
        return False
    problem = check_file(path)
    if problem is None:
        return True
    log.warning("proposals: redoing %s: %s", path, problem)
    path.unlink(missing_ok=True)
    return False


def _propose_one(task: _Task) -> _Result:
    import cv2

    try:
        image = read_image(task.path, (task.width, task.height))
    except ImageReadError as exc:
        return _Result(task.image_id, task.path, error=exc.reason)
    start = time.perf_counter()
    settings = task.settings
    try:
        boxes = propose(image, settings.mode, settings.min_size, settings.max_boxes, settings.seed, settings.max_pixels,
                        settings.min_size_reference)
    except cv2.error as exc:
        return _Result(task.image_id, task.path, error=f"OpenCV selective search failed ({exc})")
    seconds = time.perf_counter() - start
    write_boxes(Path(task.out), task.image_id, boxes)
    return _Result(task.image_id, task.path, len(boxes), seconds)


def _num_rows(path: Path) -> int:
    return int(np.load(path, allow_pickle=False).shape[0])


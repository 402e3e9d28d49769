"""Reading and writing proposals: stage folders and R-CNN's MATLAB ``.mat`` files.

In memory, proposals are ``dict[str, np.ndarray]``: image id -> ``np.ndarray[N, 4]``
float32 boxes in the project's one convention (0-based continuous ``(x1, y1, x2, y2)``
image pixels, :mod:`spp_detect.boxes`), ranked best first.

On disk:

* a **proposals stage folder** (written by ``spp-detect proposals``): ``manifest.json``
  plus one ``<image_id>.npy`` per image holding that array (``[0, 4]`` when an image has
  no boxes), each written atomically;
* a **selective-search .mat file** in the layout of the files that R-CNN, SPP-net and
  Fast R-CNN used (``selective_search_data/voc_2007_test.mat``): ``images``, a cell array
  of image ids, and ``boxes``, a cell array of ``[N, 4]`` double arrays, MATLAB 1-based
  inclusive pixels in ``(y1, x1, y2, x2)`` order.

The .mat conversion, both ways, is one line each (:func:`mat_to_xyxy`,
:func:`xyxy_to_mat`): reorder to ``(x1, y1, x2, y2)`` as py-faster-rcnn does
(``raw[:, (1, 0, 3, 2)] - 1``), but subtract 1 from the left/top edges only: the
1-based inclusive pixel ``1..x2`` is the continuous interval ``[0, x2)``, as in
:func:`spp_detect.boxes.from_voc_1based`. (py-faster-rcnn subtracts 1 everywhere because it
keeps 0-based *inclusive* boxes.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from spp_detect.boxes import from_voc_1based, to_voc_1based
from spp_detect.stage_dir import atomic_write, check_file, read_manifest

__all__ = [
    "ProposalsError",
    "STAGE",
    "BOXES_SUFFIX",
    "boxes_path",
    "write_boxes",
    "load_proposals",
    "load_mat",
    "save_mat",
    "mat_to_xyxy",
    "xyxy_to_mat",
]

#: Stage name recorded in the manifest of a proposals folder.
STAGE = "proposals"
#: Suffix of the per-image files in a proposals folder.
BOXES_SUFFIX = ".npy"


class ProposalsError(ValueError):
    """One image's proposals are missing, damaged or invalid; the message names the file.
    ``image_id`` is that image."""

    def __init__(self, message: str, image_id: str | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id

    def __reduce__(self):
        return (type(self), (str(self), self.image_id))


def check_boxes(boxes: np.ndarray, where: str) -> None:
    """Raise :class:`ProposalsError` if ``boxes`` (``[N, 4]`` xyxy) hold NaN/infinite
    coordinates or inverted boxes (``x2 < x1`` or ``y2 < y1``); ``where`` starts the message."""
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        raise ProposalsError(f"{where}: {int((~finite).sum())} of {len(boxes)} boxes have NaN or infinite coordinates")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        first = boxes[np.argmax(inverted)].tolist()
        raise ProposalsError(f"{where}: {int(inverted.sum())} of {len(boxes)} boxes are inverted (x2 < x1 or y2 < y1), e.g. {first}")


def mat_to_xyxy(raw: np.ndarray) -> np.ndarray:
    """MATLAB 1-based inclusive ``(y1, x1, y2, x2)`` ``[N, 4]`` -> 0-based continuous xyxy float32."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, 4)
    return from_voc_1based(raw[:, (1, 0, 3, 2)]).astype(np.float32)  # (y1,x1,y2,x2) -> (x1,y1,x2,y2)


def xyxy_to_mat(boxes: np.ndarray) -> np.ndarray:
    """0-based continuous xyxy ``[N, 4]`` -> MATLAB 1-based inclusive ``(y1, x1, y2, x2)`` float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return to_voc_1based(boxes)[:, (1, 0, 3, 2)]  # (x1,y1,x2,y2) -> (y1,x1,y2,x2)


def boxes_path(folder: Path, image_id: str) -> Path:
    """The per-image file ``<folder>/<image_id>.npy`` of a proposals folder."""
    if not image_id or "/" in image_id or "\\" in image_id or image_id.startswith("."):
        raise ValueError(f"proposals: image id {image_id!r} cannot name a file")
    return Path(folder) / f"{image_id}{BOXES_SUFFIX}"


def write_boxes(folder: Path, image_id: str, boxes: np.ndarray) -> Path:
    """Write one image's boxes atomically (temp file + ``os.replace``); returns the path.

    Args:
        boxes: ``np.ndarray[N, 4]``, 0-based continuous xyxy image pixels (stored float32).
    """
    boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
    path = boxes_path(folder, image_id)
    atomic_write(path, lambda tmp: np.save(tmp, boxes, allow_pickle=False))
    return path


def load_proposals(
    path: Path | str, image_ids: Iterable[str] | None = None, *, bad: list[ProposalsError] | None = None
) -> dict[str, np.ndarray]:
    """Load proposals from a proposals stage folder or an R-CNN selective-search ``.mat``.

    Args:
        path: a folder written by ``spp-detect proposals`` or a ``.mat`` file with
            ``images`` and ``boxes`` (1-based ``(y1, x1, y2, x2)``, converted on load).
        image_ids: if given, only these images, and every one of them must be present.
        bad: if given, an image whose entry is missing, truncated, or holds NaN or
            inverted boxes is appended here (a :class:`ProposalsError` with its
            ``image_id``) and left out, instead of raising (``--skip-bad``).

    Returns:
        image id -> ``np.ndarray[N, 4]`` float32, 0-based continuous ``(x1, y1, x2, y2)``
        image pixels, in the file's ranking order (``[0, 4]`` for an image without boxes).
        Folder entries come in sorted id order, .mat entries in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist or is a folder without a manifest.
        ValueError: the folder is another stage's output, or the file is malformed
            (:class:`ProposalsError` for one image's truncated file or invalid boxes).
        KeyError: an id of ``image_ids`` has no proposals (the message names up to 5).
    """
    path = Path(path)
    errors: list[ProposalsError] = []
    if path.is_dir():
        proposals = _load_folder(path, None if image_ids is None else list(image_ids), errors)
    elif path.is_file():
        if path.suffix.lower() != ".mat":
            raise ValueError(f"proposals: expected a proposals folder or a .mat file, got {path}")
        proposals = load_mat(path, errors)
    else:
        raise FileNotFoundError(f"proposals: no such file or folder: {path}")
    if errors and bad is None:
        raise errors[0]
    if image_ids is None:
        if bad is not None:
            bad.extend(errors)
        return proposals
    wanted = list(image_ids)
    failed = {e.image_id for e in errors}
    missing = [i for i in wanted if i not in proposals and i not in failed]
    if missing and bad is None:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KeyError(
            f"proposals: {path} has no boxes for {len(missing)} of the {len(wanted)} image(s): "
            f"{', '.join(missing[:5])}{more}{_made_for(path)}"
        )
    if bad is not None:
        bad.extend(e for e in errors if e.image_id in set(wanted))
        bad.extend(ProposalsError(f"proposals: {path} has no boxes for {i}{_made_for(path)}", i) for i in missing)
    return {i: proposals[i] for i in wanted if i in proposals}


def _made_for(path: Path) -> str:
    """`` (it was made for image set 'X')`` for a proposals folder that records its image set."""
    if not path.is_dir():
        return ""
    try:
        dataset = read_manifest(path).get("config", {}).get("dataset", {})
    except (FileNotFoundError, ValueError):
        return ""
    if not isinstance(dataset, dict) or "image_set" not in dataset:
        return ""
    return f" (it was made for image set '{dataset['image_set']}' of VOC{dataset.get('year', '?')})"


def load_mat(path: Path | str, errors: list[ProposalsError] | None = None) -> dict[str, np.ndarray]:
    """Read an R-CNN-style selective-search ``.mat`` (``images``, ``boxes``).

    ``errors``: if given, images whose boxes are NaN or inverted are appended here and
    left out instead of raising.

    Returns:
        image id -> ``np.ndarray[N, 4]`` float32, 0-based continuous xyxy, file order.

    Raises:
        ValueError: missing fields, unequal lengths, repeated ids, boxes not ``[N, 4]``, or
            a MATLAB v7.3 (HDF5) file, which scipy cannot read (re-save it with ``-v7``).
    """
    import scipy.io

    path = Path(path)
    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # scipy raises this for v7.3 files
        raise ValueError(f"proposals: {path} is a MATLAB v7.3 file; re-save it with save(..., '-v7')") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"proposals: cannot read {path} as a .mat file ({exc})") from exc
    for field in ("images", "boxes"):
        if field not in data:
            raise ValueError(f"proposals: {path} has no '{field}' variable (found {sorted(k for k in data if not k.startswith('__'))})")
    images = np.asarray(data["images"]).ravel()
    boxes = np.asarray(data["boxes"], dtype=object).ravel()
    if len(images) != len(boxes):
        raise ValueError(f"proposals: {path} has {len(images)} images but {len(boxes)} box arrays")
    proposals: dict[str, np.ndarray] = {}
    for image, raw in zip(images, boxes):
        image_id = _mat_string(image)
        if image_id in proposals:
            raise ValueError(f"proposals: {path} lists image {image_id!r} twice")
        raw = np.asarray(raw)
        if raw.size % 4 or (raw.size and (raw.ndim != 2 or raw.shape[1] != 4)):
            raise ValueError(f"proposals: {path}: boxes of {image_id!r} have shape {raw.shape}, expected [N, 4]")
        boxes = mat_to_xyxy(raw)
        try:
            check_boxes(boxes, f"proposals: {path}: boxes of {image_id!r}")
        except ProposalsError as exc:
            exc.image_id = image_id
            if errors is None:
                raise
            errors.append(exc)
            continue
        proposals[image_id] = boxes
    return proposals


def export_mat_file(folder: Path | str, path: Path | str, image_ids: Sequence[str] | None = None) -> int:
    """Write the proposals folder ``folder`` (``image_ids`` of it, default all) as an
    R-CNN-style ``.mat`` (:func:`save_mat`); returns the number of images written."""
    proposals = load_proposals(folder, image_ids)
    save_mat(path, proposals)
    return len(proposals)


def save_mat(path: Path | str, proposals: Mapping[str, np.ndarray], image_ids: Iterable[str] | None = None) -> Path:
    """Write proposals as an R-CNN-style ``.mat`` (atomically), the inverse of :func:`load_mat`.

    Args:
        path: the ``.mat`` file.
        proposals: image id -> ``np.ndarray[N, 4]`` 0-based continuous xyxy.
        image_ids: order (and subset) of the images; default: ``proposals``' order.

    Returns:
        ``path``. ``images`` is a 1 x M cell of char ids; ``boxes`` a 1 x M cell of
        ``[N, 4]`` double arrays, 1-based inclusive ``(y1, x1, y2, x2)``.

    A ``path`` that already holds exactly these proposals is left as it is: a ``.mat``
    header records when it was written, and the file's SHA-256 keys the caches made from it.
    """
    import scipy.io

    path = Path(path)
    ids = list(proposals) if image_ids is None else list(image_ids)
    if path.is_file() and _holds(path, ids, proposals):
        return path
    images = np.empty(len(ids), dtype=object)
    boxes = np.empty(len(ids), dtype=object)
    for i, image_id in enumerate(ids):
        images[i] = image_id
        boxes[i] = xyxy_to_mat(proposals[image_id])
    atomic_write(path, lambda tmp: scipy.io.savemat(str(tmp), {"images": images, "boxes": boxes}, do_compression=True))
    return path


def _holds(path: Path, ids: list[str], proposals: Mapping[str, np.ndarray]) -> bool:
    """Whether the ``.mat`` at ``path`` holds exactly ``proposals`` of ``ids``, in that order."""
    try:
        existing = load_mat(path)
    except (ValueError, OSError):
        return False
    return list(existing) == ids and all(
        np.array_equal(existing[i], np.asarray(proposals[i], dtype=np.float32).reshape(-1, 4)) for i in ids)


def _load_folder(folder: Path, image_ids: list[str] | None, errors: list[ProposalsError]) -> dict[str, np.ndarray]:
    manifest = read_manifest(folder)
    if manifest.get("stage") != STAGE:
        raise ValueError(f"proposals: {folder} holds '{manifest.get('stage')}' output, not proposals")
    if image_ids is None:
        # Names starting with '.' are temporary files of an unfinished write.
        files = sorted(p for p in folder.glob(f"*{BOXES_SUFFIX}") if not p.name.startswith("."))
        pairs = [(p.name[: -len(BOXES_SUFFIX)], p) for p in files]
    else:
        pairs = [(i, boxes_path(folder, i)) for i in image_ids]
    proposals = {}
    for image_id, file in pairs:
        if not file.is_file():
            continue  # reported as missing by the caller
        problem = check_file(file)
        if problem is None:
            boxes = np.load(file, allow_pickle=False)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                problem = f"an array of shape {boxes.shape}, expected [N, 4]"
        if problem is not None:
            errors.append(ProposalsError(f"proposals: {file} is unusable: {problem}; rerun `spp-detect proposals` to redo it", image_id))
            continue
        boxes = boxes.astype(np.float32, copy=False)
        try:
            check_boxes(boxes, f"proposals: {file}")
        except ProposalsError as exc:
            exc.image_id = image_id
            errors.append(exc)
            continue
        proposals[image_id] = boxes
    return proposals


def _mat_string(value) -> str:
    # loadmat gives a cell of char arrays as an object array of 1-element str arrays, and
    # a char matrix as a str array.
    array = np.asarray(value).ravel()
    if array.size == 0 or not isinstance(array[0], str):
        raise ValueError(f"proposals: image ids in a .mat file must be text, got {value!r}")
    return array[0].strip()

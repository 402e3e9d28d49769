"""Reading image pixels: the one function through which every stage reads an image.

The rule (VOC's): an annotation's ``<size>`` and boxes refer to the pixel array **as
stored in the file**. So :func:`read_image` ignores any EXIF orientation tag
(``cv2.IMREAD_IGNORE_ORIENTATION``); a viewer may show such a photo rotated, but the
boxes and the pixels the stages read stay consistent. When the stored size does not match
the annotation but the EXIF-rotated size does, the error says so.

What is accepted, and how it is read (``np.ndarray[H, W, 3]`` uint8 BGR, as ``cv2.imread``):

* JPEG, PNG, BMP, TIFF, WebP, decided by the file's content, not its name (PNG data
  under a ``.jpg`` name reads as the PNG it is);
* greyscale: replicated to 3 channels; CMYK JPEG: converted by libjpeg; alpha: dropped
  (the colour channels as stored, not composited);
* up to :data:`MAX_PIXELS` pixels, checked from the header before anything is decoded.

What is refused, with :class:`ImageReadError` naming the file and the reason: a missing
or empty file, an unknown format, a truncated or corrupt file (a strict decode with
Pillow, which raises where OpenCV's ``imread`` would return the grey remainder of a
truncated JPEG), more than :data:`MAX_PIXELS` pixels, and a size other than the
annotation's.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

__all__ = ["MAX_PIXELS", "ImageReadError", "read_image"]

#: Images above this many pixels are refused before decoding (100 MP: 300 MB as BGR).
#: VOC images are at most 500 x 500.
MAX_PIXELS = 100_000_000

#: Leading bytes of the formats accepted.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
#: EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
_TRANSPOSING = {5, 6, 7, 8}


class ImageReadError(RuntimeError):
    """An image cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"unreadable image {path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes despite the 2-argument init
        return (type(self), (self.path, self.reason))


def _format_of(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)


def read_image(
    path: Path | str, expected_size: tuple[int, int] | None = None, *, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode an image file strictly, as stored (EXIF orientation ignored).

    Args:
        path: the image file.
        expected_size: ``(width, height)`` the annotation gives, checked if given.
        max_pixels: refuse larger images before decoding them.

    Returns:
        ``np.ndarray[H, W, 3]`` uint8, BGR channel order.

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated or corrupt,
            too large, or of another size than ``expected_size``.
    """
    import cv2
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a file")
    data = path.read_bytes()
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    kind = _format_of(data)
    if kind is None:
        raise ImageReadError(path, f"not a JPEG, PNG, BMP, TIFF or WebP file (starts with {data[:8]!r})")
    try:
        with Image.open(io.BytesIO(data)) as pil:
            width, height = pil.size
            if width * height > max_pixels:
                raise ImageReadError(path, f"{width}x{height} pixels, above the limit of {max_pixels / 1e6:g} MP")
            orientation = int(pil.getexif().get(0x0112, 1) or 1)
            if kind == "JPEG":
                # Decode at 1/8 size: every entropy-coded byte is still read, so a truncated
                # file is still detected, at a fraction of the time and memory.
                pil.draft(pil.mode, (max(1, width // 8), max(1, height // 8)))
            pil.load()  # raises on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, f"cannot decode it as {kind}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"truncated or corrupt {kind} data ({exc})") from None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageReadError(path, f"OpenCV cannot decode this {kind} file")
    if (image.shape[1], image.shape[0]) != (width, height):
        raise ImageReadError(path, f"decoders disagree on its size ({image.shape[1]}x{image.shape[0]} vs {width}x{height})")
    if expected_size is not None and (width, height) != tuple(expected_size):
        ew, eh = expected_size
        reason = f"stored size {width}x{height}, annotation says {ew}x{eh}"
        if orientation in _TRANSPOSING and (height, width) == (ew, eh):
            reason += (
                f"; the annotation matches the EXIF-rotated view (orientation {orientation}), but boxes must"
                " refer to the stored pixels: save the image rotated (e.g. PIL.ImageOps.exif_transpose)"
                " or fix the annotation"
            )
        raise ImageReadError(path, reason)
    return image

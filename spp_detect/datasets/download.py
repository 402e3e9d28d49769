"""Download PASCAL VOC2007 for users who do not have it on disk.

Never exercised by the tests (they read ``../shared/data``); used by the README's main
job when that folder is absent.
"""

from __future__ import annotations

import tarfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

__all__ = ["VOC2007_URLS", "download_voc2007"]

#: The official VOC2007 archives (host.robots.ox.ac.uk, the challenge's own site).
VOC2007_URLS: tuple[str, ...] = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar",
)


def download_voc2007(out_dir: Path | str) -> Path:
    """Download and unpack VOC2007 trainval + test into ``out_dir``.

    Returns the VOCdevkit folder (``out_dir/VOCdevkit``), which holds ``VOC2007/``; an
    archive already unpacked (its list file present) is not fetched again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devkit = out / "VOCdevkit"
    for url, marker in zip(VOC2007_URLS, ("trainval.txt", "test.txt")):
        if (devkit / "VOC2007" / "ImageSets" / "Main" / marker).is_file():
            continue
        archive = out / url.rsplit("/", 1)[1]
        if not archive.is_file():
            partial = archive.with_suffix(".part")
            with urllib.request.urlopen(url) as response, open(partial, "wb") as fh:
                total = int(response.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=archive.name) as bar:
                    while chunk := response.read(1 << 20):
                        fh.write(chunk)
                        bar.update(len(chunk))
            partial.replace(archive)
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")
    return devkit

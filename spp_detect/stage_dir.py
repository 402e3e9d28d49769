"""Keyed, atomic, resumable stage output folders.

A stage (``proposals``, ``extract``, ...) writes into one folder:

* ``manifest.json``: ``{"stage", "config", "key"}`` where ``key`` is the SHA-256 of the
  canonical JSON of ``config`` (the stage's settings, the keys of the stages it read and
  the package version). It is written before any per-image file.
* one file per image, each written to a temporary name and ``os.replace``-d into place,
  so a file under its final name is always complete (luigi's ``atomic_file``).

Reopening a folder whose manifest has another key is refused with a message naming the
settings that changed, unless ``force=True``, which deletes the old per-image files.
A rerun with the same settings skips images whose file exists.

Several processes may fill one folder at once (the shards of a ``torchrun`` or ``srun``
job, :mod:`spp_detect.distributed`): the manifest is created once, race-free, and checked
by all; each writes its own images; a rerun skips finished images whoever wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spp_detect import __version__

__all__ = ["SettingsChanged", "config_key", "atomic_write", "open_stage_dir", "read_manifest", "source_key", "file_sha256"]

MANIFEST = "manifest.json"


class SettingsChanged(RuntimeError):
    """A stage folder holds results computed with other settings."""


def config_key(config: dict[str, Any]) -> str:
    """SHA-256 hex digest of the canonical (sorted-keys) JSON of ``config``."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place.

    The temporary file keeps ``path``'s suffix (some writers, like ``np.savez``, append one
    otherwise). On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; finished files get the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def source_key(path: Path) -> str:
    """Identity of an upstream input for a config: a stage folder's manifest key, or
    ``sha256:<digest>`` of a file (a weights file, an imported ``.mat``)."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path)["key"]
    return f"sha256:{file_sha256(path)}"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished or running stage folder.

    Raises:
        FileNotFoundError: ``folder`` is not a stage folder (no ``manifest.json``).
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a spp-detect stage folder (no {MANIFEST})")
    return json.loads(path.read_text())


def open_stage_dir(
    folder: Path,
    stage: str,
    config: dict[str, Any],
    force: bool = False,
    *,
    leader: bool = True,
    wait_s: float = 600.0,
) -> dict[str, Any]:
    """Create or reopen a stage folder for ``config``; returns its manifest.

    Several processes (the shards of one job) may open the same folder at once: the
    manifest is created exactly once (a complete temporary file hard-linked to
    ``manifest.json``, which fails if another process got there first), and every
    process then reads it and compares the key.

    Args:
        folder: the output folder (created if missing).
        stage: the stage name, recorded in the manifest.
        config: JSON-serialisable settings; results are reusable only under equal configs.
        force: drop results computed under another config instead of refusing.
        leader: in a sharded run, whether this process applies ``force`` (shard 1 does).
            A non-leader given ``force`` does not delete anything: it waits up to
            ``wait_s`` seconds for the leader to replace a manifest of other settings.
        wait_s: see ``leader``.

    Raises:
        SettingsChanged: the folder holds results of another stage or other settings and
            ``force`` is false (or, for a non-leader, the leader did not replace them in
            time); the message lists the settings that differ.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "package_version": __version__}
    manifest = {"stage": stage, "config": config, "key": config_key(config)}
    path = folder / MANIFEST
    deadline = time.monotonic() + wait_s
    while True:
        old = _read_or_create(path, manifest)
        if old.get("stage") == stage and old.get("key") == manifest["key"]:
            return old
        if not force:
            raise SettingsChanged(_describe_change(folder, old, manifest))
        if leader:
            break
        if time.monotonic() > deadline:
            raise SettingsChanged(_describe_change(folder, old, manifest) + " (shard 1, which applies --force, did not)")
        time.sleep(0.2)
    # the leader with force: remove the old results, then swap the manifest in one step,
    # so a waiting shard starts only once the old files are gone
    for entry in folder.iterdir():
        if entry.name == MANIFEST:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    atomic_write(path, lambda p: p.write_text(_manifest_text(manifest)))
    return manifest


def _manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str)


def _read_or_create(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest at ``path``, creating it from ``manifest`` if there is none (race-free)."""
    for _ in range(100):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            pass
        except json.JSONDecodeError:  # a non-atomic writer (the O_EXCL fallback) mid-write
            time.sleep(0.05)
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(_manifest_text(manifest))
            os.chmod(tmp_name, 0o644)
            try:
                os.link(tmp_name, path)  # atomic, fails if the manifest exists
                return manifest
            except FileExistsError:
                continue  # another process made it first: read and compare its key
            except OSError:  # a file system without hard links
                try:
                    with open(path, "x") as fh:
                        fh.write(_manifest_text(manifest))
                    return manifest
                except FileExistsError:
                    continue
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    raise RuntimeError(f"cannot read or create {path}")


def _describe_change(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("stage") != new["stage"]:
        return f"{folder} holds '{old.get('stage')}' output, not '{new['stage']}'; use another folder or --force"
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    changed = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    details = "; ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in changed)
    return f"{folder} was made with other settings ({details}); rerun with --force to recompute"

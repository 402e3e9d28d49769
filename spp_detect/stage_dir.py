"""Keyed, atomic, resumable stage output folders, and the contract every stage follows.

Every stage is one library call ``run_<stage>(inputs, out, settings, *, device, force,
shard, progress) -> <Stage>Summary`` with one frozen ``<Stage>Settings`` dataclass that
holds its defaults. :func:`settings_config` is the one way settings enter a manifest (and
:func:`settings_from_config` the way back); :func:`open_stage` opens the folder for this
process's shard and gives the to-do list (:class:`StageDir`); per-item files are written
with :func:`atomic_write` / :func:`write_npz`; the shard that finds every item done
(:meth:`StageDir.all_done`) writes the stage's final files.

A stage (``proposals``, ``extract``, ...) writes into one folder:

* ``manifest.json``: ``{"stage", "config", "key"}`` where ``key`` is the SHA-256 of the
  canonical JSON of ``config`` (the stage's settings, the keys of the stages it read and
  the package version). It is written before any per-image file.
* one file per image, each written to a temporary name and ``os.replace``-d into place,
  so a file under its final name is always complete (luigi's ``atomic_file``).

Reopening a folder whose manifest has another key is refused with a message naming the
settings that changed, unless ``force=True``, which deletes the old per-image files (of
other settings or the same: ``--force`` always recomputes).
A rerun with the same settings skips images whose file exists and is complete
(:func:`check_file`); a damaged one is redone.

Temporary files are named ``.<stem>.tmp-<pid>-<host>-<random><suffix>``. A run killed
with SIGKILL leaves its temporary file behind; the next :func:`open_stage_dir` of the
folder removes every temporary file whose writer process is dead (other live processes,
e.g. the other ``--shard`` workers of the same folder, keep theirs). A write that fails
(a full disk) removes its temporary file and raises :class:`StageWriteError`; files
already finished stay valid.

Several processes may fill one folder at once (the shards of a ``torchrun`` or ``srun``
job, :mod:`spp_detect.distributed`): the manifest is created once, race-free, and checked
by all; each writes its own images; a rerun skips finished images whoever wrote them.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import typing
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

from spp_detect import __version__

__all__ = [
    "Progress",
    "track",
    "BadSetting",
    "DamagedFile",
    "StageDir",
    "open_stage",
    "settings_config",
    "settings_from_config",
    "weights_identity",
    "weights_field",
    "SettingsChanged",
    "StageWriteError",
    "config_key",
    "atomic_write",
    "write_npz",
    "check_file",
    "remove_stale_temp_files",
    "open_stage_dir",
    "read_manifest",
    "source_key",
    "file_sha256",
]

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)

#: A short tag of this machine, in temp names (a pid only says something on its own host).
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
#: ``.<stem>.tmp-<pid>-<host>-<random><suffix>``: the temp files :func:`atomic_write` names.
_TEMP_RE = re.compile(r"^\..*\.tmp-(?P<pid>\d+)-(?P<host>[A-Za-z0-9]*)-")


class SettingsChanged(RuntimeError):
    """A stage folder holds results computed with other settings."""


class Progress(Protocol):
    """The one progress protocol of every stage: tqdm's call. A stage hands each of its loops
    to :func:`track`, which calls ``progress(items, desc=..., total=..., initial=...)`` and
    iterates over what it returns (``tqdm`` itself, or ``bar(...)`` of the command line,
    fits); ``progress=None`` shows nothing. A loop that reports more than its count (a loss)
    sets it with ``set_postfix`` where the returned object has one."""

    def __call__(self, iterable: Iterable[T], *, desc: str, total: int | None = None, initial: int = 0) -> Iterable[T]:
        ...


def track(progress: Progress | None, items: Iterable[T], desc: str, total: int | None = None,
          initial: int = 0) -> Iterable[T]:
    """``items`` behind ``progress`` (the stage's loop named ``desc``; ``total`` items in all,
    ``initial`` of them done before this run), or ``items`` itself without one."""
    if progress is None:
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items) + initial
    return progress(items, desc=desc, total=total, initial=initial)


class BadSetting(ValueError):
    """A setting cannot work with the stage's inputs (weights that do not fit the backbone, a
    scale too small for it, box regression asked of a model trained without it); ``setting``
    names it as the command line spells it without dashes (``"weights"``, ``"bbox"``), so
    the command names the option."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class DamagedFile(ValueError):
    """An input file of a stage is damaged or cut short; ``str()`` is one line naming the
    file and the command that makes it again (rerunning that command repairs it)."""

    def __init__(self, path: Path, reason: str, producer: str) -> None:
        super().__init__(f"{path} is damaged ({reason}); rerun `spp-detect {producer}` with the same options to redo it")
        self.path, self.producer = Path(path), producer


class StageWriteError(OSError):
    """Writing a stage file failed (e.g. the disk is full); ``str()`` names the file and
    the reason. Nothing half-written is left under a final name."""


def config_key(config: dict[str, Any]) -> str:
    """SHA-256 hex digest of the canonical (sorted-keys) JSON of ``config``."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_KEYED_BY_IDENTITY = "keyed_by_identity"


def weights_identity(weights: str) -> str:
    """How a ``weights`` setting keys a folder: ``"imagenet"`` and ``"none"`` as they are, a
    state_dict file by its content (``sha256:<digest>``), so a moved copy keys the same."""
    if weights in ("imagenet", "none") or str(weights).startswith("sha256:"):  # the latter: already an identity
        return weights
    return source_key(Path(weights))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return settings_config(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def weights_field(default: str = "imagenet") -> Any:
    """A settings field naming trunk weights (a file, ``"imagenet"`` or ``"none"``): it keys a
    manifest by the file's identity, not its path (:func:`weights_identity`)."""
    return dataclasses.field(default=default, metadata={_KEYED_BY_IDENTITY: True})


def settings_config(settings: Any) -> dict[str, Any]:
    """The manifest form of a stage's frozen settings, the one way any stage's settings
    enter its key: every field by name, tuples as lists, nested settings as dicts, a
    :func:`weights_field` by :func:`weights_identity`. A stage's manifest config is this
    plus the keys of its inputs."""
    return {f.name: weights_identity(getattr(settings, f.name)) if f.metadata.get(_KEYED_BY_IDENTITY)
            else _jsonable(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def settings_from_config(cls: type, config: Mapping[str, Any]) -> Any:
    """The settings of class ``cls`` recorded in a manifest ``config`` (the inverse of
    :func:`settings_config` for every field but a ``weights`` file, which stays its hash):
    lists back to tuples, nested settings rebuilt; other keys of ``config`` (inputs) ignored."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in config:
            continue
        value = config[f.name]
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = settings_from_config(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place.

    The temporary file keeps ``path``'s suffix (some writers, like ``np.savez``, append one
    otherwise). On any error the temporary file is removed and ``path`` is untouched.

    The temporary name carries this process's pid (see :func:`remove_stale_temp_files`);
    the file's data is flushed to disk (``fsync``) before the rename, so that a crash of
    the machine cannot leave an empty file under the final name.

    Raises:
        StageWriteError: an ``OSError`` while writing (e.g. ``ENOSPC``, disk full), naming
            ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.stem}.tmp-{os.getpid()}-{_HOST}-"
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; finished files get the usual mode
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StageWriteError):
            code = exc.errno or errno.EIO
            raise StageWriteError(code, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def write_npz(path: Path, arrays: Mapping[str, object]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` (what ``np.savez`` writes, readable by
    ``np.load``) atomically, byte for byte the same for the same arrays: the zip entries
    carry a fixed date instead of the time of writing."""
    import numpy as np

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)

    atomic_write(path, write)


def check_file(path: Path) -> str | None:
    """Why a stage file is not complete, or ``None`` if it looks whole (cheap: no data read).

    ``.npy``: the header parses and the file is exactly header + data long. ``.npz``: the
    zip's central directory (at its end) reads. ``.json``: it parses. Other suffixes:
    it exists and is not empty.
    """
    import numpy as np

    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)"
        if path.suffix == ".npy":
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(fh)
                expected = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size != expected:
                return f"{size} bytes, its header promises {expected} (truncated)"
        elif path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return f"damaged or truncated ({exc})"
    return None


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove temporary files of writers that no longer run; returns the removed paths.

    Only files of :func:`atomic_write`'s naming are considered: one of a process on this
    host that is dead goes; one of a live process stays (a concurrent ``--shard`` worker may
    be writing it); one of another host goes when it is over a day old.
    """
    removed = []
    for entry in Path(folder).glob(".*"):
        match = _TEMP_RE.match(entry.name)
        if match is None or not entry.is_file():
            continue
        try:
            if match["host"] == _HOST:
                stale = not _pid_alive(int(match["pid"]))
            else:
                stale = entry.stat().st_mtime < time.time() - 86400
            if stale:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), folder)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


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
        ValueError: the manifest is not valid JSON.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a spp-detect stage folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); rerun the stage with --force to start the folder again") from None
    return manifest


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
        force: start the folder again: drop its results, whether computed under another
            config (instead of refusing) or under this one (recompute).
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
        try:
            old = _read_or_create(path, manifest)
        except ValueError as exc:  # a damaged manifest
            if not force:
                raise SettingsChanged(str(exc)) from None
            old = {}
        if old.get("stage") == stage and old.get("key") == manifest["key"]:
            if not (force and leader):
                remove_stale_temp_files(folder)
                return old
            break  # --force recomputes a folder of the same settings too
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
    for attempt in range(100):
        try:
            manifest_read = json.loads(path.read_text())
            if not isinstance(manifest_read, dict):
                return read_manifest(path.parent)  # raises "is damaged"
            return manifest_read
        except FileNotFoundError:
            pass
        except (json.JSONDecodeError, UnicodeDecodeError):  # a writer mid-write (the O_EXCL fallback), or damage
            if attempt >= 20:
                return read_manifest(path.parent)  # still unreadable after 1 s: raises "is damaged"
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


@dataclass
class StageDir:
    """A stage folder opened by :func:`open_stage`, and this process's shard of the items.

    Attributes:
        folder: the stage folder; manifest: its manifest (``key``: what per-item files
            may record); shard: ``(k, n)``, 1-based.
    """

    folder: Path
    manifest: dict[str, Any]
    shard: tuple[int, int] = (1, 1)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def mine(self, items: Iterable[T]) -> list[T]:
        """This shard's items: ``k-1, k-1+n, ...`` of ``items`` (all of them in a 1/1 run)."""
        k, n = self.shard
        return list(items)[k - 1 :: n]

    def todo(
        self, items: Iterable[T], path_of: Callable[[T], Path], problem: Callable[[Path], str | None] = check_file
    ) -> tuple[list[T], int, int]:
        """``(to do, skipped, redone)`` for this shard: an item whose file exists and has no
        ``problem`` is skipped; a damaged one is logged and redone (counted in ``redone``)."""
        todo, skipped, redone = [], 0, 0
        for item in self.mine(items):
            path = path_of(item)
            found = problem(path) if path.is_file() else "missing"
            if found is None:
                skipped += 1
                continue
            if found != "missing":
                log.warning("%s: redoing %s: %s", self.manifest.get("stage"), path, found)
                redone += 1
            todo.append(item)
        return todo, skipped, redone

    def all_done(self, items: Iterable[T], path_of: Callable[[T], Path]) -> bool:
        """Whether every shard's items have their file: checked after this shard's last
        write, the last shard to finish sees True and writes the stage's final files."""
        return all(path_of(item).is_file() for item in items)


def open_stage(
    folder: Path, stage: str, config: dict[str, Any], *, force: bool = False, shard: tuple[int, int] = (1, 1)
) -> StageDir:
    """Open ``folder`` for ``stage`` under ``config`` (:func:`open_stage_dir`; shard 1 applies
    ``force``) and return it with this process's shard.

    Raises:
        ValueError: ``shard`` is not ``(k, n)`` with ``1 <= k <= n``.
        SettingsChanged: see :func:`open_stage_dir`.
    """
    k, n = shard
    if not 1 <= k <= n:
        raise ValueError(f"shard must be K/N with 1 <= K <= N, got {k}/{n}")
    manifest = open_stage_dir(folder, stage, config, force=force, leader=k == 1)
    return StageDir(Path(folder), manifest, (k, n))

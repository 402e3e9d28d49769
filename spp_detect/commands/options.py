"""Options, callbacks and error helpers shared by the spp-detect commands. A settings-backed
option names only its field and flag: its default and help are the field's (:class:`SettingsOption`)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import click

BACKBONE_NAMES = ("alexnet", "mobilenet_v2", "resnet50", "squeezenet1_0", "vgg16", "zf5")
# path types: an existing folder / file / either, a folder / file to write
IN_DIR, IN_FILE, IN_PATH = (click.Path(exists=True, file_okay=f, dir_okay=d, path_type=Path)
                             for f, d in ((False, True), (True, False), (True, True)))
OUT_DIR, OUT_FILE = click.Path(file_okay=False, path_type=Path), click.Path(dir_okay=False, path_type=Path)
POSITIVE_INT, POSITIVE_FLOAT = click.IntRange(min=1), click.FloatRange(min=0, min_open=True)
SKIP_BAD_HINT = "; fix or remove it, or rerun with --skip-bad to skip it"


def stack(*decorators):
    """One decorator applying ``decorators`` as if written above each other, in this order."""

    def decorate(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return decorate


# --------------------------------------------------------------------------- defaults and help from the settings classes
class SettingsOption(click.Option):
    """An option whose default and help are a field's in a stage's settings class (its
    ``metadata["help"]``), read when needed (so ``--help`` of the group imports no stage
    module): both are written once, in the library. ``settings`` is ``"module:Class"``,
    ``field`` the field name; ``field`` may be dotted for nested settings (``detect.bbox``)."""

    def __init__(self, *args, settings: str, field: str, **kwargs) -> None:
        self.settings, self.field = settings, field
        super().__init__(*args, default=self.settings_default, **kwargs)

    def settings_field(self):
        """``(the dataclass field, its default)``; a dotted field is read from the nested default."""
        import dataclasses
        import importlib

        module, name = self.settings.split(":")
        value = getattr(importlib.import_module(module), name)
        for part in self.field.split("."):  # a nested settings default, e.g. CalibrateSettings.detect
            field = {f.name: f for f in dataclasses.fields(value)}[part]
            value = field.default if isinstance(value, type) else getattr(value, part)
        return field, value

    def settings_default(self):
        value = self.settings_field()[1]
        return ",".join(map(str, value)) if isinstance(value, tuple) else value  # as typed on the command line

    def get_default(self, ctx, call: bool = True):
        return super().get_default(ctx, call=True)  # show the value in --help, not "(dynamic)"

    def get_help_record(self, ctx):
        self.help = self.help or self.settings_field()[0].metadata.get("help")
        return super().get_help_record(ctx)


def settings_options(settings: str, prefix: str = "", **specs):
    """One :class:`SettingsOption` per keyword, in order: the field ``prefix + keyword`` of
    ``settings``, as ``--keyword`` (dashes for underscores) under the parameter name ``keyword``.
    A spec is a click type, a callback, a flag (``"--lr"``, ``"--flip/--no-flip"``), a parameter
    name, a dict of ``click.option`` arguments, or a tuple of those."""

    def option(name, spec):
        decls, kwargs = [], {}
        for part in spec if isinstance(spec, tuple) else (spec,):
            if isinstance(part, dict):
                kwargs.update(part)
            elif isinstance(part, str):
                decls.append(part)
            else:
                kwargs["type" if isinstance(part, (type, click.ParamType)) else "callback"] = part
        flags = [d for d in decls if d.startswith("-")] or [f"--{name.replace('_', '-')}"]
        names = [d for d in decls if not d.startswith("-")] or [name]
        return click.option(*flags, *names, cls=SettingsOption, settings=settings, field=prefix + name, **kwargs)

    return stack(*(option(name, spec) for name, spec in specs.items()))


def settings_from_params(cls, params: dict, **renamed):
    """An instance of the settings class ``cls`` from a command's parsed ``params``: each
    field from the parameter of its name (or ``renamed[field]``); absent ones keep their default."""
    import dataclasses

    names = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}
    return cls(**{field: params[name] for field, name in names.items() if name in params})


def detect_settings_options(settings: str = "spp_detect.detect:DetectSettings", prefix: str = ""):
    """The detect settings as options (detect and calibrate, which must detect alike), with
    the defaults of ``settings``' fields ``prefix + name`` (calibrate: ``detect.``)."""
    return settings_options(settings, prefix, bbox="--bbox/--no-bbox", score_threshold=float,
                            nms_threshold=("--nms", click.FloatRange(0, 1)), max_per_class=POSITIVE_INT,
                            svd_rank=click.IntRange(min=0), precision=click.Choice(["fp32", "bf16"]))


def _check_weights(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value not in ("imagenet", "none") and not Path(value).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {value}")
    return value


def backbone_options(settings: str):
    """``--backbone``, ``--weights``, ``--input-norm``: the conv trunk and its weights, with
    the defaults of ``settings`` (``"module:Class"``, a stage's settings with those fields)."""
    return settings_options(
        settings, backbone=(click.Choice(BACKBONE_NAMES), {"help": "Conv trunk whose last map is pooled."}),
        weights=(_check_weights, {"help": "'imagenet' (torchvision weights, downloaded), 'none' (random init) or a state_dict file."}),
        input_norm=(click.Choice(["auto", "torchvision", "caffe-bgr", "tf-rgb"]), {
            "help": "Input normalisation the weights expect. auto: torchvision's for --weights imagenet/none, "
                    "the known convention for the files in shared/data/weights, else torchvision's."}))


# --------------------------------------------------------------------------- shared options
def out_option(help: str, type: click.Path = OUT_DIR):
    """The required ``--out`` of a command."""
    return click.option("--out", type=type, required=True, help=help)


def not_required(*names: str):
    """Make options added by the decorators below this one optional (e.g. --voc-root)."""

    def decorate(f):
        for param in getattr(f, "__click_params__", []):
            param.required = param.required and param.name not in names
        return f

    return decorate


def voc_options(default_image_set: str | None = None):
    """``--voc-root``, ``--year``, ``--image-set``: which VOC images a stage reads."""
    return stack(
        click.option("--voc-root", type=IN_DIR, required=True, envvar="SPP_DETECT_VOC_ROOT",
                     help="VOCdevkit folder holding VOC<year>/ (env SPP_DETECT_VOC_ROOT)."),
        click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>)."),
        click.option("--image-set", default=default_image_set, required=default_image_set is None, show_default=True,
                     help="Image list under ImageSets/Main (train, val, trainval, test)."))


limit_option = click.option("--limit", type=POSITIVE_INT, default=None, help="Only the first N images of the image set "
                            "(quick trials). Their files are the same as a full run's.")
force_option = click.option("--force", is_flag=True, help="Recompute everything, even if a cache with other settings exists.")
device_option = click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu, "
                             "cuda (cuda:LOCAL_RANK under torchrun / srun) or cuda:N.")
workers_option = click.option("--workers", type=POSITIVE_INT, default=None, help="Worker processes [default: CPU count].")
caches_option = click.option("--cache", "caches", type=IN_DIR, multiple=True, required=True, help="Extract cache of the "
                             "training images; repeat to train on several (e.g. VOC07 and VOC12 trainval).")


def dataset_options(default_image_set: str | None = None, limit: bool = True):
    """A VOC image set, or ``--coco-json`` (a COCO dataset) or ``--images`` (plain images) instead
    (:func:`open_dataset_or_usage_error`), and ``--limit``."""
    return stack(
        not_required("voc_root", "image_set") if default_image_set is None else not_required("voc_root"),
        voc_options(default_image_set),
        click.option("--coco-json", type=IN_FILE, default=None, help="A COCO dataset json instead of --voc-root (its "
                     "categories, in id order, are the class list); with --images DIR."),
        click.option("--images", "image_paths", type=IN_PATH, multiple=True, help="With --coco-json: the folder its "
                     "file_name entries are relative to. Alone: images without annotations (a folder and/or files; repeat)."),
        *([limit_option] if limit else []))


def image_source_options(default_image_set: str):
    """A VOC image set (--voc-root ...) or an image folder split (--image-folder ...)."""
    return stack(
        not_required("voc_root"), voc_options(default_image_set), limit_option,
        click.option("--image-folder", type=IN_DIR, default=None,
                     help="Instead of VOC: a <class>/<image> folder (e.g. Caltech101's 101_ObjectCategories)."),
        click.option("--split", type=click.Choice(["train", "test"]), default="train",
                     help="With --image-folder: which part of the per-class split."),
        click.option("--train-per-class", type=POSITIVE_INT, default=30,
                     help="With --image-folder: training images per class (paper 3.3: 30)."),
        click.option("--test-per-class", type=POSITIVE_INT, default=50,
                     help="With --image-folder: test images per class (paper 3.3: up to 50)."),
        click.option("--seed", type=int, default=0, help="With --image-folder: seed of the random split."))


def skip_bad_option(what: str = "missing, unreadable or badly annotated"):
    return click.option("--skip-bad", is_flag=True, help=f"Skip images that are {what} (counted and listed in the summary) "
                        "instead of stopping.")


def _check_shard(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from spp_detect.distributed import parse_shard

    try:
        parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


shard_option = click.option(
    "--shard", default="auto", callback=_check_shard,
    help="K/N: this process takes every N-th image from the K-th, into the same --out. auto: from torchrun (RANK/WORLD_SIZE) "
    "or srun (SLURM_PROCID/SLURM_NTASKS) when launched by one, else 1/1. See docs/scaling.md.")


# --------------------------------------------------------------------------- callbacks
def parse_scales(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated scale lists like ``480,576,688,864,1200``."""
    what = param.name if param is not None and param.name else "scales"
    scales = parse_int_list(ctx, param, value)
    if not scales or any(s <= 0 for s in scales):
        raise click.BadParameter(f"expected positive {what}, got {value!r}")
    if len(set(scales)) != len(scales):
        raise click.BadParameter(f"{what} repeat: {value!r}")
    return scales


def parse_int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated integers that may be empty (``--lr-steps 2000,4000``)."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def parse_bbox(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """Callback for ``x1,y1,x2,y2`` query boxes (0-based pixels, as Oxford/Paris _query.txt)."""
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected x1,y1,x2,y2 numbers, got {value!r}") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise click.BadParameter(f"expected x1,y1,x2,y2 with 0 <= x1 < x2 and 0 <= y1 < y2, got {value!r}")
    return box


# --------------------------------------------------------------------------- devices, jobs, datasets
def job(shard: str = "auto", device: str | None = None):
    """``(launch, (k, n), torch device)``: this process's place in a torchrun / srun job, its shard
    of the images (``--shard``) and ``--device`` (``auto``: its GPU); a bad device is a usage error."""
    from spp_detect.distributed import launch_from_env, resolve_shard

    try:
        launch = launch_from_env()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return launch, resolve_shard(shard, launch), None if device is None else pick_device(device, launch)


def pick_device(device: str, launch=None):
    """``--device`` as a canonical ``torch.device`` (:func:`spp_detect.device.resolve_device`:
    ``auto`` and ``cuda`` are this process's GPU under a launcher, ``cpu:0`` is ``cpu``);
    ``launch``: the job's :class:`~spp_detect.distributed.Launch` (None: read from the
    environment). A bad value is a usage error."""
    from spp_detect.device import resolve_device

    try:
        return resolve_device(device, launch.local_rank if launch is not None else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


def where(shard: tuple[int, int], launch) -> str:
    """``""`` for a lone process, else e.g. `` [shard 2/4 (torchrun rank 1)]``, for summary lines."""
    if shard[1] == 1 and launch.launcher == "none":
        return ""
    rank = f" ({launch.launcher} rank {launch.rank})" if launch.launcher != "none" else ""
    return f" [shard {shard[0]}/{shard[1]}{rank}]"


def open_dataset_or_usage_error(voc_root: Path | None, image_set: str | None, year: str, coco_json: Path | None,
                                image_paths: tuple[Path, ...], limit: int | None = None, bad: list | None = None):
    """The :class:`~spp_detect.datasets.registry.Dataset` the options name; entries left out
    (``bad`` given: --skip-bad) are appended to ``bad``; what reading changed (clipped or
    dropped boxes) is printed. No source, two sources or a missing image-set list are usage errors."""
    from spp_detect.datasets.registry import DatasetError, open_dataset
    from spp_detect.datasets.voc import VOCFormatError

    if voc_root is not None and image_set is None and coco_json is None and not image_paths:
        raise click.UsageError("Missing option '--image-set'.")
    try:
        dataset = open_dataset(voc_root=voc_root, image_set=image_set, year=year, coco_json=coco_json,
                               images=image_paths, limit=limit, skip_bad=bad is not None)
    except DatasetError as exc:
        raise click.UsageError(str(exc)) from None
    except VOCFormatError as exc:
        if exc.image_id is None and str(exc).startswith("image-set list not found"):
            raise click.BadParameter(str(exc), param_hint="'--image-set' / '--year'") from None
        raise
    if bad is not None:
        bad.extend(dataset.bad)
    if dataset.notes:
        click.echo(f"{dataset.name}: {dataset.notes}", err=True)
    return dataset


# --------------------------------------------------------------------------- output and errors
def quiet() -> bool:
    """Whether ``-q`` hides progress bars (the log level is above INFO)."""
    return logging.getLogger().getEffectiveLevel() > logging.INFO


def bar(unit: str = "img", suffix: str = "", leave: bool = True):
    """The stages' progress protocol (:class:`spp_detect.stage_dir.Progress`) as tqdm bars on
    stderr, hidden by -q; ``suffix`` follows each loop's name (e.g. this process's shard)."""
    from tqdm import tqdm

    def progress(items, *, desc: str, total: int | None = None, initial: int = 0):
        return tqdm(items, desc=desc + suffix, total=total, initial=initial, unit=unit, leave=leave, disable=quiet())

    return progress


def refuse_given(ctx: click.Context, names, why: str) -> None:
    """A usage error naming the options of ``names`` given on the command line, if any."""
    given = [f"--{n.replace('_', '-')}" for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{why}: {', '.join(given)}")


def echo_skipped(errors) -> None:
    """List what ``--skip-bad`` left out, on stderr."""
    for error in errors:
        click.echo(f"  skipped {message(error)}", err=True)


def message(exc: BaseException) -> str:
    """An exception's text for the command line (a KeyError's without the quotes repr adds)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


@contextlib.contextmanager
def stage_errors(bad_input_hint: str = ""):
    """Turn what a stage raises for a user's mistake or a damaged file into one line
    (``click.ClickException``); a setting that cannot work names its option; a failed write
    (a full disk) says that finished files are kept. ``bad_input_hint`` is added to the
    message of an unreadable image or annotation (e.g. the ``--skip-bad`` advice)."""
    from spp_detect.images import ImageReadError
    from spp_detect.stage_dir import SettingsChanged

    try:
        yield
    except click.ClickException:
        raise
    except (ImageReadError, *_bad_annotation_errors()) as exc:
        raise click.ClickException(f"{message(exc)}{bad_input_hint}") from None
    except ValueError as exc:
        if hasattr(exc, "setting"):  # stage_dir.BadSetting
            raise click.BadParameter(str(exc), param_hint=f"--{exc.setting}") from None
        raise click.ClickException(message(exc)) from None
    except (SettingsChanged, FileNotFoundError, KeyError, RuntimeError) as exc:
        raise click.ClickException(message(exc)) from None
    except OSError as exc:
        raise write_error(exc) from None


def _bad_annotation_errors() -> tuple[type[Exception], ...]:
    from proposals.run import BadImageError
    from spp_detect.datasets.coco import COCOFormatError
    from spp_detect.datasets.voc import VOCFormatError

    return BadImageError, VOCFormatError, COCOFormatError


def write_error(exc: OSError) -> click.ClickException:
    """One line for a failed write (a full disk, no permission); finished files are kept."""
    import errno

    text = str(exc) if exc.filename is None else f"cannot write {exc.filename}: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space and rerun the same command (finished files are kept and reused)"
    return click.ClickException(text)

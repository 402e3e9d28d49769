"""Options, callbacks and error helpers shared by the spp-detect commands."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import click


BACKBONE_NAMES = ("alexnet", "mobilenet_v2", "resnet50", "squeezenet1_0", "vgg16", "zf5")

# --------------------------------------------------------------------------- shared options
def voc_options(default_image_set: str | None = None):
    """``--voc-root``, ``--year``, ``--image-set``: which VOC images a stage reads."""

    def decorate(f):
        f = click.option(
            "--image-set",
            default=default_image_set,
            required=default_image_set is None,
            show_default=True,
            help="Image list under ImageSets/Main (train, val, trainval, test).",
        )(f)
        f = click.option("--year", default="2007", show_default=True, help="VOC year (folder VOC<year>).")(f)
        f = click.option(
            "--voc-root",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            required=True,
            envvar="SPP_DETECT_VOC_ROOT",
            help="VOCdevkit folder holding VOC<year>/ (env SPP_DETECT_VOC_ROOT).",
        )(f)
        return f

    return decorate


limit_option = click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Only the first N images of the image set (quick trials). Their files are the same as a full run's.",
)
force_option = click.option(
    "--force", is_flag=True, help="Recompute everything, even if a cache with other settings exists."
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when present, else CPU; cuda:LOCAL_RANK under torchrun / srun), cpu, cuda or cuda:N.",
)
workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [default: CPU count]."
)


def _check_shard(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from spp_detect.distributed import parse_shard

    try:
        parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


shard_option = click.option(
    "--shard",
    default="auto",
    callback=_check_shard,
    help="K/N: this process takes every N-th image from the K-th, into the same --out. auto: "
    "from torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID/SLURM_NTASKS) when launched by one, "
    "else 1/1. See docs/scaling.md.",
)


def job_launch():
    """This process's place in a torchrun / srun job (spp_detect.distributed)."""
    from spp_detect.distributed import launch_from_env

    try:
        return launch_from_env()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def pick_device(device: str, launch=None):
    """``--device`` as a ``torch.device`` (``auto``: this process's GPU under a launcher);
    a bad value is a usage error."""
    from spp_detect.device import resolve_device

    try:
        return resolve_device(device, launch.local_rank if launch is not None else 0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


def _check_weights(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value not in ("imagenet", "none") and not Path(value).is_file():
        raise click.BadParameter(f"not 'imagenet', 'none' or an existing file: {value}")
    return value


def backbone_options(settings: str):
    """``--backbone``, ``--weights``, ``--input-norm``: the conv trunk and its weights, with
    the defaults of ``settings`` (``"module:Class"``, a stage's settings with those fields)."""

    def decorate(f):
        f = settings_option(settings, "input_norm", "--input-norm", type=click.Choice(["auto", "torchvision", "caffe-bgr", "tf-rgb"]),
                            help="Input normalisation the weights expect. auto: torchvision's for --weights imagenet/none, "
                            "the known convention for the files in shared/data/weights, else torchvision's.")(f)
        f = settings_option(settings, "weights", "--weights", callback=_check_weights,
                            help="'imagenet' (torchvision weights, downloaded), 'none' (random init) or a state_dict file.")(f)
        return settings_option(settings, "backbone", "--backbone", type=click.Choice(BACKBONE_NAMES),
                               help="Conv trunk whose last map is pooled.")(f)

    return decorate


def parse_scales(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated scale lists like ``480,576,688,864,1200``."""
    what = param.name if param is not None and param.name else "scales"
    try:
        scales = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise click.BadParameter(f"expected positive {what}, got {value!r}")
    if len(set(scales)) != len(scales):
        raise click.BadParameter(f"{what} repeat: {value!r}")
    return scales


def read_voc_or_usage_error(voc_root: Path, image_set: str, year: str, limit: int | None = None, bad: list | None = None):
    """``read_voc``, turning a missing image-set list (a bad --image-set / --year) into a usage error."""
    from spp_detect.datasets.voc import VOCFormatError, read_voc

    try:
        return read_voc(voc_root, image_set, year, bad=bad, limit=limit)
    except VOCFormatError as exc:
        if exc.image_id is None and str(exc).startswith("image-set list not found"):
            raise click.BadParameter(str(exc), param_hint="'--image-set' / '--year'") from None
        raise


def dataset_options(f):
    """``--coco-json`` and ``--images``: a COCO dataset or plain images instead of --voc-root
    (add ``not_required("voc_root", "image_set")`` above the VOC options)."""
    f = click.option(
        "--images", "image_paths", type=click.Path(exists=True, path_type=Path), multiple=True,
        help="With --coco-json: the folder its file_name entries are relative to. Alone: images without "
        "annotations (a folder and/or files; repeat).",
    )(f)
    f = click.option(
        "--coco-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="A COCO dataset json instead of --voc-root (its categories, in id order, are the class list); with --images DIR.",
    )(f)
    return f


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


def quiet() -> bool:
    """Whether ``-q`` hides progress bars (the log level is above INFO)."""
    return logging.getLogger().getEffectiveLevel() > logging.INFO


def refuse_given(ctx: click.Context, names, why: str) -> None:
    """A usage error naming the options of ``names`` given on the command line, if any."""
    from click.core import ParameterSource

    given = [f"--{n.replace('_', '-')}" for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{why}: {', '.join(given)}")


def message(exc: BaseException) -> str:
    """An exception's text for the command line (a KeyError's without the quotes repr adds)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def write_error(exc: OSError) -> click.ClickException:
    """One line for a failed write (a full disk, no permission); finished files are kept."""
    import errno

    text = str(exc) if exc.filename is None else f"cannot write {exc.filename}: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space and rerun the same command (finished files are kept and reused)"
    return click.ClickException(text)


def not_required(*names: str):
    """Make options added by the decorators below this one optional (e.g. --voc-root)."""

    def decorate(f):
        for param in getattr(f, "__click_params__", []):
            if param.name in names:
                param.required = False
        return f

    return decorate


def job_shard(shard: str):
    """``(launch, (k, n))``: this process's place in a torchrun / srun job and its shard of
    the images (``--shard``)."""
    from spp_detect.distributed import resolve_shard

    launch = job_launch()
    return launch, resolve_shard(shard, launch)


def where(shard: tuple[int, int], launch) -> str:
    """``""`` for a lone process, else e.g. `` [shard 2/4 (torchrun rank 1)]``, for summary lines."""
    if shard[1] == 1 and launch.launcher == "none":
        return ""
    text = f"shard {shard[0]}/{shard[1]}"
    return f" [{text}" + (f" ({launch.launcher} rank {launch.rank})" if launch.launcher != "none" else "") + "]"


def parse_int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Callback for comma-separated integers that may be empty (``--lr-steps 2000,4000``)."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


caches_option = click.option(
    "--cache",
    "caches",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="Extract cache of the training images; repeat to train on several (e.g. VOC07 and VOC12 trainval).",
)


def bar(desc: str, unit: str = "img"):
    """A tqdm wrapper for a stage's per-image loop, hidden by -q."""
    from tqdm import tqdm

    return lambda seq, label=desc: tqdm(seq, desc=label, unit=unit, disable=quiet())


def image_source_options(default_image_set: str):
    """A VOC image set (--voc-root ...) or an image folder split (--image-folder ...)."""

    def decorate(f):
        f = click.option("--seed", type=int, default=0, help="With --image-folder: seed of the random split.")(f)
        f = click.option("--test-per-class", type=click.IntRange(min=1), default=50, help="With --image-folder: test images per class (paper 3.3: up to 50).")(f)
        f = click.option("--train-per-class", type=click.IntRange(min=1), default=30, help="With --image-folder: training images per class (paper 3.3: 30).")(f)
        f = click.option("--split", type=click.Choice(["train", "test"]), default="train", help="With --image-folder: which part of the per-class split.")(f)
        f = click.option(
            "--image-folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
            help="Instead of VOC: a <class>/<image> folder (e.g. Caltech101's 101_ObjectCategories).",
        )(f)
        f = limit_option(f)
        f = not_required("voc_root")(voc_options(default_image_set)(f))
        return f

    return decorate


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




# --------------------------------------------------------------------------- defaults from the settings classes
class SettingsOption(click.Option):
    """An option whose default is a field's default in a stage's settings class, read when
    needed (so ``--help`` of the group imports no stage module): the default is written
    once, in the library. ``settings`` is ``"module:Class"``, ``field`` the field name;
    ``field`` may be dotted for nested settings (``detect.bbox``)."""

    def __init__(self, *args, settings: str, field: str, **kwargs) -> None:
        self.settings, self.field = settings, field
        kwargs["default"] = self.settings_default
        super().__init__(*args, **kwargs)

    def settings_default(self):
        import dataclasses
        import importlib

        module, name = self.settings.split(":")
        first, *rest = self.field.split(".")
        value = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), name))}[first]
        for part in rest:  # a nested settings default, e.g. CalibrateSettings.detect
            value = getattr(value, part)
        return ",".join(map(str, value)) if isinstance(value, tuple) else value  # as typed on the command line

    def get_default(self, ctx, call: bool = True):
        return super().get_default(ctx, call=True)  # show the value in --help, not "(dynamic)"


def settings_option(settings: str, field: str, *param_decls: str, **kwargs):
    """``click.option`` whose default is ``settings``' ``field`` default (:class:`SettingsOption`)."""
    return click.option(*param_decls, cls=SettingsOption, settings=settings, field=field, **kwargs)


DETECT_SETTINGS = "spp_detect.detect:DetectSettings"


def detect_settings_options(settings: str = DETECT_SETTINGS, prefix: str = ""):
    """The detect settings as options (detect and calibrate, which must detect alike), with
    the defaults of ``settings``' fields ``prefix + name`` (calibrate: ``detect.``)."""
    options = [
        settings_option(settings, prefix + "bbox", "--bbox/--no-bbox", help="Apply the model's box regressors (train-svm --bbox)."),
        settings_option(settings, prefix + "score_threshold", "--score-threshold", type=float,
                        help="Keep SVM scores above this (release: -1.5)."),
        settings_option(settings, prefix + "nms_threshold", "--nms", "nms_threshold", type=click.FloatRange(0, 1),
                        help="Per-class NMS IoU (release: 0.3)."),
        settings_option(settings, prefix + "max_per_image", "--max-per-image", type=click.IntRange(min=1),
                        help="Detections per class per image (release: 100)."),
        settings_option(settings, prefix + "svd_rank", "--svd-rank", type=click.IntRange(min=0),
                        help="Replace fc6 by its rank-R truncated SVD (Fast R-CNN 3.1): faster, approximate; 0 keeps it exact."),
        settings_option(settings, prefix + "precision", "--precision", type=click.Choice(["fp32", "bf16"]),
                        help="fc6/fc7 arithmetic. bf16 rounds weights and input to bfloat16 (float32 sums): ~5x faster fc "
                             "on CPUs with AMX and on GPU tensor cores, approximate (README: its measured mAP cost)."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def settings_from_params(cls, params: dict, **renamed):
    """An instance of the settings class ``cls`` from a command's parsed ``params``: each
    field from the parameter of its name (or ``renamed[field]``); absent ones keep their default."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        name = renamed.get(f.name, f.name)
        if name in params:
            values[f.name] = params[name]
    return cls(**values)


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
        if hasattr(exc, "setting"):  # extract.BadSetting
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

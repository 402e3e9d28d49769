"""The stage contract, on real images through the command line: every stage's manifest is
keyed by ``settings_config`` of its one settings class, every CLI default is that class's
default, ``--force`` recomputes a finished folder, and a damaged cache file stops detect,
train-svm and finetune with one line naming it and ``spp-detect extract``, which repairs it."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil

import pytest
from click.testing import CliRunner

import cli
from proposals.run import ProposalSettings
from spp_detect.classification.features import FeatureSettings
from spp_detect.classification.train import TrainSettings
from spp_detect.combine import CalibrateSettings, CombineSettings
from spp_detect.commands.options import SettingsOption
from spp_detect.detect import DetectSettings
from spp_detect.extract import ExtractSettings
from spp_detect.finetune import FinetuneSettings
from spp_detect.retrieval.index import IndexSettings
from spp_detect.stage_dir import config_key, read_manifest, settings_config, settings_from_config
from svm.train import SVMSettings
from tests.conftest import SQUEEZENET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

W = str(SQUEEZENET_FILE)
#: every stage: its folder in the pipeline below and the settings the command line asked for
STAGES = {
    "proposals": ("ss", ProposalSettings(max_boxes=40)),
    "extract": ("feat", ExtractSettings(weights=W, scales=(240,))),
    "finetune": ("head", FinetuneSettings(fc_dim=16, iterations=10, round_iterations=5, batch_size=16)),
    "train-svm": ("svm", SVMSettings(layer="fc7", C=0.1, bbox=True)),
    "detect": ("dets", DetectSettings(bbox=True)),
    "calibrate": ("svm/calibration", CalibrateSettings(detect=DetectSettings(bbox=True))),
    "combine": ("both", CombineSettings(scores="raw")),
    "classify-features": ("cls", FeatureSettings(weights=W, size=64)),
    "train-spp-classifier": ("spp-cls", TrainSettings(weights=W, sizes=(64,), resize=256, epochs=1, batch_size=2)),
    "index": ("index", IndexSettings(weights=W, whiten_limit=2, levels=1)),
}


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli.main, ["-q", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipeline(voc_root, tmp_path_factory):
    """Every stage once, through the command line, on 3 trainval images."""
    root = tmp_path_factory.mktemp("contract")
    voc = ["--voc-root", str(voc_root), "--image-set", "trainval", "--limit", "3"]
    _run("proposals", *voc, "--max-boxes", "40", "--workers", "1", "--out", str(root / "ss"))
    _run("extract", *voc, "--proposals", str(root / "ss"), "--weights", W, "--scales", "240", "--out", str(root / "feat"))
    _run("finetune", "--cache", str(root / "feat"), "--out", str(root / "head"), "--fc-dim", "16", "--iterations", "10",
         "--round-iterations", "5", "--batch-size", "16")
    _run("train-svm", "--cache", str(root / "feat"), "--head", str(root / "head"), "--bbox", "--C", "0.1", "--out", str(root / "svm"))
    _run("detect", "--cache", str(root / "feat"), "--svm", str(root / "svm"), "--bbox", "--out", str(root / "dets"))
    _run("calibrate", "--cache", str(root / "feat"), "--svm", str(root / "svm"), "--bbox")
    _run("combine", "--detections", str(root / "dets"), "--detections", str(root / "dets"), "--scores", "raw",
         "--out", str(root / "both"))
    _run("classify-features", *voc, "--weights", W, "--size", "64", "--out", str(root / "cls"))
    _run("train-spp-classifier", *voc, "--weights", W, "--sizes", "64", "--epochs", "1", "--batch-size", "2",
         "--out", str(root / "spp-cls"))
    images = voc_root / "VOC2007" / "JPEGImages"
    (root / "db").mkdir()
    (root / "wh").mkdir()
    for n, name in enumerate(sorted(p.name for p in images.iterdir())[:4]):
        (root / ("db" if n < 2 else "wh") / name).symlink_to(images / name)
    _run("index", str(root / "db"), "--weights", W, "--whiten-images", str(root / "wh"), "--whiten-limit", "2",
         "--levels", "1", "--out", str(root / "index"))
    return root


def test_every_stage_keys_its_manifest_by_settings_config(pipeline):
    stages = set()
    for stage, (folder, asked) in STAGES.items():
        manifest = read_manifest(pipeline / folder)
        config = manifest["config"]
        assert manifest["stage"] == stage and manifest["key"] == config_key(config)
        recorded = settings_from_config(type(asked), config)
        assert settings_config(recorded) == settings_config(asked), stage  # what the command asked for, no other
        assert {k: config[k] for k in settings_config(asked)} == settings_config(asked), stage
        assert "settings" not in config  # one flat style: settings fields, then the inputs' keys
        stages.add(stage)
    assert stages == set(STAGES)
    assert read_manifest(pipeline / "feat")["config"]["weights"].startswith("sha256:")  # a weights file by its content


def test_every_cli_default_is_the_settings_default():
    checked = set()
    for name, command in cli.main.commands.items():
        ctx = command.make_context(name, [], resilient_parsing=True)
        for param in command.params:
            if not isinstance(param, SettingsOption):
                continue
            module, cls_name = param.settings.split(":")
            first, *rest = param.field.split(".")
            (field,) = [f for f in dataclasses.fields(getattr(importlib.import_module(module), cls_name)) if f.name == first]
            value = field.default  # the class's default as written, before any __post_init__ resolution
            for part in rest:
                value = getattr(value, part)
            given = param.type_cast_value(ctx, param.get_default(ctx))
            if param.callback is not None:
                given = param.callback(ctx, param, given)
            assert given == value, f"{name} --{param.name}: {given!r} != {value!r}"
            checked.add((cls_name, param.field))
    for _, settings in STAGES.values():  # every stage's settings reach the command line through SettingsOption
        assert any(cls == type(settings).__name__ for cls, _ in checked), type(settings).__name__
    assert ("DetectSettings", "score_threshold") in checked and ("ExtractSettings", "scales") in checked


def test_force_recomputes_a_finished_folder_of_the_same_settings(pipeline, tmp_path):
    out = tmp_path / "dets"
    detect = ["detect", "--cache", str(pipeline / "feat"), "--svm", str(pipeline / "svm"), "--bbox", "--out", str(out)]
    assert "3 image(s) computed" in CliRunner().invoke(cli.main, detect).output
    for path in out.glob("*.npz"):
        os.utime(path, (0, 0))  # marked: a file that is kept keeps this date
    again = CliRunner().invoke(cli.main, detect)
    assert "0 image(s) computed" in again.output and "3 already done" in again.output
    forced = CliRunner().invoke(cli.main, [*detect, "--force"])
    assert forced.exit_code == 0 and "3 image(s) computed" in forced.output and "0 already done" in forced.output
    assert all(p.stat().st_mtime > 0 for p in out.glob("*.npz"))  # written again, not kept
    assert (out / "detections.json").is_file()


def test_a_damaged_cache_file_names_itself_and_extract_repairs_it(pipeline, voc_root, tmp_path):
    cache = tmp_path / "feat"
    shutil.copytree(pipeline / "feat", cache)
    victim = sorted(cache.glob("0*.npz"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # bytes overwritten inside a conv map
    victim.write_bytes(bytes(data))
    runs = {
        "detect": ["detect", "--cache", str(cache), "--svm", str(pipeline / "svm"), "--out", str(tmp_path / "d")],
        "train-svm": ["train-svm", "--cache", str(cache), "--features", "pool", "--C", "0.1", "--out", str(tmp_path / "s")],
        "finetune": ["finetune", "--cache", str(cache), "--out", str(tmp_path / "h"), "--fc-dim", "16", "--iterations", "5",
                     "--round-iterations", "5", "--batch-size", "16"],
    }
    for stage, args in runs.items():
        result = CliRunner().invoke(cli.main, ["-q", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (stage, result.output)
        assert lines[0].startswith(f"Error: {victim} is damaged") and "`spp-detect extract`" in lines[0], stage
    voc = ["--voc-root", str(voc_root), "--image-set", "trainval", "--limit", "3"]
    repaired = _run("extract", *voc, "--proposals", str(pipeline / "ss"), "--weights", W, "--scales", "240",
                    "--out", str(cache))
    assert "1 image(s) computed, 2 already cached" in repaired and "1 damaged file(s) redone" in repaired
    assert victim.read_bytes() == (pipeline / "feat" / victim.name).read_bytes()
    _run(*runs["detect"])


def test_settings_round_trip_through_the_manifest_form():
    for _, settings in STAGES.values():
        config = settings_config(settings)
        back = settings_from_config(type(settings), config)
        assert settings_config(back) == config  # a weights file comes back as its hash, which keys the same
        assert back == settings or back.weights == config["weights"]
        assert all(not isinstance(v, tuple) for v in config.values())  # JSON-ready: tuples as lists
    assert dataclasses.is_dataclass(CalibrateSettings) and isinstance(settings_config(CalibrateSettings())["detect"], dict)


def test_every_stage_is_one_run_call_taking_out_settings_and_force():
    import inspect

    from proposals.run import run_proposals
    from spp_detect.classification.features import run_classify_features
    from spp_detect.classification.stages import run_train_spp_classifier
    from spp_detect.combine import run_calibrate, run_combine
    from spp_detect.detect import run_detect
    from spp_detect.extract import run_extract
    from spp_detect.finetune import run_finetune
    from spp_detect.retrieval.index import run_index
    from svm.train import run_train_svm

    runs = {"proposals": run_proposals, "extract": run_extract, "finetune": run_finetune, "train-svm": run_train_svm,
            "detect": run_detect, "calibrate": run_calibrate, "combine": run_combine,
            "classify-features": run_classify_features, "train-spp-classifier": run_train_spp_classifier, "index": run_index}
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        params = inspect.signature(run).parameters
        assert {"out", "settings"} <= set(params), stage
        assert params["force"].kind is inspect.Parameter.KEYWORD_ONLY and params["force"].default is False, stage
        assert str(params["settings"].annotation).endswith(STAGES[stage][1].__class__.__name__), stage


def _stage_runs():
    """Every ``run_<stage>`` with a loop to show, by stage name (predict and queries beside the
    folder stages)."""
    from proposals.run import run_proposals
    from spp_detect.classification.features import run_classify_features
    from spp_detect.classification.stages import run_train_spp_classifier
    from spp_detect.combine import run_calibrate
    from spp_detect.detect import run_detect
    from spp_detect.extract import run_extract
    from spp_detect.finetune import run_finetune
    from spp_detect.model import run_predict
    from spp_detect.retrieval.index import run_index
    from spp_detect.retrieval.search import run_queries
    from svm.train import run_train_svm

    return {"proposals": run_proposals, "extract": run_extract, "finetune": run_finetune, "train-svm": run_train_svm,
            "detect": run_detect, "calibrate": run_calibrate, "classify-features": run_classify_features,
            "train-spp-classifier": run_train_spp_classifier, "index": run_index, "predict": run_predict,
            "queries": run_queries}


def test_every_stage_takes_the_one_progress_protocol():
    """``progress`` is keyword-only, None by default (nothing shown), of the one protocol."""
    import inspect

    for stage, run in _stage_runs().items():
        param = inspect.signature(run).parameters["progress"]
        assert param.default is None and str(param.annotation) == "Progress | None", stage


def test_the_progress_protocol_is_tqdms_call_and_none_shows_nothing(pipeline, tmp_path):
    """Stages call ``progress(items, desc=..., total=..., initial=...)`` and iterate over what it
    returns; tqdm fits it as is; a resumed loop starts at what was done."""
    from tqdm import tqdm

    from spp_detect.detect import DetectSettings, run_detect
    from spp_detect.finetune import FinetuneSettings, run_finetune
    from spp_detect.stage_dir import track

    calls = []

    def recording(items, *, desc, total=None, initial=0):
        calls.append((desc, total, initial))
        return tqdm(items, desc=desc, total=total, initial=initial, disable=True)

    assert list(track(None, [1, 2], "x")) == [1, 2] and calls == []
    settings = FinetuneSettings(fc_dim=16, iterations=10, round_iterations=5, batch_size=16)
    run_finetune([pipeline / "feat"], tmp_path / "head", settings, progress=recording, stop_after=5)
    run_finetune([pipeline / "feat"], tmp_path / "head", settings, progress=recording)  # resumes at 5
    assert calls == [("finetune", 10, 0), ("finetune", 10, 5)]
    calls.clear()
    run_detect(pipeline / "feat", pipeline / "svm", tmp_path / "dets", DetectSettings(bbox=True), progress=recording)
    assert calls == [("detect", 3, 0)]


def test_every_stage_returns_a_summary_that_describes_itself():
    """Commands print what ``describe()`` says: every ``run_<stage>`` returns a summary with one."""
    import inspect
    import typing

    from spp_detect.classification.stages import ClassifierSummary, run_train_classifier
    from spp_detect.combine import run_combine

    runs = {**_stage_runs(), "combine": run_combine, "train-classifier": run_train_classifier}
    runs.pop("queries")  # a search, not a stage folder: it returns the rankings themselves
    for stage, run in runs.items():
        try:
            summary = typing.get_type_hints(run)["return"]
        except NameError:  # annotations naming TYPE_CHECKING-only settings classes
            summary = {"ClassifierSummary": ClassifierSummary}[inspect.signature(run).return_annotation]
        assert callable(getattr(summary, "describe", None)), stage


#: every stage that reads stage folders: the config entry holding their keys, and the folders
INPUTS = {
    "extract": {"proposals": "ss"},
    "finetune": {"caches": ["feat"]},
    "train-svm": {"caches": ["feat"], "head": "head"},
    "detect": {"cache": "feat", "model": "svm"},
    "calibrate": {"caches": ["feat"], "model": "svm"},
    "combine": {"inputs": ["dets", "dets"]},
}


def test_every_stage_derives_its_input_keys_from_its_input_folders(pipeline):
    """Each stage records the manifest keys of the folders it read, found by itself: no
    ``run_<stage>`` takes a key from its caller (a benchmark or a test cannot invent one)."""
    import inspect

    from spp_detect.combine import run_combine

    for stage, entries in INPUTS.items():
        config = read_manifest(pipeline / STAGES[stage][0])["config"]
        for entry, folders in entries.items():
            keys = ([read_manifest(pipeline / f)["key"] for f in folders] if isinstance(folders, list)
                    else read_manifest(pipeline / folders)["key"])
            assert config[entry] == keys, (stage, entry)
    for stage, run in {**_stage_runs(), "combine": run_combine}.items():
        taken = [p for p in inspect.signature(run).parameters if p.endswith("_key") or p == "key"]
        assert not taken, f"run_{stage.replace('-', '_')} takes {taken} from its caller"

"""One device rule (``spp_detect.device``): canonical devices, ``cuda`` as a rank's GPU under
torchrun / srun, and the stages run with ``--device`` spelled another way than the default
(``cpu:0`` beside ``cpu``) giving the same files, so that a ``device ==`` comparison of two
spellings of one device cannot come back unseen (issue 28)."""

from __future__ import annotations

import filecmp
import shutil

import pytest
import torch
from click.testing import CliRunner

import cli
import spp_detect.detect
import spp_detect.extract
import spp_detect.finetune
from proposals.run import ProposalSettings
from spp_detect.cache import FeatureCache
from spp_detect.commands.options import pick_device
from spp_detect.device import canonical_device, resolve_device, same_device
from spp_detect.model import export_model
from spp_detect.spp import spatial_pyramid_pool
from spp_detect.window_features import PoolBuffer
from tests.conftest import SQUEEZENET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

SPELLINGS = ("cpu", "cpu:0")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")


# --------------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("spelling", ["cpu", "cpu:0", "cpu:3", "CPU", torch.device("cpu"), torch.device("cpu", 0)])
def test_every_cpu_spelling_is_the_cpu(spelling):
    if spelling == "CPU":
        with pytest.raises(ValueError, match="unknown device"):
            canonical_device(spelling)  # torch's names are lower case
        return
    assert canonical_device(spelling) == torch.device("cpu") and canonical_device(spelling).index is None
    assert resolve_device(spelling) == torch.device("cpu")


def test_cuda_spellings_get_their_index():
    assert canonical_device("cuda") == torch.device("cuda", 0)
    assert canonical_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert canonical_device("cuda:1", local_rank=2) == torch.device("cuda", 1)  # an explicit index wins
    assert canonical_device(torch.device("cuda")) == torch.device("cuda:0")
    for bad in ("gpu", "cuda:x", "", "meta"):
        with pytest.raises(ValueError, match="device"):
            canonical_device(bad)


def test_same_device_compares_canonical_forms():
    assert same_device("cpu", "cpu:0") and same_device(torch.device("cpu", 0), torch.empty(0).device)
    assert same_device("cuda", "cuda:0") and same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not same_device("cuda:0", "cuda:1") and not same_device("cpu", "cuda:0")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two visible GPUs as far as the resolver asks (no tensor is made on them), no launcher."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return monkeypatch


def test_cuda_is_the_local_ranks_gpu_under_torchrun_and_srun(fake_gpus):
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):  # torchrun's variables
        fake_gpus.setenv(name, value)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 1)  # what every command calls
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit GPU stays
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)  # a given rank wins over the environment
    fake_gpus.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # modulo the 2 visible GPUs
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        fake_gpus.delenv(name)
    for name, value in (("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1")):
        fake_gpus.setenv(name, value)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_cuda_where_there_is_none_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spelling in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(spelling)
    r = CliRunner().invoke(cli.main, ["detect", "--cache", ".", "--svm", ".", "--out", "x", "--device", "cuda"])
    assert r.exit_code == 2 and "--device" in r.output and "CUDA is not available" in r.output


# --------------------------------------------------------------------------- the stages, spelled two ways
def _run(*args):
    result = CliRunner().invoke(cli.main, ["-q", *(str(a) for a in args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def stages(voc_root, tmp_path_factory):
    """proposals once (no device), then per spelling: extract (3 trainval images, 1 scale) ->
    finetune (tiny) -> train-svm fc7 --bbox -> calibrate -> detect (plain and --svd-rank)
    -> predict on 2 of the JPEGs through an exported model; ``{spelling: folder}``."""
    root = tmp_path_factory.mktemp("device")
    voc = ["--voc-root", voc_root, "--image-set", "trainval", "--limit", 3]
    _run("proposals", *voc, "--workers", 1, "--max-pixels", 60_000, "--max-boxes", 60, "--out", root / "ss")
    photos = root / "photos"
    photos.mkdir()
    ids = (voc_root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:2]
    for image_id in ids:
        shutil.copy(voc_root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", photos / f"{image_id}.jpg")
    folders = {}
    for spelling in SPELLINGS:
        out = folders[spelling] = root / spelling.replace(":", "-")
        device = ["--device", spelling]
        _run("extract", *voc, "--proposals", root / "ss", "--weights", SQUEEZENET_FILE, "--scales", 240, *device,
             "--out", out / "feat")
        _run("finetune", "--cache", out / "feat", "--out", out / "head", "--fc-dim", 32, "--iterations", 20,
             "--round-iterations", 10, "--batch-size", 32, *device)
        _run("train-svm", "--cache", out / "feat", "--head", out / "head", "--features", "fc7", "--bbox", "--C", 0.1,
             *device, "--out", out / "svm")
        _run("calibrate", "--cache", out / "feat", "--svm", out / "svm", "--bbox", *device, "--out", out / "calib")
        _run("detect", "--cache", out / "feat", "--svm", out / "svm", "--bbox", *device, "--out", out / "dets")
        _run("detect", "--cache", out / "feat", "--svm", out / "svm", "--svd-rank", 24, *device, "--out", out / "dets-svd")
        export_model(out / "svm", out / "feat", out / "model", weights=SQUEEZENET_FILE,
                     proposals=ProposalSettings(max_pixels=60_000, max_boxes=60))
        _run("predict", "--model", out / "model", photos, "--threshold", "-1", *device, "--out", out / "pred")
    # the GPU data path (read ahead, write behind), forced on the CPU; finetune pools its 2 rounds in one pass
    out = folders["background"] = root / "background"
    with pytest.MonkeyPatch.context() as patch:
        for module in (spp_detect.extract, spp_detect.detect):  # finetune decodes in the background everywhere
            patch.setattr(module, "reads_ahead", lambda device: True)
        patch.setattr(spp_detect.finetune, "pass_budget", lambda device: 1 << 40)
        _run("extract", *voc, "--proposals", root / "ss", "--weights", SQUEEZENET_FILE, "--scales", 240, "--out", out / "feat")
        _run("finetune", "--cache", out / "feat", "--out", out / "head", "--fc-dim", 32, "--iterations", 20,
             "--round-iterations", 10, "--batch-size", 32)
        _run("train-svm", "--cache", out / "feat", "--head", out / "head", "--features", "fc7", "--bbox", "--C", 0.1,
             "--out", out / "svm")
        _run("detect", "--cache", out / "feat", "--svm", out / "svm", "--bbox", "--out", out / "dets")
    return folders


def _same_files(a, b, pattern: str) -> list[str]:
    """Names of the files matching ``pattern`` in folder ``a``, after checking that ``b``
    holds the same names with the same bytes."""
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern)), (a, pattern)
    differ = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert not differ, f"{a} and {b} differ in {differ}"
    return names


def test_stages_with_cpu0_give_the_files_of_cpu(stages):
    a, b = stages["cpu"], stages["cpu:0"]
    assert len(_same_files(a / "feat", b / "feat", "0*.npz")) == 3  # conv maps, windows, cells
    _same_files(a / "head", b / "head", "head.npz")
    _same_files(a / "svm", b / "svm", "*.npz")  # SVMs and box regressors
    _same_files(a / "calib", b / "calib", "calibration.npz")
    for dets in ("dets", "dets-svd"):
        _same_files(a / dets, b / dets, "0*.npz")
        _same_files(a / dets, b / dets, "detections.json")
    _same_files(a / "pred", b / "pred", "detections.json")
    assert len(_same_files(a / "pred", b / "pred", "*.png")) == 2


def test_the_gpu_data_path_forced_on_the_cpu_gives_the_files_of_the_cpu_path(stages):
    """extract writing behind, finetune pooling its rounds in one pass and reading ahead,
    detect reading ahead (what CUDA does) give the bytes of the in-turn CPU path."""
    a, b = stages["cpu"], stages["background"]
    assert len(_same_files(a / "feat", b / "feat", "0*.npz")) == 3
    _same_files(a / "head", b / "head", "head.npz")
    _same_files(a / "svm", b / "svm", "*.npz")
    _same_files(a / "dets", b / "dets", "0*.npz")
    _same_files(a / "dets", b / "dets", "detections.json")


def test_library_calls_take_any_spelling_of_the_buffers_device(stages):
    """The buffer checks compare devices through the rule: a buffer made on ``cpu`` serves
    ``cpu:0`` (it used to be refused: "out must be a float32 or bfloat16 buffer ... on cpu:0")."""
    image = FeatureCache(stages["cpu"] / "feat").load(FeatureCache(stages["cpu"] / "feat").image_ids[0])
    dim = image.maps[0].shape[0] * sum(n * n for n in image.levels)
    buffer = PoolBuffer()
    out = buffer.get(len(image), dim, "cpu")
    assert buffer.get(len(image), dim, torch.device("cpu", 0)).data_ptr() == out.data_ptr()  # reused, not reallocated
    plain = image.features(device="cpu")
    assert torch.equal(image.features(device=torch.device("cpu", 0), out=out), plain)
    assert torch.equal(image.features(device="cpu:0"), plain)
    fmap, cells = image.maps[0], image.cells[image.scale_index == 0]
    pooled = torch.empty((len(cells), dim))
    assert torch.equal(spatial_pyramid_pool(fmap, cells, image.levels, out=pooled), plain[image.scale_index == 0])

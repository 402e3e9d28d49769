"""`spp-detect index / search / evaluate --retrieval` end to end on real Paris6k images.

Four database images (two Louvre views from louvre_1's ok list, two Eiffel tower
photos), whitening on 30 VOC2007 images (600 region vectors for 512 channels), the real SqueezeNet weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from tests.conftest import SHARED_DATA, SQUEEZENET_FILE

PARIS = SHARED_DATA / "paris6k-subset"
DATABASE = ["paris_eiffel_000000", "paris_eiffel_000004", "paris_louvre_000002", "paris_louvre_000081"]
QUERY_BOX = "107,69,936,445"  # louvre_1's box in paris_louvre_000081 (gt/paris_120310/louvre_1_query.txt)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, weights_dir):
    root = tmp_path_factory.mktemp("retrieval")
    jpg = root / "jpg"
    jpg.mkdir()
    for name in DATABASE:
        (jpg / f"{name}.jpg").symlink_to(PARIS / "jpg" / f"{name}.jpg")
    out = root / "index"
    voc = SHARED_DATA / "voc2007-mini" / "VOC2007" / "JPEGImages"
    args = ["index", str(jpg), "--out", str(out), "--weights", str(SQUEEZENET_FILE), "--whiten-images", str(voc),
            "--whiten-limit", "30"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "4 image(s) described, 0 already indexed" in result.output
    again = invoke(*args)  # resumable: nothing left to do
    assert again.exit_code == 0 and "0 image(s) described, 4 already indexed" in again.output
    changed = CliRunner().invoke(main, [*args[:-1], "31"])
    assert changed.exit_code != 0 and "whiten_limit" in changed.output and "--force" in changed.output
    return out


def test_index_contents(index_dir):
    from spp_detect.retrieval.index import load_index

    index = load_index(index_dir)
    assert index.names == DATABASE and index.macs.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(index.regions, axis=1), 1, atol=1e-5)
    levels = index.levels(3)
    assert levels.dtype.__str__() == "torch.uint8" and int(levels.max()) <= 8 and levels.shape[0] == 512
    assert index.whitening.num_vectors > 512 and index.quant_cap > 0
    for method in ("mac", "rmac"):
        for whiten in (False, True):
            np.testing.assert_allclose(np.linalg.norm(index.descriptors(method, whiten), axis=1), 1, atol=1e-5)


def ranked_rows(output: str) -> list[list[str]]:
    return [cells for cells in map(str.split, output.splitlines())
            if len(cells) == 4 and cells[0].isdigit() and cells[2].startswith("paris_")]


def test_search_finds_the_louvre_and_draws(index_dir, tmp_path):
    query = str(PARIS / "jpg" / "paris_louvre_000081.jpg")
    first = invoke("search", "--index", str(index_dir), "--query", query, "--bbox", QUERY_BOX, "--rerank", "0")
    assert first.exit_code == 0, first.output
    assert {cells[2] for cells in ranked_rows(first.output)[:2]} == {"paris_louvre_000081", "paris_louvre_000002"}
    assert all(cells[3] == "-" for cells in ranked_rows(first.output))  # no localisation without AML

    png = tmp_path / "show.png"
    result = invoke("search", "--index", str(index_dir), "--query", query, "--bbox", QUERY_BOX,
                    "--rerank", "4", "--qe", "1", "--show", str(png))
    assert result.exit_code == 0, result.output
    rows = ranked_rows(result.output)
    assert len(rows) == 4 and rows[0][2] == "paris_louvre_000081"
    # AML finds the query's own box again in its image (IoU with the query box > 0.5)
    from torchvision.ops import box_iou
    import torch

    found = torch.tensor([[float(v) for v in rows[0][3].split(",")]])
    assert float(box_iou(found, torch.tensor([[107.0, 69, 936, 445]]))) > 0.5, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_search_bad_input(index_dir):
    query = str(PARIS / "jpg" / "paris_louvre_000081.jpg")
    bad = CliRunner().invoke(main, ["search", "--index", str(index_dir), "--query", query, "--bbox", "5,5,2,9"])
    assert bad.exit_code == 2 and "x1 < x2" in bad.output
    bad = CliRunner().invoke(main, ["search", "--index", str(index_dir), "--query", query, "--rerank", "0", "--qe", "5"])
    assert bad.exit_code == 2 and "--rerank" in bad.output


def test_index_refuses_whitening_on_the_indexed_images(tmp_path):
    """Whitening is learned on another dataset: the stage refuses any image in both lists,
    the same folder given twice or one image linked into both, naming the option."""
    db, other = tmp_path / "db", tmp_path / "other"
    db.mkdir(), other.mkdir()
    for name in DATABASE[:2]:
        (db / f"{name}.jpg").symlink_to(PARIS / "jpg" / f"{name}.jpg")
    (other / "x.jpg").symlink_to(PARIS / "jpg" / f"{DATABASE[0]}.jpg")  # one image of the database again
    (other / "y.jpg").symlink_to(PARIS / "jpg" / f"{DATABASE[2]}.jpg")
    for whiten in (db, other):
        r = CliRunner().invoke(main, ["index", str(db), "--out", str(tmp_path / "idx"), "--weights", str(SQUEEZENET_FILE),
                                      "--whiten-images", str(whiten)])
        assert r.exit_code != 0 and "--whiten-images" in r.output and "another dataset" in r.output, r.output


def test_evaluate_retrieval(index_dir, tmp_path):
    gnd = {"imlist": DATABASE, "qnames": ["louvre_1"], "qimlist": ["paris_louvre_000081"],
           "gnd": [{"ok": [2, 3], "junk": [], "bbx": [107.0, 69.0, 936.0, 445.0]}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    out = tmp_path / "eval.json"
    result = invoke("evaluate", "--retrieval", "paris6k", "--index", str(index_dir), "--ground-truth",
                    str(tmp_path / "gnd.json"), "--rerank", "4", "--json", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert set(summary["map"]) == {"mac", "rmac", "rmac+aml", "rmac+aml+qe"}
    assert summary["map"]["rmac"] == 1.0  # both Louvre images above both Eiffel photos
    # the full Paris ground truth names images this small index lacks: a clear refusal
    missing = CliRunner().invoke(main, ["evaluate", "--retrieval", "paris6k", "--index", str(index_dir),
                                        "--ground-truth", str(PARIS / "gnd_paris6k_subset.json")])
    assert missing.exit_code != 0 and "lacks 318 image(s)" in missing.output
    no_index = CliRunner().invoke(main, ["evaluate", "--retrieval", "paris6k"])
    assert no_index.exit_code == 2 and "--index" in no_index.output
    no_voc = CliRunner().invoke(main, ["evaluate", "--voc2007"], env={"SPP_DETECT_VOC_ROOT": ""})
    assert no_voc.exit_code == 2 and "Missing option '--voc-root'" in no_voc.output

"""The click group: help, version, registered stages."""

from __future__ import annotations

from click.testing import CliRunner

import cli
from spp_detect import __version__
from spp_detect.backbones import BACKBONES


def test_help_lists_the_stages():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for stage in ("proposals", "extract", "evaluate"):
        assert stage in result.output


def test_version():
    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_backbone_choices_match_the_registry():
    assert tuple(sorted(BACKBONES)) == cli.BACKBONE_NAMES


def test_scales_parser_rejects_bad_values():
    import click
    import pytest

    assert cli.parse_scales(None, None, "480, 688") == (480, 688)
    for bad in ("480,x", "0,480", "", "480,480"):
        with pytest.raises(click.BadParameter):
            cli.parse_scales(None, None, bad)


def test_all_stage_commands_are_registered():
    assert {"proposals", "extract", "evaluate", "info", "download-voc2007"} <= set(cli.main.commands)


def test_limit_then_info_on_real_images(tmp_path, voc_root):
    from tests.conftest import SQUEEZENET_FILE

    runner = CliRunner()
    voc = ["--voc-root", str(voc_root), "--image-set", "test", "--limit", "2"]
    result = runner.invoke(cli.main, ["proposals", *voc, "--workers", "1", "--out", str(tmp_path / "ss")])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in (tmp_path / "ss").glob("*.npy")) == ["000001", "000015"]
    result = runner.invoke(cli.main, ["extract", *voc, "--proposals", str(tmp_path / "ss"), "--weights",
                                      str(SQUEEZENET_FILE), "--scales", "300", "--out", str(tmp_path / "feat")])
    assert result.exit_code == 0, result.output
    info = runner.invoke(cli.main, ["info", str(tmp_path / "ss"), "--voc-root", str(voc_root)])
    assert info.exit_code == 0 and "recall of 3 non-difficult objects in 2 images" in info.output
    info = runner.invoke(cli.main, ["info", str(tmp_path / "feat")])
    assert info.exit_code == 0 and "images: 2" in info.output and "25600 numbers per window" in info.output
    assert "300: 100%" in info.output
    bad = runner.invoke(cli.main, ["info", str(tmp_path)])
    assert bad.exit_code == 2 and "not a spp-detect stage folder" in bad.output

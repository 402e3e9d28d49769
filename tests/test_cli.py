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

"""Checks a stage's command makes on what the stage did, before it reports success."""

from __future__ import annotations

import click

__all__ = ["nothing_done"]


def nothing_done(stage: str, skipped: int, folder: str, what: str = "image") -> click.ClickException:
    """The error of a stage that skipped every one of its ``skipped`` inputs (``--skip-bad``)
    and so produced nothing: the likeliest cause is a wrong folder, which the message names.

    Args:
        stage: the command, e.g. ``"proposals"``.
        skipped: how many inputs were skipped.
        folder: where the inputs were looked for (a dataset's ``image_folder``).
        what: the kind of input, for the message.
    """
    return click.ClickException(
        f"{stage}: all {skipped} {what}(s) were skipped as bad, nothing was computed: is {folder} the right folder? "
        "(--images: the folder the json's file_name entries are relative to; --voc-root: the VOCdevkit folder)")

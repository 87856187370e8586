"""The command line in-process, as a user's terminal would show it but wide and without colours."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from tunelab.cli import app

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args: str):  # noqa: ANN201 - typer.testing.Result
    """Run `tunelab ARGS`; the result's `clean` is its output without ANSI escapes."""
    # A wide console, so rich neither wraps file paths nor squeezes the table.
    result = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"}).invoke(app, [str(a) for a in args])
    result.clean = ANSI.sub("", result.output)
    return result

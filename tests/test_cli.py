"""The `moe-llava` console script: model info and the demo, run as a user would."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import pytest

from moe_llava.cli import main
from moe_llava.errors import ConfigError, DataError, UserError, WriteFailed, user_errors


def test_model_info_json_matches_paper_counts(capsys):
    assert main(["model", "info", "--recipe", "phi2_clip336", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layers"] == list(range(0, 32, 2))
    assert abs(info["moe"]["language_model"]["total"] / 5.3e9 - 1) < 0.02
    assert abs(info["moe"]["language_model"]["activated"] / 3.6e9 - 1) < 0.02


def test_unknown_recipe_is_a_one_line_error(capsys):
    assert main(["model", "info", "--recipe", "nope"]) == 2
    assert "unknown model recipe model='nope'" in capsys.readouterr().err


def test_demo_console_script_end_to_end():
    exe = shutil.which("moe-llava") or f"{sys.executable} -m moe_llava.cli"
    proc = subprocess.run(
        [*exe.split(), "demo", "--steps", "40"], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "upcycling identity" in proc.stdout
    assert "correct after save/reload" in proc.stdout


def test_a_bug_keeps_its_traceback_a_user_error_is_one_line(monkeypatch, capsys):
    """`moe-llava` reports the project's errors (UserError) as one line, exit 2; a ValueError from
    anywhere else (torch, a bug) propagates with its traceback instead of passing for a user error."""
    from moe_llava.model import recipes

    def broken(name, overrides=None):
        raise ValueError("a bug deep in torch")

    monkeypatch.setattr(recipes, "load_recipe", broken)
    with pytest.raises(ValueError, match="a bug deep in torch"):
        main(["model", "info", "--recipe", "tiny"])
    assert capsys.readouterr().err == ""


def test_user_errors_is_the_one_report_of_an_entry_point(capsys):

    for error, code, line in [
        (ConfigError("moe.top_k", "must be >= 1"), 2, "prog: config error: moe.top_k: must be >= 1"),
        (DataError("bad turn", file="t.json", record=3), 2, "prog: error: t.json: record #3: bad turn"),
        (UserError("no champion"), 2, "prog: error: no champion"),
        (
            WriteFailed.of("out", "export", OSError(errno.ENOSPC, "No space")),
            1,
            "prog: out: writing the export",
        ),
    ]:
        with pytest.raises(SystemExit) as exited, user_errors("prog"):
            raise error
        assert exited.value.code == code
        assert capsys.readouterr().err.startswith(line)
        with user_errors("prog", exit=False) as failed:
            raise error
        assert failed.code == code and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(RuntimeError), user_errors("prog"):
        raise RuntimeError("a bug")
    with user_errors("prog", exit=False) as fine:
        pass
    assert fine.code == 0

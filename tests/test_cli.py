"""The `moe-llava` console script: model info and the demo, run as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from moe_llava.cli import main


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

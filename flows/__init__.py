"""Prefect orchestration of this repository's pipeline (flows/README.md)."""

from pathlib import Path

# The repository the flows orchestrate (dvc.yaml, params/, data.dvc): the one holding flows/.
# Not moe_llava.paths.REPO_ROOT, which is where the imported package lives: another checkout when a
# clone runs with an installed moe_llava (the tests' clones, a non-editable install).
PROJECT_ROOT = Path(__file__).resolve().parents[1]

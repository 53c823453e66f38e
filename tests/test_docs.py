"""The docs name tests as proof (docs/reliability.md): every named test exists under tests/."""

import re
from pathlib import Path

from moe_llava.paths import REPO_ROOT

TESTS = REPO_ROOT / "tests"
# `dir/test_x.py::test_name[param]`, or `::test_name` for another test of the file named before it.
TEST_REF = re.compile(r"`((?:[\w/]+\.py)?)::(\w+)(?:\[[^\]`]*\])?`")


def named_tests(doc: Path) -> list[tuple[str, str]]:
    refs, last_file = [], None
    for file, name in TEST_REF.findall(doc.read_text(encoding="utf-8")):
        last_file = file or last_file
        assert last_file, f"{doc.name}: `::{name}` names no file before it"
        refs.append((last_file, name))
    return refs


def test_every_test_named_in_the_reliability_doc_exists():
    refs = named_tests(REPO_ROOT / "docs" / "reliability.md")
    assert len(refs) >= 40
    missing = [
        f"{file}::{name}"
        for file, name in refs
        if not (TESTS / file).is_file()
        or not re.search(rf"^(async )?def {name}\(", (TESTS / file).read_text(encoding="utf-8"), re.M)
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"

"""The wheel's package list covers every package in olmo_iv/ (an editable install would hide a missing one)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_packages() -> set[str]:
    # read by pattern, not tomllib: the project supports Python 3.10, which has no tomllib
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^packages\s*=\s*(\[.*?\])", text, re.S | re.M)
    assert m, "pyproject.toml lists no packages"
    return set(ast.literal_eval(m.group(1)))


def test_every_package_is_listed():
    listed = listed_packages()
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "olmo_iv").rglob("__init__.py")}
    found |= {"olmo_iv.cli"} if (ROOT / "cli" / "__init__.py").exists() else set()
    assert "olmo_iv.sae" in found and found - listed == set(), f"missing from pyproject.toml: {sorted(found - listed)}"

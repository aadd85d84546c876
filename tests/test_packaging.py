"""The wheel's package list covers every package in olmo_iv/ (an editable install would hide a missing one)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "olmo_iv").rglob("__init__.py")}
    found |= {"olmo_iv.cli"} if (ROOT / "cli" / "__init__.py").exists() else set()
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"

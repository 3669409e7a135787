"""Project hygiene: environment.yml and pyproject.toml list the same dependencies; public API is exported."""
import re
from pathlib import Path

import vtp

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_deps():
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return sorted(re.findall(r'"([^"]+)"', block))


def _environment_pip_deps():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    deps = []
    for line in lines[start + 1:]:
        m = re.match(r"^\s{6,}- (.+)$", line)
        if not m:
            break
        deps.append(m.group(1).strip())
    return sorted(deps)


def test_environment_yml_matches_pyproject():
    assert _pyproject_deps(), "no dependencies parsed from pyproject.toml"
    assert _environment_pip_deps() == _pyproject_deps()


def test_public_names_are_exported_and_documented():
    for name in vtp.__all__:
        obj = getattr(vtp, name)
        assert obj.__doc__ and obj.__doc__.strip(), f"vtp.{name} has no docstring"
    for name in ("sample_keep_mask", "GumbelVisionPruner", "PruningLoss", "get_temperature"):
        assert name in vtp.__all__

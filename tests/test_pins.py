"""Versions are bounded and pinned: pyproject's ranges, constraints.txt, and every install that uses it."""

from __future__ import annotations

import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO_ROOT

CONSTRAINTS = REPO_ROOT / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, pinned = line.partition("==")
            assert sep and pinned, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_normalise(name)] = pinned
    return pins


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_flwr_is_bounded_below_its_next_minor_release():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (flwr,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "flwr"]
    upper = [s for s in flwr.specifier if s.operator == "<"]
    assert upper, f"{flwr} has no upper bound"
    lowest = Version(
        min((s for s in flwr.specifier if s.operator == ">="), key=lambda s: Version(s.version)).version
    )
    assert Version(upper[0].version) <= Version(f"{lowest.major}.{lowest.minor + 1}")


def test_every_requirement_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _requirements():
        name = _normalise(requirement.name)
        assert name in pins, f"{requirement.name} is not in constraints.txt: regenerate it (see its header)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} vs {requirement}"
        )


def test_this_environment_is_the_pinned_one_for_the_core_packages():
    pins = _pins()
    for name in ("flwr", "torch", "diffusers"):
        assert version(name).split("+")[0] == pins[name].split("+")[0], f"{name}: installed {version(name)}"


def test_ci_readme_and_dockerfiles_install_with_the_constraints():
    readme = (REPO_ROOT / "README.md").read_text()
    test_block = readme.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    assert "pip install -c constraints.txt" in test_block  # .ci/run runs this block
    quick_start = readme.split("## Quick start")[1].split("```bash")[1].split("```")[0]
    assert "pip install -c constraints.txt" in quick_start
    for dockerfile in ("superlink", "supernode"):
        text = (REPO_ROOT / "docker" / f"{dockerfile}.Dockerfile").read_text()
        assert "constraints.txt ./" in text and "pip install --no-cache-dir -c constraints.txt" in text

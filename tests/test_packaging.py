"""pyproject's lower bounds are the tested releases that requirements/constraints.txt pins."""

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.cli import REPO


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements/constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_lower_bounds_are_the_pinned_releases():
    pins = constraints()
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "triton":  # left free: the CUDA torch pins its own triton
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is a dependency but requirements/constraints.txt does not pin it"
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{req} needs one >= lower bound"
        pinned = pins[name]
        assert pinned in req.specifier, f"{req} excludes the tested {pinned}"
        # the bound names the tested release (2.13 for 2.13.0), not an older, untested one
        assert pinned.release[: len(lower[0].release)] == lower[0].release, f"{req}: tested {pinned}"


def test_constraints_hold_numpy_below_what_mistral_common_allows():
    pins = constraints()
    assert pins["numpy"] < Version("2.4")  # mistral-common's numpy<2.4 on Python <= 3.12
    assert re.search(r"^\$\(PY\) -m pip install -q \$\(PIN\) -e", _setup_rule(), re.M)


def _setup_rule() -> str:
    text = (REPO / "Makefile").read_text()
    assert "PIN ?= -c requirements/constraints.txt" in text
    rule = text.split("$(STAMP): ", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line.strip() for line in rule.splitlines())

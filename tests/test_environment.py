"""environment.yml (conda) installs the same packages as requirements.txt (pip): same names, versions, markers."""
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from notebooks.runtime import requirement_lines
from conftest import ROOT


def normalised(lines):
    return sorted((canonicalize_name(r.name), str(r.specifier), str(r.marker or "")) for r in map(Requirement, lines))


def conda_dependencies():
    return yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]


def test_conda_pip_section_matches_requirements_txt():
    pip_sections = [entry["pip"] for entry in conda_dependencies() if isinstance(entry, dict)]
    assert len(pip_sections) == 1
    assert normalised(pip_sections[0]) == normalised(requirement_lines(ROOT / "requirements.txt"))


def test_conda_environment_brings_python_and_pip():
    plain = [entry for entry in conda_dependencies() if isinstance(entry, str)]
    assert "pip" in plain and any(entry.startswith("python=") for entry in plain)

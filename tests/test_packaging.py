"""The set-up files agree with each other: pyproject, environment.yml, README, Makefile, RTD.

Each route into the project (pip, conda, `make`, Read the Docs) is described in its own file;
these tests keep them from drifting apart. The code the documentation shows is run too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
ENVIRONMENT = yaml.safe_load((ROOT / "environment.yml").read_text())
EDITABLE = re.compile(r"^-e\s+\.(?:\[(?P<extras>[^\]]*)\])?$")


def _conda_and_pip_entries() -> tuple[list[str], list[str]]:
    conda, pip = [], []
    for entry in ENVIRONMENT["dependencies"]:
        if isinstance(entry, dict):
            assert set(entry) == {"pip"}, f"unexpected nested entry {entry} in environment.yml"
            pip.extend(entry["pip"])
        else:
            conda.append(entry)
    return conda, pip


def _requirements(strings: list[str]) -> dict[str, Requirement]:
    requirements = [Requirement(s) for s in strings]
    return {canonicalize_name(r.name): r for r in requirements}


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    _, pip = _conda_and_pip_entries()
    listed = _requirements([entry for entry in pip if not entry.startswith("-e")])
    declared = _requirements(PROJECT["dependencies"])
    assert listed.keys() == declared.keys(), (
        f"environment.yml lists {sorted(listed)}, pyproject declares {sorted(declared)}"
    )
    for name, requirement in declared.items():
        assert listed[name].specifier == requirement.specifier, (
            f"{name}: environment.yml says {listed[name].specifier}, "
            f"pyproject {requirement.specifier}"
        )


def test_environment_yml_installs_the_package_with_its_test_and_docs_extras():
    _, pip = _conda_and_pip_entries()
    editable = [EDITABLE.match(entry) for entry in pip if entry.startswith("-e")]
    assert len(editable) == 1 and editable[0], f"expected one '-e .[extras]' entry, got {pip}"
    extras = {extra.strip() for extra in (editable[0]["extras"] or "").split(",") if extra}
    available = set(PROJECT["optional-dependencies"])
    assert extras <= available, f"environment.yml asks for unknown extras {extras - available}"
    assert {"test", "docs"} <= extras, f"environment.yml installs only the extras {extras}"


def test_environment_yml_gives_python_pip_and_pandoc_from_conda_forge():
    conda, _ = _conda_and_pip_entries()
    assert "conda-forge" in ENVIRONMENT["channels"]
    names = {re.split(r"[<>=! ]", entry, maxsplit=1)[0]: entry for entry in conda}
    assert {"python", "pip", "pandoc"} <= names.keys(), f"conda entries: {conda}"
    python_bound = names["python"].removeprefix("python")
    assert python_bound == PROJECT["requires-python"], (
        f"environment.yml pins python{python_bound}, "
        f"pyproject requires {PROJECT['requires-python']}"
    )


def test_readme_gives_the_two_set_up_commands():
    readme = (ROOT / "README.rst").read_text()
    assert "make docs" in readme
    assert "make test" in readme


def test_make_docs_builds_with_warnings_as_errors_and_nitpicky():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^docs:.*?(?=^\S)", makefile, flags=re.MULTILINE | re.DOTALL)
    assert recipe, "the Makefile has no docs target"
    command = next(line for line in recipe.group(0).splitlines() if "sphinx" in line)
    for flag in ("-W", "--keep-going", "-n", "-b html", "docs/_build/html"):
        assert flag in command, f"`make docs` runs {command.strip()!r}, without {flag}"


def test_readthedocs_config_builds_the_same_site():
    config = yaml.safe_load((ROOT / ".readthedocs.yaml").read_text())
    assert config["version"] == 2
    assert config["sphinx"]["configuration"] == "docs/conf.py"
    assert config["sphinx"]["fail_on_warning"] is True
    (install,) = config["python"]["install"]
    assert install["method"] == "pip" and install["path"] == "."
    assert "docs" in install["extra_requirements"]
    pre_install = " ".join(config["build"]["jobs"]["pre_install"])
    assert "download.pytorch.org/whl/cpu" in pre_install, "RTD must install the CPU build of torch"
    assert (ROOT / "docs" / "conf.py").is_file()


def test_docs_build_needs_no_network():
    """No intersphinx (it downloads inventories), MathJax served from the site itself."""
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert "sphinx.ext.intersphinx" not in conf
    assert "sphinx-mathjax-offline" in conf
    assert 'nbsphinx_requirejs_path = ""' in conf, "nbsphinx would load require.js from a CDN"
    docs_extra = {
        canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["docs"]
    }
    assert {"sphinx-mathjax-offline", "pypandoc-binary", "nbsphinx"} <= docs_extra


def _python_blocks(rst: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of a reStructuredText file."""
    blocks = []
    for match in re.finditer(r"^( *)\.\. code-block:: python\n\n", rst, flags=re.MULTILINE):
        indent = len(match.group(1)) + 4
        lines = []
        for line in rst[match.end() :].splitlines():
            if line.strip() and len(line) - len(line.lstrip()) < indent:
                break
            lines.append(line[indent:])
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


@pytest.mark.parametrize("page", ["README.rst", "docs/index.rst", "docs/installation.rst"])
def test_python_examples_in_the_docs_run(page, capsys):
    blocks = [
        block
        for block in _python_blocks((ROOT / page).read_text())
        if not block.lstrip().startswith("%")  # IPython magics, e.g. Colab's %pip install
    ]
    assert blocks, f"{page} shows no Python example"
    for block in blocks:
        exec(compile(block, f"{page} example", "exec"), {"__name__": "__docs_example__"})  # noqa: S102
    printed = capsys.readouterr().out
    assert "False" not in printed, f"an example in {page} printed a failed check:\n{printed}"


def test_the_wheel_holds_every_subpackage_and_imports_outside_the_checkout(tmp_path):
    """Users install a wheel, not the checkout: build one and import it from elsewhere."""
    import subprocess
    import sys

    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = wheels.glob("goodfellow-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, timeout=600,
    )  # fmt: skip
    # every package of the checkout, so that one left out of pyproject's list fails here
    packages = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "goodfellow").rglob("__init__.py")
    )
    assert {"goodfellow.layers", "goodfellow.exercises"} <= set(packages)
    code = (
        f"import {', '.join(packages)}, goodfellow.layers.conv, goodfellow.exercises.privacy\n"
        "import pathlib\n"
        f"for name in {packages!r}:\n"
        "    where = pathlib.Path(__import__('sys').modules[name].__file__)\n"
        f"    assert where.is_relative_to({str(target)!r}), f'{{name}} came from {{where}}'\n"
        "print(len(goodfellow.__all__), sorted(t.__name__ for t in goodfellow.layers"
        ".registered_rules())[:3])\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == str(len(__import__("goodfellow").__all__))

"""The tutorials: every notebook executes from scratch, and the files in git carry no outputs.

The docs build executes the notebooks too (nbsphinx), but the test suite must not depend on a
docs build having run: here each notebook is executed by nbclient with ``tutorials/`` as its
working directory, exactly as a student running it from a clone would. The code of the exercise
solutions (hidden in the pages, never executed by the docs build) runs too, after the notebook,
in the order of the exercises: a solution that no longer runs is caught here.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
NOTEBOOK_IDS = [path.stem for path in NOTEBOOKS]
TITLE = re.compile(r"\A# (\d+)\. \S")
SOLUTION = "<details><summary>Solution</summary>"
PYTHON_FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)
# Inline code or math inside **bold** or *italics*: the docs build converts markdown to
# reStructuredText, which cannot nest inline markup, so the page would show raw backticks and
# ":math:" (write "**Against the width** $w$" instead of "**Against the width $w$**").
CODE_OR_MATH = re.compile(r"```.*?```|\$\$.+?\$\$|\$[^$]+\$|`[^`]+`", re.DOTALL)
_IN_PARAGRAPH = r"(?:(?!\n[ \t]*\n)[^*])"
BOLD = re.compile(rf"\*\*(?=\S)({_IN_PARAGRAPH}+?)(?<=\S)\*\*")
ITALICS = re.compile(rf"(?<![*\w])\*(?=[^\s*])({_IN_PARAGRAPH}+?)(?<=[^\s*])\*(?![*\w])")
MASK = "\x00"
# A notebook must finish in under a minute on two cores; this only stops a hung kernel.
EXECUTION_TIMEOUT_S = 600


def nested_markup(markdown: str) -> list[str]:
    """Bold or italic spans of ``markdown`` that contain inline code or math."""
    masked = CODE_OR_MATH.sub(MASK, markdown)  # also hides the asterisks inside math
    spans = [m.group(0) for m in BOLD.finditer(masked) if MASK in m.group(1)]
    spans += [m.group(0) for m in ITALICS.finditer(BOLD.sub("", masked)) if MASK in m.group(1)]
    return [span.replace(MASK, "<code or math>") for span in spans]


def test_there_are_tutorials():
    numbers = [path.name[:2] for path in NOTEBOOKS]
    assert {"01", "02", "03", "04"} <= set(numbers), f"tutorials/ holds {numbers}"


def solution_code(notebook) -> list[str]:
    """The ```python blocks of the notebook's solution cells, in order."""
    return [
        code
        for cell in notebook.cells
        if cell.cell_type == "markdown" and SOLUTION in cell.source
        for code in PYTHON_FENCE.findall(cell.source)
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_and_its_solutions_execute(path: Path):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    solutions = solution_code(notebook)
    assert solutions, f"{path.name}: no ```python code in the exercise solutions"
    notebook.cells += [nbformat.v4.new_code_cell(code) for code in solutions]
    client = NotebookClient(
        notebook,
        timeout=EXECUTION_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
        # ipykernel's note on every start that its local channel is unencrypted is noise here.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, f"{path.name}: cells raised {[e.ename for e in errors]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs or execution counts; clear them "
        "(e.g. `jupyter nbconvert --clear-output --inplace`) before committing: the docs build "
        "executes every notebook itself."
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_follows_the_tutorial_layout(path: Path):
    """Title "# N. Title" matching the file's number (the page title), exercises with solutions."""
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be the title"
    match = TITLE.match(first.source)
    assert match, (
        f"{path.name}: the first cell must start with '# N. Title', got {first.source[:40]!r}"
    )
    assert int(match.group(1)) == int(path.name[:2]), (
        f"{path.name}: title number {match.group(1)} does not match the file name"
    )
    solutions = [
        cell
        for cell in notebook.cells
        if cell.cell_type == "markdown" and SOLUTION in cell.source
    ]
    assert 2 <= len(solutions) <= 4, (
        f"{path.name}: expected 2-4 exercises with solutions in '{SOLUTION} ... </details>' "
        f"blocks, found {len(solutions)}"
    )
    for cell in solutions:
        # The teachers' page strips solutions for handouts by this prefix.
        assert cell.source.lstrip().startswith(SOLUTION), (
            f"{path.name}: a solution cell must start with '{SOLUTION}', got "
            f"{cell.source[:40]!r}"
        )
        assert cell.source.rstrip().endswith("</details>"), (
            f"{path.name}: a solution block is not closed with </details>"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_markdown_survives_the_conversion_to_the_site(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nested = [
        (index, span[:70])
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "markdown"
        for span in nested_markup(cell.source)
    ]
    assert not nested, (
        f"{path.name}: inline code or math inside bold/italics (cell, text): {nested}; "
        "the site would show it as raw markup. Move the code or math outside the emphasis."
    )


# -- The course: metadata, the Colab cell, exercise checks, figure descriptions -------------------

COURSE_KEY = "goodfellow"  # docs/conf.py's TUTORIAL_METADATA_KEY; docs/teachers.rst documents it
COURSE_FIELDS = {
    "part": str,
    "summary": str,
    "minutes": int,
    "level": str,
    "session": int,
    "aims": str,
    "activity": str,
}
LEVELS = ("introductory", "intermediate", "advanced")
CONF = ROOT / "docs" / "conf.py"


def repository_url() -> str:
    match = re.search(r'^REPOSITORY_URL = "([^"]+)"', CONF.read_text(encoding="utf-8"), re.M)
    assert match, "docs/conf.py defines no REPOSITORY_URL"
    return match.group(1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_carries_its_place_in_the_course(path: Path):
    """The Tutorials page, the lesson plan and the handouts are built from this metadata."""
    meta = nbformat.read(path, as_version=4).metadata.get(COURSE_KEY)
    assert isinstance(meta, dict), (
        f"{path.name}: no {COURSE_KEY!r} entry in the notebook metadata; see docs/teachers.rst, "
        "'Adding a tutorial'"
    )
    for key, kind in COURSE_FIELDS.items():
        assert isinstance(meta.get(key), kind), (
            f"{path.name}: metadata {COURSE_KEY}.{key} should be a {kind.__name__}"
        )
    assert meta["level"] in LEVELS, f"{path.name}: level {meta['level']!r} not in {LEVELS}"
    assert 10 <= meta["minutes"] <= 120, f"{path.name}: {meta['minutes']} minutes"
    assert meta["session"] >= 1


def test_lesson_plan_follows_the_order_of_the_tutorials():
    sessions = [
        nbformat.read(path, as_version=4).metadata.get(COURSE_KEY, {}).get("session", 0)
        for path in NOTEBOOKS
    ]
    assert sessions == sorted(sessions), f"sessions in file order: {sessions}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_first_code_cell_installs_goodfellow_in_colab_only(path: Path):
    notebook = nbformat.read(path, as_version=4)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert '"google.colab" in sys.modules' in first_code.source, (
        f"{path.name}: the first code cell must install goodfellow when run in Colab, guarded "
        "by `if \"google.colab\" in sys.modules:`"
    )
    assert f"git+{repository_url()}" in first_code.source, (
        f"{path.name}: the Colab cell installs from another repository than docs/conf.py's "
        "REPOSITORY_URL"
    )


def test_colab_cell_does_nothing_outside_colab():
    """Run the first code cell of a notebook here: it must not try to install anything."""
    import subprocess
    import sys

    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    guard = "import subprocess\nsubprocess.run = None  # would fail if called\n"
    result = subprocess.run(
        [sys.executable, "-c", guard + first_code.source],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_every_exercise_has_a_check_cell_and_its_solution_passes_it(path: Path):
    notebook = nbformat.read(path, as_version=4)
    problems = []
    for index, cell in enumerate(notebook.cells):
        if not (cell.cell_type == "markdown" and cell.source.lstrip().startswith(SOLUTION)):
            continue
        before = notebook.cells[index - 1]
        if not (
            before.cell_type == "code"
            and "from goodfellow.exercises import check_" in before.source
        ):
            problems.append(f"cell {index}: the cell before the solution is not a check cell")
            continue
        name = re.search(r"import (check_\w+)", before.source).group(1)
        if not re.search(rf"assert {name}\(", cell.source):
            problems.append(f"cell {index}: the solution does not `assert {name}(...)`")
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_every_figure_has_a_description(path: Path):
    """A cell that shows a figure says what it shows (the figure's alt text on the site)."""
    notebook = nbformat.read(path, as_version=4)
    missing = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        and "plt.show()" in cell.source
        and "# Figure:" not in cell.source
    ]
    assert not missing, (
        f"{path.name}: code cells {missing} show a figure without a '# Figure: ...' comment "
        "describing it"
    )

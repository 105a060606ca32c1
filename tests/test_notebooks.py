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

"""The built site in a real browser.

``docs/_build/html`` is served on 127.0.0.1 and every page is opened in headless Chromium
(Debian's ``chromium``, driven through its own ``--dump-dom`` and ``--screenshot``). The tests
then check what a reader would see: every resource a page asked for was served, nothing came
from the network, the math is typeset by the bundled MathJax with no raw TeX left, each tutorial
page shows its figures, and the API page documents ``goodfellow_backprop``. A screenshot of
every page is saved (into ``$GOODFELLOW_SCREENSHOT_DIR`` when set, else a pytest temporary
folder) for a person to look at.

Without Chromium the browser tests skip and say why, unless ``GOODFELLOW_REQUIRE_BROWSER=1``
(set by ``.ci/run``), in which case they fail. If the site has not been built, it is built first
with the same command as ``make docs``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
SPHINX_BUILD = ["-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", "docs", str(SITE)]
REQUIRE_BROWSER = os.environ.get("GOODFELLOW_REQUIRE_BROWSER") == "1"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGE_TIMEOUT_S = 120
VIRTUAL_TIME_BUDGET_MS = 8000
WINDOW = "1280,2400"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Tags and attributes through which a page loads something (links to other pages are not loads).
RESOURCE_ATTRIBUTES = {
    "script": "src",
    "img": "src",
    "iframe": "src",
    "source": "src",
    "video": "src",
    "audio": "src",
    "embed": "src",
    "object": "data",
}
LOADED_LINK_RELS = {"stylesheet", "icon", "shortcut", "preload", "modulepreload", "manifest"}
# Text in these elements is code or machinery, not prose: TeX-like characters there are fine.
NON_PROSE = {"script", "style", "pre", "code", "textarea", "mjx-container", "svg", "noscript"}
# \( \) \[ \] and $$ delimiters, or an inline $...$ that pandoc did not turn into math.
RAW_TEX = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\$\$|(?<![\w$])\$[^$\s][^$\n]{0,200}?[^$\s\\]\$(?![\w$])"
)

# reStructuredText that reached the page as text (e.g. pandoc cannot nest math or code in bold).
RAW_RST = re.compile(r":(?:math|doc|ref|func|class|cite:[pt]):`|``\S")

# -- The site -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Path:
    """The built site, building it first (as `make docs` does) when it is missing."""
    if not (SITE / "index.html").is_file():
        result = subprocess.run(
            [sys.executable, *SPHINX_BUILD],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert result.returncode == 0, (
            "building the docs failed:\n" + (result.stdout + result.stderr)[-6000:]
        )
    return SITE


def html_pages(site: Path) -> list[Path]:
    return sorted(
        path
        for path in site.rglob("*.html")
        if not path.relative_to(site).parts[0].startswith(("_static", "_sources", "_images"))
    )


class PageParser(HTMLParser):
    """Collects what a page loads, where it links, its images, ids and visible prose text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.resources: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.tags: set[str] = set()
        self.prose: list[str] = []
        self._skip_depth = 0
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        if tag in RESOURCE_ATTRIBUTES and attributes.get(RESOURCE_ATTRIBUTES[tag]):
            self.resources.append(attributes[RESOURCE_ATTRIBUTES[tag]])
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"])
        if tag == "link" and attributes.get("href"):
            rels = set((attributes.get("rel") or "").lower().split())
            if rels & LOADED_LINK_RELS:
                self.resources.append(attributes["href"])
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])
        if tag in ("img", "meta", "link", "br", "hr", "input", "source", "wbr", "col", "area"):
            return  # void elements have no end tag
        self._stack.append(tag)
        if tag in NON_PROSE:
            self._skip_depth += 1

    def handle_endtag(self, tag):
        if tag not in self._stack:
            return
        while self._stack:
            open_tag = self._stack.pop()
            if open_tag in NON_PROSE:
                self._skip_depth -= 1
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._skip_depth == 0:
            self.prose.append(data)


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    parser.close()
    return parser


def is_external(url: str) -> bool:
    parsed = urlparse(url)
    return bool(parsed.scheme and parsed.scheme not in ("data", "blob")) or url.startswith("//")


def local_target(site: Path, page: Path, url: str) -> Path:
    """The file a relative URL on ``page`` points to."""
    path = unquote(urlparse(url).path)
    if not path:
        return page
    target = (page.parent / path) if not path.startswith("/") else site / path.lstrip("/")
    if target.is_dir() or path.endswith("/"):
        target = target / "index.html"
    return target


# -- Static checks: need no browser ----------------------------------------------------------------


def test_site_loads_nothing_from_the_network_and_every_local_resource_exists(site):
    problems = []
    for page in html_pages(site):
        parser = parse(page.read_text(encoding="utf-8"))
        for url in parser.resources:
            if url.startswith("data:"):
                continue
            if is_external(url):
                problems.append(f"{page.relative_to(site)} loads {url} from the network")
            elif not local_target(site, page, url).is_file():
                problems.append(f"{page.relative_to(site)} loads {url}, which is not in the site")
    assert not problems, "\n".join(problems)


def test_internal_links_point_to_files_that_exist(site):
    problems = []
    for page in html_pages(site):
        for url in parse(page.read_text(encoding="utf-8")).links:
            if url.startswith(("#", "mailto:", "javascript:")) or is_external(url):
                continue
            if not local_target(site, page, url).exists():
                problems.append(f"{page.relative_to(site)} links to missing {url}")
    assert not problems, "\n".join(problems)


# -- The browser -----------------------------------------------------------------------------------


def find_chromium() -> str | None:
    configured = os.environ.get("GOODFELLOW_CHROMIUM")
    if configured:
        return configured
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = (
            "headless Chromium not found (looked for "
            + ", ".join(CHROMIUM_NAMES)
            + " and $GOODFELLOW_CHROMIUM): the real-browser test of the docs did not run. "
            "Install it with `apt-get install chromium` to run it."
        )
        if REQUIRE_BROWSER:
            pytest.fail(reason + " GOODFELLOW_REQUIRE_BROWSER=1 makes this a failure.")
        pytest.skip(reason)
    return path


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site and records every request with its status code."""

    def __init__(self, *args, log: list, lock: threading.Lock, **kwargs):
        self._log = log
        self._lock = lock
        super().__init__(*args, **kwargs)

    def log_request(self, code="-", size="-"):
        status = code.value if hasattr(code, "value") else int(code)
        with self._lock:
            self._log.append((self.path, status))

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # keep the test output quiet; requests are checked through log_request


@pytest.fixture(scope="module")
def server(site):
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    handler = functools.partial(RecordingHandler, directory=str(site), log=log, lock=lock)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", log, lock
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    configured = os.environ.get("GOODFELLOW_SCREENSHOT_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")


@dataclass
class PageVisit:
    page: str  # relative to the site, e.g. "tutorials/01_notation_and_model.html"
    returncode: int | None
    dom: str
    console: list[str]
    requests: list[tuple[str, int]]
    screenshot: Path
    error: str = ""
    parsed: PageParser = field(init=False)

    def __post_init__(self):
        self.parsed = parse(self.dom)


def open_in_chromium(chromium: str, url: str, screenshot: Path) -> tuple[int | None, str, str, str]:
    """Load ``url`` headless; return (returncode, dom, stderr, error)."""
    with tempfile.TemporaryDirectory(prefix="goodfellow-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--window-size={WINDOW}",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a hung browser is killed with all its helpers
        )
        try:
            dom, stderr = process.communicate(timeout=PAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            dom, stderr = process.communicate()
            return None, dom, stderr, f"Chromium did not finish within {PAGE_TIMEOUT_S} s"
        return process.returncode, dom, stderr, ""


@pytest.fixture(scope="module")
def visits(site, chromium, server, screenshot_dir) -> dict[str, PageVisit]:
    """Every page of the site, opened once in headless Chromium."""
    base, log, lock = server
    results = {}
    for page in html_pages(site):
        relative = page.relative_to(site).as_posix()
        screenshot = screenshot_dir / (relative.replace("/", "__").removesuffix(".html") + ".png")
        with lock:
            log.clear()
        returncode, dom, stderr, error = open_in_chromium(
            chromium, f"{base}/{relative}", screenshot
        )
        with lock:
            requests = list(log)
        console = [line for line in stderr.splitlines() if ":CONSOLE" in line]
        results[relative] = PageVisit(
            relative, returncode, dom, console, requests, screenshot, error
        )
    (screenshot_dir / "visits.json").write_text(
        json.dumps({k: {"requests": v.requests, "console": v.console} for k, v in results.items()})
    )
    return results


def test_every_page_opens(visits):
    broken = {
        page: visit.error or f"exit status {visit.returncode}"
        for page, visit in visits.items()
        if visit.returncode != 0 or visit.error or "</html>" not in visit.dom
    }
    assert not broken, broken
    assert "index.html" in visits and "api.html" in visits


def test_no_failed_resource_load(visits, site):
    problems = []
    for page, visit in visits.items():
        requested = {urlparse(path).path for path, _ in visit.requests}
        if f"/{page}" not in requested:
            problems.append(f"{page}: the page itself was never requested")
        for path, status in visit.requests:
            if status not in (200, 304):
                problems.append(f"{page}: GET {path} returned {status}")
        # After the scripts ran: nothing in the live DOM points outside the site or to a gap.
        for url in visit.parsed.resources:
            if url.startswith(("data:", "blob:")):
                continue
            if is_external(url) and not url.startswith("http://127.0.0.1:"):
                problems.append(f"{page}: loads {url} from the network")
            elif not is_external(url) and not local_target(site, site / page, url).is_file():
                problems.append(f"{page}: refers to {url}, which is not in the site")
        for line in visit.console:
            if "Uncaught" in line or "Failed to load resource" in line:
                problems.append(f"{page}: console: {line.split('] ', 1)[-1]}")
    assert not problems, "\n".join(problems)


def test_math_is_typeset_and_no_raw_markup_is_left(visits, site):
    problems = []
    pages_with_math = 0
    for page, visit in visits.items():
        source = (site / page).read_text(encoding="utf-8")
        has_math = 'class="math' in source
        prose = " ".join(visit.parsed.prose)
        leftover = RAW_TEX.findall(prose)
        if leftover:
            problems.append(f"{page}: raw TeX left in the text: {leftover[:3]}")
        markup = RAW_RST.findall(prose)
        if markup:
            problems.append(f"{page}: reStructuredText markup shown as text: {markup[:3]}")
        if "mjx-merror" in visit.parsed.tags or "data-mjx-error" in visit.dom:
            problems.append(f"{page}: MathJax reported a TeX error")
        if has_math:
            pages_with_math += 1
            if "mjx-container" not in visit.parsed.tags:
                problems.append(f"{page}: has math, but MathJax typeset none of it")
    assert pages_with_math >= 5, f"only {pages_with_math} pages have math; is MathJax wired up?"
    assert not problems, "\n".join(problems)


def _image_outputs(notebook: Path) -> int:
    """The number of PNG figures in the notebook nbsphinx executed and copied into the site."""
    data = json.loads(notebook.read_text(encoding="utf-8"))
    return sum(
        1
        for cell in data["cells"]
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


def test_each_tutorial_page_shows_its_figures(visits, site):
    tutorial_pages = [page for page in visits if re.fullmatch(r"tutorials/\d\d_[^/]+\.html", page)]
    assert len(tutorial_pages) >= 4, f"tutorial pages: {tutorial_pages}"
    problems = []
    for page in tutorial_pages:
        visit = visits[page]
        expected = _image_outputs(site / page.replace(".html", ".ipynb"))
        served = {urlparse(path).path for path, status in visit.requests if status == 200}
        figures = []
        for src in visit.parsed.images:
            target = local_target(site, site / page, src)
            if target.suffix == ".png" and target.is_file():
                with target.open("rb") as handle:
                    if handle.read(8) == PNG_MAGIC:
                        figures.append(target)
            url_path = urlparse(urljoin(f"/{page}", src)).path
            if not src.startswith("data:") and url_path not in served:
                problems.append(f"{page}: image {src} was not loaded")
        if expected == 0:
            problems.append(f"{page}: the notebook produced no figure")
        if len(figures) < expected:
            problems.append(
                f"{page}: shows {len(figures)} PNG figures, its notebook made {expected}"
            )
    assert not problems, "\n".join(problems)


def test_api_page_lists_goodfellow_backprop(visits):
    api = visits["api.html"]
    assert "goodfellow.backprop.goodfellow_backprop" in api.parsed.ids
    assert "goodfellow_backprop" in " ".join(api.parsed.prose)
    for module in ("models", "backprop", "hooks", "transforms", "ekfac", "gradiator"):
        assert f"module-goodfellow.{module}" in api.parsed.ids, f"no goodfellow.{module} section"


def test_tutorial_pages_link_to_the_notebook_colab_and_binder(visits, site):
    for page, visit in visits.items():
        if not re.fullmatch(r"tutorials/\d\d_[^/]+\.html", page):
            continue
        notebook = Path(page).with_suffix(".ipynb").name
        assert notebook in visit.parsed.links, f"{page}: no download link to {notebook}"
        assert (site / "tutorials" / notebook).is_file()
        assert any("colab.research.google.com" in url for url in visit.parsed.links), page
        assert any("mybinder.org" in url for url in visit.parsed.links), page


def test_a_screenshot_of_every_page(visits):
    missing = [
        page
        for page, visit in visits.items()
        if not visit.screenshot.is_file() or visit.screenshot.read_bytes()[:8] != PNG_MAGIC
    ]
    assert not missing, f"no screenshot of {missing}"

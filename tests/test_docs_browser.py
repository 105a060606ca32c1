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
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
SPHINX_BUILD = ["-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", "docs", str(SITE)]
REQUIRE_BROWSER = os.environ.get("GOODFELLOW_REQUIRE_BROWSER") == "1"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGE_TIMEOUT_S = 120
VIRTUAL_TIME_BUDGET_MS = 8000
WINDOW = "1280,2400"
# A phone: 390 CSS pixels wide. Headless Chromium keeps its window at least 500 px wide, so the
# page is laid out inside a 390 px iframe of a wrapper page (media queries then see 390 px).
NARROW_WIDTH = 390
NARROW_WINDOW = "500,2400"
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


# Injected into a page requested with ?measure=1 (and &theme=dark): once the page and its math
# are laid out, it measures every notebook output block and every table of the text column and
# writes what sticks out, as JSON, into the DOM that --dump-dom returns. An element overflows if
# its content is wider than its box (it scrolls or is cut: scrollWidth > clientWidth) or if its
# box reaches past the right edge of the text column.
MEASURE_SCRIPT = """
<script>
(() => {
  const THEME = "%s";
  if (THEME) document.body.dataset.theme = THEME;
  const measure = () => {
    const article = document.querySelector("article[role=main]")
      || document.querySelector("article");
    const edge = article ? article.getBoundingClientRect().right : window.innerWidth;
    const problems = [];
    const describe = (el) => (el.textContent || "").trim().replace(/\\s+/g, " ").slice(0, 60);
    const check = (el, kind) => {
      const box = el.getBoundingClientRect();
      if (box.width === 0 && box.height === 0) return;
      const hidden = el.scrollWidth - el.clientWidth;
      const past = box.right - edge;
      if (hidden > 1 || past > 1) {
        problems.push({kind: kind, hidden_px: hidden, past_edge_px: Math.round(past),
                       text: describe(el)});
      }
    };
    const outputs = "div.nboutput div.output_area, div.nboutput div.output_area pre";
    document.querySelectorAll(outputs).forEach((el) => check(el, "output"));
    document.querySelectorAll("article table").forEach((el) => {
      check(el, "table");
      if (el.parentElement && el.parentElement.classList.contains("table-wrapper")) {
        check(el.parentElement, "table");
      }
    });
    const out = document.createElement("pre");
    out.id = "goodfellow-overflow";
    out.hidden = true;
    out.textContent = JSON.stringify({width: window.innerWidth, problems: problems});
    document.body.appendChild(out);
    // In the narrow wrapper's iframe: hand the result to the page --dump-dom returns.
    if (window.parent !== window) window.parent.document.body.appendChild(out.cloneNode(true));
  };
  window.addEventListener("load", () => {
    const typeset = window.MathJax && MathJax.startup && MathJax.startup.promise;
    (typeset || Promise.resolve()).then(() => setTimeout(measure, 300));
  });
})();
</script>
"""
NARROW_WRAPPER = """<!DOCTYPE html><html><head><meta charset="utf-8"></head>
<body style="margin:0"><iframe src="/{page}?measure=1&theme={theme}"
style="width:{width}px;height:2400px;border:0;display:block"></iframe></body></html>"""
OVERFLOW_RESULT = re.compile(r'<pre id="goodfellow-overflow"[^>]*>(.*?)</pre>', re.S)


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site and records every request with its status code.

    A page requested with ``?measure=1`` comes with :data:`MEASURE_SCRIPT` (``&theme=dark``
    switches furo to its dark theme first).
    """

    def __init__(self, *args, log: list, lock: threading.Lock, **kwargs):
        self._log = log
        self._lock = lock
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 - the base class's name
        parsed = urlparse(self.path)
        query = parse_qs(parsed.query)
        if parsed.path == "/__narrow__.html":
            self._send_html(NARROW_WRAPPER.format(
                width=int(query["width"][0]), page=query["page"][0],
                theme=query.get("theme", [""])[0],
            ).encode())
            return
        file = Path(self.directory) / unquote(parsed.path).lstrip("/")
        if "measure" not in query or file.suffix != ".html" or not file.is_file():
            super().do_GET()
            return
        theme = query.get("theme", [""])[0]
        script = (MEASURE_SCRIPT % theme).encode()
        self._send_html(file.read_bytes().replace(b"</body>", script + b"</body>"))

    def _send_html(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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


def open_in_chromium(
    chromium: str, url: str, screenshot: Path, window: str = WINDOW
) -> tuple[int | None, str, str, str]:
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
            f"--window-size={window}",
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
            chromium, f"{base}/{relative}?measure=1", screenshot
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


@pytest.fixture(scope="module")
def narrow_dark_visits(site, chromium, server, screenshot_dir) -> dict[str, PageVisit]:
    """Every page again, 390 px wide (a phone) and in furo's dark theme."""
    base, log, lock = server
    results = {}
    for page in html_pages(site):
        relative = page.relative_to(site).as_posix()
        name = relative.replace("/", "__").removesuffix(".html") + "__390_dark.png"
        screenshot = screenshot_dir / name
        with lock:
            log.clear()
        url = f"{base}/__narrow__.html?page={relative}&theme=dark&width={NARROW_WIDTH}"
        returncode, dom, stderr, error = open_in_chromium(chromium, url, screenshot, NARROW_WINDOW)
        with lock:
            requests = list(log)
        results[relative] = PageVisit(relative, returncode, dom, [], requests, screenshot, error)
    return results


def overflow_report(visit: PageVisit) -> dict | None:
    match = OVERFLOW_RESULT.search(visit.dom)
    return json.loads(html_unescape(match.group(1))) if match else None


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


@pytest.mark.parametrize("width", ["1280", "390"])
def test_no_output_block_or_table_overflows_its_column(width, request):
    fixture = "visits" if width == "1280" else "narrow_dark_visits"
    visits = request.getfixturevalue(fixture)
    problems, measured = [], 0
    for page, visit in visits.items():
        if page in ("search.html", "genindex.html", "py-modindex.html"):
            continue
        report = overflow_report(visit)
        if report is None:
            problems.append(f"{page}: the overflow measurement did not run")
            continue
        measured += 1
        assert report["width"] == int(width), f"{page}: laid out {report['width']} px wide"
        for item in report["problems"]:
            by = max(item["hidden_px"], item["past_edge_px"])
            problems.append(f"{page}: a {item['kind']} overflows by {by} px: {item['text']!r}")
    assert measured >= 10
    assert not problems, f"at {width} px:\n" + "\n".join(problems)


def test_the_measurement_finds_an_overflow(tmp_path, chromium):
    """The overflow check itself: a page with a long unbroken output line is reported."""
    page = tmp_path / "page.html"
    page.write_text(
        "<html><body><article role='main' style='width:300px'>"
        "<div class='nboutput'><div class='output_area' style='overflow-x:auto'>"
        "<pre>" + "x" * 400 + "</pre></div></div></article></body></html>",
        encoding="utf-8",
    )
    handler = functools.partial(
        RecordingHandler, directory=str(tmp_path), log=[], lock=threading.Lock()
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/page.html?measure=1"
        returncode, dom, _, error = open_in_chromium(chromium, url, tmp_path / "shot.png")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert returncode == 0 and not error
    report = json.loads(html_unescape(OVERFLOW_RESULT.search(dom).group(1)))
    assert report["problems"], "a 400-character line in a 300 px column was not reported"


def test_dark_theme_and_phone_width_screenshots(narrow_dark_visits):
    missing = [p for p, v in narrow_dark_visits.items() if v.returncode != 0 or not
               v.screenshot.is_file() or v.screenshot.read_bytes()[:8] != PNG_MAGIC]
    assert not missing, f"no 390 px dark screenshot of {missing}"
    for page, visit in narrow_dark_visits.items():
        requested = {urlparse(path).path for path, _ in visit.requests}
        assert f"/{page}" in requested, f"{page}: the narrow wrapper did not load the page"


# -- What a student and a teacher need on the site -------------------------------------------------


def test_header_shows_the_version_and_every_page_links_the_project(site):
    import goodfellow

    for page in html_pages(site):
        html = page.read_text(encoding="utf-8")
        if page.name in ("genindex.html", "search.html", "py-modindex.html"):
            continue
        assert f"goodfellow {goodfellow.__version__}" in html, f"{page.name}: no version"
        links = parse(html).links
        assert any(url.endswith("/issues") for url in links), f"{page.name}: no issue tracker"
        assert any("CITATION.cff" in url or "how-to-cite" in url for url in links), page.name


def test_citation_and_licence_files_agree_with_the_package():
    import yaml

    import goodfellow

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["version"] == goodfellow.__version__
    assert citation["license"] == "BSD-3-Clause"
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text(encoding="utf-8")


def test_front_page_says_what_is_supported_and_links_the_method_guide(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    assert "supported-box" in html
    assert "torch.nn.Linear" in html
    assert "choosing.html" in html and "glossary.html" in html
    assert (site / "choosing.html").is_file() and (site / "changelog.html").is_file()


def test_handouts_hold_every_tutorial_without_solutions(site):
    import zipfile

    import nbformat

    from tests.test_notebooks import NOTEBOOKS, SOLUTION

    teachers = (site / "teachers.html").read_text(encoding="utf-8")
    assert 'href="goodfellow-handouts.zip"' in teachers
    with zipfile.ZipFile(site / "goodfellow-handouts.zip") as archive:
        names = sorted(Path(name).name for name in archive.namelist())
        assert names == sorted(path.name for path in NOTEBOOKS)
        for name in archive.namelist():
            notebook = nbformat.reads(archive.read(name).decode(), as_version=4)
            assert not any(SOLUTION in cell.source for cell in notebook.cells), name
            assert any("goodfellow.exercises" in cell.source for cell in notebook.cells), name


def test_tutorials_link_api_names_and_arxiv_identifiers(site):
    problems = []
    for page in sorted((site / "tutorials").glob("[0-9][0-9]_*.html")):
        html = page.read_text(encoding="utf-8")
        if "api.html#goodfellow." not in html:
            problems.append(f"{page.name}: no API name links to the API reference")
        prose = re.sub(r"<pre.*?</pre>|<script.*?</script>", "", html, flags=re.S)
        for match in re.finditer(r"arXiv:\d{4}\.\d{4,5}", prose):
            if not prose[match.end() : match.end() + 4] == "</a>":
                problems.append(f"{page.name}: {match.group(0)} is not a link")
    assert not problems, "\n".join(problems)


def test_figures_have_descriptions_and_open_full_size(site):
    problems = []
    for page in sorted((site / "tutorials").glob("[0-9][0-9]_*.html")):
        html = page.read_text(encoding="utf-8")
        for tag in re.findall(r"<img[^>]*>", html):
            alt = re.search(r'alt="([^"]*)"', tag)
            if not alt or alt.group(1).endswith(".png") or len(alt.group(1)) < 20:
                problems.append(f"{page.name}: figure without a description: {tag[:80]}")
        if "<img" in html and "image-reference" not in html:
            problems.append(f"{page.name}: figures do not link to their full-size image")
    assert not problems, "\n".join(problems)


def test_search_results_show_prose_without_tex_or_the_run_box(site, chromium, server, tmp_path):
    base, _, _ = server
    returncode, dom, _, error = open_in_chromium(
        chromium, f"{base}/search.html?q=batch+size+factor", tmp_path / "search.png"
    )
    assert returncode == 0 and not error
    summaries = re.findall(r'<p class="context">(.*?)</p>', dom, re.S)
    assert len(summaries) >= 5, "the search found (almost) nothing"
    text = " ".join(re.sub(r"<[^>]+>", "", summary) for summary in summaries)
    assert "Run this tutorial yourself" not in text
    assert not re.search(r"\\\(|\\\)|\\mathcal|\\frac", text), text[:500]

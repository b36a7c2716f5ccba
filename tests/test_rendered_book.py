"""The built book, opened page by page in a real headless Chromium (issue 14).

`jupyter-book build` with warnings as errors only proves Sphinx was happy; this checks what a reader sees.
For every page `_toc.yml` lists (so a page added later is covered without touching this file):

- the page is served (HTTP 200), has a title and a heading, and holds no Sphinx "problematic" or
  system-message node (what an unresolved reference or a bad directive leaves on the page);
- every image of the article served by the book itself has loaded (``complete && naturalWidth > 0``), and a
  chapter shows at least as many rendered images in its outputs as its notebook stores image/png outputs;
- no error output: no traceback or error node, no stderr output (myst-nb marks it ``.output.stderr``), no
  "Traceback (most recent call last)" and no ``SomethingError``/``SomethingException`` in an output's text;
- a chapter (a notebook page) has the Colab launch button pointing at its notebook on GitHub
  (``colab.research.google.com/github/<repo>/blob/<branch>/<path>.ipynb``, from `_config.yml`) and its first
  code cell is the Colab install cell (``%pip install`` under ``if os.path.exists("/content"):``);
- the browser logged no JavaScript error and no failed request coming from the book's own files.

The network is closed (and Chromium is told so: every host name but 127.0.0.1 fails to resolve), so what the
book fetches from elsewhere never loads: MathJax, require.js and the ipywidgets HTML manager from CDNs, the
Colab badge image. No check depends on them: external images are listed, not required to load, and their
failed requests are set aside (``IGNORED``, written to ``_build/artefacts/rendered_book.json``). So this test
does not show that formulas typeset or that stored widget views come alive; it shows that everything the book
serves itself renders. One message from the book's own files is known and narrowly allowed (``KNOWN``).

The book comes from ``MLUNLEARN_BOOK_HTML`` (an already built ``_build/html``: `make test-book` builds it with
``-W --keep-going`` first) or, when unset, is built here with ``-W --keep-going`` into a temporary folder. A
full-page screenshot of one chapter is kept as a build artefact in ``_build/artefacts/``.

Without Chromium or chromedriver the tests skip, naming the fix; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import yaml
from sphinx_external_toc.parsing import parse_toc_yaml

ROOT = Path(__file__).resolve().parent.parent
ARTEFACTS = ROOT / "_build" / "artefacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install chromium chromium-driver"
SOURCE_SUFFIXES = (".ipynb", ".md")
SCREENSHOT_CHAPTER = "book/03_projector_diagnosis"  # has figures; the first chapter stands in if it goes away

# Chromium as the machine notes prescribe for a closed network, plus a resolver that fails every host name but
# the local server's at once: the outcome is then the same with or without a network (no CDN ever loads).
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")

ERROR_OUTPUT = ".output.error, .output.traceback, .traceback, .output.stderr"
SPHINX_PROBLEM = ".problematic, .system-message, .system-messages"
ERROR_WORD = re.compile(r"\b\w*(?:Error|Exception)\b")
TRACEBACK = "Traceback (most recent call last)"
DONE_CELL_TAGS = {"remove-cell", "remove-output"}  # cells whose outputs the build leaves out of the page

# Messages the browser logs from the book's own files that are not the book's fault, each matched narrowly.
KNOWN = {
    # pydata-sphinx-theme reads the light/dark mode from localStorage, which a fresh profile (a first visit)
    # does not have yet; its own script reports the empty value with console.error and falls back to "auto".
    "theme-mode-first-visit": "Got invalid theme mode: . Resetting to auto.",
}
# What the browser logs and this test sets aside, by kind (written to the artefact report for each page).
IGNORED = {
    "closed-network": "a request to another host (CDN, Colab badge): this machine's network is closed",
    "favicon": "the browser's own request for /favicon.ico (the book has no favicon)",
    "widget-offline": "stored ipywidgets views: drawn by the ipywidgets HTML manager, which comes from a CDN",
}
WIDGET_VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]'


# ---------------------------------------------------------------------------------------------- the pages

@dataclass(frozen=True)
class Page:
    """One page of `_toc.yml`: its docname (``book/02_baselines``), its source file, and its HTML path."""

    docname: str
    source: Path

    @property
    def html(self) -> str:
        return f"{self.docname}.html"

    @property
    def is_chapter(self) -> bool:
        return self.source.suffix == ".ipynb"

    def stored_images(self) -> int:
        """image/png outputs the notebook stores in cells whose outputs reach the page."""
        if not self.is_chapter:
            return 0
        nb = nbformat.read(self.source, as_version=4)
        return sum("image/png" in out.get("data", {})
                   for cell in nb.cells if cell.cell_type == "code"
                   and not DONE_CELL_TAGS & set(cell.metadata.get("tags", []))
                   for out in cell.get("outputs", []))


def toc_pages() -> list[Page]:
    """Every page in `_toc.yml` (root first), read with the parser jupyter-book itself uses."""
    pages = []
    for docname in parse_toc_yaml(ROOT / "_toc.yml"):
        source = next((ROOT / f"{docname}{s}" for s in SOURCE_SUFFIXES if (ROOT / f"{docname}{s}").exists()), None)
        # A listed page with no source is tests/test_notebooks_executed.py's failure; here it has nothing to show.
        pages.append(Page(docname, source or ROOT / f"{docname}.md"))
    return pages


def colab_url(page: Page) -> str:
    """The Colab launch address of a chapter, as jupyter-book builds it from `_config.yml`'s repository."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]
    slug = repo["url"].removeprefix("https://github.com/").strip("/")
    path = "/".join(p for p in (repo.get("path_to_book", "").strip("/"), f"{page.docname}.ipynb") if p)
    return f"https://colab.research.google.com/github/{slug}/blob/{repo.get('branch', 'main')}/{path}"


PAGES = toc_pages()
CHAPTERS = [p for p in PAGES if p.is_chapter]


# ------------------------------------------------------------------------------------------- the checks

@dataclass
class Report:
    """What one page showed: ``problems`` fail the test; ``ignored`` are the log entries set aside, and why."""

    url: str
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0


def fetch(url: str) -> tuple[int, str]:
    """HTTP status and body, as the server sends them."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def classify_log(entries: list[dict], origin: str) -> tuple[list[str], list[str]]:
    """Split the browser's SEVERE log entries into the book's own errors and those set aside (with a reason).

    Each entry's message starts with the address it came from: anything from another host is the closed
    network's doing; from the book's own server it is an error unless it is one of KNOWN."""
    problems, ignored = [], []
    for entry in entries:
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        source = message.split(" ", 1)[0]
        if not source.startswith(origin):
            if source.startswith(("http://", "https://")):
                ignored.append(f"closed-network: {message}")
            else:
                problems.append(f"browser error: {message}")  # no address: cannot be put on someone else
        elif entry["source"] == "network" and source == f"{origin}/favicon.ico":
            ignored.append(f"favicon: {message}")
        elif KNOWN["theme-mode-first-visit"] in message and "pydata-sphinx-theme.js" in source:
            ignored.append(f"theme-mode-first-visit: {message}")
        else:
            problems.append(f"browser error from the book's own files: {message}")
    return problems, ignored


# One round trip: everything the checks need from the rendered page, read in the browser.
PAGE_STATE_JS = """
const article = document.querySelector("article") || document.body;
const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
const origin = location.origin;
const firstCell = article.querySelector(".cell .cell_input");
const launch = [...document.querySelectorAll(".dropdown-launch-buttons a[href]")];
const launchToggle = document.querySelector(".dropdown-launch-buttons button");
return {
  title: document.title,
  h1: (article.querySelector("h1") || {}).textContent || "",
  sphinxProblems: [...article.querySelectorAll(arguments[0])].map(e => e.outerHTML.slice(0, 200)),
  images: [...article.querySelectorAll("img")].map(i => ({
      src: i.src, own: i.src.startsWith(origin), complete: i.complete, width: i.naturalWidth,
      inOutput: !!i.closest(".cell_output")})),
  errorOutputs: [...article.querySelectorAll(arguments[1])].map(e => e.className + ": " + e.innerText.slice(0, 200)),
  outputTexts: [...article.querySelectorAll(".cell_output")].filter(visible).map(e => e.innerText),
  firstCell: firstCell ? firstCell.innerText : null,
  launchLinks: launch.map(a => a.href),
  launchVisible: !!launchToggle && visible(launchToggle),
  widgetViews: article.querySelectorAll(arguments[2]).length,
  codeScrolls: [...article.querySelectorAll(".cell_input pre")].filter(pre => pre.scrollWidth > pre.clientWidth + 1)
      .map(pre => pre.innerText.split("\\n").reduce((a, b) => a.length >= b.length ? a : b).slice(0, 100)),
};
"""


def check_page(driver, base: str, page: Page) -> Report:
    """Load ``base/<page>.html`` in the browser and return every problem it shows (see the module doc)."""
    url = f"{base}/{page.html}"
    report = Report(url)
    start = time.perf_counter()
    status, page_html = fetch(url)
    if status != 200:
        report.problems.append(f"HTTP {status} for {url}")
        return report
    driver.get_log("browser")  # drop what an earlier page left behind
    driver.get(url)
    state = driver.execute_script(PAGE_STATE_JS, SPHINX_PROBLEM, ERROR_OUTPUT, WIDGET_VIEW)
    p = report.problems

    if not state["title"].strip() or not state["h1"].strip():
        p.append(f"no title or no heading (title {state['title']!r}, h1 {state['h1']!r})")
    p += [f"Sphinx left a problem node on the page: {html}" for html in state["sphinxProblems"]]

    for img in state["images"]:
        if img["own"] and not (img["complete"] and img["width"] > 0):
            p.append(f"image did not render: {img['src']}")
    report.images = sum(i["own"] and i["inOutput"] and i["complete"] and i["width"] > 0 for i in state["images"])
    if page.is_chapter and report.images < (stored := page.stored_images()):
        p.append(f"shows {report.images} rendered output images, the notebook stores {stored} image/png outputs")

    p += [f"error output on the page: {text}" for text in state["errorOutputs"]]
    for text in state["outputTexts"]:
        if TRACEBACK in text:
            p.append(f"a traceback in an output: {text[:200]!r}")
        p += [f"{word!r} in an output: {text[:200]!r}" for word in sorted(set(ERROR_WORD.findall(text)))]

    # A code cell wider than the text column gets a horizontal scrollbar (book/_static/book.css sizes the
    # code so that the 88 characters tests/test_notebooks_executed.py allows fit at this window's width).
    p += [f"a code cell is wider than the text column (longest line: {line!r})" for line in state["codeScrolls"]]

    if page.is_chapter:
        expected = colab_url(page)
        if expected not in state["launchLinks"] or not state["launchVisible"]:
            p.append(f"no visible Colab launch button to {expected} (launch links: {state['launchLinks']})")
        if not has_colab_install(state["firstCell"] or ""):
            p.append(f"first code cell is not the Colab install cell: {state['firstCell']!r}")

    origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(base))
    errors, report.ignored = classify_log(driver.get_log("browser"), origin)
    p += errors
    if state["widgetViews"]:  # not checked: they stay inert <script> tags without the CDN
        report.ignored.append(f"widget-offline: {state['widgetViews']} stored widget views not drawn")
    report.seconds = time.perf_counter() - start
    return report


def has_colab_install(cell: str) -> bool:
    """``%pip install`` inside ``if os.path.exists("/content"):`` (only Colab has /content), in one cell."""
    lines = cell.splitlines()
    guard = next((i for i, line in enumerate(lines) if re.match(r'\s*if os\.path\.exists\("/content"\):', line)),
                 None)
    if guard is None:
        return False
    indent = len(lines[guard]) - len(lines[guard].lstrip())
    for line in lines[guard + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            return False  # the guarded block ended without the install
        if line.strip().startswith("%pip install"):
            return True
    return False


# ------------------------------------------------------------------------------------------- fixtures

def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def book_html(tmp_path_factory) -> Path:
    """The built HTML: ``MLUNLEARN_BOOK_HTML``, or a build made here with warnings as errors."""
    given = os.environ.get("MLUNLEARN_BOOK_HTML")
    if given:
        html = Path(given).resolve()
        assert (html / "index.html").is_file(), f"MLUNLEARN_BOOK_HTML={given}: no index.html there; run `make book`"
        return html
    jb = Path(sys.executable).with_name("jupyter-book")
    jb = str(jb) if jb.exists() else shutil.which("jupyter-book")
    assert jb, "jupyter-book is not installed; run `make install`"
    out = tmp_path_factory.mktemp("book")
    done = subprocess.run([jb, "build", str(ROOT), "--path-output", str(out), "-W", "--keep-going"],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"the book build failed or warned:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out / "_build" / "html"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def serve():
    """``serve(folder) -> base URL``: a static server on 127.0.0.1 (a free port) per folder, closed at the end."""
    servers = []

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler,
                                                                                      directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def base(book_html, serve) -> str:
    return serve(book_html)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Debian's Chromium through Debian's chromedriver (Selenium Manager is kept offline: it downloads nothing)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        _unavailable(f"{' and '.join(missing)} not found: `{INSTALL_HINT}` (Debian packages)")
    os.environ["SE_OFFLINE"] = "true"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed: `make install` (it is in the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def results():
    """Every page's report, written to ``_build/artefacts/rendered_book.json`` when the module ends."""
    collected: dict[str, dict] = {}
    yield collected
    if collected:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        (ARTEFACTS / "rendered_book.json").write_text(json.dumps(
            {"ignored_kinds": IGNORED, "known": KNOWN, "pages": collected}, indent=1) + "\n")


def full_page_screenshot(driver, path: Path) -> tuple[int, int]:
    """The whole page (not just the window) as a PNG; returns its CSS size.

    The viewport is made as tall as the page for the shot (DevTools' device metrics), so the theme lays the
    page out as a browser window of that size would; a clip beyond the viewport shifts its fixed sidebars."""
    import base64

    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    width = int(metrics["cssLayoutViewport"]["clientWidth"])
    height = int(metrics["cssContentSize"]["height"])
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return width, height


# ---------------------------------------------------------------------------------------------- tests

def test_toc_pages_found():
    assert PAGES and CHAPTERS, "_toc.yml lists no pages or no chapter notebooks"


def test_index_leads_to_the_root_page(driver, base):
    driver.get(f"{base}/index.html")
    assert driver.current_url == f"{base}/{PAGES[0].html}", driver.current_url


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.docname)
def test_page_renders_cleanly(page, driver, base, results):
    report = check_page(driver, base, page)
    results[page.docname] = {"url": report.url, "problems": report.problems, "ignored": report.ignored,
                             "rendered_output_images": report.images, "seconds": round(report.seconds, 2)}
    assert not report.problems, f"{page.docname}:\n  " + "\n  ".join(report.problems)
    if page.is_chapter and page.stored_images():
        assert report.images > 0  # the count above compares with the notebook; this says it was not 0 >= 0


def test_screenshot_of_a_chapter(driver, base):
    """A full-page PNG of one chapter with figures, kept in _build/artefacts/ (CI keeps it)."""
    page = next((p for p in CHAPTERS if p.docname == SCREENSHOT_CHAPTER), CHAPTERS[0])
    driver.get(f"{base}/{page.html}")
    path = ARTEFACTS / f"{Path(page.docname).name}.png"
    width, height = full_page_screenshot(driver, path)
    assert height > 1000 and width >= 800, (width, height)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 50_000


# ----------------------------------------------------------------- the checks can fail: broken copies

# Each mutation breaks one thing in a copy of a chapter's HTML; check_page must report it (the needle).
def _sub(pattern: str, repl: str, count: int = 1):
    def mutate(html: str) -> str:
        new, n = re.subn(pattern, repl, html, count=count, flags=re.S)
        assert n, f"mutation pattern not found in the page: {pattern!r}"
        return new
    return mutate


def _insert_output(fragment: str):
    return _sub(r'(<div class="cell_output docutils container">)', r"\1" + fragment.replace("\\", "\\\\"))


MUTATIONS = {
    "broken image": (_sub(r'src="\.\./_images/[^"]+"', 'src="../_images/missing.png"'), "image did not render"),
    "image removed": (_sub(r'<img [^>]*src="\.\./_images/[^"]+"[^>]*>', ""), "rendered output images, the notebook"),
    "traceback output": (_insert_output('<div class="output traceback highlight-ipythontb notranslate"><pre>'
                                        f'{TRACEBACK}:\n  File "x", line 1\nValueError: boom</pre></div>'),
                         "error output on the page"),
    "stderr output": (_insert_output('<div class="output stderr highlight-myst-ansi notranslate"><pre>'
                                     "warning: something</pre></div>"), "error output on the page"),
    "error text in stdout": (_insert_output('<div class="output stream highlight-myst-ansi notranslate"><pre>'
                                            "RuntimeError: CUDA out of memory</pre></div>"),
                             "'RuntimeError' in an output"),
    "problematic node": (_sub(r'(<article class="bd-article">)', r'\1<span class="problematic">{cite}`nobody`</span>'),
                         "Sphinx left a problem node"),
    "colab link to another branch": (_sub(r"/blob/main/", "/blob/dev/", count=0), "no visible Colab launch button"),
    "install cell without the guard": (_sub(r'"/content"', '"/contents"'), "not the Colab install cell"),
    "javascript error": (_sub(r"(</body>)", r'<script>throw new Error("boom from the book")</script>\1'),
                         "boom from the book"),
    # as Sphinx 7.4 wrote sphinx-thebe's THEBE_JS_URL before book/_ext/unique_scripts.py
    "a redeclaration": (_sub(r"(</body>)", r"<script>const FOO = 1;</script><script>const FOO = 2;</script>\1"),
                        "Identifier 'FOO' has already been declared"),
    "missing own script": (_sub(r"(</body>)", r'<script src="../_static/missing.js"></script>\1'),
                           "_static/missing.js"),
    "a code line of 120 characters": (_sub(r'(<div class="cell_input docutils container">.*?<pre>)',
                                           r"\1" + "x" * 120 + "\n"),
                                      "a code cell is wider than the text column"),
}


@pytest.fixture(scope="module")
def broken_copies(book_html, serve, tmp_path_factory):
    """``name -> base URL`` of a copy of the book (linked, not copied) whose one chapter page is mutated."""
    page = next((p for p in CHAPTERS if p.docname == SCREENSHOT_CHAPTER), CHAPTERS[0])
    original = (book_html / page.html).read_text()
    root = tmp_path_factory.mktemp("broken")
    for i, (name, (mutate, _)) in enumerate({"control": (lambda h: h, None), **MUTATIONS}.items()):
        copy = root / f"c{i}"
        (copy / page.html).parent.mkdir(parents=True)
        for shared in book_html.iterdir():  # everything but the page's own folder (search index, images, ...)
            if shared.name != Path(page.html).parts[0]:
                (copy / shared.name).symlink_to(shared)
        (copy / page.html).write_text(mutate(original))
    base = serve(root)
    names = ["control", *MUTATIONS]
    return page, {name: f"{base}/c{i}" for i, name in enumerate(names)}


def test_unbroken_copy_passes(driver, broken_copies):
    """The copy without a mutation passes, so each failure below is the mutation's; and the closed network's
    failures (the CDNs the book asks for) are set aside, not silently absent."""
    page, bases = broken_copies
    report = check_page(driver, bases["control"], page)
    assert not report.problems, report.problems
    assert any(i.startswith("closed-network: https://cdn.jsdelivr.net/") for i in report.ignored), report.ignored


@pytest.mark.parametrize("name", MUTATIONS)
def test_broken_copy_is_reported(name, driver, broken_copies):
    page, bases = broken_copies
    report = check_page(driver, bases[name], page)
    needle = MUTATIONS[name][1]
    assert any(needle in problem for problem in report.problems), (name, report.problems)


def test_page_missing_from_the_build_is_reported(driver, base):
    report = check_page(driver, base, Page("book/no_such_page", ROOT / "book" / "no_such_page.ipynb"))
    assert report.problems == [f"HTTP 404 for {base}/book/no_such_page.html"], report.problems

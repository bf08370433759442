"""Browser check of the built book: every page of _build/html opens in headless Chromium, has its title, every
image loads, and every internal link resolves. `make book` runs this right after building; under `make test` it
skips when no book has been built yet."""
import os, shutil
from pathlib import Path
from urllib.parse import urldefrag, urlparse
import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build/html"
SKIP_DIRS = {"_static", "_sources", "_images", "reports", "_sphinx_design_static"}

def _pages() -> list[Path]:
    return sorted(p for p in HTML.rglob("*.html") if not SKIP_DIRS & set(p.relative_to(HTML).parts)
                  and p.name not in ("genindex.html", "search.html"))

@pytest.fixture(scope="module")
def browser():
    if not (HTML / "index.html").exists(): pytest.skip("no built book: run `make book` (it runs this check itself)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("Chromium and ChromeDriver are needed for the book check: "
                    "`make browser` installs them (Debian packages)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--allow-file-access-from-files"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield driver
    driver.quit()

def test_book_has_pages():
    if not (HTML / "index.html").exists(): pytest.skip("no built book: run `make book`")
    names = {p.relative_to(HTML).as_posix() for p in _pages()}
    assert "book/intro.html" in names and "nbs/01_shapes.html" in names, sorted(names)

def test_every_page_title_images_links(browser):
    problems = []
    for page in _pages():
        rel = page.relative_to(HTML).as_posix()
        browser.get(page.as_uri())
        if page.name == "index.html" and "refresh" in page.read_text().lower(): continue  # redirect to the root page
        h1 = [h.get_attribute("textContent").strip() for h in browser.find_elements("css selector", "article h1")]
        if not any(h1): problems.append(f"{rel}: no title (h1)")
        if not browser.title.strip(): problems.append(f"{rel}: no <title>")
        for img in browser.find_elements("css selector", "main img, article img"):
            ok = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            if not ok: problems.append(f"{rel}: image does not load: {img.get_attribute('src')}")
        for a in browser.find_elements("css selector", "a[href]"):
            href = a.get_attribute("href")
            url = urlparse(href)
            if url.scheme != "file": continue  # external links are not checked (no network here)
            target, _ = urldefrag(href)
            if not Path(urlparse(target).path).exists(): problems.append(f"{rel}: broken link {href}")
    assert not problems, "\n".join(problems)

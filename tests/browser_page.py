"""The search page in a real headless Chromium (selenium), for tests/test_serve.py and the README's screenshot.

  python tests/browser_page.py --url http://127.0.0.1:8000 --query "a red triangle shakes in the top left corner" \
      --out docs/serve.png      # with `varcmp serve` running

Uses Debian's `chromium` and `chromium-driver` (or any chromium/chromedriver pair on PATH); selenium is told
both paths, so it never tries to download a browser or a driver.
"""
import argparse
import contextlib
import os
import shutil
import tempfile

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--autoplay-policy=no-user-gesture-required")


def chromium_paths() -> tuple[str, str] | None:
  """(browser, driver) executables, or None when either is missing."""
  browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
  driver = shutil.which("chromedriver") or next(
      (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
  return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 900):
  """A headless Chromium driven by selenium, with a fresh profile that is deleted afterwards."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  paths = chromium_paths()
  if paths is None:
    raise FileNotFoundError("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
  os.environ.setdefault("SE_OFFLINE", "true")    # selenium-manager: never download anything
  profile = tempfile.mkdtemp(prefix="varcmp-chromium-")
  options = webdriver.ChromeOptions()
  options.binary_location = paths[0]
  for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}", f"--window-size={width},{height}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
  try:
    yield driver
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, url: str, timeout: float = 60):
  """Opens the page and waits until it has read /api/info."""
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  driver.get(url)
  WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def search(driver, url: str, query: str, timeout: float = 60) -> list[dict]:
  """Opens the page, types `query`, submits, waits for the hits and their main keyframes; returns per hit its
  name and its keyframe's naturalWidth (0: not loaded or none)."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  open_page(driver, url, timeout)
  box = driver.find_element(By.ID, "text")
  box.clear()
  box.send_keys(query)
  driver.find_element(By.ID, "go").click()
  return wait_for_hits(driver, f"“{query}”", timeout)


def wait_for_hits(driver, words: str, timeout: float = 60) -> list[dict]:
  """Waits for a search's hits (the status line naming `words`) and their main keyframes to finish (loaded or
  failed); returns per hit its name and its main keyframe's naturalWidth (0: not loaded or none)."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  wait = WebDriverWait(driver, timeout)
  wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#hits li.hit")
             and words in d.find_element(By.ID, "status").text)
  wait.until(lambda d: d.execute_script(
      "return [...document.querySelectorAll('#hits .thumb img')].every(img => img.complete)"))
  return driver.execute_script(
      "return [...document.querySelectorAll('#hits li.hit')].map(li => ({"
      " name: li.querySelector('.name').textContent,"
      " thumbnail_width: li.querySelector('.thumb img')?.naturalWidth ?? 0}))")


def layout(driver) -> dict:
  """The page's horizontal layout (CSS px): the document's scrollWidth, the window's innerWidth and, per hit, its
  name, its chart's time axis (the axis line's left and right x) and its strip's thumbnails (left, right x and the
  snippet slot of the keyframe each shows), in page order."""
  return driver.execute_script("""
      const box = (node) => node.getBoundingClientRect();
      const hits = [...document.querySelectorAll('#hits li.hit')].map((li) => ({
        name: li.querySelector('.name').textContent,
        axis: [box(li.querySelector('svg.curves line.axis')).left, box(li.querySelector('svg.curves line.axis')).right],
        thumbnails: [...li.querySelectorAll('.strip figure')].map((figure) => ({
          left: box(figure).left, right: box(figure).right,
          slot: Number(figure.dataset.slot)}))}));
      return {scroll_width: document.documentElement.scrollWidth, inner_width: window.innerWidth, hits};""")


def charts(driver) -> list[dict]:
  """Per hit, its chart's scales as drawn (CSS px, y down): the time axis's y, the relevance grid lines' y, the
  y-scale labels (text and vertical centre; relevance left, prior right), each relevance bar's top and bottom and
  each point of the prior line's y, in page order."""
  return driver.execute_script("""
      const centre = (node) => { const b = node.getBoundingClientRect(); return (b.top + b.bottom) / 2; };
      return [...document.querySelectorAll('#hits li.hit svg.curves')].map((chart) => {
        const matrix = chart.getScreenCTM();
        return {
          axis: centre(chart.querySelector('line.axis')),
          grid: [...chart.querySelectorAll('line.grid')].map(centre),
          relevance_ticks: [...chart.querySelectorAll('text.relevance-tick')].map((t) => [t.textContent, centre(t)]),
          prior_ticks: [...chart.querySelectorAll('text.prior-tick')].map((t) => [t.textContent, centre(t)]),
          bars: [...chart.querySelectorAll('rect.bar')].map((r) => [r.getBoundingClientRect().top,
                                                                   r.getBoundingClientRect().bottom]),
          prior: [...chart.querySelector('polyline.prior').points].map(
              (p) => new DOMPoint(p.x, p.y).matrixTransform(matrix).y)};
      });""")


def keyframes(driver) -> list[dict]:
  """Per hit, its keyframe boxes (the main one first, then the strip's), each: shown (its image loaded and
  displayed), empty (marked .no-keyframe, its image, if any, not displayed), width and height (CSS px) and
  whether its content overflows it."""
  return driver.execute_script("""
      return [...document.querySelectorAll('#hits li.hit')].map((li) =>
        [...li.querySelectorAll('.thumb, .strip .frame')].map((box) => {
          const img = box.querySelector('img');
          return {shown: !!img && img.complete && img.naturalWidth > 0 && getComputedStyle(img).display !== 'none',
                  empty: box.classList.contains('no-keyframe') && (!img || getComputedStyle(img).display === 'none'),
                  width: box.getBoundingClientRect().width, height: box.getBoundingClientRect().height,
                  overflows: box.scrollWidth > box.clientWidth + 1 || box.scrollHeight > box.clientHeight + 1};
        }));""")


def screenshot(driver, path: str, width: int = 1200) -> str:
  """The whole page as a PNG at `path` (the window grown to the page's height)."""
  for _ in range(3):   # the window's outer size includes what is not page: grow until the page fits
    page, inner = driver.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
    if inner >= page:
      break
    driver.set_window_size(width, min(driver.get_window_size()["height"] + page - inner, 6000))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if not driver.save_screenshot(path):
    raise OSError(f"{path}: chromium could not write the screenshot")
  return path


def main():
  parser = argparse.ArgumentParser(description="screenshot of the search page for a query")
  parser.add_argument("--url", default="http://127.0.0.1:8000/")
  parser.add_argument("--query", required=True)
  parser.add_argument("--k", type=int, default=5)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  with chromium() as driver:
    hits = search(driver, f"{args.url.rstrip('/')}/?k={args.k}", args.query)
    print(f"{len(hits)} hits, top: {hits[0]['name']}; screenshot: {screenshot(driver, args.out)}")


if __name__ == "__main__":
  main()

"""The interactive head view in a real browser: Debian's chromium, headless,
driven by selenium through chromium-driver (both installed by dev.sh).

What is checked: the page loads with no console message at all and fetches
nothing; the number of lines drawn is the number of weights above
``min_weight`` (counted here in NumPy); hovering a query or a key token draws
exactly that token's lines; the head toggles and the layer menu change what is
drawn; a screenshot is a real picture and changes with the hover; two views
share a page the way notebook outputs do; long inputs stay linear.
"""
import io
import os
import shutil

import numpy as np
import pytest

from attnpy import viz

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
except ImportError:   # the tests marked browser are skipped (conftest.py)
    webdriver = None

TOKENS = ["the", "cat", "sat", "on", "the", "mat", "</script>"]
MIN_WEIGHT = 0.01


def find(names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"none of {names} found: `bash dev.sh test` installs Debian's chromium and "
                "chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = find(["chromium", "chromium-browser"])
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the sanitizer pass preloads libasan into Python; the browser must not inherit it
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    service = Service(find(["chromedriver"]), env=env)
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def weights(layers=3, H=4, L=len(TOKENS), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.random((layers, H, L, L)) ** 4          # some weights below MIN_WEIGHT
    return w / w.sum(-1, keepdims=True)


def open_page(browser, tmp_path, view, name="view.html"):
    path = view.save_html(tmp_path / name)
    browser.get_log("browser")                      # drop earlier pages' messages
    browser.get(path.as_uri())
    return browser.find_element(By.CSS_SELECTOR, ".attnpy-view")


def lines(root):
    assert root.get_attribute("data-ready") == "1"
    drawn = int(root.get_attribute("data-lines"))
    assert drawn == len(root.find_elements(By.CSS_SELECTOR, "g.attnpy-lines line"))
    return drawn


def hover(browser, element):
    ActionChains(browser).move_to_element(element).perform()


def leave(browser, root):
    ActionChains(browser).move_to_element(root.find_element(By.CSS_SELECTOR, ".attnpy-title")
                                          ).perform()


def screenshot(browser):
    import matplotlib.image as mpimg
    png = browser.get_screenshot_as_png()
    assert png[:4] == b"\x89PNG"
    return mpimg.imread(io.BytesIO(png), format="png")


@pytest.mark.browser
def test_page_loads_clean_and_hover_draws_that_tokens_lines(browser, tmp_path):
    w = weights()
    root = open_page(browser, tmp_path, viz.head_view(w, TOKENS, min_weight=MIN_WEIGHT))
    assert browser.get_log("browser") == []         # no errors, no warnings, no logs
    # nothing fetched: the page holds its script, style and data
    assert browser.execute_script(
        "return performance.getEntriesByType('resource').length") == 0
    assert lines(root) == int((w[0] >= MIN_WEIGHT).sum())
    still = screenshot(browser)
    assert still.std() > 0.01                       # a picture, not a blank page

    queries = root.find_elements(By.CSS_SELECTOR, "text.attnpy-query")
    keys = root.find_elements(By.CSS_SELECTOR, "text.attnpy-key")
    assert [t.text for t in queries] == TOKENS and [t.text for t in keys] == TOKENS
    for i in (1, 6):
        hover(browser, queries[i])
        assert root.get_attribute("data-hover") == f"query:{i}"
        assert lines(root) == int((w[0, :, i, :] >= MIN_WEIGHT).sum())
    hovered = screenshot(browser)
    assert hovered.shape == still.shape and np.abs(hovered - still).max() > 0.1
    hover(browser, keys[2])
    assert lines(root) == int((w[0, :, :, 2] >= MIN_WEIGHT).sum())
    leave(browser, root)
    assert root.get_attribute("data-hover") == ""
    assert lines(root) == int((w[0] >= MIN_WEIGHT).sum())
    assert browser.get_log("browser") == []


@pytest.mark.browser
def test_head_toggles_and_layer_menu(browser, tmp_path):
    w = weights()
    root = open_page(browser, tmp_path, viz.head_view(w, TOKENS, min_weight=MIN_WEIGHT))
    buttons = root.find_elements(By.CSS_SELECTOR, "button.attnpy-head")
    assert len(buttons) == 4
    buttons[0].click()                                           # head 0 off
    assert lines(root) == int((w[0, 1:] >= MIN_WEIGHT).sum())
    ActionChains(browser).double_click(buttons[2]).perform()     # only head 2
    assert lines(root) == int((w[0, 2] >= MIN_WEIGHT).sum())
    Select(root.find_element(By.CSS_SELECTOR, "select.attnpy-layer")).select_by_index(2)
    assert lines(root) == int((w[2] >= MIN_WEIGHT).sum())        # new layer: all heads on
    assert browser.get_log("browser") == []


@pytest.mark.browser
def test_two_views_in_one_page_like_notebook_outputs(browser, tmp_path):
    # JupyterLab and the classic Notebook insert an output's HTML and then run
    # its <script> elements; do the same twice on one page
    a = viz.head_view(weights(layers=1, H=2), TOKENS, min_weight=MIN_WEIGHT)._repr_html_()
    b = viz.head_view(weights(layers=1, H=5, seed=1), TOKENS, min_weight=MIN_WEIGHT)._repr_html_()
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><html><body></body></html>")
    browser.get((tmp_path / "blank.html").as_uri())
    browser.get_log("browser")
    browser.execute_script("""
        for (const fragment of arguments) {
            const cell = document.createElement('div');
            cell.innerHTML = fragment;               // scripts inserted this way do not run
            document.body.appendChild(cell);
            for (const old of cell.querySelectorAll('script:not([type])')) {
                const s = document.createElement('script');
                s.textContent = old.textContent;
                old.replaceWith(s);                  // ... these do
            }
        }""", a, b)
    roots = browser.find_elements(By.CSS_SELECTOR, ".attnpy-view")
    assert len(roots) == 2
    assert len(roots[0].find_elements(By.CSS_SELECTOR, "button.attnpy-head")) == 2
    assert len(roots[1].find_elements(By.CSS_SELECTOR, "button.attnpy-head")) == 5
    before = lines(roots[1])
    hover(browser, roots[0].find_elements(By.CSS_SELECTOR, "text.attnpy-query")[3])
    assert roots[0].get_attribute("data-hover") == "query:3"
    assert roots[1].get_attribute("data-hover") == "" and lines(roots[1]) == before
    assert browser.get_log("browser") == []


@pytest.mark.browser
def test_long_input_stays_linear_and_scrolls(browser, tmp_path):
    L, H, top_k = 400, 12, 16
    tokens = [f"t{i}" for i in range(L)]
    rng = np.random.default_rng(2)
    w = rng.random((H, L, L)) ** 8
    w /= w.sum(-1, keepdims=True)
    view = viz.head_view(w, tokens, top_k=top_k, min_weight=MIN_WEIGHT)
    page = view.to_html()
    assert len(page) < 20 * H * L * top_k           # bytes per line kept, not per weight
    root = open_page(browser, tmp_path, view, "long.html")
    assert lines(root) == 0                          # too many lines: drawn on hover only
    assert "hover a token" in root.find_element(By.CSS_SELECTOR, ".attnpy-note").text
    q = root.find_elements(By.CSS_SELECTOR, "text.attnpy-query")[250]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", q)
    hover(browser, q)
    top = -np.sort(-w[:, 250, :], axis=-1)[:, :top_k]
    assert lines(root) == int((top >= MIN_WEIGHT).sum())
    assert browser.get_log("browser") == []


# Issue 12, item 10: the view was about 350 x 250 px with its instructions
# in tooltips only, and hovering showed no values.
@pytest.mark.browser
def test_the_view_is_large_says_how_to_use_it_and_shows_weights(browser, tmp_path):
    w = weights()
    root = open_page(browser, tmp_path, viz.head_view(w, TOKENS, min_weight=MIN_WEIGHT))
    svg = root.find_element(By.CSS_SELECTOR, "svg.attnpy-svg")
    assert svg.size["width"] >= 700 and svg.size["height"] >= 26 * len(TOKENS)
    hint = root.find_element(By.CSS_SELECTOR, ".attnpy-hint").text
    assert "Hover a token" in hint and "double-click" in hint
    assert root.find_elements(By.CSS_SELECTOR, "text.attnpy-weight") == []   # idle: none

    milli = np.rint(w[0] * 1000)                   # what the page keeps, per mille
    buttons = root.find_elements(By.CSS_SELECTOR, "button.attnpy-head")
    ActionChains(browser).double_click(buttons[2]).perform()     # head 2 alone
    hover(browser, root.find_elements(By.CSS_SELECTOR, "text.attnpy-query")[3])
    shown = {int(t.get_attribute("data-index")): t.text
             for t in root.find_elements(By.CSS_SELECTOR, "text.attnpy-weight")}
    want = {j: f"{milli[2, 3, j] / 1000:.3f}" for j in range(len(TOKENS))
            if w[0, 2, 3, j] >= MIN_WEIGHT}
    assert shown == want
    # with every head on, each key shows its largest weight over the heads
    for b in buttons:
        if b.value_of_css_property("opacity") != "1":
            b.click()
    hover(browser, root.find_elements(By.CSS_SELECTOR, "text.attnpy-key")[5])
    shown = {int(t.get_attribute("data-index")): (t.text, int(t.get_attribute("data-head")))
             for t in root.find_elements(By.CSS_SELECTOR, "text.attnpy-weight")}
    kept = np.where(w[0, :, :, 5] >= MIN_WEIGHT, milli[:, :, 5], -1)   # (H, L)
    want = {i: (f"{kept[:, i].max() / 1000:.3f}", int(kept[:, i].argmax()))
            for i in range(len(TOKENS)) if kept[:, i].max() >= 0}
    assert {i: t for i, (t, _) in shown.items()} == {i: t for i, (t, _) in want.items()}
    for i, (_, h) in shown.items():
        assert milli[h, i, 5] == kept[:, i].max()   # the head named holds that weight
    # each drawn line's tooltip names its tokens, head and weight
    title = root.find_element(By.CSS_SELECTOR, "g.attnpy-lines line title")
    assert "\u2192 mat, head" in title.get_attribute("textContent")
    assert browser.get_log("browser") == []


@pytest.mark.browser
def test_the_view_size_is_configurable(browser, tmp_path):
    view = viz.head_view(weights(layers=1), TOKENS, width=1100, row_height=40, font_size=22)
    root = open_page(browser, tmp_path, view)
    svg = root.find_element(By.CSS_SELECTOR, "svg.attnpy-svg")
    assert svg.size["width"] == 1100 and svg.size["height"] == 40 * len(TOKENS) + 24
    token = root.find_element(By.CSS_SELECTOR, "text.attnpy-query")
    assert token.value_of_css_property("font-size") == "22px"


def test_head_view_size_arguments_are_checked():
    for name, bad in (("width", 0), ("row_height", 2.5), ("font_size", True),
                      ("max_height", "600")):
        with pytest.raises(ValueError, match=f"{name} must be an int of at least"):
            viz.head_view(np.ones((1, 2, 2)) / 2, ["a", "b"], **{name: bad})


def test_head_view_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weights"):
        viz.head_view(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match=r"must be \(H, 3, 3\)"):
        viz.head_view(np.ones((2, 4, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="layer_names"):
        viz.head_view(np.ones((2, 1, 3, 3)), ["a", "b", "c"], layer_names=["x"])

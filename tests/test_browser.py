"""The feature browser, its top-k helper and the density plot.

The page itself is checked in a real headless Chromium driven through
chromedriver's W3C WebDriver HTTP API with a small client written on the
standard library (urllib + json), so the test needs no Python package beyond
pytest: only Debian's ``chromium`` and ``chromium-driver``.
"""

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sparse_dict.browser import (
    plot_feature_density,
    top_activating_examples,
    write_feature_browser,
)
from memory_peak import peak_bytes

# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------


def _brute_top(codes, k):
    """Reference top-k per column: a full stable sort, best first."""
    out = []
    for f in range(codes.shape[1]):
        col = codes[:, f]
        order = np.lexsort((np.arange(col.size), -col))[:k]
        out.append([r if col[r] > 0 else -1 for r in order])
    return np.array(out)


def _random_codes(n_tokens=300, n_features=40, density=0.05, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.random((n_tokens, n_features)).astype(np.float32)
    codes *= rng.random((n_tokens, n_features)) < density
    codes[:, 0] = 0.0  # a dead feature
    return codes


def test_top_k_matches_full_sort():
    codes = _random_codes()
    ex = top_activating_examples(codes, [f"t{i}" for i in range(300)], k=5, context=2)
    np.testing.assert_array_equal(ex.rows, _brute_top(codes, 5))
    assert np.all(ex.rows[0] == -1) and np.all(ex.values[0] == 0)
    assert np.all(np.diff(ex.values[1:], axis=1) <= 0)


def test_top_k_takes_the_lowest_rows_among_ties():
    # Values tied at the k-th place: the partition picked among them as its
    # algorithm fell (row 1392 over row 720 for one feature); the lowest rows
    # are taken, as a full sort by value, then row, gives them.
    rng = np.random.default_rng(0)
    codes = np.round(rng.random((2000, 6)), 1)  # ten levels: ties everywhere
    codes[:, 1] = 0.5  # one level only
    ex = top_activating_examples(codes, [f"t{i}" for i in range(2000)], k=7, context=0)
    np.testing.assert_array_equal(ex.rows, _brute_top(codes, 7))
    assert ex.rows[1].tolist() == list(range(7))


def test_top_k_blocks_and_sparse_input_agree(monkeypatch):
    codes = _random_codes()
    tokens = [f"t{i}" for i in range(300)]
    whole = top_activating_examples(codes, tokens, k=4, context=3)
    import sparse_dict.browser as browser

    # Force many small feature blocks to exercise the chunked path.
    monkeypatch.setattr(browser, "_BLOCK_ELEMENTS", 300 * 3)
    for blocked in (
        top_activating_examples(codes, tokens, k=4, context=3),
        top_activating_examples(sp.csr_matrix(codes), tokens, k=4, context=3),
    ):
        np.testing.assert_array_equal(blocked.rows, whole.rows)
        np.testing.assert_array_equal(blocked.context_rows, whole.context_rows)
        np.testing.assert_allclose(blocked.context_values, whole.context_values)


def test_context_stays_within_text_and_follows_positions():
    # Two texts of 5 tokens, rows shuffled: context must follow (text, position).
    rng = np.random.default_rng(1)
    index = np.array([(t, p) for t in range(2) for p in range(5)])
    perm = rng.permutation(10)
    codes = np.zeros((10, 1))
    codes[perm == 5, 0] = 1.0  # row holding (text 1, position 0)
    ex = top_activating_examples(codes, np.arange(10).astype(str), index[perm], k=1, context=2)
    ctx = ex.context_rows[0, 0]
    assert ctx[:2].tolist() == [-1, -1]  # nothing before position 0
    assert [tuple(index[perm][r]) for r in ctx[2:]] == [(1, 0), (1, 1), (1, 2)]
    np.testing.assert_array_equal(ex.context_values[0, 0], [0, 0, 1, 0, 0])


def test_k_and_context_larger_than_the_tokens_are_capped():
    ex = top_activating_examples(np.array([[1.0], [2.0]]), ["a", "b"], k=5, context=0)
    assert ex.rows.tolist() == [[1, 0]]
    # Asked for arrays of k x (2 context + 1) per feature: 18 TiB of them
    # for a report of 436 tokens.
    codes = np.eye(4)[:, :3]
    ex = top_activating_examples(codes, list("abcd"), [[0, 0], [0, 1], [0, 2], [1, 0]],
                                 k=10**9, context=10**9)
    assert ex.context_rows.shape == (3, 4, 5)  # the longest text: 3 tokens
    assert ex.context_rows[1, 0].tolist() == [-1, 0, 1, 2, -1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codes": np.ones(3)}, "dimension"),
        ({"tokens": ["a"]}, "token strings"),
        ({"index": np.zeros((3, 3))}, "index of shape"),
        ({"k": 0}, "k must be"),
        ({"k": 2.7}, "k must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"context": -1}, "context must be"),
        ({"codes": np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 0.0]])},
         r"codes contain NaN or infinite values \(in features 0 to 1\)"),
        ({"codes": np.array([[1.0, np.inf], [0.0, 1.0], [2.0, 0.0]])},
         r"codes contain NaN or infinite values \(in features 0 to 1\)"),
    ],
)
def test_top_k_rejects_bad_input(kwargs, match):
    args = {"codes": np.ones((3, 2)), "tokens": ["a", "b", "c"], "index": None}
    args.update(kwargs)
    codes, tokens, index = args.pop("codes"), args.pop("tokens"), args.pop("index")
    with pytest.raises(ValueError, match=match):
        top_activating_examples(codes, tokens, index, **args)


def test_one_string_is_not_taken_for_tokens():
    # Its characters passed for one token a row.
    with pytest.raises(TypeError, match=r"not one string \('abc'\)"):
        top_activating_examples(np.ones((3, 2)), "abc")


def test_an_extractors_token_index_is_taken_as_tokens_and_index():
    from sparse_dict.extraction import TokenIndex

    codes = np.array([[1.0], [3.0], [2.0], [0.5]])
    index = TokenIndex(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]),
                       np.array(["a", "b", "c", "d"], dtype=object))
    by_hand = top_activating_examples(codes, list(index.token),
                                      np.column_stack([index.text_index, index.position]),
                                      k=2, context=1)
    for ex in (top_activating_examples(codes, index, k=2, context=1),
               top_activating_examples(codes, list(index.token), index, k=2, context=1)):
        np.testing.assert_array_equal(ex.rows, by_hand.rows)
        # Context stays within each row's own text: row 1's neighbours are row 0 only.
        np.testing.assert_array_equal(ex.context_rows, by_hand.context_rows)
    assert by_hand.context_rows[0, 0].tolist() == [0, 1, -1]


def test_frequencies_outside_0_and_1_are_refused(tmp_path):
    for bad in ([3.0, 0.5], [-1.0, 0.5]):
        with pytest.raises(ValueError, match="frequencies range from .* between 0 and 1"):
            write_feature_browser(tmp_path / "f.html", bad)
        with pytest.raises(ValueError, match="between 0 and 1"):
            plot_feature_density(bad, tmp_path / "f.png")
    assert not list(tmp_path.iterdir())


def test_a_title_is_shown_as_given_even_with_placeholders(tmp_path):
    page = write_feature_browser(tmp_path / "f.html", [0.5], title="Run @@JS@@ & @@DATA@@")
    text = open(page, encoding="utf-8").read()
    from sparse_dict.browser import _CSS, _JS

    assert "<title>Run @@JS@@ &amp; @@DATA@@</title>" in text
    assert text.count(_JS) == 1 and text.count(_CSS) == 1
    # Not a string: refused, and nothing written (None titled the page "None").
    with pytest.raises(TypeError, match="title must be a str, got None"):
        write_feature_browser(tmp_path / "g.html", [0.5], title=None)
    assert not (tmp_path / "g.html").exists()


def test_max_features_is_a_positive_integer(tmp_path):
    for bad in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="max_features must be an integer of at least 1"):
            write_feature_browser(tmp_path / f"{bad}.html", [0.5, 0.25], max_features=bad)
        assert not (tmp_path / f"{bad}.html").exists()


def test_page_escapes_token_text(tmp_path):
    codes = np.array([[1.0], [0.5]])
    ex = top_activating_examples(codes, ["</script><b>x", "&amp;"], k=2, context=1)
    page = write_feature_browser(tmp_path / "f.html", [1.0], ex, title="<i>t</i>")
    text = open(page, encoding="utf-8").read()
    assert "</script><b>" not in text
    assert "<i>t</i>" not in text
    data = text.split('type="application/json">')[1].split("</script>")[0]
    assert "</script><b>x" in json.loads(data)["vocab"]


def _embedded(page):
    text = open(page, encoding="utf-8").read()
    return json.loads(text.split('type="application/json">')[1].split("</script>")[0])


def test_tokens_are_kept_exactly_and_by_row(tmp_path):
    # NUL characters (a real byte-level token) are kept, distinct tokens stay
    # distinct, and each shown token refers to its own string.
    tokens = ["\x00", "a\x00", "", "a", "a"]
    ex = top_activating_examples(np.array([[5.0], [4.0], [3.0], [2.0], [1.0]]), tokens, k=5,
                                 context=0)
    data = _embedded(write_feature_browser(tmp_path / "f.html", [1.0], ex))
    assert sorted(data["vocab"]) == sorted(["\x00", "a\x00", "", "a"])
    shown = [data["vocab"][e[4][0]] for e in data["features"][0][3]]
    assert shown == tokens


def test_one_long_token_costs_its_own_length_only(tmp_path):
    # The vocabulary was a fixed-width array as wide as the longest token per
    # shown context cell: one 20,000-character token cost about a GB here.
    rng = np.random.default_rng(0)
    codes = (rng.random((2000, 50)) * (rng.random((2000, 50)) < 0.05)).astype(np.float32)
    tokens = [f"t{i % 50}" for i in range(2000)]
    tokens[5] = "-" * 20_000
    ex = top_activating_examples(codes, tokens, k=8, context=6)
    data, peak = peak_bytes(
        lambda: _embedded(write_feature_browser(tmp_path / "f.html", np.ones(50), ex)))
    assert peak < 50e6, peak
    assert "-" * 20_000 in data["vocab"] and len(data["vocab"]) <= 51


def test_browser_rejects_mismatched_inputs(tmp_path):
    ex = top_activating_examples(np.ones((3, 2)), ["a", "b", "c"], k=1)
    with pytest.raises(ValueError, match="describe 3 features"):
        write_feature_browser(tmp_path / "f.html", np.ones(3), ex)
    with pytest.raises(ValueError, match="frequencies of shape"):
        write_feature_browser(tmp_path / "f.html", np.ones((3, 1)))


def test_density_plot_writes_png(tmp_path):
    freqs = np.r_[np.zeros(5), np.logspace(-5, -1, 95)]
    fig = plot_feature_density(freqs, tmp_path / "density.png")
    with open(tmp_path / "density.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "5 dead" in fig.axes[0].get_title()
    # All features dead: still a figure, no error from an empty histogram.
    plot_feature_density(np.zeros(4), tmp_path / "dead.png")
    # PNG bytes under another name were written silently.
    for name in ("density.svg", "density.pdf", "density"):
        with pytest.raises(ValueError, match="path must name a .png file"):
            plot_feature_density(freqs, tmp_path / name)
        assert not (tmp_path / name).exists()
    plot_feature_density(freqs, tmp_path / "UPPER.PNG")


# --------------------------------------------------------------------------
# The page in a real headless Chromium
# --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands this test needs, over plain HTTP."""

    def __init__(self, url):
        self.url = url
        self.session = None

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as err:
            raise AssertionError(f"WebDriver {method} {path}: {err.read()[:500]!r}") from None

    def start(self, chromium, user_data_dir):
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}",
        ]
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        value = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = value["sessionId"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def script(self, source, *args):
        return self.s("POST", "/execute/sync", {"script": source, "args": list(args)})

    def find(self, css):
        value = self.s("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(value.values()))

    def browser_log(self):
        # chromedriver's own endpoint for the console; not part of W3C.
        return self.s("POST", "/se/log", {"type": "browser"}) or []

    def quit(self):
        if self.session is not None:
            try:
                self.s("DELETE", "")
            except Exception:
                pass


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    if CHROMEDRIVER is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    port = _free_port()
    proc = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wd = WebDriver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if wd.call("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError, AssertionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("chromedriver did not become ready within 15 s")
            time.sleep(0.1)
        wd.start(CHROMIUM, str(tmp_path_factory.mktemp("chromium-profile")))
        wd.s("POST", "/timeouts", {"script": 10_000, "pageLoad": 20_000, "implicit": 0})
        yield wd
    finally:
        wd.quit()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for(driver, script, expected, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = driver.script(script)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A browser page of 3000 features; feature 7 alone fires on 'wherefore'."""
    rng = np.random.default_rng(0)
    n_tokens, n_features = 2000, 3000
    words = np.array(["to", "be", "or", "not", "that", "is", "the", "question"])
    tokens = words[rng.integers(0, words.size, n_tokens)].astype(object)
    tokens[1234] = "wherefore"
    codes = sp.random(n_tokens, n_features, density=0.004, random_state=0, format="csc",
                      dtype=np.float32)
    codes = codes.tolil()
    codes[1234, :] = 0
    codes[1234, 7] = 5.0
    codes[:, 11] = 0  # dead
    codes = codes.tocsc()
    index = np.column_stack([np.arange(n_tokens) // 50, np.arange(n_tokens) % 50])
    ex = top_activating_examples(codes, tokens, index, k=5, context=4)
    freqs = np.asarray((codes > 0).mean(axis=0)).ravel()
    path = tmp_path_factory.mktemp("browser") / "features.html"
    write_feature_browser(path, freqs, ex, title="Test dictionary")
    return path


COUNT = "return document.querySelectorAll('#features .feature').length;"
# The start of a script that maps each drawn feature ``f`` to a value.
EACH_FEATURE = ("return Array.from(document.querySelectorAll('#features .feature'))"
                ".map(function (f) {")
IDS = EACH_FEATURE + " return Number(f.dataset.feature); });"


def _open(driver, path, n_features):
    """Load the page at ``path`` and wait until ``n_features`` features are drawn."""
    driver.s("POST", "/url", {"url": Path(path).as_uri()})
    driver.browser_log()  # drop anything logged before this page
    assert _wait_for(driver, COUNT, n_features) == n_features


def test_page_in_headless_chromium(driver, page):
    # Loaded and drawn, one page at a time rather than all 3000 at once.
    _open(driver, page, 50)
    assert driver.script(IDS)[:3] == [0, 1, 2]
    info = driver.script("return document.getElementById('page-info').textContent;")
    assert "3000 of 3000" in info
    # Tokens are highlighted: the top example's own token is the most shaded.
    assert driver.script("return document.querySelectorAll('.tok.max.l9').length;") > 0

    search = driver.find("#search")
    # Search by token text.
    driver.s("POST", f"/element/{search}/value", {"text": "wherefore"})
    assert _wait_for(driver, IDS, [7]) == [7]
    # Search by feature id.
    driver.s("POST", f"/element/{search}/clear", {})
    driver.s("POST", f"/element/{search}/value", {"text": "#11"})
    assert _wait_for(driver, IDS, [11]) == [11]
    assert "Dead" in driver.script("return document.querySelector('.feature').textContent;")
    # Nothing matches.
    driver.s("POST", f"/element/{search}/clear", {})
    driver.s("POST", f"/element/{search}/value", {"text": "zzzz-no-such-token"})
    assert _wait_for(driver, COUNT, 0) == 0

    # Sorted by frequency, high first.
    driver.s("POST", f"/element/{search}/clear", {})
    driver.script(
        "var s = document.getElementById('sort'); s.value = 'freq-desc';"
        "s.dispatchEvent(new Event('change'));"
    )
    _wait_for(driver, COUNT, 50)
    freqs = driver.script(
        "return Array.from(document.querySelectorAll('#features .feature'))"
        ".map(function (e) { return Number(e.dataset.frequency); });"
    )
    assert len(freqs) == 50 and freqs == sorted(freqs, reverse=True) and freqs[0] > 0

    # Paging forward shows the next 50.
    driver.script("document.getElementById('next').click();")
    assert "page 2 of 60" in driver.script(
        "return document.getElementById('page-info').textContent;"
    )

    errors = [e for e in driver.browser_log() if e.get("level") == "SEVERE"]
    assert errors == [], errors


@pytest.fixture(scope="module")
def effects_page(tmp_path_factory):
    """A page whose feature 1 promotes markup-like tokens and suppresses a newline."""
    codes = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.5, 3.0, 0.0]])
    ex = top_activating_examples(codes, ["to", "be", "or"], k=2, context=1)
    # Feature 2's atom is zero: logit_effects gives it no token ('' and 0).
    effects = {
        "features": [1, 0, 2],
        "promoted_tokens": [["<b>bold</b>", " king", "&amp;"], [" a", " b", " c"], [""] * 3],
        "promoted_logits": [[2.5, 1.25, 0.5], [0.3, 0.2, 0.1], [0.0] * 3],
        "suppressed_tokens": [["\n", "</script>", " queen"], [" x", " y", " z"], [""] * 3],
        "suppressed_logits": [[-3.0, -2.0, -1.0], [-0.1, -0.2, -0.3], [0.0] * 3],
    }
    path = tmp_path_factory.mktemp("effects") / "features.html"
    write_feature_browser(path, (codes > 0).mean(axis=0), ex, logit_effects=effects)
    return path


def test_promoted_and_suppressed_tokens_render_escaped(driver, effects_page):
    _open(driver, effects_page, 3)
    rows = driver.script(
        EACH_FEATURE +
        "  var up = f.querySelector('.effects .promoted'), down = f.querySelector("
        "    '.effects .suppressed');"
        "  return [Number(f.dataset.feature), up ? Array.from(up.querySelectorAll('.effect'))"
        "    .map(function (e) { return e.firstChild.textContent; }) : null,"
        "    down ? Array.from(down.querySelectorAll('.effect')).map(function (e) {"
        "      return e.textContent; }) : null]; });")
    by_id = {r[0]: r[1:] for r in rows}
    # Shown as text, in order, next to the examples; the markup is not parsed.
    assert by_id[1][0] == ["<b>bold</b>", " king", "&amp;"]
    assert by_id[1][1] == ["\u21b5-3.00", "</script>-2.00", " queen-1.00"]
    assert by_id[0][0] == [" a", " b", " c"]
    assert by_id[2] == [None, None]  # none shown for feature 2
    assert driver.script("return document.querySelectorAll('#features b').length;") == 0
    # The promoted tokens sit before the feature's examples.
    assert driver.script(
        "var f = document.querySelector('[data-feature=\"1\"]');"
        "return f.querySelector('.effects').compareDocumentPosition("
        "  f.querySelector('.example')) === Node.DOCUMENT_POSITION_FOLLOWING;")
    errors = [e for e in driver.browser_log() if e.get("level") == "SEVERE"]
    assert errors == [], errors


def test_float64_codes_keep_their_range():
    # Cast to float32, 1e39 became inf and was refused as "NaN or infinite";
    # 1e-50 became 0 and its example was lost.
    codes = np.zeros((4, 2))
    codes[1, 0], codes[2, 0], codes[3, 1] = 1e39, 2.0, 1e-50
    ex = top_activating_examples(codes, list("abcd"), k=2, context=0)
    assert ex.rows.tolist() == [[1, 2], [3, -1]]
    assert ex.values[0, 0] == 1e39 and ex.values[1, 0] == 1e-50


def test_numbers_are_stored_as_the_page_shows_them(tmp_path):
    # Stored to 4 digits and shown to 3, 2.9653 was rounded twice and shown as
    # 2.96; 153 of 661 tokens as 23.2%.
    codes = np.zeros((661, 1), np.float32)
    codes[:153, 0] = 1.0
    codes[0, 0] = 2.9653
    ex = top_activating_examples(codes, [f"t{i}" for i in range(661)], k=1, context=0)
    feature = _embedded(write_feature_browser(tmp_path / "f.html", (codes > 0).mean(axis=0),
                                              ex))["features"][0]
    assert feature[2] == 2.97  # the peak, as the page prints it
    assert f"{100 * feature[1]:.3g}" == "23.1" and feature[1] == pytest.approx(153 / 661,
                                                                                rel=1e-6)


def test_tokens_that_draw_nothing_are_shown_by_their_pictures(driver, tmp_path):
    # An empty or a carriage-return token was zero pixels wide: the example's
    # strongest token could not be seen. A right-to-left override in one
    # token reversed the tokens after it.
    tokens = ["", "\r", "a", "\u202e", "b", "c"]
    codes = np.zeros((6, 3))
    codes[0, 0], codes[1, 1], codes[2, 2] = 3.0, 2.0, 1.0
    ex = top_activating_examples(codes, tokens, k=1, context=5)
    path = write_feature_browser(tmp_path / "f.html", (codes > 0).mean(axis=0), ex)
    _open(driver, path, 3)
    shown = driver.script(
        EACH_FEATURE +
        "  return Array.from(f.querySelectorAll('.example .tok')).map(function (t) {"
        "    return [t.textContent, t.classList.contains('max'),"
        "            t.getBoundingClientRect().width > 0, t.getBoundingClientRect().left]; "
        "  }); });")
    assert [t[0] for t in shown[0]] == ["\u2205", "\u240d", "a", "\u202e", "b", "c"]
    for feature in shown:
        assert all(t[2] for t in feature if t[1])  # the strongest token has a width
        lefts = [t[3] for t in feature]
        assert lefts == sorted(lefts)  # in token order, left to right
    errors = [e for e in driver.browser_log() if e.get("level") == "SEVERE"]
    assert errors == [], errors


def test_logit_effects_input_is_checked(tmp_path):
    # Tokens without values drew a blank page (a TypeError in its script).
    with pytest.raises(ValueError, match=r"tokens have shape \(1, 2\) but their logits "
                                         r"\(1, 1\)"):
        write_feature_browser(tmp_path / "f.html", [0.5], logit_effects={
            "promoted_tokens": [["a", "b"]], "promoted_logits": [[1.0]],
            "suppressed_tokens": [["c"]], "suppressed_logits": [[-1.0]]})
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_feature_browser(tmp_path / "f.html", [0.5], logit_effects={
            "promoted_tokens": [["a"]], "promoted_logits": [[np.inf]],
            "suppressed_tokens": [["c"]], "suppressed_logits": [[-1.0]]})
    assert not (tmp_path / "f.html").exists()
    with pytest.raises(ValueError, match="lacks"):
        write_feature_browser(tmp_path / "f.html", np.ones(2),
                              logit_effects={"promoted_tokens": [["a"]]})
    with pytest.raises(ValueError, match="outside 0..1"):
        write_feature_browser(tmp_path / "f.html", np.ones(2), logit_effects={
            "features": [5], "promoted_tokens": [["a"]], "promoted_logits": [[1.0]],
            "suppressed_tokens": [["b"]], "suppressed_logits": [[-1.0]]})

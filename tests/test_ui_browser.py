"""The web app in a real browser: `diffutoon ui --demo-models` served on 127.0.0.1, headless Chromium (Debian's
`chromium` + `chromium-driver`, driven by Selenium) uploads a non-video file and sees the CLI's message, then a
short clip, renders it with the tiny models, sees the progress move and a result <video> as long as the clip.

Skipped only where Chromium is missing outside CI; in CI (env CI set, as .ci/run does) a missing browser fails.
    python tests/test_ui_browser.py --screenshot docs/webapp.png    # the README's screenshot
"""

import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES, CLIP_SIZE, CLIP_FPS = 12, 64, 8  # 1.5 s; windows of 8 / stride 4 (demo defaults): 2 a step, 2 steps


def _browser():
    def first(*candidates):
        return next((p for p in candidates if p and os.path.isfile(p)), None)

    chromium = first(os.environ.get("CHROME_BIN"), *map(shutil.which, ("chromium", "chromium-browser", "google-chrome")))
    driver = first(os.environ.get("CHROMEDRIVER"), shutil.which("chromedriver"))
    try:
        import selenium  # noqa: F401
    except ImportError:
        return chromium, driver, "selenium is not installed (pip install -e '.[test]')"
    if not (chromium and driver):
        return chromium, driver, ("Chromium or chromedriver not found (Debian: apt-get install chromium "
                                  "chromium-driver; or set CHROME_BIN and CHROMEDRIVER)")
    return chromium, driver, None


def _start_browser():
    chromium, driver, missing = _browser()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}; .ci/run installs them")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="diffutoon-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(options=options, service=Service(driver))
    drv.set_page_load_timeout(60)
    return drv, profile


def _open_browser():
    """A browser with a profile of its own, closed and its profile removed afterwards."""
    drv, profile = _start_browser()
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    yield from _open_browser()


@pytest.fixture(scope="module")
def other_browser():
    """A second browser profile: another user of the same app."""
    yield from _open_browser()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`diffutoon ui --demo-models` (its options parsed by the CLI, then `webapp.page.serve`), on 127.0.0.1 only, with its
    own data folder; in this process, so that the models' libraries are imported once for the whole suite."""
    pytest.importorskip("gradio")
    from diffutoon import cli
    from diffutoon.webapp import page as ui

    tmp = tmp_path_factory.mktemp("ui")
    port = _free_port()
    args = cli.build_parser().parse_args(["ui", "--demo-models", "--device", "cpu", "--host", "127.0.0.1",
                                          "--port", str(port), "--data-dir", str(tmp / "data")])
    app, manager = ui.serve(args, block=False)
    url = f"http://127.0.0.1:{port}/"
    assert urllib.request.urlopen(url, timeout=30).status == 200
    yield url, tmp
    app.close()
    manager.stop()


def _wait(fn, timeout=60, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _file_input(drv):
    from selenium.webdriver.common.by import By

    return _wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#dt-video input[type=file]"), what="the upload box")[0]


def _text(drv, elem_id):
    from selenium.webdriver.common.by import By

    found = drv.find_elements(By.ID, elem_id)
    return found[0].text.strip() if found else ""


# the progress block's data-* attributes, every time the page changes them
RECORD_PROGRESS = """
window.__progress = [];
const record = () => { const p = document.getElementById('dt-progress'); if (p) window.__progress.push({...p.dataset}); };
new MutationObserver(record).observe(document.getElementById('dt-status'),
                                     {subtree: true, childList: true, attributes: true, characterData: true});
"""


def _set(drv, elem_id, value):
    """Type a value into a Number / Textbox / Slider's box of the page, as a user does (then leave the field)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = drv.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number], #{elem_id} textarea, "
                                            f"#{elem_id} input[type=text]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)
    time.sleep(0.3)


def _status(drv):
    return drv.execute_script("const p = document.getElementById('dt-progress'); return p ? {...p.dataset} : {}")


def _get(url, cookie=None):
    """(status, body) of a plain HTTP request, with or without the session's cookie."""
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_page_renders_a_clip_and_shows_errors(browser, other_browser, server, tmp_path, capfd):
    from selenium.webdriver.common.by import By

    from diffutoon import cli
    from diffutoon import video as vio

    url, tmp = server
    drv = browser
    drv.get(url)
    assert "Demo mode: tiny random-weight models" in _wait(lambda: _text(drv, "dt-models"), what="the banner")

    # a file that is not a video: the CLI's one-line message, in the page
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    assert cli.main(["render", str(notes)]) == 2
    cli_line = capfd.readouterr().err.strip().split(": error: ", 1)[1].replace(str(notes), notes.name)
    _file_input(drv).send_keys(str(notes))
    shown = _wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#dt-message .dt-error"), what="the error message")
    assert shown[0].text.strip() == cli_line
    assert cli_line == "cannot read notes.txt as a video (truncated, corrupt or not a video file)"

    # a short clip with sound, rendered with the tiny models; a prompt of ours, to see it restored later
    drv.refresh()
    clip = vio.make_demo_clip(tmp_path / "clip.mp4", CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE, CLIP_FPS, overwrite=True)
    _file_input(drv).send_keys(str(clip))
    info = _wait(lambda: "Selected" in _text(drv, "dt-info") and _text(drv, "dt-info"), what="the video's details")
    assert f"{CLIP_FRAMES} frames" in info and "with sound" in info
    assert _text(drv, "dt-message") == ""
    _wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#dt-input video"), what="the player of the upload")
    _set(drv, "dt-prompt", "a cat in the rain")
    # the keyframe's frame picker shows the upload at its time (through the session's private route); the demo
    # models have no distilled motion adapter: Fast draft says so
    drv.execute_script("for (const b of document.querySelectorAll('button.label-wrap')) if (['Direct the look', "
                       "'Fast draft'].some(t => b.textContent.includes(t))) b.click()")
    _wait(lambda: drv.execute_script("const i = document.querySelector('#dt-keyframe-frame-1 img');"
                                     "return i && i.complete && i.naturalWidth === 64"), what="the frame picker")
    assert "Fast draft: not available" in _wait(lambda: _text(drv, "dt-fast-missing"), what="the Fast draft note")
    drv.execute_script(RECORD_PROGRESS)
    drv.find_element(By.ID, "dt-render").click()

    duration = _wait(lambda: drv.execute_script(
        "const v = document.querySelector('#dt-after video');"
        "return v && v.readyState >= 1 && isFinite(v.duration) ? v.duration : null"), timeout=300, what="the result")
    log = drv.execute_script("return window.__progress")
    assert abs(duration - CLIP_FRAMES / CLIP_FPS) <= 1 / CLIP_FPS, duration

    # the progress moved, as the pipeline reported it: its conditions, then window after window, never backwards
    assert log[-1]["state"] == "done", log[-1]
    stages = [e.get("stage") for e in log]
    assert "conditions" in stages and "denoising" in stages
    assert stages.index("conditions") < stages.index("denoising")
    denoising = sorted({int(e["done"]) for e in log if e.get("stage") == "denoising"})
    assert len(denoising) >= 2 and denoising[-1] > denoising[0]
    fractions = [float(e["fraction"]) for e in log if "fraction" in e]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "Done in" in _text(drv, "dt-status")
    # screen readers: the status is announced, the bar has a name
    assert drv.find_element(By.CSS_SELECTOR, "#dt-progress").get_attribute("role") == "status"
    assert drv.find_element(By.CSS_SELECTOR, "#dt-progress").get_attribute("aria-live") == "polite"
    assert drv.find_element(By.CSS_SELECTOR, "#dt-progress progress").get_attribute("aria-label") == "Render progress"
    # before and after, labelled, side by side; the download; the condition frames
    assert _text(drv, "dt-before").startswith("Before: clip.mp4") and _text(drv, "dt-after").startswith("After:")
    assert drv.find_element(By.CSS_SELECTOR, "#dt-before video").is_displayed()
    assert drv.find_element(By.ID, "dt-download").is_displayed()
    assert len(drv.find_elements(By.CSS_SELECTOR, "#dt-previews img")) >= 1
    # what the pipeline reported: the scene cuts it used (none in this clip) and the quality report
    assert "Scene cuts: none found, one shot." in _text(drv, "dt-status")
    assert "quality: warping error" in _text(drv, "dt-status")

    # the result is this session's: 200 with its cookie, 403 without, 404 for another browser profile; never
    # served by its path in the data folder
    src = drv.execute_script("return document.querySelector('#dt-after video').src")
    preview = drv.execute_script("return document.querySelector('#dt-previews img').src")
    cookie = f"diffutoon_session={drv.get_cookie('diffutoon_session')['value']}"
    outputs = list((tmp / "data" / "sessions").glob("*/*/result.mp4"))
    assert len(outputs) == 1
    assert _get(src, cookie) == (200, outputs[0].read_bytes())
    assert _get(preview, cookie)[0] == 200
    assert _get(src)[0] == 403 and _get(preview)[0] == 403
    other_browser.get(url)
    _wait(lambda: other_browser.get_cookie("diffutoon_session"), what="the other profile's session")
    other = f"diffutoon_session={other_browser.get_cookie('diffutoon_session')['value']}"
    assert other != cookie and _get(src, other)[0] == 404 and _get(preview, other)[0] == 404
    assert other_browser.execute_script(
        "return fetch(arguments[0]).then(r => r.status)", src) == 404  # the other profile's own browser
    assert _get(f"{url}gradio_api/file={outputs[0]}", cookie)[0] == 403
    assert not list(Path(tempfile.gettempdir()).glob("gradio/*/result.mp4"))  # nothing in Gradio's shared cache

    # a refused Render after a finished one: the message stays, the old result is marked as the previous one
    _set(drv, "dt-start", 1)
    _set(drv, "dt-end", 0.5)
    drv.find_element(By.ID, "dt-render").click()
    message = _wait(lambda: _text(drv, "dt-message"), what="the refusal")
    assert "Start/End" in message
    time.sleep(1.5)
    assert _text(drv, "dt-message") == message
    assert _text(drv, "dt-start").endswith(message)  # also next to the field it is about
    assert drv.find_element(By.CSS_SELECTOR, "#dt-start input").get_attribute("aria-invalid") == "true"
    assert "Previous result" in _text(drv, "dt-result")
    # a number out of its range: the app's one line with the field's label, no Gradio toast
    _set(drv, "dt-start", 0)
    _set(drv, "dt-end", 0)
    _set(drv, "dt-every-nth", 0)
    drv.find_element(By.ID, "dt-render").click()
    _wait(lambda: "Every n-th frame" in _text(drv, "dt-message"), what="the range message")
    assert _text(drv, "dt-message") == "Every n-th frame: must be at least 1, got 0"
    _wait(lambda: _text(drv, "dt-every-nth").endswith("Every n-th frame: must be at least 1, got 0"),
          what="the message next to its field")
    assert not drv.find_elements(By.CSS_SELECTOR, "#dt-start .dt-field-error")
    assert not drv.find_elements(By.CSS_SELECTOR, ".toast-body")

    # a reload: the form shows the job's video and settings; "Your renders" lists it with its thumbnail
    drv.refresh()
    _wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#dt-input video"), what="the restored video")
    _wait(lambda: drv.execute_script("return document.querySelector('#dt-prompt textarea').value")
          == "a cat in the rain", what="the restored prompt")
    job = _status(drv).get("job") or _wait(lambda: _status(drv).get("job"), what="the job")
    row = _wait(lambda: drv.find_elements(By.CSS_SELECTOR, f"#dt-render-{job}"), what="Your renders")[0]
    assert "clip.mp4" in row.text and "done" in row.text and "Download" in row.text
    assert row.find_elements(By.CSS_SELECTOR, "img") and row.find_elements(By.CSS_SELECTOR, ".dt-delete-row")

    shot = os.environ.get("DIFFUTOON_UI_SCREENSHOT")
    if shot:
        _screenshot(drv, shot)

    # Delete: the row goes, and so do the files
    row.find_element(By.CSS_SELECTOR, ".dt-delete-row").click()
    _wait(lambda: not drv.find_elements(By.CSS_SELECTOR, f"#dt-render-{job}"), what="the row to go")
    assert _get(src, cookie)[0] == 404 and not outputs[0].exists()


def _screenshot(drv, path, size=(1400, 1494)):
    """The whole page in the README's screenshot size: the page laid out over the full width and zoomed out to fit."""
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1],
                                                               "deviceScaleFactor": 1, "mobile": False})
    drv.execute_script("document.querySelectorAll('.gradio-container, .main, .wrap, .contain').forEach("
                       "e => e.style.maxWidth = 'none')")
    for _ in range(3):  # a wider layout is shorter: settle the zoom
        time.sleep(0.5)
        height = drv.execute_script("document.body.style.zoom = 1; return Math.max(document.body.scrollHeight, "
                                    "...[...document.querySelectorAll('.gradio-container')].map(e => e.scrollHeight))")
        zoom = min(1.0, size[1] / height)
        drv.execute_script(f"document.body.style.zoom = {zoom:.3f}; window.scrollTo(0, 0)")
    time.sleep(1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(path))


if __name__ == "__main__":
    m = re.fullmatch(r"--screenshot=?(.*)", " ".join(sys.argv[1:2]))
    target = (sys.argv[2] if len(sys.argv) > 2 else m[1]) if m else None
    if not target:
        sys.exit("usage: python tests/test_ui_browser.py --screenshot docs/webapp.png")
    os.environ["DIFFUTOON_UI_SCREENSHOT"] = str(Path(target).resolve())
    sys.exit(pytest.main(["-q", "-p", "no:warnings", __file__]))

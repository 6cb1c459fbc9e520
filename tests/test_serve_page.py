"""The `ldm serve` page in a real headless browser (Selenium + Debian's chromium / chromedriver; skipped
when they are missing): type a prompt, generate, wait for the images, reuse their settings, read a
PNG's settings by drag and drop, inpaint with a mask painted on the canvas. It leaves a screenshot in
its tmp folder; LDM_UPDATE_SCREENSHOT=1 also writes it to docs/images/serve-page.png."""
from __future__ import annotations

import base64
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.slow
DOCS_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve-page.png"
WAIT = 60  # seconds for any one thing the page does


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,960",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory, one_thread):
    import torch

    from test_serve import _adapters, start_server, stop_server

    from ldmkit.pipelines import load

    browser = _browser()
    root = tmp_path_factory.mktemp("page")
    try:
        lora_dir, cn_dir = _adapters(root, load("demo-shapes", device="cpu", dtype=torch.float32))
        proc, url = start_server(["--model", "demo-shapes", "--out", str(root / "out"), "--lora-dir", str(lora_dir),
                                  "--controlnet-dir", str(cn_dir), "--device", "cpu"], root / "server.log")
    except BaseException:
        browser.quit()
        raise
    try:
        browser.get(url + "/")
        yield browser, root
    finally:
        browser.quit()
        stop_server(proc)


def _wait(condition, what: str, timeout: float = WAIT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"the page did not {what} within {timeout} s")


def _cards(browser):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#gallery .card")


def test_generate_from_the_page(page):
    from selenium.webdriver.common.by import By

    browser, root = page
    field = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    _wait(lambda: len(field("sampler_name").find_elements(By.TAG_NAME, "option")) > 1, "load the samplers")
    assert field("width").get_attribute("value") == "32" and not field("lora-box").get_attribute("hidden")
    field("prompt").clear()
    field("prompt").send_keys("a red circle above a (blue:1.2) square")
    for name, value in (("steps", "12"), ("seed", "7"), ("batch_size", "4")):
        field(name).clear()
        field(name).send_keys(value)
    field("generate").click()
    _wait(lambda: _cards(browser), "show the images")
    card = _cards(browser)[0]
    images = card.find_elements(By.CSS_SELECTOR, "img.result")
    assert len(images) == 4 and all(browser.execute_script("return arguments[0].naturalWidth", i) == 32
                                    for i in images)
    text = card.find_element(By.TAG_NAME, "pre").text
    assert text.startswith("a red circle above a (blue:1.2) square") and "Seed: 7" in text and "Steps: 12" in text
    browser.save_screenshot(str(root / "serve-page.png"))
    if os.environ.get("LDM_UPDATE_SCREENSHOT"):
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "serve-page.png", DOCS_IMAGE)
    # reuse settings: the form gets the card's values back
    field("prompt").clear()
    field("seed").clear()
    field("seed").send_keys("-1")
    card.find_element(By.XPATH, ".//button[text()='Reuse settings']").click()
    assert field("prompt").get_attribute("value") == "a red circle above a (blue:1.2) square"
    assert field("seed").get_attribute("value") == "7"


def _png_bytes(text: str) -> bytes:
    from io import BytesIO

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_drop_a_png_to_read_its_settings(page):
    from selenium.webdriver.common.by import By

    browser, _ = page
    data = base64.b64encode(_png_bytes("a green triangle\nNegative prompt: blurry\nSteps: 9, Sampler: Euler a, "
                                       "CFG scale: 4.5, Seed: 1234, Size: 32x32")).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "from-a1111.png", { type: "image/png" }));
        document.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    """, data)
    field = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    _wait(lambda: field("prompt").get_attribute("value") == "a green triangle", "read the dropped PNG")
    assert [field(n).get_attribute("value") for n in ("negative_prompt", "steps", "cfg_scale", "seed",
                                                      "sampler_name")] == ["blurry", "9", "4.5", "1234", "Euler a"]


def test_inpaint_with_a_painted_mask(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser, _ = page
    field = lambda name: browser.find_element(By.ID, name)  # noqa: E731
    Image.new("RGB", (32, 32), (180, 40, 40)).save(tmp_path / "in.png")
    browser.find_element(By.CSS_SELECTOR, ".tabs button[data-mode=img2img]").click()
    field("init-file").send_keys(str(tmp_path / "in.png"))
    _wait(lambda: browser.execute_script("return document.getElementById('init-canvas').width") == 32,
          "load the input image")
    canvas = field("mask-canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, -20, -20).click_and_hold() \
        .move_by_offset(40, 40).release().perform()
    assert field("mask-on").is_selected()
    before = len(_cards(browser))
    field("steps").clear()
    field("steps").send_keys("5")
    field("generate").click()
    _wait(lambda: len(_cards(browser)) > before, "show the inpainted image")
    assert "Denoising strength: 0.75" in _cards(browser)[0].find_element(By.TAG_NAME, "pre").text
    assert field("error").text == ""

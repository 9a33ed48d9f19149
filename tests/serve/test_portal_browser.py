"""The portal in a real headless browser (Debian's chromium + chromium-driver, through Selenium)
against a real `phitune serve` on loopback with two organizations: sign in, a broken file shown by
line, a good one with its trained tokens, a job started from the form, the chart growing, a reload
mid-run that brings the whole history back, pause and resume, the side-by-side playground, two runs
compared, and organization B seeing none of A's jobs. Every page is photographed on the way
(PHITUNE_SCREENSHOTS=docs/images writes the README's pictures)."""

import json
import os
import time
from pathlib import Path

import pytest

from helpers import DEMO_TRAIN, STARTED, Server, create_key, headless_chromium, wait_for_job

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
EPOCHS = 10
STEPS = 40 // 2 * EPOCHS  # 40 rows, batch 2


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PHITUNE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(logs={"browser": "ALL"})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def service(tiny_phi3, tmp_path_factory):
    store = tmp_path_factory.mktemp("portal-store")
    server = Server(store, tiny_phi3)
    keys = {org: create_key(store, org, server.db) for org in ("alpha", "beta")}
    server.start()
    yield server, keys
    server.stop()
    STARTED.remove(server)


def viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's own size (a headless window's size includes its frame)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def shown(driver, css: str, contains: str, timeout: float = 60) -> None:
    try:
        wait(driver, EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), contains), timeout)
    except TimeoutException:
        raise AssertionError(f"{css} never showed {contains!r}; it shows {text_of(driver, css)!r}") from None


def points(driver) -> int:
    return int(text_of(driver, "#points") or 0)


def sign_in(driver, base: str, key: str) -> None:
    driver.get(base + "/")
    wait(driver, EC.url_contains("/signin"))
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#job-rows tr td")))


def upload(driver, field: str, path: Path) -> None:
    driver.find_element(By.ID, field + "_upload").send_keys(str(path))


def test_the_portal_end_to_end_in_a_browser(browser, service, tmp_path, shots):
    server, keys = service
    base = f"http://127.0.0.1:{server.port}"
    driver = browser
    good, bad, held_out = tmp_path / "support.jsonl", tmp_path / "broken.jsonl", tmp_path / "held-out.jsonl"
    lines = DEMO_TRAIN.read_text().splitlines()
    rows = lines[:40]
    good.write_text("\n".join(rows) + "\n")
    held_out.write_text("\n".join(lines[40:50]) + "\n")
    bad.write_text(rows[0] + "\n{oops\n" + json.dumps({"messages": [{"role": "user", "content": "<b>hi</b>"}]}) + "\n")

    # Sign in: a wrong key is refused next to the field; the right one opens the jobs page
    driver.get(base + "/new")
    wait(driver, EC.url_contains("/signin?next=%2Fnew"))
    driver.find_element(By.ID, "api-key").send_keys("sk-wrong")
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    shown(driver, "#error-key", "Incorrect API key")
    driver.save_screenshot(str(shots / "portal-signin.png"))
    driver.find_element(By.ID, "api-key").clear()
    driver.find_element(By.ID, "api-key").send_keys(keys["alpha"])
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait(driver, EC.url_to_be(base + "/new"))
    assert keys["alpha"] not in driver.current_url

    # A broken file: every problem with its line, the markup in it shown as text
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#model option[value=tiny]")))
    upload(driver, "training_file", bad)
    shown(driver, "#check-training_file", "line 2")
    check = text_of(driver, "#check-training_file")
    assert "line 3" in check and "invalid JSON" in check, check
    assert not driver.find_elements(By.CSS_SELECTOR, "#check-training_file b")  # not rendered as markup
    # A good one: the examples as the model sees them, the trained tokens marked
    upload(driver, "training_file", good)
    shown(driver, "#check-training_file", "40 examples")
    trained = driver.find_elements(By.CSS_SELECTOR, "#check-training_file .preview .trained")
    assert trained and json.loads(rows[0])["messages"][-1]["content"][:20] in " ".join(t.text for t in trained)
    upload(driver, "validation_file", held_out)
    shown(driver, "#check-validation_file", "10 examples")
    for name, value in (
        ("n_epochs", str(EPOCHS)),
        ("batch_size", "2"),
        ("learning_rate_multiplier", "1.5"),
        ("suffix", "first"),
    ):
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    shown(driver, "#request-json", '"suffix": "first"')
    request = json.loads(text_of(driver, "#request-json"))
    assert request["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": EPOCHS,
        "batch_size": 2,
        "learning_rate_multiplier": 1.5,
    }
    assert request["validation_file"].startswith("file-")
    driver.save_screenshot(str(shots / "portal-new-job.png"))
    # A bad value comes back from the API next to its field
    seed = driver.find_element(By.ID, "seed")
    seed.send_keys("-5")
    driver.find_element(By.CSS_SELECTOR, "#job-form button[type=submit]").click()
    shown(driver, "#error-seed", "seed")
    seed.clear()
    seed.send_keys("1")
    driver.find_element(By.CSS_SELECTOR, "#job-form button[type=submit]").click()
    wait(driver, EC.url_contains("/jobs/ftjob-"))
    job_id = driver.current_url.rsplit("/", 1)[1]

    # The chart grows while it trains; a reload mid-run brings back the whole history at once
    wait(driver, lambda d: points(d) >= 5, 180)
    before = points(driver)
    wait(driver, lambda d: points(d) > before, 60)
    driver.refresh()
    wait(driver, lambda d: points(d) >= before, 5)
    # Pause from the page: no step is added while paused, and a reload shows exactly what was run
    wait(driver, EC.element_to_be_clickable((By.XPATH, "//section[@id='summary']//button[text()='Pause']")), 60).click()
    shown(driver, "#job-status", "paused", 90)
    time.sleep(2)
    paused_at = points(driver)
    assert 0 < paused_at < STEPS
    time.sleep(2)
    assert points(driver) == paused_at
    driver.refresh()
    wait(driver, lambda d: points(d) == paused_at, 10)
    shown(driver, "#job-status", "paused")
    driver.save_screenshot(str(shots / "portal-job-paused.png"))
    wait(driver, EC.element_to_be_clickable((By.XPATH, "//section[@id='summary']//button[text()='Resume']"))).click()
    shown(driver, "#job-status", "succeeded", 600)
    shown(driver, "#chart-status", "finished: succeeded", 30)
    wait(driver, lambda d: points(d) == STEPS, 30)  # every step once, the resumed run's repeats not twice
    driver.refresh()
    wait(driver, lambda d: points(d) == STEPS, 30)  # and all of it again after a reload
    Select(driver.find_element(By.ID, "axis")).select_by_value("epoch")
    driver.find_element(By.ID, "logscale").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#chart canvas")
    legend = text_of(driver, "#chart .u-legend")
    assert "training loss" in legend and "validation loss" in legend, legend
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, f"#checkpoints tr[data-step='{STEPS}']")))
    events = text_of(driver, "#events")
    assert "paused" in events and "resumed" in events and "successfully completed" in events
    driver.save_screenshot(str(shots / "portal-job.png"))
    fine_tuned = driver.find_element(By.CSS_SELECTOR, "#summary .summary-head code").text
    assert fine_tuned.startswith("ft:tiny:alpha:first:")

    # The playground: the same prompt to the base and the fine-tune, side by side
    driver.find_element(By.LINK_TEXT, "try it").click()
    wait(driver, EC.url_contains("/playground"))
    wait(
        driver,
        lambda d: (
            Select(d.find_elements(By.CSS_SELECTOR, ".model-pick")[1]).first_selected_option.get_attribute("value")
            == fine_tuned
        ),
    )
    question = json.loads(rows[0])["messages"][-2]["content"]
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#playground-form button[type=submit]").click()
    for i in (0, 1):
        wait(
            driver, EC.presence_of_element_located((By.CSS_SELECTOR, f".answer[data-index='{i}'][data-done=true]")), 120
        )
        stats = text_of(driver, f".answer[data-index='{i}'] .answer-stats")
        assert "first token" in stats and "completion tokens" in stats, stats
    assert not driver.find_element(By.CSS_SELECTOR, ".answer[data-index='2']").is_displayed()  # none picked
    assert text_of(driver, ".answer[data-index='0'] .answer-model") == "tiny"
    assert text_of(driver, ".answer[data-index='1'] .answer-model") == fine_tuned
    driver.save_screenshot(str(shots / "portal-playground.png"))
    prompt = driver.find_element(By.ID, "prompt")
    driver.execute_script("arguments[0].value = 'word '.repeat(5000)", prompt)  # longer than the model's positions
    driver.find_element(By.CSS_SELECTOR, "#playground-form button[type=submit]").click()
    shown(driver, "#error-playground", "shorten the conversation")  # the API's 400, next to the form

    # A second run (another seed, from the API) and the comparison of both
    client = server.client(keys["alpha"])
    f = client.files.create(file=good.open("rb"), purpose="fine-tune")
    second = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        seed=2,
        suffix="second",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    assert wait_for_job(client, second.id).status == "succeeded"
    driver.get(base + "/compare")
    for ident in (job_id, second.id):
        wait(driver, EC.element_to_be_clickable((By.CSS_SELECTOR, f"input[name=jobs][value='{ident}']"))).click()
    driver.find_element(By.CSS_SELECTOR, "#compare-form button[type=submit]").click()
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#compare-table table.compare")))
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#compare-chart canvas")))
    seed_row = driver.find_element(By.XPATH, "//table[contains(@class,'compare')]//tr[th='seed']")
    model_row = driver.find_element(By.XPATH, "//table[contains(@class,'compare')]//tr[th='model']")
    assert "differs" in seed_row.get_attribute("class") and model_row.is_displayed()
    driver.find_element(By.ID, "differences-only").click()
    assert not model_row.is_displayed() and seed_row.is_displayed()
    driver.save_screenshot(str(shots / "portal-compare.png"))

    # The jobs list and the models, light and dark, desktop and phone width
    driver.get(base + "/")
    shown(driver, "#job-rows", second.id)
    assert job_id in text_of(driver, "#job-rows")
    driver.save_screenshot(str(shots / "portal-jobs.png"))
    driver.get(base + "/models")
    shown(driver, "#model-rows", fine_tuned)
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    driver.save_screenshot(str(shots / "portal-models-dark.png"))
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    viewport(driver, 390, 844, mobile=True)
    driver.get(base + "/")
    shown(driver, "#job-rows", job_id)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 400  # no sideways page scroll
    driver.save_screenshot(str(shots / "portal-jobs-phone.png"))
    viewport(driver, 1280, 800)

    # Organization B: none of A's jobs, files or models, even by their ids
    driver.find_element(By.ID, "signout").click()
    wait(driver, EC.url_contains("/signin"))
    driver.find_element(By.ID, "api-key").send_keys(keys["beta"])
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    shown(driver, "#job-rows", "No jobs yet")
    driver.get(base + f"/jobs/{job_id}")
    shown(driver, "#notice", "No fine-tuning job found")
    driver.get(base + "/models")
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#model-rows tr[data-model=tiny]")))
    assert "ft:" not in text_of(driver, "#model-rows")
    driver.get(base + "/new")
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "#training_file option")))
    assert "support.jsonl" not in text_of(driver, "#training_file")
    # No page asked for anything outside this server
    logs = [e for e in driver.get_log("browser") if "127.0.0.1" not in e["message"] and e["level"] == "SEVERE"]
    assert not logs, logs


@pytest.mark.parametrize(
    "next_",
    ["/%5C127.0.0.1:19999/x", "/%09/127.0.0.1:19999/x", "//127.0.0.1:19999/x", "http://127.0.0.1:19999/x", "/models"],
)
def test_signing_in_never_leaves_this_server(browser, service, next_):
    """`next` after sign-in: a path here is followed; anything a browser resolves to another origin
    (`/\\host`, `/<tab>/host`, `//host`, a full URL) lands on the jobs page instead."""
    server, keys = service
    base = f"http://127.0.0.1:{server.port}"
    browser.get(base + "/signin")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{base}/signin?next={next_}")
    browser.find_element(By.ID, "api-key").send_keys(keys["alpha"])
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait(browser, lambda d: "/signin" not in d.current_url)
    assert browser.current_url == base + (next_ if next_ == "/models" else "/"), browser.current_url

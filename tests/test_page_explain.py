"""The page's "Why?" view, unsure wording, example gallery, class list, dark mode and its retry of a
busy answer (503 + Retry-After, for a classification and an explanation), in a real
headless Chromium before a real adapter and TorchServe; plus an axe-core accessibility audit run
inside the page (axe-core from npm, `make test` puts it in node_modules/).

Screenshots land in test-artifacts/ (page-why.png, page-unsure-phone.png, page-dark.png).
"""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from adapter.run import running_adapter
from test_hostile import PART_HEAD, multipart_head

# The page fixtures (a real adapter before the session's TorchServe, Chromium, a fresh page, the
# mountain of CIFAR-100 test image 42) and helpers, shared with the page's other tests.
from test_page import (ANSWER_TIMEOUT_MS, ARTIFACTS, DESKTOP, PHONE, REPO, adapter, browser,  # noqa: F401
                       expected_answer, hold, page, photo, wait_for_answer, wait_for_error, wait_until)

EXAMPLES = REPO / "frontend" / "examples"


def article(name: str) -> str:
    lower = name.lower()
    return ("an " if lower[0] in "aeiou" else "a ") + lower


def show_why(page) -> None:
    page.click("#why-button")
    page.wait_for_selector("#heatmap:not([hidden])", timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('heatmap').complete && "
                           "document.getElementById('heatmap').naturalWidth > 0")


def test_why_lays_the_heatmap_over_the_preview(adapter, page, photo):
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    assert page.is_hidden("#heatmap")
    with page.expect_response(lambda r: "/explain/" in r.url) as response:
        show_why(page)
    assert response.value.status == 200
    assert page.get_attribute("#why-button", "aria-pressed") == "true"
    # Same box as the preview: the overlay lines up with the picture.
    boxes = page.evaluate("['preview', 'heatmap'].map(id => { const r = document.getElementById(id)"
                          ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })")
    assert boxes[0] == boxes[1] and boxes[0][2] > 100
    # Coloured and see-through: opaque where it counted most, transparent where it did not.
    alphas = page.evaluate("""() => { const img = document.getElementById('heatmap');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data; const a = [];
        for (let i = 3; i < d.length; i += 4) a.push(d[i]); return [Math.min(...a), Math.max(...a)]; }""")
    assert alphas[0] < 30 and alphas[1] > 150
    answer = expected_answer(adapter, photo)
    assert answer["prediction"] in page.inner_text("#why-caption")
    assert answer["prediction"] in page.inner_text("#status")  # said to screen readers too
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-why.png"), full_page=True)
    # A second press hides it; a new picture starts without it.
    page.click("#why-button")
    assert page.is_hidden("#heatmap") and page.get_attribute("#why-button", "aria-pressed") == "false"


def test_a_failed_explanation_keeps_the_answer_and_the_focus(adapter, page, photo):
    """/explain/ fails (the adapter's reply replaced by a 500): the answer stays, the reason is said
    beside the button and to screen readers, the keyboard focus stays on the button, and a second
    press (the server well again) shows the heatmap."""
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    prediction = page.inner_text("#prediction")
    page.route("**/explain/", lambda route: route.fulfill(status=500, json={"error": "The model server failed (500)"}))
    page.focus("#why-button")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('why-caption').textContent.startsWith('Could not show why')",
                           timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#why-caption") == "Could not show why: The model server failed (500)"
    assert page.is_visible("#why-caption") and page.is_visible("#answer") and page.is_hidden("#error")
    assert page.inner_text("#prediction") == prediction
    assert page.evaluate("document.body.dataset.state") == "answered"
    assert "Could not show why" in page.inner_text("#status")
    assert page.evaluate("document.activeElement.id") == "why-button"
    assert page.get_attribute("#why-button", "aria-pressed") == "false"
    page.unroute("**/explain/")
    page.keyboard.press("Enter")
    page.wait_for_selector("#heatmap:not([hidden])", timeout=ANSWER_TIMEOUT_MS)
    assert prediction in page.inner_text("#why-caption")
    assert page.evaluate("document.activeElement.id") == "why-button"


@pytest.mark.parametrize("reply, words", [
    ({"body": "<html>proxy page</html>", "content_type": "text/html"}, "The server sent an answer this page cannot read."),
    ({"json": {"prediction": "Mountain"}}, "The server's answer has no explanation."),
    # An image of no size: the canvas cannot read it (the page's "Why?" stayed busy for that picture)
    ({"json": {"prediction": "Mountain", "heatmap": "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='0' height='0'/%3E"}},
     "The explanation could not be shown."),
], ids=["not-json", "no-heatmap", "heatmap-of-no-size"])
def test_an_unreadable_explanation_says_so_in_the_pages_words(adapter, page, photo, reply, words):
    """A 200 from /explain/ that is not JSON (a proxy's page), or JSON without a heatmap: the page said the
    browser's parser error ("Unexpected token '<' ...") or a failed image load; now its own words, as for
    /classify/, and the answer on show stays."""
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    prediction = page.inner_text("#prediction")
    page.route("**/explain/", lambda route: route.fulfill(status=200, **reply))
    page.click("#why-button")
    page.wait_for_function("() => document.getElementById('why-caption').textContent.startsWith('Could not show why')",
                           timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#why-caption") == f"Could not show why: {words}"
    assert page.inner_text("#prediction") == prediction and page.is_hidden("#heatmap")
    assert page.get_attribute("#why-button", "aria-disabled") is None  # free for another try


def test_why_from_an_updated_model_shows_the_answer_its_heatmap_belongs_to(adapter, page, photo):
    """The model changed between the answer and "Why?" (a rollout, a canary's share): the explanation
    answers otherwise. Its heatmap was shown under the old answer, the caption naming the old label;
    now the page shows the explanation's answer and version, and says the model was updated."""
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    old = page.inner_text("#prediction")
    new = "Cloud" if old != "Cloud" else "Rocket"
    # The real explanation of this photo (its heatmap), answered as an updated model would. (Playwright's
    # route.fetch() loses a multipart body's file, so it is asked here and the page is given it.)
    r = httpx.post(f"{adapter.base_url}/explain/", files={"image": (photo.name, photo.read_bytes(), "image/png")},
                   timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    answer.update(prediction=new, model_version="w3-rolled-out",
                  top5=[{**answer["top5"][0], "name": new, "probability": 0.9}, *answer["top5"][1:]])

    def other_answer(route):
        route.fulfill(json=answer)
    page.route("**/explain/", other_answer)
    show_why(page)
    caption = page.inner_text("#why-caption")
    assert page.inner_text("#prediction") == new and f"“{new}”" in caption and f"“{old}”" not in caption, caption
    assert "updated" in caption and "w3-rolled-out" in page.inner_text("#meta")
    assert page.inner_text("#top5 .guess-name >> nth=0") == new
    page.unroute("**/explain/")


def why_pressed_for(adapter, page, photo) -> list[str]:
    """``photo`` answered and its "Why?" pressed, its explanation on its way (held by the caller's route): the
    explanations that failed (were cancelled) from here on, as they do."""
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url) if r.url.endswith("/explain/") else None)
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    page.click("#why-button")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Looking for what')")
    return failed


def test_why_for_a_new_picture_works_while_the_old_ones_explanation_is_pending(adapter, page, photo):
    """"Why?" for picture A, its explanation held; picture B chosen and answered: "Why?" for B sent
    nothing until A's stale explanation came back. Now B's goes out and shows; A's, late, does not."""
    held = []
    page.route("**/explain/", lambda route: held.append(route) if not held else route.continue_())
    failed = why_pressed_for(adapter, page, photo)
    # Sighted users see it beside the button too (the status line is hidden once answered).
    assert page.is_visible("#why-caption") and page.inner_text("#why-caption").startswith("Looking for what")
    lion = EXAMPLES / "test-00015.png"
    lion_answer = expected_answer(adapter, lion)
    page.set_input_files("#file-input", str(lion))
    page.wait_for_function(f"() => document.getElementById('prediction').textContent === {lion_answer['prediction']!r}"
                           " && document.body.dataset.state === 'answered'", timeout=ANSWER_TIMEOUT_MS)
    assert page.get_attribute("#why-button", "aria-disabled") is None
    with page.expect_response(lambda r: "/explain/" in r.url, timeout=ANSWER_TIMEOUT_MS):
        show_why(page)
    assert lion_answer["prediction"] in page.inner_text("#why-caption")
    assert failed == [held[0].request.url]  # A's was cancelled when B was chosen: it holds no share at the adapter
    overlay = page.get_attribute("#heatmap", "src")
    held[0].continue_()  # A's explanation, late (the browser dropped it)
    page.wait_for_timeout(1000)
    assert page.get_attribute("#heatmap", "src") == overlay and lion_answer["prediction"] in page.inner_text("#why-caption")


def test_a_why_cancelled_by_a_newer_pick_says_no_failure_while_that_pick_loads(adapter, page, photo):
    """"Why?" for picture A, its explanation held; then an example clicked, its file held too: A's explanation
    was cancelled at once, but A stayed on show until the example arrived, and the page said "Could not show
    why: Cannot reach the classifier" (to screen readers too) for a server that was fine. Now nothing is said
    about the cancelled one, "Why?" for A is not sent again meanwhile, and the example is answered."""
    held_explain = hold(page, "**/explain/")
    failed = why_pressed_for(adapter, page, photo)
    example = page.locator(".example").nth(1)
    src = example.get_attribute("data-src")
    held_example = hold(page, f"**/{src}")
    example.click()
    wait_until(page, lambda: failed and held_example)  # A's explanation cancelled, the example's file asked for
    page.click("#why-button")  # A is still on show: a press now must not ask again
    page.wait_for_timeout(500)
    said = page.inner_text("#why-caption") + " " + page.evaluate("document.getElementById('status').textContent")
    assert "Could not show why" not in said and "Cannot reach" not in said, said
    assert len(held_explain) == 1, len(held_explain)
    held_example[0].continue_()
    answer = expected_answer(adapter, REPO / "frontend" / src)
    page.wait_for_function(f"() => document.getElementById('prediction').textContent === {answer['prediction']!r}"
                           " && document.body.dataset.state === 'answered'", timeout=ANSWER_TIMEOUT_MS)
    assert "Could not show why" not in page.inner_text("body")


def test_why_is_not_offered_when_the_settings_say_the_server_gives_no_explanations(adapter, page, photo):
    """An OIP model server without KServe's explainer answers every /explain/ with 501: GET /settings says
    so ("explain": false), and the page offers no "Why?"."""
    shipped = httpx.get(f"{adapter.base_url}/settings").json()
    assert shipped["explain"] is True  # TorchServe explains
    page.route("**/settings", lambda route: route.fulfill(json={**shipped, "explain": False}))
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    assert page.is_visible("#prediction") and page.is_hidden("#why-button")


def test_a_501_from_explain_stops_offering_why(adapter, page, photo):
    """The settings said nothing (an older adapter, or asked before the model server had said so), and
    "Why?" answered 501: the reason is said, and "Why?" is not offered again in this visit."""
    reason = "This model server gives no explanations."
    page.route("**/explain/", lambda route: route.fulfill(status=501, json={"error": reason}))
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    page.focus("#why-button")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('why-caption').textContent.startsWith('Could not show why')",
                           timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#why-caption") == f"Could not show why: {reason}"
    assert page.is_hidden("#why-button") and page.evaluate("document.activeElement.id") == "drop-zone"
    page.set_input_files("#file-input", str(EXAMPLES / "test-00015.png"))
    page.wait_for_function("() => document.body.dataset.state === 'answered' && "
                           "document.getElementById('preview').alt === 'Your image: test-00015.png'",
                           timeout=ANSWER_TIMEOUT_MS)
    assert page.is_hidden("#why-button")


def test_unsure_answer_says_so(adapter, page, photo):
    # CIFAR-100 test image 42, a mountain, is the example: "Ray, 18%" in large type before.
    answer = expected_answer(adapter, photo)
    assert answer["unsure"] is True
    page.set_viewport_size(PHONE)
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    first, second = (g["name"] for g in answer["top5"][:2])
    wording = f"Not sure — maybe {article(first)} or {article(second)}"
    assert page.inner_text("#unsure") == wording
    assert page.inner_text("#status").startswith(wording)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-unsure-phone.png"), full_page=True)


def test_sure_answer_has_no_unsure_wording(adapter, page):
    lion = EXAMPLES / "test-00015.png"
    answer = expected_answer(adapter, lion)
    assert answer["unsure"] is False
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(lion))
    wait_for_answer(page)
    assert page.is_hidden("#unsure")
    assert page.inner_text("#prediction") == answer["prediction"]


def test_clicking_an_example_classifies_it(adapter, page):
    page.goto(f"{adapter.base_url}/")
    examples = page.locator(".example")
    assert examples.count() >= 6
    src = examples.nth(2).get_attribute("data-src")
    answer = expected_answer(adapter, REPO / "frontend" / src)
    with page.expect_response(lambda r: "/classify/" in r.url):
        examples.nth(2).click()
    wait_for_answer(page)
    assert page.inner_text("#prediction") == answer["prediction"]
    assert page.get_attribute("#preview", "alt").startswith("Example:")
    # Keyboard: Tab reaches the examples, Enter picks one. The earlier answer is still shown, so
    # wait for the page to be busy with the new picture, then for the new answer itself.
    other = examples.nth(5).get_attribute("data-src")
    other_answer = expected_answer(adapter, REPO / "frontend" / other)
    examples.nth(5).focus()
    with page.expect_request(lambda r: "/classify/" in r.url):
        page.keyboard.press("Enter")
    page.wait_for_function("() => document.body.dataset.state === 'answered'", timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#prediction") == other_answer["prediction"]
    assert other_answer["prediction"] != answer["prediction"]  # so the check above tells them apart
    assert page.get_attribute("#preview", "alt") == examples.nth(5).locator("img").get_attribute("alt")


def test_an_example_is_busy_while_its_file_comes_and_says_why_it_could_not(adapter, page, photo):
    """An example clicked while an answer is shown: the page said nothing until the example's file came (a slow
    link: seconds, the old answer standing as if current), and a file that did not come was "could not be loaded"
    with no reason. Now busy at once, and the reason said (its status here)."""
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    example = page.locator(".example").nth(3)
    src = example.get_attribute("data-src")
    held = hold(page, f"**/{src}")
    example.click()
    wait_until(page, lambda: held)
    assert page.evaluate("document.body.dataset.state") == "busy"
    assert page.evaluate("document.getElementById('status').textContent") == "Looking at your image…"
    held[0].fulfill(status=404, body="gone")
    assert wait_for_error(page) == f"The picture {src} could not be loaded: the server answered 404."
    assert page.evaluate("document.body.dataset.state") == "error"


def test_page_lists_the_hundred_things_it_knows(adapter, page):
    page.goto(f"{adapter.base_url}/")
    page.click("#known-things summary")
    page.wait_for_function("() => document.querySelectorAll('#class-list li').length === 100")
    names = page.eval_on_selector_all("#class-list li", "els => els.map(e => e.textContent)")
    expected = [c["name"] for c in httpx.get(f"{adapter.base_url}/classes").json()]
    assert names == expected and "Aquarium fish" in names


def test_the_list_of_things_is_asked_again_after_it_failed_and_once_at_a_time(adapter, page):
    """/classes failed once (the server down a moment): the list said so and stayed so until the page was
    reloaded; and opening it twice while the first fetch ran sent two. Now one fetch at a time, and the next
    opening after a failure asks again."""
    asked = []
    page.route("**/classes", lambda route: (asked.append(route), route.fulfill(status=500, json={"error": "down"})))
    page.goto(f"{adapter.base_url}/")
    page.click("#known-things summary")
    page.wait_for_function("() => document.querySelector('#class-list li')?.textContent.includes('could not be loaded')")
    page.unroute("**/classes")
    held = []
    page.route("**/classes", lambda route: held.append(route))
    for _ in range(2):  # closed and opened again while its fetch is held
        page.click("#known-things summary")
        page.click("#known-things summary")
    page.wait_for_function("() => document.getElementById('known-things').open")
    wait_until(page, lambda: held)  # (a loaded machine: the held fetch reaches Python late)
    page.wait_for_timeout(300)  # a second fetch, if any, would be held by now too
    assert len(asked) == 1 and len(held) == 1, (len(asked), len(held))
    held[0].continue_()
    page.wait_for_function("() => document.querySelectorAll('#class-list li').length === 100")


@pytest.fixture
def dark_page(browser):
    context = browser.new_context(viewport=DESKTOP, color_scheme="dark")
    page = context.new_page()
    yield page
    context.close()


def luminance(css_rgb: str) -> float:
    r, g, b = (int(v) for v in css_rgb[css_rgb.index("(") + 1:css_rgb.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_dark_mode_follows_the_system(adapter, dark_page, photo):
    dark_page.goto(f"{adapter.base_url}/")
    dark_page.set_input_files("#file-input", str(photo))
    wait_for_answer(dark_page)
    show_why(dark_page)
    background = dark_page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    text = dark_page.evaluate("getComputedStyle(document.querySelector('h1')).color")
    assert luminance(background) < 0.15 and luminance(text) > 0.8
    ARTIFACTS.mkdir(exist_ok=True)
    dark_page.screenshot(path=str(ARTIFACTS / "page-dark.png"), full_page=True)


def test_bars_and_the_pressed_why_show_in_forced_colours(adapter, browser, photo):
    """Windows high contrast: every background becomes the system's one; the top-5 bars vanished (fill
    and track alike) and a pressed "Why?" looked like any button. Now they have colours of their own."""
    context = browser.new_context(viewport=DESKTOP, forced_colors="active")
    page = context.new_page()
    try:
        page.goto(f"{adapter.base_url}/")
        assert page.evaluate("matchMedia('(forced-colors: active)').matches")
        page.set_input_files("#file-input", str(photo))
        wait_for_answer(page)
        show_why(page)
        background = "(selector) => getComputedStyle(document.querySelector(selector)).backgroundColor"
        assert page.evaluate(background, ".bar-fill") != page.evaluate(background, ".bar")
        assert page.evaluate(background, "#why-button") != page.evaluate(background, "label[for='camera-input']")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "page-forced-colours.png"), full_page=True)
    finally:
        context.close()


def axe_violations(page, axe_script) -> list[dict]:
    """axe-core's serious and critical violations on the page as it stands."""
    page.add_script_tag(path=str(axe_script))
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["html"][:120] for n in v["nodes"][:3]]}
            for v in result["violations"] if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violation(adapter, browser, photo, axe_script, scheme):
    # bypass_csp: axe-core goes in as an inline script, which the page's own policy refuses.
    context = browser.new_context(viewport=DESKTOP, color_scheme=scheme, bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(f"{adapter.base_url}/")
        assert axe_violations(page, axe_script) == []  # the empty page
        page.set_input_files("#file-input", str(photo))
        wait_for_answer(page)
        show_why(page)
        page.click("#known-things summary")
        page.wait_for_function("() => document.querySelectorAll('#class-list li').length === 100")
        assert axe_violations(page, axe_script) == []  # answered (unsure), heatmap shown, class list open
    finally:
        context.close()


@pytest.fixture(scope="module")
def one_explanation_adapter(torchserve, tmp_path_factory):
    """An adapter where one address may hold a single explanation at a time (and a held body may pause
    for 30 s before the minimum upload rate applies)."""
    env = {**torchserve.adapter_env(), "MAX_CLIENT_EXPLANATIONS_IN_FLIGHT": "1", "MIN_RATE_GRACE_S": "30"}
    with running_adapter(env, tmp_path_factory.mktemp("one-explanation") / "adapter.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def one_upload_adapter(torchserve, tmp_path_factory):
    """An adapter where one address may hold a single upload at a time (held bodies may pause 30 s)."""
    env = {**torchserve.adapter_env(), "MAX_CLIENT_REQUESTS_IN_FLIGHT": "1", "MIN_RATE_GRACE_S": "30"}
    with running_adapter(env, tmp_path_factory.mktemp("one-upload") / "adapter.log") as proc:
        yield proc


class HeldUpload:
    """An upload of `photo` from 127.0.0.1 (the browser's address too) whose body stops half-way until
    finish(): it holds its address's share meanwhile."""

    def __init__(self, adapter, route: str, photo):
        port = int(adapter.base_url.rsplit(":", 1)[1])
        self.body = PART_HEAD + photo.read_bytes() + b"\r\n--xx--\r\n"
        head = multipart_head(port, len(self.body), route)[:-2] + b"Connection: close\r\n\r\n"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(head + self.body[:100])

    def finish(self) -> bytes:
        self.sock.sendall(self.body[100:])
        answer = b""
        while chunk := self.sock.recv(65536):
            answer += chunk
        self.sock.close()
        return answer


def statuses_of(page, route: str) -> list:
    statuses = []
    page.on("response", lambda r: statuses.append(r.status) if r.url.endswith(route) else None)
    return statuses


def wait_for_busy_notice(page) -> None:
    page.wait_for_function("() => document.getElementById('status').textContent.includes('busy; trying again in 1 s')",
                           timeout=ANSWER_TIMEOUT_MS)


def test_a_busy_explanation_is_asked_again_after_its_retry_after(one_explanation_adapter, page, photo):
    """The address's one explanation is held when "Why?" is pressed: the adapter answers 503 +
    Retry-After, the page says it will try again, and does once the held one is done."""
    adapter = one_explanation_adapter
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    wait_for_answer(page)
    statuses = statuses_of(page, "/explain/")
    held = HeldUpload(adapter, "/explain/", photo)
    page.wait_for_timeout(300)
    page.click("#why-button")
    wait_for_busy_notice(page)
    assert page.is_visible("#why-caption")  # seen, not only heard
    assert "busy; trying again in 1 s" in page.inner_text("#why-caption")
    assert "why-failed" not in page.get_attribute("#why-caption", "class")
    assert held.finish().startswith(b"HTTP/1.1 200")
    page.wait_for_selector("#heatmap:not([hidden])", timeout=ANSWER_TIMEOUT_MS)
    assert statuses[0] == 503 and statuses[-1] == 200 and len(statuses) <= 3, statuses
    assert page.is_hidden("#error")


def test_a_busy_classification_is_asked_again_after_its_retry_after(one_upload_adapter, page, photo):
    """The same for the picture itself: the address's one upload is held when the page sends its own."""
    adapter = one_upload_adapter
    page.goto(f"{adapter.base_url}/")
    statuses = statuses_of(page, "/classify/")
    held = HeldUpload(adapter, "/classify/", photo)
    page.wait_for_timeout(300)
    page.set_input_files("#file-input", str(photo))
    wait_for_busy_notice(page)
    assert held.finish().startswith(b"HTTP/1.1 200")
    wait_for_answer(page)
    assert statuses[0] == 503 and statuses[-1] == 200 and len(statuses) <= 3, statuses
    assert page.inner_text("#prediction") == expected_answer(adapter, photo)["prediction"]
    assert page.is_hidden("#error")


def test_a_server_that_stays_busy_is_asked_again_twice_at_most_5_s_apart(adapter, page, photo):
    """Every answer a 503 with Retry-After: 3600 (the adapter's replies replaced): the page says it
    waits 5 s (its cap), asks again twice (its cap), then says the classifier is not available."""
    page.route("**/classify/", lambda route: route.fulfill(status=503, headers={"Retry-After": "3600"},
                                                           json={"error": "busy"}))
    sent = []
    page.on("request", lambda r: sent.append(time.monotonic()) if r.url.endswith("/classify/") else None)
    page.goto(f"{adapter.base_url}/")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('busy; trying again in')",
                           timeout=ANSWER_TIMEOUT_MS)
    assert "trying again in 5 s" in page.inner_text("#status")
    assert "The classifier is not available right now." in wait_for_error(page)
    page.wait_for_timeout(1000)  # a third retry would go out at once: none does
    gaps = [later - earlier for earlier, later in zip(sent, sent[1:])]
    assert len(sent) == 3 and all(4.5 < gap < 15 for gap in gaps), gaps

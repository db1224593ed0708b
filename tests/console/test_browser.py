"""Training as a service, end to end, against one real ``raydb serve`` on 127.0.0.1 — a private
``ray start --head`` cluster (the Jobs API runs each training as a Ray job), the tiny model, the
built-in demo subject's photos, three training steps, prior preservation in model mode (the
operator's default here: no class image to generate) — first through the web console in a real
browser (headless Chromium, Selenium), then over plain HTTP with faults. One server for the three
tests: a head cluster and a Serve deployment are most of each test's time on 2 cores.

``test_the_main_loop_by_keyboard`` does the whole loop with the keyboard only (Tab, Shift+Tab,
Enter, Space and typing; the one exception is handing the photo files to the file input, which
opens the system's file dialog for a person): sign in, upload the photos (one too small, shown with
its problem and removed), train, watch the live view reach ``succeeded``, open the subject's pictures,
generate with the subject and the base model side by side, download the adapter — checking focus
order and labels on the way, that every image element decoded a PNG of the requested size, and that
the browser reported no CSP violation. A screenshot of each page (and one at 390 px wide) goes to
tests/helpers/browser.py's ARTIFACTS folder.

``test_tenant_strings_are_text_and_other_tenants_stay_out``: markup in a prompt, in a subject's
metadata and in the URL renders as text; another tenant's subject appears nowhere; every ``/ui``
response of the real server carries the CSP and no console ``/v1`` route answers without the key.

``test_upload_train_as_a_ray_job_then_generate_without_redeploy`` (no browser): a multipart upload
of the demo photos with overrides; the ingress replica is killed mid-training and its replacement
still answers; the training is polled to ``succeeded``; ``POST /v1/generate`` returns a PNG of the
new subject from the same, never redeployed, app; the Jobs API knows the training's job.

The browser tests skip where no Chromium is installed (and fail under ``CI=true``); the HTTP test
runs everywhere.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from PIL import Image

from raydb.cluster import free_ports
from raydb.data.demo_subject import demo_images
from raydb.serving.auth import hash_key
from tests.helpers.browser import (
    ARTIFACTS,
    NetworkLog,
    active,
    chromium,
    csp_violations,
    image_pixels,
    press,
    retype,
    screenshot,
    tab_to,
)
from tests.helpers.head_cluster import head_cluster, http_status, job_info, run_job
from tests.helpers.images import demo_photos

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY_ONE, KEY_TWO = "console-browser-key-one", "console-browser-key-two"
MARKUP = "<img src=x onerror=window.__xss=1>"
PNG = b"\x89PNG\r\n\x1a\n"
UNLABELLED = """
return Array.from(document.querySelectorAll('main input, main select, main textarea, main button'))
  .filter((el) => el.offsetParent !== null)
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
    && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 120));
"""


def _wait(what: str, fn, timeout: float = 60, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _heading(d, text: str, timeout: float = 60) -> None:
    """The page with heading ``text`` is shown and its heading has the focus (as after navigation)."""
    _wait(f"page {text!r}", lambda: d.execute_script(
        "const h = document.querySelector('main h2');"
        "return h && h.textContent === arguments[0] && document.activeElement === h;", text), timeout)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory):
    """``raydb serve`` on 127.0.0.1 over a private head cluster; another tenant's subject registered.
    Yields ``(url, workspace, cluster)``."""
    from raydb.registry import register_adapter
    from raydb.storage import Storage

    tmp = tmp_path_factory.mktemp("console")
    ws = tmp / "ws"
    theirs = tmp / "theirs"  # tenant t2's subject, with markup in its metadata
    theirs.mkdir()
    (theirs / "pytorch_lora_weights.safetensors").write_bytes(b"not served in these tests")
    (theirs / "adapter.json").write_text(json.dumps({
        "weights_sha256": "0" * 64, "base_model": {"pretrained": "tiny"},
        "subject": {"tenant": "t2", "instance_token": "sks", "instance_prompt": f"{MARKUP} sks",
                    "class_prompt": "a photo of a dog"}}))
    register_adapter(Storage(), str(ws), "t2", "secret-t2", str(theirs))
    port = free_ports(1)[0]
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "workspace": str(ws), "model": {"pretrained": "tiny", "cache_dir": str(tmp / "m")},
        "prior": {"enabled": True, "mode": "model"},  # prior preservation without a prior stage
        "train": {"resolution": 64, "max_steps": 3, "learning_rate": 1e-2, "checkpoint_every": 1000,
                  "num_sample_images": 1, "sample_steps": 2},
        "cluster": {"num_workers": 1, "use_gpu": False},
        "serve": {"api_keys": {hash_key(KEY_ONE): "t1", hash_key(KEY_TWO): "t2"}, "port": port,
                  "max_size": 128, "max_inference_steps": 4, "default_inference_steps": 2,
                  "num_cpus_per_replica": 1},
        "service": {"poll_interval_s": 1.0},
    }))
    started = time.monotonic()
    with head_cluster(prefix="rcb-") as cluster:
        log = open(tmp / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "raydb.cli", "serve", "--config", str(config)],
                                env=cluster.env | {"RAY_ADDRESS": cluster.gcs}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while http_status(f"{url}/healthz", None) != 200:
                assert proc.poll() is None, (tmp / "serve.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "raydb serve did not come up"
                time.sleep(1)
            print(f"\nconsole server up in {time.monotonic() - started:.0f} s; screenshots -> {ARTIFACTS}")
            yield url, ws, cluster
        finally:
            # no graceful Serve shutdown (it drains replicas: tens of seconds of the suite's time):
            # the driver goes at once, and stopping the private cluster takes Serve's actors with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            log.close()


def _shows(d, net: NetworkLog, img, png: bytes, size: tuple[int, int]) -> None:
    """The ``<img>`` loaded exactly ``png`` — the bytes the API sent — a PNG of ``size``, and decoded
    it to the same pixels as PIL does."""
    import numpy as np

    assert png.startswith(PNG), png[:16]
    assert net.image(img) == png
    sent = Image.open(io.BytesIO(png))
    assert sent.format == "PNG" and sent.size == size, (sent.format, sent.size)
    shown = image_pixels(d, img)
    assert (shown.get("width"), shown.get("height")) == size, shown.get("error")
    expected = np.asarray(sent.convert("RGBA"), dtype=np.int16).ravel()
    got = np.frombuffer(shown["rgba"], dtype=np.uint8).astype(np.int16)
    assert np.abs(got - expected).max() <= 2  # (a browser may round a colour-managed decode)


def _sign_in(d, url: str, key: str) -> None:
    d.get(f"{url}/ui")
    _wait("the key field to have the focus", lambda: active(d)["id"] == "api-key")
    assert active(d)["name"] == "API key" and d.current_url == f"{url}/ui/"
    press(d, key, "\ue007")  # Enter
    _heading(d, "Subjects")


def _photos(folder: Path) -> list[Path]:
    """The built-in demo subject's photos as JPEG files, and one far too small."""
    from PIL import Image

    folder.mkdir()
    paths = []
    for i, img in enumerate(demo_images(4, 128)):
        paths.append(folder / f"star{i}.jpg")
        img.save(paths[-1], format="JPEG")
    paths.append(folder / "tiny.png")
    Image.new("RGB", (20, 20), "red").save(paths[-1])
    return paths


def test_the_main_loop_by_keyboard(console_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, ws, _ = console_server
    started = time.monotonic()
    photos = _photos(tmp_path / "photos")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(downloads=downloads) as d:
        net = NetworkLog(d)
        d.get(f"{url}/ui")
        _wait("sign-in", lambda: active(d)["id"] == "api-key")
        screenshot(d, "1-sign-in")
        press(d, KEY_ONE, Keys.ENTER)
        _heading(d, "Subjects")
        _wait("the empty list", lambda: "No subjects yet" in d.find_element(By.ID, "main").text)
        assert [s["name"] for s in tab_to(d, lambda a: a["tag"] == "a")] == ["Train a new one"]
        press(d, Keys.ENTER)

        # -- train: fields in reading order, each labelled ---------------------------------------
        _heading(d, "Train a subject")
        order = []
        for text in ("star", "a photo of sks toy", "a photo of a toy"):
            order.append(tab_to(d, lambda a: a["tag"] in ("input", "textarea"))[-1])
            press(d, text)
        order.append(tab_to(d, lambda a: a["type"] == "file")[-1])
        d.find_element(By.ID, "train-photos").send_keys("\n".join(str(p) for p in photos))  # the file dialog
        _wait("the photo checks", lambda: len(d.find_elements(By.CSS_SELECTOR, "#train-photo-list li")) == 5
              and not d.find_elements(By.CSS_SELECTOR, "#train-photo-list li[data-status=checking]"), 60)
        rows = {li.find_element(By.CLASS_NAME, "photo-name").text: (li.get_attribute("data-status"),
                li.find_element(By.CLASS_NAME, "photo-msg").text)
                for li in d.find_elements(By.CSS_SELECTOR, "#train-photo-list li")}
        assert rows["star0.jpg"] == ("ok", "✓ 128×128")
        assert rows["tiny.png"][0] == "error" and "too small: 20x20" in rows["tiny.png"][1], rows
        assert d.execute_script(UNLABELLED) == []
        screenshot(d, "2-train-photos")
        tab_to(d, lambda a: a["name"] == "Remove tiny.png")
        press(d, Keys.ENTER)
        assert len(d.find_elements(By.CSS_SELECTOR, "#train-photo-list li")) == 4
        assert active(d)["id"] == "train-photos"  # focus back on the file input, not lost
        order += tab_to(d, lambda a: a["id"] == "train-submit")
        ids = [a["id"] or a["name"] for a in order]
        assert ids == ["train-subject", "train-instance-prompt", "train-class-prompt", "train-photos",
                       *[f"Remove star{i}.jpg" for i in range(4)],
                       "train-train-max-steps", "train-train-learning-rate", "train-train-prior-loss-weight",
                       "train-prior-mode", "train-lora-rank", "train-train-resolution", "train-tune",
                       "train-submit"], ids
        assert [a["name"] for a in order[:4]] == ["Subject id", "Instance prompt", "Class prompt", "Photos"]
        press(d, Keys.ENTER)

        # -- the live view until the training succeeds ---------------------------------------------
        _wait("the live view", lambda: "#/train/" in d.current_url
              and d.find_element(By.ID, "training-live").is_displayed(), 60)
        _heading(d, "Train a subject")
        seen, shot = set(), False
        deadline = time.monotonic() + 600
        while (status := d.find_element(By.ID, "training-live").get_attribute("data-status")) not in (
                "succeeded", "failed", "cancelled"):
            seen.add(status)
            if status == "running" and not shot and "Loss" in d.find_element(By.ID, "training-facts").text:
                screenshot(d, "3-train-running")
                shot = True
            assert time.monotonic() < deadline, f"training still {status}"
            time.sleep(0.5)
        facts = d.find_element(By.ID, "training-facts").text
        assert status == "succeeded", facts
        assert "3 / 3" in facts and re.search(r"Loss\s+[0-9.]+", facts), facts
        assert d.find_element(By.ID, "training-progress").get_attribute("value") == "3"
        print(f"training seen as {sorted(s for s in seen if s)} -> succeeded "
              f"({time.monotonic() - started:.0f} s into the test)")
        screenshot(d, "3-train-succeeded")
        tab_to(d, lambda a: a["name"] == "See star v0001")
        press(d, Keys.ENTER)

        # -- the subject: settings, metrics and the run's pictures ---------------------------------
        _heading(d, "star")
        registry = ws / "tenants" / "t1" / "subjects" / "star" / "v0001"
        for name in ("samples.png", "loss_curve.png"):
            img = _wait(name, lambda n=name: d.find_elements(By.CSS_SELECTOR, f"img[data-file='{n}']"))[0]
            _wait(f"{name} loaded", lambda i=img: d.execute_script(
                "return arguments[0].src.startsWith('blob:') && arguments[0].complete", i))
            png = (registry / name).read_bytes()
            # samples.png, one sample image: the base model above the adapter, 64 px each
            _shows(d, net, img, png, (64, 128) if name == "samples.png" else Image.open(io.BytesIO(png)).size)
        metrics = d.find_element(By.ID, "subject-metrics-list").text
        assert "Steps\n3" in metrics and "Final loss" in metrics, metrics
        assert d.execute_script(UNLABELLED) == []
        screenshot(d, "4-subject")
        assert [a["name"] for a in tab_to(d, lambda a: a["name"] == "Generate with it")] == \
            ["All subjects", "Version", "Generate with it"]
        press(d, Keys.ENTER)

        # -- generate: the subject beside the base model, same prompt and seed ----------------------
        _heading(d, "Generate")
        _wait("the subject boxes", lambda: d.find_elements(By.CSS_SELECTOR, "#gen-models [data-model=star]"))
        typed = {"gen-prompt": "a toy on a beach", "gen-seed": "7", "gen-steps": "2", "gen-width": "64",
                 "gen-height": "64"}
        stops = tab_to(d, lambda a: a["id"] == "gen-submit")
        assert [a["id"] for a in stops] == [
            "gen-prompt", "gen-negative", "gen-model-base", "gen-model-0", "gen-seed", "gen-steps",
            "gen-width", "gen-height", "gen-guidance", "gen-count", "gen-submit"]
        assert d.execute_script(UNLABELLED) == []
        tab_to(d, lambda a: a["id"] == "gen-prompt", backwards=True)
        for stop in stops[:-1]:
            if stop["id"] in typed:
                retype(d, typed[stop["id"]])
            if stop["id"] == "gen-model-base":
                press(d, Keys.SPACE)  # tick the base model; the subject is ticked already
            press(d, Keys.TAB)
        assert active(d)["id"] == "gen-submit"
        assert d.find_element(By.ID, "gen-model-base").is_selected()
        assert d.find_element(By.ID, "gen-model-0").is_selected()
        press(d, Keys.ENTER)
        run = _wait("the results", lambda: [r for r in d.find_elements(By.CSS_SELECTOR, "article.run")
                                            if not r.get_attribute("aria-busy")], 180)[0]
        assert run.get_attribute("data-seed") == "7"
        figures = run.find_elements(By.CSS_SELECTOR, "figure.model")
        assert [f.get_attribute("data-model") for f in figures] == ["base", "star"]
        assert [f.get_attribute("data-state") for f in figures] == ["done", "done"], run.text
        answers = {json.loads(body)["subject_id"]: json.loads(body)
                   for _, body in net.bodies(r"/v1/generate$")}
        assert set(answers) == {None, "star"} and {a["seed"] for a in answers.values()} == {7}
        for figure, subject in zip(figures, (None, "star"), strict=True):
            [img] = figure.find_elements(By.TAG_NAME, "img")
            _shows(d, net, img, base64.b64decode(answers[subject]["images"][0]), (64, 64))
        captions = [f.find_element(By.TAG_NAME, "figcaption").text for f in figures]
        assert captions[0].startswith("Base model — a toy on a beach"), captions
        assert captions[1].startswith("star v0001 — a sks toy on a beach"), captions  # the token added
        screenshot(d, "5-generate")

        # -- export: the diffusers file, byte for byte the registry's -------------------------------
        tab_to(d, lambda a: a["id"] == "nav-export", backwards=True)
        press(d, Keys.ENTER)
        _heading(d, "Export")
        _wait("the download button", lambda: d.find_elements(By.ID, "export-diffusers"))
        assert d.find_element(By.ID, "export-no-kohya").is_displayed()
        assert [a["id"] for a in tab_to(d, lambda a: a["id"] == "export-diffusers")] == \
            ["export-subject", "export-version", "export-diffusers"]
        press(d, Keys.ENTER)
        saved = downloads / "star-v0001-pytorch_lora_weights.safetensors"
        _wait("the download", lambda: saved.exists() and not list(downloads.glob("*.crdownload")), 60)
        data = saved.read_bytes()
        version = ws / "tenants" / "t1" / "subjects" / "star" / "v0001"
        assert data == (version / "pytorch_lora_weights.safetensors").read_bytes()
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        assert any(".lora" in k for k in header), list(header)[:5]
        screenshot(d, "6-export")

        # -- a phone: 390 px wide, nothing wider than the screen ----------------------------------
        d.set_window_size(390, 844)
        d.get(f"{url}/ui/#/subjects/star")
        _heading(d, "star")
        _wait("the pictures", lambda: d.execute_script(
            "return Array.from(document.images).filter((i) => i.complete && i.naturalWidth).length") == 2)
        assert d.execute_script("return document.documentElement.scrollWidth") <= 390
        screenshot(d, "7-subject-390px")
        d.get(f"{url}/ui/#/train")
        _heading(d, "Train a subject")
        assert d.execute_script("return document.documentElement.scrollWidth") <= 390
        screenshot(d, "7-train-390px")
        assert csp_violations(d) == []
    print(f"browser main loop: {time.monotonic() - started:.0f} s")


def test_tenant_strings_are_text_and_other_tenants_stay_out(console_server):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from raydb.serving.console import CONTENT_SECURITY_POLICY, router

    url, _, _ = console_server
    no_markup = "return document.querySelectorAll('img[src=\"x\"], img[src$=\"/x\"]').length === 0 " \
                "&& window.__xss === undefined"
    with chromium() as d:
        _sign_in(d, url, KEY_ONE)
        _wait("the list", lambda: "Loading" not in d.find_element(By.ID, "main").text)
        assert "secret-t2" not in d.find_element(By.ID, "main").text

        # markup in a prompt: shown as typed, in the run's title and in the caption
        d.get(f"{url}/ui/#/generate")
        _heading(d, "Generate")
        _wait("the models", lambda: "Loading your subjects" not in d.find_element(By.ID, "gen-models").text)
        boxes = d.find_elements(By.CSS_SELECTOR, "#gen-models [data-model]")
        assert "secret-t2" not in [b.get_attribute("data-model") for b in boxes]
        assert "secret-t2" not in d.find_element(By.ID, "gen-models").text
        for box in d.find_elements(By.CSS_SELECTOR, "#gen-models input:checked"):
            box.send_keys(Keys.SPACE)  # untick the subjects: the base model alone
        d.find_element(By.ID, "gen-model-base").send_keys(Keys.SPACE)
        for field, text in (("gen-prompt", MARKUP), ("gen-width", "64"), ("gen-height", "64"),
                            ("gen-steps", "2")):
            d.find_element(By.ID, field).send_keys(Keys.CONTROL, "a", Keys.CONTROL, text)
        d.find_element(By.ID, "gen-steps").send_keys(Keys.ENTER)
        run = _wait("the result", lambda: [r for r in d.find_elements(By.CSS_SELECTOR, "article.run")
                                           if not r.get_attribute("aria-busy")], 120)[0]
        assert run.find_element(By.CSS_SELECTOR, ".prompt-used").text == MARKUP
        assert MARKUP in run.find_element(By.TAG_NAME, "h4").text
        assert d.execute_script(no_markup)
        screenshot(d, "8-markup-prompt-as-text")

        # another tenant's subject, by URL: not found, exactly like a missing one
        for sid in ("secret-t2", "no-such-subject"):
            d.get(f"{url}/ui/#/subjects/{sid}")
            _heading(d, sid)
            _wait("the answer",
                  lambda s=sid: f"No subject {s} in your tenant." in d.find_element(By.ID, "main").text)
        d.get(f"{url}/ui/#/export/secret-t2")
        _heading(d, "Export")
        _wait("the subjects", lambda: "Loading" not in d.find_element(By.ID, "main").text)
        assert "secret-t2" not in d.find_element(By.ID, "main").text
        # markup in the URL: the unknown id comes back in the heading and the message, as text
        d.get(f"{url}/ui/#/subjects/{quote(MARKUP)}")
        _wait("the answer", lambda: "in your tenant" in d.find_element(By.ID, "main").text)
        assert d.find_element(By.CSS_SELECTOR, "main h2").text == MARKUP
        assert d.execute_script(no_markup)

        # the other tenant sees its own subject (markup in its prompt, as text), and not ours
        d.find_element(By.ID, "sign-out").send_keys(Keys.ENTER)
        _wait("signed out", lambda: active(d)["id"] == "api-key")
        assert d.execute_script("return sessionStorage.length") == 0
        press(d, KEY_TWO, Keys.ENTER)
        _heading(d, "Subjects")
        card = _wait("their subject",
                     lambda: d.find_elements(By.CSS_SELECTOR, "[data-subject='secret-t2']"))[0]
        assert f"Instance prompt\n{MARKUP} sks" in card.text
        cards = d.find_elements(By.CSS_SELECTOR, ".card")
        assert "star" not in [c.get_attribute("data-subject") for c in cards]
        assert d.execute_script(no_markup)
        screenshot(d, "9-other-tenant")
        assert csp_violations(d) == []

    # the real server: the CSP on every /ui answer, 401 for every console /v1 route without a key
    with httpx.Client(base_url=url, timeout=30, follow_redirects=False) as client:
        for method, path in [("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/app.js"), ("GET", "/ui/style.css"),
                             ("GET", "/ui/nope.js"), ("POST", "/ui/")]:  # the last: FastAPI's own 405
            resp = client.request(method, path)
            assert resp.headers.get("content-security-policy") == CONTENT_SECURITY_POLICY, path
        base = client.post("/v1/generate", json={"prompt": "a toy"})  # the base model needs the key too
        assert base.status_code == 401, base.text
        fill = {"subject_id": "secret-t2", "version": "v0001", "name": "pytorch_lora_weights.safetensors"}
        for route in router.routes:
            if route.path.startswith("/v1/"):
                path = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], route.path)
                for method in route.methods:
                    resp = client.request(method, path)
                    assert resp.status_code == 401 and "secret" not in resp.text, (method, path, resp.text)
        theirs = "/v1/subjects/secret-t2/versions/v0001/files/pytorch_lora_weights.safetensors"
        weights = client.get(theirs, headers={"Authorization": f"Bearer {KEY_ONE}"})
        assert weights.status_code == 404  # t1 may not download t2's adapter
        own = client.get(theirs, headers={"Authorization": f"Bearer {KEY_TWO}"})
        assert own.content == b"not served in these tests"


KILL_INGRESS = (
    "import ray; ray.init(); "
    "names = [a for a in ray.util.list_named_actors(all_namespaces=True) if 'RaydbIngress' in a['name']]; "
    "assert len(names) == 1, names; "
    "ray.kill(ray.get_actor(names[0]['name'], namespace=names[0]['namespace']), no_restart=False)")


def _get(client, url: str, deadline: float):
    """GET that rides out the moments when the ingress replica is being replaced."""
    import httpx

    while True:
        try:
            resp = client.get(url, headers={"Authorization": f"Bearer {KEY_ONE}"})
            if resp.status_code < 500:
                return resp
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"GET {url} did not answer"
        time.sleep(1)


def test_upload_train_as_a_ray_job_then_generate_without_redeploy(console_server):
    """Over plain HTTP: the upload asks for ``prior.mode: model`` and ``lora.rank: 2`` (allowed
    overrides), so it trains with prior preservation, no prior stage and the tenant's rank."""
    import httpx

    url, ws, cluster = console_server
    deadline = time.monotonic() + 600  # generous: the 2 shared cores are often overloaded
    client = httpx.Client(base_url=url, timeout=120)
    files = [("photos", (name, data, "image/jpeg")) for name, data in demo_photos(4, 128, "JPEG")]
    resp = client.post("/v1/trainings", headers={"Authorization": f"Bearer {KEY_ONE}"}, files=files,
                       data={"subject_id": "toy", "instance_prompt": "a photo of sks toy",
                             "class_prompt": "a photo of a toy",
                             "overrides": json.dumps({"prior.mode": "model", "lora.rank": 2})})
    assert resp.status_code == 202, resp.text
    tid = resp.json()["id"]
    assert resp.json()["status"] in ("queued", "running")  # queued while the job agent starts

    # Serve replaces the replica; the new one answers from the workspace
    run_job(cluster, [sys.executable, "-c", KILL_INGRESS], "kill-ingress", deadline)
    while True:
        view = _get(client, f"/v1/trainings/{tid}", deadline).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"training still {view}"
        time.sleep(1)
    assert view["status"] == "succeeded", view
    assert view["subject"] == {"subject_id": "toy", "version": "v0001"}
    assert (view["step"], view["max_steps"]) == (3, 3) and view["loss"] > 0
    png = client.post("/v1/generate", headers={"Authorization": f"Bearer {KEY_ONE}", "Accept": "image/png"},
                      json={"subject_id": "toy", "prompt": "a toy on a beach", "seed": 1,
                            "num_inference_steps": 2, "width": 64, "height": 64})
    assert png.status_code == 200, png.text
    assert png.headers["X-Raydb-Adapter-Version"] == "v0001"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    client.close()
    home = ws / "tenants" / "t1"  # subject ids are per tenant
    meta = json.loads((home / "subjects" / "toy" / "v0001" / "adapter.json").read_text())
    assert meta["training"]["prior_mode"] == "model" and meta["training"]["prior_enabled"]
    assert meta["lora"]["rank"] == 2
    assert not (ws / "priors").exists()  # no class image was generated
    manifests = home / "pipeline" / "toy"
    assert not (manifests / "prior.json").exists()  # the stage was off: no manifest
    assert json.loads((manifests / "encode.json").read_text())["outputs"]["num_class"] == 0

    # the Jobs API knows the job (its driver may take a moment to exit after the result is written)
    while (job := job_info(cluster.dashboard, view["job_id"], cluster.token)).get("status") == "RUNNING":
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "SUCCEEDED" and "raydb.trainings.job" in job["entrypoint"]

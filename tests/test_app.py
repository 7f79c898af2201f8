"""The web UI (``python -m contentv_jax.app``) in a real headless Chromium, and the pipeline's offload modes.

One server (a subprocess, on a port it picks, with the tiny demo model it builds into a temporary cache)
serves every browser step; each wait ends on the page's own status text or elements, bounded by a generous
failure timeout. The browser is Debian's ``chromium`` driven by Playwright (no browser download).
"""

from __future__ import annotations

import gc
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import av
import jax
import numpy as np
import pytest
from flax import nnx

from contentv_jax import pipeline as pl
from contentv_jax.app import READY_PREFIX

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_TIMEOUT_MS = 480_000  # a job on a loaded 2-core box, first compile included
PROMPT = "a red circle moving right"
REPO = Path(__file__).resolve().parents[1]


def _read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app serving the demo model (built into a fresh cache): yields (url, outputs dir, model dir)."""
    root = tmp_path_factory.mktemp("app")
    env = dict(os.environ, CONTENTV_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "contentv_jax.app", "--port", "0", "--outputs", str(root / "outputs")],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def pump():
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    try:
        while url is None:
            line = lines.get(timeout=600)  # the demo model is built first; queue.Empty fails the test
            if line is None:
                pytest.fail("the app exited before it was ready:\n" + "".join(log[-40:]))
            if line.startswith(READY_PREFIX):
                url = line[len(READY_PREFIX):].strip()
        yield url, root / "outputs", root / "cache" / "tiny-demo"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1100})
        pg = context.new_page()
        pg.set_default_timeout(120_000)
        pg.goto(server[0])
        yield pg
        context.close()
        browser.close()


def _set(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")  # Gradio reads the value on change / blur


def _generate(page, job: int) -> str:
    """Click Generate and wait until the page reports job ``job`` done or failed; returns the status text."""
    from playwright.sync_api import expect

    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_contain_text(f"job {job}", timeout=JOB_TIMEOUT_MS)
    return status.inner_text()


def _download_mp4(page, dst: Path) -> Path:
    """Fetch the first mp4 of the page's download list through its link (the bytes the browser downloads)."""
    from urllib.parse import urljoin

    link = page.locator('#files a[href*=".mp4"]').first
    try:
        link.wait_for(state="attached", timeout=60_000)
    except Exception:
        pytest.fail("no mp4 link in the download list:\n" + page.locator("#files").inner_html()[:3000])
    response = page.request.get(urljoin(page.url, link.get_attribute("href")))
    assert response.ok, response.status
    dst.write_bytes(response.body())
    return dst


def test_app_generates_in_a_browser(server, page, tmp_path):
    from playwright.sync_api import expect

    url, outputs, model_dir = server
    _set(page, "prompt", PROMPT)
    _set(page, "frames", 9)
    _set(page, "height", 64)
    _set(page, "width", 64)
    _set(page, "steps", 4)

    # 1. first job, random seed: the video element appears, the mp4 downloads, the sidecar holds everything.
    text = _generate(page, 1)
    assert "done" in text, text
    expect(page.locator("#video-0 video")).to_be_visible()
    mp4 = _download_mp4(page, tmp_path / "first.mp4")
    first = _read_frames(mp4)
    assert first.shape == (9, 64, 64, 3)
    (saved,) = sorted(outputs.glob("*.mp4"))
    assert saved.read_bytes() == mp4.read_bytes()
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    seed = sidecar["seed"]
    assert f"seed {seed}" in text
    settings = sidecar["settings"]
    assert (settings["prompt"], settings["num_frames"], settings["height"], settings["width"], settings["steps"]) == (
        PROMPT, 9, 64, 64, 4)
    assert settings["seed"] == seed and settings["negative_prompt"] == pl.DEFAULT_NEGATIVE_PROMPT
    assert {"text_encoding", "denoising", "decoding"} <= set(sidecar["timings_s"])
    assert sidecar["compilations"] > 0  # the first job compiles
    shot = tmp_path / "app-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CONTENTV_APP_SCREENSHOT"):  # refresh docs/app-screenshot.png on request
        shutil.copy(shot, os.environ["CONTENTV_APP_SCREENSHOT"])

    # 2. width 100: a message in the page, no stack trace; the server goes on serving.
    _set(page, "width", 100)
    text = _generate(page, 2)
    assert "Error" in text and "width must be a positive multiple of 16" in text and "Traceback" not in text, text

    # 3. the next job, same shapes and the first job's seed: served, no new compilation, same frames.
    _set(page, "width", 64)
    _set(page, "seed", seed)
    text = _generate(page, 3)
    assert "done" in text, text
    expect(page.locator("#compiles")).to_contain_text("compilations this job: 0")
    expect(page.locator("#compiles")).to_contain_text("pipeline reused")
    again = _read_frames(_download_mp4(page, tmp_path / "again.mp4"))
    np.testing.assert_array_equal(again, first)

    # ... and the CLI gives the same video for that seed and these settings.
    cli_out = tmp_path / "cli.mp4"
    subprocess.run(
        [sys.executable, "-m", "contentv_jax.sample", "--model", str(model_dir), "--prompt", PROMPT,
         "--num-frames", "9", "--height", "64", "--width", "64", "--steps", "4", "--seed", str(seed),
         "--out", str(cli_out), "--no-progress"],
        check=True, timeout=600, cwd=tmp_path,
    )
    np.testing.assert_array_equal(_read_frames(cli_out), first)


def test_sequential_offload_streams_one_block(server):
    """During denoising with sequential offload, the transformer parameters in device memory are at most one
    block's plus the non-block ones (every live device array of a parameter's shape counted), the stacked
    blocks stay in host memory, and the frames equal the run without offload within 1e-5."""
    model_dir = server[2]
    kw = dict(num_frames=9, height=64, width=64, num_inference_steps=3, seed=3)
    pipe = pl.ContentVPipeline.from_pretrained(model_dir, dtype="float32", offload="sequential")
    blocks = nnx.state(pipe.transformer.transformer_blocks)
    num_layers = jax.tree.leaves(blocks)[0].shape[0]
    block_bytes = sum(a.nbytes for a in jax.tree.leaves(blocks)) // num_layers
    non_block_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(pipe.transformer))) - block_bytes * num_layers
    assert num_layers >= 2 and block_bytes > 0
    resident: list[int] = []
    host_kinds: set = set()

    # Every parameter's values by (shape, dtype): a live device array is counted as a parameter when it equals
    # one of them (so an activation that happens to have a parameter's shape is not counted).
    known: dict = {}
    for a in jax.tree.leaves(blocks):
        host = np.asarray(a)
        known.setdefault((tuple(a.shape), a.dtype), []).append(host)
        for layer in host:
            known.setdefault((tuple(layer.shape), a.dtype), []).append(layer)
    from contentv_jax.models.transformer import NonBlockView

    for a in jax.tree.leaves(nnx.state(NonBlockView(pipe.transformer))):
        known.setdefault((tuple(a.shape), a.dtype), []).append(np.asarray(a))

    # Arrays alive before the run are not the run's (this process ran other tests before: e.g. a zero bias of
    # another model equals this model's zero bias); holding them keeps their ids from being reused.
    gc.collect()
    before = jax.live_arrays()
    before_ids = {id(a) for a in before}

    def on_block(step, layer):
        n = 0
        for a in jax.live_arrays():
            if a.sharding.memory_kind != "device" or id(a) in before_ids:
                continue
            candidates = known.get((tuple(a.shape), a.dtype), ())
            if candidates and any(np.array_equal(np.asarray(a), c) for c in candidates):
                n += a.nbytes
        resident.append(n)
        host_kinds.update(a.sharding.memory_kind for a in jax.tree.leaves(nnx.state(transformer)))

    transformer = pipe.transformer
    pipe.on_block = on_block
    streamed = pipe(PROMPT, **kw).frames
    assert len(resident) == 3 * num_layers
    assert max(resident) <= block_bytes + non_block_bytes, (resident, block_bytes, non_block_bytes)
    assert max(resident) >= block_bytes  # the counting sees the streamed block itself
    assert host_kinds == {"pinned_host"}  # every parameter of the model object stays in host memory
    del pipe, before
    gc.collect()

    full = pl.ContentVPipeline.from_pretrained(model_dir, dtype="float32")
    # without offload all blocks are resident, which the bound above excludes
    assert block_bytes * num_layers + non_block_bytes > block_bytes + non_block_bytes
    np.testing.assert_allclose(streamed, full(PROMPT, **kw).frames, atol=1e-5, rtol=0)
    model = pl.ContentVPipeline.from_pretrained(model_dir, dtype="float32", offload="model")
    assert set(pl.memory_kind_bytes(nnx.state(model.transformer))) == {"pinned_host"}
    np.testing.assert_allclose(model(PROMPT, **kw).frames, streamed, atol=1e-5, rtol=0)


def test_app_bad_arguments_exit_2(tmp_path, capsys):
    """Bad command-line input: one line on stderr and exit status 2, before any model is built."""
    from contentv_jax import app

    assert app.main(["--port", "70000"]) == 2
    assert "--port must be in 0..65535, got 70000" in capsys.readouterr().err
    assert app.main(["--model", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert app.main(["mesh.bogus=2"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_settings_check_names_the_input():
    """The page's inputs are checked with one-line messages naming the input; frame counts are rounded
    to 4k+1 with a notice (as the official pipeline rounds them)."""
    from contentv_jax.app import Settings

    s = Settings(model="m", prompt="p", num_frames=10, height=64, width=64)
    assert s.check() == ["frames: 10 is not 4k+1, rounded down to 9 (as the official pipeline)"]
    assert s.num_frames == 9
    for kw, msg in (
        (dict(width=100), "width must be a positive multiple of 16"),
        (dict(steps=0), "steps: expected at least 1"),
        (dict(prompt=" "), "prompt:"),
        (dict(videos_per_prompt=9), "videos per prompt: expected 1..4"),
        (dict(offload="disk"), "offload: expected one of"),
        (dict(seed=-1), "seed: expected a whole number >= 0"),
    ):
        with pytest.raises(ValueError, match=msg):
            Settings(**{"model": "m", "prompt": "p", "height": 64, "width": 64, **kw}).check()

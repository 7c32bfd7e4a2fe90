"""The widgets in a real JupyterLab 4, in a real Chromium, driven with the mouse and keyboard.

One server and one notebook for the module: the tests run in order (draw, reload, generate, scrub, preview,
reload, explore, scale and self-attention, errors, stop, residuals, fork, laptop screen, video). The kernel writes what it holds (the pad's image and strokes, the finished
run) under ``state/`` in the server's folder, so the assertions read the kernel's side, not the
page's. Screenshots go to ``test-output/browser/`` (not committed).
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jupyterlab_browser import JupyterLab, chromium_path, launch, run_cell, wait_for, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

SHOTS = Path(os.environ.get("LATENT_LAB_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "test-output")) / "browser"
STEPS = 12

SETUP = """
import json, os
from pathlib import Path
import lab, widgets
pipe = lab.load("shapes", controlnet="scribble")
STATE = Path("state"); STATE.mkdir(exist_ok=True)
def dump(name, **data):  # atomic: the test never reads half a file
    tmp = STATE / f"{name}.json.tmp"; tmp.write_text(json.dumps(data)); os.replace(tmp, STATE / f"{name}.json")
dump("kernel", pid=os.getpid())
"""
STUDIO = f"""
studio = widgets.Studio(pipe, steps={STEPS}, guidance=5.0, seed=1,
                        prompt="a large red circle and a small blue square on a gray background")
pad = studio.pad
def on_pad(change):
    pad.image.save(STATE / "pad.png")
    dump("pad", version=pad.version, strokes=[list(map(list, s.points)) for s in pad.strokes])
pad.observe(on_pad, "version")
def on_run(change):
    run = change["new"]
    if run is None:
        return
    ex = studio.explorer
    if ex is not None:
        ex.observe(lambda ch: dump("explorer", word=ex.word, version=ex.version, view=ex.view.value,
                                   scale_max=ex.scale_max, location=list(ex.location) if ex.location else None),
                   "version")
    dump("studio", steps=len(run.steps), interrupted=run.interrupted, n_frames=studio.viewer.n_frames,
         frame_ms=studio.viewer.frame_ms, words=ex.words if ex else [])
studio.observe(on_run, "run")
def on_fork(change):
    if change["new"]:
        import torch
        k, changes, branch = studio.forks[-1]
        again = studio.viewer.sampler.fork(at=k, **changes).run()  # lab's own fork, outside the widget
        dump("fork", step=k, changes=changes, n=change["new"],
             same_as_lab=bool(torch.equal(again.final_latents, branch.final_latents)),
             shares_prefix=all(bool(torch.equal(branch.steps[i].latents, studio.run.steps[i].latents)) for i in range(k + 1)))
studio.observe(on_fork, "n_forks")
studio
"""
LONG_RUN = "studio.steps.value = 80"
VIDEO = """
video = lab.video(lab.load("shapes"), "a large red circle on a gray background", frames=4, motion=(4, 0), steps=20,
                  t0=15, t1=18, guidance=5.0, seed=0)
dump("video", frames=video.n_frames, steps=len(video.frames))
widgets.VideoViewer(video, size=192, strip=64)
"""

EDIT = """
edit = widgets.EditWidget(pipe, "a large red circle on a gray background", seed=0, steps=12)
edit.observe(lambda ch: dump("edit", version=ch["new"], change=edit.change, prompt=edit.edited.settings["prompt"]), "version")
edit
"""


def _read(root: Path, name: str):
    p = root / "state" / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _shot(locator, name: str) -> np.ndarray:
    SHOTS.mkdir(parents=True, exist_ok=True)
    data = locator.screenshot(path=str(SHOTS / f"{name}.png"))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    if chromium_path() is None:
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium (or set LATENT_LAB_CHROMIUM)")
    from playwright.sync_api import sync_playwright
    root = tmp_path_factory.mktemp("lab") / "root"
    root.mkdir()
    write_notebook(root / "widgets_test.ipynb", [SETUP, STUDIO, LONG_RUN, VIDEO, EDIT])
    with JupyterLab(root) as server, sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1500, "height": 1300})
        console = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.goto(f"{server.base}/lab/tree/widgets_test.ipynb")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        server.wait_kernel_ready()
        run_cell(page, 0)
        run_cell(page, 1)
        page.wait_for_selector(".ll-studio canvas.ll-scribble-canvas", timeout=120_000)
        try:
            yield dict(page=page, root=root, server=server, console=console)
        finally:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "zz_final_page.png"), full_page=True)
            (SHOTS / "console-errors.txt").write_text("\n".join(console))
            browser.close()


def _pad_canvas(page):
    return page.locator(".ll-studio .ll-scribble-canvas").first


def test_draw_on_scribble_pad_reaches_kernel(session):
    page, root = session["page"], session["root"]
    canvas = _pad_canvas(page)
    canvas.scroll_into_view_if_needed()
    before = _shot(canvas, "01_pad_empty")
    hint = before[110:150, 80:180]  # "draw here" in gray, on the screen only
    assert ((hint.min(-1) > 80) & (hint.max(-1) < 160)).sum() > 20, "the empty pad says where to draw"
    box = canvas.bounding_box()
    scale = 4  # Studio draws a 64-px model at 4 screen px per pixel
    assert round(box["width"]) == 64 * scale
    # a horizontal stroke across model pixels x = 10..50 at y = 15
    y = box["y"] + (15 + 0.5) * scale
    page.mouse.move(box["x"] + 10.5 * scale, y)
    page.mouse.down()
    page.mouse.move(box["x"] + 50.5 * scale, y, steps=12)
    page.mouse.up()
    state = wait_for(lambda: _read(root, "pad"), 30, "the kernel to record the stroke")
    assert state["version"] >= 1 and len(state["strokes"]) == 1
    xs, ys = np.array(state["strokes"][0]).T
    assert abs(xs.min() - 10) <= 1 and abs(xs.max() - 50) <= 1 and np.abs(ys - 15).max() <= 1
    img = np.asarray(Image.open(root / "state" / "pad.png").convert("L"))
    assert img.shape == (64, 64)
    assert (img[14:17, 12:49].max(axis=0) == 255).all(), "the stroke's pixels are set in the kernel's image"
    assert img[30:, :].max() == 0 and img[:10, :].max() == 0, "nothing is set away from the stroke"
    after = _shot(canvas, "02_pad_stroke")
    # what the page shows is the kernel's raster: bright along the stroke, black elsewhere
    assert after[int(15.5 * scale), int(30 * scale)].min() > 200
    assert after[int(40 * scale), int(30 * scale)].max() < 40
    assert not np.array_equal(before, after)


def test_reload_redraws_pad_from_kernel_state(session):
    page, root = session["page"], session["root"]
    # save, so the reopened notebook has the output that shows the kernel's live widgets
    page.locator('[data-command="docmanager:save"]').first.click()
    wait_for(lambda: "widget-view+json" in (root / "widgets_test.ipynb").read_text(), 30, "the notebook to be saved")
    page.reload()
    page.wait_for_selector(".ll-studio canvas.ll-scribble-canvas", timeout=90_000)
    canvas = _pad_canvas(page)
    canvas.scroll_into_view_if_needed()
    shot = wait_for(lambda: (lambda a: a if a[int(15.5 * 4), 120].min() > 200 else None)(_shot(canvas, "03_pad_reloaded")),
                    30, "the reloaded view to show the stroke again")
    assert shot[int(40 * 4), 120].max() < 40


def test_generate_shows_image_and_trajectory(session):
    page, root = session["page"], session["root"]
    page.locator(".ll-studio button", has_text="Generate").click()
    state = wait_for(lambda: _read(root, "studio"), 180, "the run to finish")
    assert state["steps"] == STEPS and not state["interrupted"] and state["n_frames"] == STEPS
    image = page.locator(".ll-studio-image")
    wait_for(lambda: image.get_attribute("src") or image.locator("img").count(), 30, "the result image")
    page.wait_for_selector(".ll-attention-explorer canvas.ll-attention-canvas", timeout=60_000)
    traj = page.locator(".ll-trajectory").first
    traj.scroll_into_view_if_needed()
    label = page.locator(".ll-step-label").first
    wait_for(lambda: f"step {STEPS - 1} " in label.inner_text(), 30, "the last step's label")
    shot = _shot(traj, "04_trajectory_last")
    assert shot.std() > 5, "the trajectory panels are drawn"
    result = _shot(page.locator(".ll-studio").first, "05_studio_after_generate")
    assert result.std() > 5


def test_trajectory_slider_changes_frame_without_the_kernel(session):
    page, root = session["page"], session["root"]
    panel = page.locator(".ll-panel-x0").first
    panel.scroll_into_view_if_needed()
    last = _shot(panel, "06_x0_last")
    pid = _read(root, "kernel")["pid"]
    os.kill(pid, signal.SIGSTOP)  # the kernel is frozen: it cannot take part in what follows
    try:
        handle = page.locator(".ll-trajectory .noUi-handle").first
        handle.focus()
        handle.press("Home")  # step 0: pure noise's x0 estimate
        label = page.locator(".ll-step-label").first
        wait_for(lambda: label.inner_text().startswith("step 0 "), 15, "the slider to reach step 0")
        first = wait_for(lambda: (lambda a: a if not np.array_equal(a, last) else None)(_shot(panel, "07_x0_first")),
                         15, "the shown frame to change")
        assert np.abs(first.astype(int) - last.astype(int)).mean() > 2
        for _ in range(STEPS - 1):
            handle.press("ArrowRight")
        wait_for(lambda: label.inner_text().startswith(f"step {STEPS - 1} "), 15, "the slider to reach the end")
        assert np.array_equal(_shot(panel, "07b_x0_last_again"), last), "the last frame again, from the page's copy"
    finally:
        os.kill(pid, signal.SIGCONT)

def test_x0_preview_looks_like_the_decoded_image(session):
    page = session["page"]
    label = page.locator(".ll-step-label").first
    wait_for(lambda: label.inner_text().startswith(f"step {STEPS - 1} "), 15, "the last step")
    preview = _shot(page.locator(".ll-panel-x0 img").first, "07d_x0_preview_last").astype(float)
    decoded = _shot(page.locator(".ll-panel-image img").first, "07e_decoded_last").astype(float)
    assert preview.shape == decoded.shape
    # the tiny decoder draws what the VAE draws (issue 25: block noise and wrong colours before)
    mse = ((preview - decoded) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / mse) > 22, f"preview PSNR against the decoded panel {10 * np.log10(255 ** 2 / mse):.1f} dB"


def test_reload_keeps_the_trajectory_at_its_step(session):
    page = session["page"]
    label = page.locator(".ll-step-label").first
    wait_for(lambda: label.inner_text().startswith(f"step {STEPS - 1} "), 15, "the last step before the reload")
    page.locator('[data-command="docmanager:save"]').first.click()
    page.wait_for_timeout(1000)
    page.reload()
    page.wait_for_selector(".ll-studio canvas.ll-scribble-canvas", timeout=90_000)
    label = page.locator(".ll-step-label").first
    label.wait_for(timeout=60_000)
    label.scroll_into_view_if_needed()
    # the views are rebuilt from the kernel's state: the page shows the step the kernel shows, not step 0
    wait_for(lambda: label.inner_text().startswith(f"step {STEPS - 1} "), 30, "the reloaded page at the last step")
    page.wait_for_timeout(1500)  # the links' first sync would have moved it by now
    assert label.inner_text().startswith(f"step {STEPS - 1} ")
    _shot(page.locator(".ll-trajectory").first, "07c_trajectory_reloaded")


def test_word_click_changes_overlay(session):
    page, root = session["page"], session["root"]
    explorer = page.locator(".ll-attention-explorer").first
    explorer.scroll_into_view_if_needed()
    canvas = explorer.locator(".ll-attention-canvas").first
    v0 = (_read(root, "explorer") or {}).get("version", 0)
    before = _shot(canvas, "08_overlay_before")
    words = _read(root, "studio")["words"]
    assert "blue" in words
    explorer.locator("button", has_text="blue").first.click()
    state = wait_for(lambda: (lambda s: s if s and s["version"] > v0 and s["word"] == "blue" else None)(
        _read(root, "explorer")), 30, "the explorer to switch to 'blue'")
    after = wait_for(lambda: (lambda a: a if not np.array_equal(a, before) else None)(_shot(canvas, "09_overlay_blue")),
                     15, "the overlay to change")
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 1
    # a click on the image plots what that pixel attended to over time
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.25)
    state = wait_for(lambda: (lambda s: s if s and s["location"] else None)(_read(root, "explorer")), 30,
                     "the click to reach the kernel")
    y, x = state["location"]
    assert abs(x - 32) <= 2 and abs(y - 16) <= 2
    plot = explorer.locator(".ll-attention-plot").first
    wait_for(lambda: plot.get_attribute("src") or "", 15, "the over-time plot")
    _shot(explorer, "10_explorer")


def test_explorer_shared_scale_and_self_attention_in_the_page(session):
    page, root = session["page"], session["root"]
    explorer = page.locator(".ll-attention-explorer").first
    explorer.scroll_into_view_if_needed()
    canvas = explorer.locator(".ll-attention-canvas").first
    bar = explorer.locator(".ll-attention-colourbar").first
    top = lambda: bar.inner_text().split()[0]  # noqa: E731 - the colour bar's top tick
    before_tick, before = top(), _shot(canvas, "10b_word_scale")
    state0 = _read(root, "explorer")
    explorer.locator("button", has_text="shared scale").first.click()
    state = wait_for(lambda: (lambda s: s if s and s["version"] > state0["version"] else None)(_read(root, "explorer")),
                     30, "the shared scale")
    assert state["scale_max"] >= state0["scale_max"]
    wait_for(lambda: top() != before_tick or state["scale_max"] == state0["scale_max"], 15, "the colour bar's new top")
    # self-attention: a click on the circle shows where that pixel looked
    explorer.locator("button", has_text="self-attention").first.click()
    wait_for(lambda: (lambda s: s and s["view"] == "self")(_read(root, "explorer")), 30, "the self-attention view")
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7)
    state = wait_for(lambda: (lambda s: s if s and s["view"] == "self" and s["location"]
                              and abs(s["location"][1] - 0.7 * 64) <= 2 else None)(_read(root, "explorer")),
                     30, "the clicked pixel's self-attention")
    after = wait_for(lambda: (lambda a: a if not np.array_equal(a, before) else None)(_shot(canvas, "10c_self_attention")),
                     15, "the self-attention map")
    assert "self-attention probability" in bar.inner_text() or "self-attention" in explorer.inner_text()
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 1
    _shot(explorer, "10d_explorer_self")


def test_callback_error_is_shown_in_widget(session):
    page = session["page"]
    prompt = page.locator(".ll-studio textarea").first
    prompt.fill("")
    page.wait_for_timeout(500)  # let the empty value sync to the kernel
    page.locator(".ll-studio button", has_text="Generate").click()
    err = page.locator(".ll-studio .ll-error").first
    err.wait_for(timeout=15_000)
    assert "prompt is empty" in err.inner_text()
    _shot(page.locator(".ll-studio").first, "11_error_shown")
    prompt.fill("a small green triangle on a white background")


def test_stop_keeps_partial_run(session):
    page, root = session["page"], session["root"]
    run_cell(page, 2)  # studio.steps.value = 80
    (root / "state" / "studio.json").unlink()
    label = page.locator(".ll-step-label").first
    before = label.inner_text()  # the last run's last step, until the new run's frames replace it
    page.locator(".ll-studio button", has_text="Generate").click()

    # the page may skip labels between polls (steps are faster than a round trip), so any index
    # from 3 to 60 of the new run counts: enough steps to keep, and well before the run's end at 80
    def shown_step():
        text = label.inner_text()
        m = re.match(r"step (\d+) ", text)
        return text != before and m is not None and 3 <= int(m.group(1)) <= 60
    wait_for(shown_step, 120, "a few live steps")
    page.locator(".ll-studio button", has_text="Stop").first.click()
    seen = int(re.match(r"step (\d+) ", label.inner_text()).group(1))  # at or after what the click saw
    state = wait_for(lambda: _read(root, "studio"), 120, "the stopped run")
    assert state["interrupted"] and 3 <= state["steps"] < 80
    assert state["n_frames"] == state["steps"]
    # the run ends within one step of the step the page showed (issue 25: it was 8 steps later)
    assert state["steps"] - 1 <= seen + 1, (state["steps"], seen)
    last = state["steps"] - 1
    wait_for(lambda: label.inner_text().startswith(f"step {last} "), 30, "the page to show the last kept step")
    _shot(page.locator(".ll-studio").first, "12_stopped")
    viewer = page.locator(".ll-residual-viewer").first
    viewer.scroll_into_view_if_needed()
    _shot(viewer, "13_residual_viewer")


def test_residual_viewer_draws_over_the_condition(session):
    page = session["page"]
    viewer = page.locator(".ll-residual-viewer").first
    viewer.scroll_into_view_if_needed()
    img = viewer.locator("img.ll-pixelated, .ll-pixelated img").first
    alone = img.get_attribute("src")
    viewer.locator("button", has_text="over the condition").first.click()
    wait_for(lambda: img.get_attribute("src") != alone, 30, "the map over the scribble")
    assert "over the condition" in viewer.inner_text()
    _shot(viewer, "13b_residuals_over_condition")


def test_fork_at_the_shown_step_in_the_page(session):
    page, root = session["page"], session["root"]
    handle = page.locator(".ll-trajectory .noUi-handle").first
    handle.focus()
    handle.press("Home")
    for _ in range(3):
        handle.press("ArrowRight")
    label = page.locator(".ll-step-label").first
    wait_for(lambda: label.inner_text().startswith("step 3 "), 15, "step 3 shown")
    page.wait_for_timeout(500)  # the slider's value reaches the kernel
    fork = page.locator(".ll-fork").first
    fork.scroll_into_view_if_needed()
    prompt = fork.locator("input[type=text]").first
    prompt.fill("a large blue circle on a white background")
    prompt.press("Tab")
    page.wait_for_timeout(500)
    fork.locator("button", has_text="Fork at shown step").click()
    state = wait_for(lambda: _read(root, "fork"), 120, "the branch")
    assert state["step"] == 3 and state["changes"] == {"prompt": "a large blue circle on a white background"}
    assert state["same_as_lab"] and state["shares_prefix"]
    cards = page.locator(".ll-branch")
    wait_for(lambda: cards.count() == 2 and "fork at step 3" in cards.nth(1).inner_text(), 30, "the branch's card")
    shots = [_shot(cards.nth(i).locator("img").first, f"18_branch_{i}") for i in range(2)]
    assert np.abs(shots[0].astype(int) - shots[1].astype(int)).mean() > 3, "the branch differs from the run"
    _shot(fork, "19_fork_panel")


def test_studio_fits_a_laptop_screen(session):
    page = session["page"]
    page.set_viewport_size({"width": 1366, "height": 768})
    try:
        page.wait_for_timeout(800)
        studio = page.locator(".ll-studio").first
        studio.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(300)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "20_laptop_1366x768.png"))
        box = page.locator(".ll-studio-image").first.bounding_box()
        assert box["x"] + box["width"] <= 1366 and box["y"] + box["height"] <= 768, f"result below the fold: {box}"
        # no control clips its text or scrolls: the range readout, the pad's toolbar
        clipped = studio.evaluate("""e => [...e.querySelectorAll('.widget-readout, .widget-hbox, .widget-vbox')]
            .filter(x => x.offsetParent !== null && x.scrollWidth > x.clientWidth + 1)
            .map(x => x.className + ' ' + x.scrollWidth + '>' + x.clientWidth).slice(0, 5)""")
        readout = studio.locator(".widget-readout").filter(has_text="–").first
        assert "0.00" in readout.inner_text() and "1.00" in readout.inner_text()
        top = studio.evaluate("""e => [...e.querySelectorAll('.ll-scribble-canvas')].map(c => c.parentElement)
            .concat([...e.querySelectorAll('.ll-studio .widget-toggle-buttons')])
            .filter(x => x.scrollWidth > x.clientWidth + 1).length""")
        assert top == 0 and not clipped, clipped
    finally:
        page.set_viewport_size({"width": 1500, "height": 1300})


def test_video_viewer_plays_frames_and_scrubs_steps_without_the_kernel(session):
    page, root = session["page"], session["root"]
    run_cell(page, 3)
    state = wait_for(lambda: _read(root, "video"), 180, "the video")
    viewer = page.locator(".ll-video").first
    viewer.wait_for(timeout=60_000)
    viewer.scroll_into_view_if_needed()
    main = page.locator(".ll-video-main").first
    frame_label = page.locator(".ll-video-frame-label").first
    step_label = page.locator(".ll-video-step-label").first
    wait_for(lambda: frame_label.inner_text().strip() == "frame 0", 30, "frame 0 shown")
    frame0 = _shot(main, "14_video_frame0_last_step")
    assert frame0.std() > 5
    _shot(viewer, "15_video_viewer")
    pid = _read(root, "kernel")["pid"]
    os.kill(pid, signal.SIGSTOP)  # playing and scrubbing happen in the page alone
    try:
        viewer.locator("button").first.click()  # play: the frames advance in the browser
        last = state["frames"] - 1
        wait_for(lambda: frame_label.inner_text().strip() == f"frame {last}", 30, "playback to reach the last frame")
        moved = _shot(main, "16_video_last_frame")
        assert np.abs(moved.astype(int) - frame0.astype(int)).mean() > 1, "the circle moved between frames"
        handle = viewer.locator(".noUi-handle").nth(1)  # the step slider (the frame slider's handle is first)
        handle.focus()
        handle.press("Home")
        wait_for(lambda: step_label.inner_text().startswith("step 1 "), 15, "the step slider to reach the first step")
        early = _shot(main, "17_video_first_step")
        assert np.abs(early.astype(int) - moved.astype(int)).mean() > 2, "an early step's x0 differs from the end"
    finally:
        os.kill(pid, signal.SIGCONT)


def test_edit_widget_replaces_the_prompt_in_the_page(session):
    page, root = session["page"], session["root"]
    run_cell(page, 4)
    ed = page.locator(".ll-edit").first
    ed.wait_for(timeout=120_000)
    ed.scroll_into_view_if_needed()
    ed.locator("button", has_text="replace the prompt").first.click()
    box = ed.locator("input[type=text]").first
    wait_for(lambda: box.is_visible(), 15, "the new-prompt field")
    box.fill("a large blue circle on a gray background")
    box.press("Tab")
    page.wait_for_timeout(500)
    ed.locator("button", has_text="Apply").first.click()
    state = wait_for(lambda: _read(root, "edit"), 120, "the edit")
    assert state["prompt"] == "a large blue circle on a gray background" and state["change"] > 5
    wait_for(lambda: "new prompt alone" in ed.inner_text(), 30, "the summary")
    source = _shot(ed.locator(".ll-edit-source img").first, "21_edit_source").astype(int)
    edited = _shot(ed.locator(".ll-edit-edited img").first, "22_edit_edited").astype(int)
    # the circle turned blue: more blue than red where it was red
    red = (source[..., 0] > 150) & (source[..., 2] < 100)
    assert red.sum() > 500 and (edited[red][:, 2] > edited[red][:, 0]).mean() > 0.5
    _shot(ed, "23_edit_widget")

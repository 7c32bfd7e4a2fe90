"""The widgets' Python side, without a browser: state, callbacks, rasterisation, errors.

(What the page shows and what the mouse does are tested in a real JupyterLab in test_browser.py.)
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import analysis
import lab
import widgets
from widgets import Stroke, rasterise
from widgets._base import channel_tiles


PROMPT = "a large red circle and a small blue square on a gray background"


@pytest.fixture(scope="module")
def run_with_everything(shapes_pipe):
    pad = widgets.ScribblePad(64)
    pad.add_stroke([(12, 12), (40, 12), (40, 40), (12, 40), (12, 12)])
    return shapes_pipe.sampler(PROMPT, steps=6, guidance=5.0, seed=3, progress=False,
                               control=lab.Control("scribble", pad.image),
                               recorders=[lab.AttentionRecorder(), lab.ResidualRecorder(maps=True)]).run()


# ---------------------------------------------------------------------------- rasterisation
def test_rasterise_horizontal_stroke_sets_exactly_its_pixels():
    img = rasterise([Stroke(((10, 20), (50, 20)), width=2.0)], (64, 64))
    on = img.max(-1) > 0
    ys, xs = np.nonzero(on)
    assert set(np.unique(ys)) <= {19, 20, 21} and 20 in ys
    assert xs.min() in (9, 10) and xs.max() in (50, 51)
    assert (img[on] == 255).all(), "binary strokes, like the shapes world's scribbles"


def test_rasterise_width_eraser_order_and_colour():
    thin = rasterise([Stroke(((10, 32), (50, 32)), width=1.0)], (64, 64)).max(-1) > 0
    thick = rasterise([Stroke(((10, 32), (50, 32)), width=5.0)], (64, 64)).max(-1) > 0
    assert thick.sum() > 3 * thin.sum() and (thin <= thick).all()
    red = Stroke(((5, 5), (30, 5)), width=3.0, color=(255, 0, 0))
    blue = Stroke(((20, 0), (20, 20)), width=3.0, color=(0, 0, 255))
    both = rasterise([red, blue], (64, 64))
    assert tuple(both[5, 20]) == (0, 0, 255), "later strokes paint over earlier ones"
    assert tuple(both[5, 8]) == (255, 0, 0)
    erased = rasterise([red, Stroke(((5, 5), (30, 5)), width=5.0, erase=True)], (64, 64))
    assert erased.max() == 0
    dot = rasterise([Stroke(((32, 32),), width=3.0)], (64, 64))
    assert dot[32, 32].max() == 255 and (dot.max(-1) > 0).sum() < 16


def test_condition_does_not_depend_on_display_scale():
    pts = [(3.2, 7.7), (30.1, 44.9), (60, 2)]
    a, b = widgets.ScribblePad(64, scale=2), widgets.ScribblePad(64, scale=6)
    a.add_stroke(pts, width=2.5)
    b.add_stroke(pts, width=2.5)
    assert np.array_equal(a.array, b.array)


# ---------------------------------------------------------------------------- scribble pad
def test_mouse_events_make_a_stroke_in_model_pixels():
    pad = widgets.ScribblePad(64, scale=4)
    seen = []
    pad.observe(lambda ch: seen.append(ch["new"]), "version")
    pad._down(42, 62)                  # canvas pixels: model (10, 15)
    for x in range(50, 210, 16):
        pad._move(x, 62)
    pad._up(202, 62)
    assert len(pad.strokes) == 1 and seen == [1]
    xs, ys = np.array(pad.strokes[0].points).T
    assert abs(xs[0] - 10) < 0.01 and abs(ys[0] - 15) < 0.01 and abs(xs.max() - 50) < 0.01
    on = pad.array.max(-1) > 0
    assert on[15, 11:50].all() and not on[30:].any()
    assert pad.image.size == (64, 64) and pad.image.mode == "RGB"
    pad._move(100, 100)                # moving without a pressed button draws nothing
    assert len(pad.strokes) == 1


def test_touch_events_draw_too():
    pad = widgets.ScribblePad(64, scale=4)
    pad.canvas._canvases[-1]._handle_frontend_event(None, {"event": "touch_start", "touches": [{"x": 40, "y": 40}]}, [])
    pad.canvas._canvases[-1]._handle_frontend_event(None, {"event": "touch_move", "touches": [{"x": 120, "y": 40}]}, [])
    pad.canvas._canvases[-1]._handle_frontend_event(None, {"event": "touch_end", "touches": []}, [])
    assert len(pad.strokes) == 1 and len(pad.strokes[0].points) == 2


def test_undo_redo_clear_and_eraser():
    pad = widgets.ScribblePad(32, scale=2)
    pad.add_stroke([(2, 2), (20, 2)])
    pad.add_stroke([(2, 10), (20, 10)])
    two = pad.array
    assert pad.undo() is not None and len(pad.strokes) == 1
    assert pad.redo() is not None and np.array_equal(pad.array, two)
    pad.tool = "eraser"
    pad.add_stroke([(2, 10), (20, 10)], width=4)
    assert pad.strokes[-1].erase and pad.array[10].max() == 0 and pad.array[2].max() == 255
    pad.clear()
    assert pad.strokes == () and pad.array.max() == 0 and pad.undo() is None
    assert pad.version == 6


def test_background_as_guide_or_as_condition():
    bg = np.zeros((32, 32, 3), np.uint8)
    bg[:, 16:] = 200
    guide = widgets.ScribblePad(32, background=bg)
    assert guide.array.max() == 0, "a guide is not part of the condition"
    cond = widgets.ScribblePad(32, background=Image.fromarray(bg), background_is_condition=True)
    assert np.array_equal(cond.array, bg)
    cond.add_stroke([(20, 5), (30, 5)], width=3, erase=True)
    assert cond.array[5, 24].max() == 0 and cond.array[20, 24].max() == 200


def test_bad_input_is_refused_and_loses_nothing():
    pad = widgets.ScribblePad(32)
    pad.add_stroke([(1, 1), (10, 10)])
    before = pad.array
    with pytest.raises(ValueError, match="resize it first"):
        pad.set_background(np.zeros((16, 16, 3), np.uint8))
    assert "resize it first" in pad.error_box.value and pad.error_box.layout.display is None
    with pytest.raises(TypeError, match="uint8"):
        pad.set_background(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="at least one point"):
        pad.add_stroke([])
    with pytest.raises(ValueError, match="finite"):
        pad.add_stroke([(1, float("nan"))])
    with pytest.raises(ValueError, match="colour"):
        pad.add_stroke([(1, 1)], color="not-a-colour")
    with pytest.raises(ValueError, match="positive"):
        widgets.ScribblePad(0)
    assert np.array_equal(pad.array, before) and len(pad.strokes) == 1


def test_callback_errors_are_shown_not_raised_when_asked():
    pad = widgets.ScribblePad(32, raise_errors=False)
    assert pad.set_background(np.zeros((8, 8, 3), np.uint8)) is None
    assert len(pad.errors) == 1 and "8x8" in pad.error_box.value


def test_pad_condition_drives_the_controlnet(shapes_pipe):
    pad = widgets.ScribblePad.for_pipeline(shapes_pipe)
    pad.add_stroke([(16, 16), (48, 16), (48, 48), (16, 48), (16, 16)])
    run = shapes_pipe.sampler("a large red square on a white background", steps=3, progress=False,
                              control=lab.Control("scribble", pad.image)).run()
    plain = shapes_pipe.sampler("a large red square on a white background", steps=3, progress=False).run()
    assert not torch.equal(run.final_latents, plain.final_latents)


# ---------------------------------------------------------------------------- trajectory viewer
def test_trajectory_viewer_shows_every_step(run_with_everything):
    run = run_with_everything
    v = widgets.TrajectoryViewer(run)
    n = len(run.steps)
    assert v.n_frames == n and all(len(s.children) == n for s in v.stacks.values())
    assert v.step == n - 1 and v.slider.max == n - 1 and v.play.max == n - 1
    v.show(2)
    assert v.step == 2 and all(s.selected_index == 2 for s in v.stacks.values())
    v.show(-1)
    assert v.step == n - 1
    with pytest.raises(IndexError):
        v.show(n)
    x0 = Image.open(__import__("io").BytesIO(v.stacks["x0"].children[0].value))
    image = Image.open(__import__("io").BytesIO(v.stacks["image"].children[0].value))
    assert x0.size == image.size == (64, 64)  # the preview decoder draws at full resolution
    assert len(v.frame_ms) == n and all(b > 0 for b in v.frame_bytes)
    # frames differ from step to step (the trajectory moves)
    assert v.stacks["x0"].children[0].value != v.stacks["x0"].children[-1].value


def test_trajectory_viewer_needs_a_pipeline_for_image_panels(run_with_everything):
    detached = lab.Run(run_with_everything.steps, settings=run_with_everything.settings)
    with pytest.raises(ValueError, match="pass pipe="):
        widgets.TrajectoryViewer(detached)
    only_arrays = widgets.TrajectoryViewer(detached, panels=("latents", "noise"))
    assert only_arrays.n_frames == len(detached.steps)
    with pytest.raises(ValueError, match="unknown panels"):
        widgets.TrajectoryViewer(detached, panels=("x1",))


def test_channel_tiles_layout():
    x = np.stack([np.full((4, 4), v, np.float32) for v in (-1.0, 0.0, 1.0, 0.5)])
    t = channel_tiles(x)
    assert t.shape == (9, 9) and t[0, 0] == 0 and t[0, 5] == 127 and t[5, 0] == 255


def test_live_follow_and_stop_keep_the_partial_run(shapes_pipe):
    v = widgets.TrajectoryViewer(pipe=shapes_pipe, panels=("x0",))
    sampler = shapes_pipe.sampler(PROMPT, steps=40, progress=False)
    v.observe(lambda ch: v.stop() if ch["new"] == 3 else None, "n_frames")
    v.follow(sampler)
    run = v.wait(timeout=120)
    assert run.interrupted and 3 <= len(run.steps) < 40 and v.n_frames == len(run.steps)
    assert not v.running and v.stop_button.disabled
    full = widgets.TrajectoryViewer(pipe=shapes_pipe, panels=("x0",))
    done = full.follow(shapes_pipe.sampler(PROMPT, steps=4, progress=False), block=True)
    assert not done.is_alive() and full.run is not None and len(full.run.steps) == 4 and not full.run.interrupted
    # partial steps equal the full run's first steps (a stop changes nothing before it)
    again = shapes_pipe.sampler(PROMPT, steps=40, progress=False).run()
    assert torch.equal(run.steps[-1].prev_latents, again.steps[len(run.steps) - 1].prev_latents)


def test_live_viewer_drops_steps_while_the_page_is_behind_and_fills_them_in_at_the_end(shapes_pipe):
    v = widgets.TrajectoryViewer(pipe=shapes_pipe, panels=("x0", "latents"))
    send = v.add_step

    def add_step(state):  # a page that shows the first two frames it gets, then falls silent
        ms = send(state)
        if v.n_frames <= 2:
            v.shown.value = v.n_frames - 1  # what the page's link writes back when it shows a frame
        return ms
    v.add_step = add_step
    steps = 12
    v.follow(shapes_pipe.sampler(PROMPT, steps=steps, progress=False), block=True)
    run = v.run
    # frame 0 and 1 were shown, frame 2 was sent and never shown: every later step waited, then was dropped
    # (each step here takes well under the one second after which a silent page gets a frame anyway)
    assert len(v.frame_ms) < steps and v.dropped == steps - len(v.frame_ms)
    assert v.n_frames == steps and v._steps_sent == list(range(steps))
    # at the end the stacks hold every step in order: labels and frames match the run's own steps
    assert [c.value.split(" ·")[0] for c in v.labels.children] == [f"step {k}" for k in range(steps)]
    from widgets._base import png
    for k in (3, steps - 1):
        assert v.stacks["x0"].children[k].value == png(shapes_pipe.preview(run.steps[k].pred_x0[0]))
    assert v.slider.value == v.play.value == steps - 1 and "shown only at the end" in v.status.value


def test_live_run_defers_the_vae_panel_to_the_end(shapes_pipe):
    v = widgets.TrajectoryViewer(pipe=shapes_pipe)
    seen = []
    send = v.add_step

    def add_step(state):  # what the page gets while the run is live
        ms = send(state)
        seen.append(type(v.stacks["image"].children[-1]).__name__)
        return ms
    v.add_step = add_step
    v.follow(shapes_pipe.sampler(PROMPT, steps=5, progress=False), block=True)
    # live: the preview decoder's x0, latents and noise; the VAE panel is a placeholder until the run ends
    assert seen == ["HTML"] * 5 and v.complete_ms > 0 and "VAE panels made at the end" in v.status.value
    from widgets._base import png
    assert [c.value for c in v.stacks["image"].children] == [png(shapes_pipe.decode(s.pred_x0[:1])[0]) for s in v.run.steps]
    assert not v._deferred
    live = widgets.TrajectoryViewer(pipe=shapes_pipe, decode_live=True)
    live.follow(shapes_pipe.sampler(PROMPT, steps=2, progress=False), block=True)
    assert all(type(c).__name__ == "Image" for c in live.stacks["image"].children) and live.complete_ms == 0


def test_stop_keeps_one_step_past_what_the_page_showed(shapes_pipe):
    v = widgets.TrajectoryViewer(pipe=shapes_pipe, panels=("x0",))
    send = v.add_step

    def add_step(state):  # the page shows every frame at once, until step 6: there Stop is pressed with the
        ms = send(state)  # page still showing step 2 (say, a slow browser)
        v.shown.value = 2 if state.index >= 6 else v.n_frames - 1
        if state.index == 6:
            v.stop()
        return ms
    v.add_step = add_step
    sampler = shapes_pipe.sampler(PROMPT, steps=20, progress=False)
    v.follow(sampler, block=True)
    run = v.run
    assert v.stopped_at == 2 and run.interrupted and len(run.steps) == 4  # steps 0..3: one past the shown one
    assert v.n_frames == 4 and sampler.position == 4 and "Stop pressed at step 2" in v.status.value
    # the steps run ahead were rewound, not lost: going on gives the uninterrupted run bit-exactly
    rest = sampler.run()
    plain = shapes_pipe.sampler(PROMPT, steps=20, progress=False).run()
    assert len(rest.steps) == 20 and torch.equal(rest.final_latents, plain.final_latents)


def test_live_errors_show_in_the_viewer_and_reraise_on_wait(shapes_pipe):
    class Broken:
        def bind(self, ctx):
            raise RuntimeError("recorder exploded")

    v = widgets.TrajectoryViewer(pipe=shapes_pipe, panels=("x0",))
    v.follow(shapes_pipe.sampler(PROMPT, steps=3, progress=False, recorders=[Broken()]))
    with pytest.raises(RuntimeError, match="exploded"):
        v.wait(timeout=60)
    assert "exploded" in v.error_box.value and not v.running
    with pytest.raises(RuntimeError, match="already in progress"):
        v.running = True
        v.follow(shapes_pipe.sampler(PROMPT, steps=1, progress=False))


# ---------------------------------------------------------------------------- attention explorer
def test_explorer_word_layers_steps_and_click(run_with_everything):
    run = run_with_everything
    ex = widgets.AttentionExplorer(run)
    assert ex.words == analysis.words(run) and ex.word == "large"
    first, v0 = ex.overlay.copy(), ex.version
    hm = lambda word, **kw: analysis.word_heatmap(run, word, normalize=False, **kw).values  # noqa: E731
    ex.show("blue")
    assert ex.word == "blue" and ex.version > v0 and not np.array_equal(ex.overlay, first)
    np.testing.assert_allclose(ex.heatmap.values, hm("blue", steps=(0, 5)))
    ex.show(layers="res:16x16")
    np.testing.assert_allclose(ex.heatmap.values, hm("blue", layers=ex._layer_sets["res:16x16"], steps=(0, 5)))
    assert ex.heatmap.attrs["layers"] == len(ex._layer_sets["res:16x16"])
    ex.show(steps=(1, 2))
    np.testing.assert_allclose(ex.heatmap.values, hm("blue", layers=ex._layer_sets["res:16x16"], steps=(1, 2)))
    ot = ex.click(40, 20)
    assert ot.dims == ("step", "word") and ex.location == (20.0, 40.0) and ex.plot.value
    np.testing.assert_allclose(ot.values, analysis.attention_at(run, 20, 40, layers=ex._layer_sets["res:16x16"]).values)
    ex._clicked(128, 64)  # canvas pixels at size 256: image pixel (32, 16)
    assert ex.location == (16.0, 32.0) and "clicked (x=32, y=16)" in ex.caption.value
    # several choices in one call apply together
    both = widgets.AttentionExplorer(run).show("circle", layers="res:8x8", steps=(2, 4))
    np.testing.assert_allclose(both.values, hm("circle", layers=ex._layer_sets["res:8x8"], steps=(2, 4)))


def test_explorer_scale_colour_bar_and_overlay(run_with_everything):
    run = run_with_everything
    ex = widgets.AttentionExplorer(run, alpha=0.7)
    ex.show("blue", scale="word")
    own = float(ex.heatmap.max())
    assert ex.scale_max == own and f"{own:.2g}" in ex.bar.value and "attention probability" in ex.bar.value
    # shared: one maximum over every word of the prompt, so a weakly attended word looks weak
    ex.show(scale="shared")
    every = max(float(analysis.word_heatmap(run, w, normalize=False).max()) for w in ex.words)
    assert ex.scale_max == pytest.approx(every) and ex.scale_max >= own
    weakest = min(ex.words, key=lambda w: float(analysis.word_heatmap(run, w, normalize=False).max()))
    ex.show(weakest)
    shared = ex.overlay.astype(int)
    ex.show(scale="word")
    assert np.abs(ex.overlay.astype(int) - np.asarray(ex.image.resize((256, 256), Image.NEAREST))).mean() > \
        np.abs(shared - np.asarray(ex.image.resize((256, 256), Image.NEAREST))).mean()
    # where the map is 0 the image shows through unchanged; opacity 0 shows only the image
    ex.opacity.value = 0.0
    assert np.array_equal(ex.overlay, np.asarray(ex.image.resize((256, 256), Image.NEAREST)))


def test_explorer_heads_and_self_attention(shapes_pipe):
    run = shapes_pipe.sampler(PROMPT, steps=4, seed=2, progress=False,
                              recorders=[lab.AttentionRecorder(kind="both", heads="all")]).run()
    ex = widgets.AttentionExplorer(run)
    assert ex.has_self and not ex.heads.disabled and len(ex.heads.options) == 1 + 4  # mean + 4 heads
    # the cross view's resolution menu names cross-attention layers, the self view's self-attention ones
    res = ex.show("red", layers="res:16x16")
    np.testing.assert_allclose(res.values, analysis.word_heatmap(
        run, "red", layers=[n for n in ex._layer_sets["res:16x16"]], normalize=False).values)
    assert all(n.endswith("attn2") for n in ex._layer_sets["res:16x16"])
    ex.show(layers="*")
    one = ex.show("red", heads=2)
    np.testing.assert_allclose(one.values, analysis.word_heatmap(run, "red", heads=2, normalize=False).values)
    assert not np.allclose(one.values, analysis.word_heatmap(run, "red", normalize=False).values)
    ot = ex.click(48, 40)
    np.testing.assert_allclose(ot.values, analysis.attention_at(run, 40, 48, heads=2).values)
    # self-attention: where the clicked pixel looked, over the same layer/head/step choices
    m = ex.show(view="self", heads=-1)
    assert m.name == "self_attention" and "self-attention of the pixel (x=48, y=40)" in ex.caption.value
    assert ex.plot.layout.display == "none"  # the words view's over-time plot would be stale here
    np.testing.assert_allclose(m.values, analysis.self_attention_at(run, 40, 48, steps=(0, 3)).values)
    assert [v for _, v in ex.filter.options][:2] == ["*", "res:16x16"] and "self-attention probability" in ex.bar.value
    assert all(n.endswith("attn1") for n in ex._layer_sets["res:16x16"])
    ex.click(10, 12)
    far = analysis.self_attention_at(run, 12, 10)
    np.testing.assert_allclose(ex.heatmap.values, far.values)
    assert not np.allclose(far.values, m.values)
    ex.show(view="cross")
    assert ex.word_buttons.layout.display is None and ex.heatmap.name == "heatmap" and ex.plot.layout.display is None
    with pytest.raises(KeyError, match="no head"):
        ex.show(heads=9)
    no_self = widgets.AttentionExplorer(shapes_pipe.sampler(PROMPT, steps=2, progress=False,
                                                            recorders=[lab.AttentionRecorder()]).run())
    with pytest.raises(ValueError, match="no self-attention"):
        no_self.show(view="self")
    assert no_self.heads.disabled and no_self.view.layout.display == "none"


def test_explorer_errors(run_with_everything, shapes_pipe):
    ex = widgets.AttentionExplorer(run_with_everything)
    with pytest.raises(KeyError, match="not in the prompt"):
        ex.show("green")
    assert "green" in ex.error_box.value and ex.word == "large"
    with pytest.raises(ValueError, match="step window"):
        ex.show(steps=(3, 99))
    with pytest.raises(ValueError, match="outside"):
        ex.click(100, 5)
    plain = shapes_pipe.sampler(PROMPT, steps=2, progress=False).run()
    with pytest.raises(ValueError, match="recorded no attention"):
        widgets.AttentionExplorer(plain)


# ---------------------------------------------------------------------------- edits
def test_edit_widget_reweight_and_replace_equal_the_plain_calls(shapes_pipe):
    P = "a large red circle on a gray background"
    ed = widgets.EditWidget(shapes_pipe, P, seed=5, steps=6)
    assert ed.words == ["large", "red", "circle", "gray", "background"] and ed.images["source"].value
    run = ed.reweight("red", 6.0)
    plain = shapes_pipe.sampler(P, steps=6, seed=5, guidance=5.0, progress=False,
                                recorders=[lab.AttentionRecorder(record=False, edits=[lab.Reweight({"red": 6.0})])]).run()
    assert torch.equal(run.final_latents, plain.final_latents) and ed.version == 1
    expect = np.abs(np.asarray(run.image, np.float32) - np.asarray(ed.source.image, np.float32)).mean()
    assert ed.change == pytest.approx(float(expect)) and f"{ed.change:.1f} / 255" in ed.captions["difference"].value
    assert ed.cards["plain"].layout.display == "none"
    new = "a large blue circle on a gray background"
    swapped = ed.replace(new)
    src = shapes_pipe.sampler(P, steps=6, seed=5, guidance=5.0, progress=False,
                              recorders=[lab.AttentionRecorder(heads="all")]).run()
    p2p = shapes_pipe.sampler(new, steps=6, seed=5, guidance=5.0, progress=False, recorders=[
        lab.AttentionRecorder(record=False, edits=[lab.ReplaceAttention(src, steps=(0.0, 0.6))])]).run()
    assert torch.equal(swapped.final_latents, p2p.final_latents) and ed.window.value == (0.0, 0.6)
    assert ed.plain is not None and ed.cards["plain"].layout.display is None and "new prompt alone" in ed.summary.value
    # the controls drive the same calls
    ed.mode.value = "reweight"
    ed.word.value, ed.factor.value = "circle", 0.0
    assert torch.equal(ed.apply().final_latents, shapes_pipe.sampler(P, steps=6, seed=5, guidance=5.0, progress=False,
        recorders=[lab.AttentionRecorder(record=False, edits=[lab.Reweight({"circle": 0.0})])]).run().final_latents)
    with pytest.raises(KeyError, match="not a content word"):
        ed.reweight("green", 2.0)
    with pytest.raises(ValueError, match="factor"):
        ed.reweight("red", float("nan"))
    with pytest.raises(ValueError, match="empty"):
        ed.replace("  ")
    assert ed.version == 3  # the refused edits changed nothing shown


# ---------------------------------------------------------------------------- residual viewer
def test_residual_viewer(run_with_everything):
    run = run_with_everything
    rv = widgets.ResidualViewer(run)
    # it opens on the strongest cell among the finest-resolution blocks, not on block 0 at step 0
    d = analysis.residual_norms(run).sel(net="scribble")
    finest = [i for i, r in enumerate(d["resolution"].values) if str(r) == "16x16"]
    sub = d.isel(block=finest).transpose("block", "step").values
    b, i = np.unravel_index(np.nanargmax(sub), sub.shape)
    assert (rv.block.value, rv.step.value) == (finest[b], i) and rv.map.value and "channel norm" in rv.bar.value
    assert [label for label, _ in rv.block.options][0] == "down 0 · 16x16" and "mid · 4x4" in rv.block.options[-1][0]
    m = rv.show(block=3, step=4)
    np.testing.assert_allclose(m.values, run.residual_map("scribble", 3, 4))
    assert rv.block.value == 3 and rv.step.value == 4 and rv.chart.value and rv.map.value
    m2 = rv.show(block="mid_block_res_sample")
    assert m2.shape == run.residual_map("scribble", "mid_block_res_sample", 4).shape
    with pytest.raises(KeyError, match="no block"):
        rv.show(block="nope")
    with pytest.raises(KeyError, match="no ControlNet"):
        rv.show(net="edges")
    with pytest.raises(IndexError):
        rv.show(step=99)
    # over the image and over the scribble: the same map, drawn on what it steers
    alone = rv.map.value
    rv.show(block=0, over="image")
    on_image = rv.map.value
    rv.show(over="condition")
    assert len({alone, on_image, rv.map.value}) == 3 and "over the condition" in rv.caption.value
    with pytest.raises(ValueError, match="over must be"):
        rv.show(over="sky")


def test_residual_viewer_without_maps(shapes_pipe, run_with_everything):
    pad = widgets.ScribblePad(64)
    pad.add_stroke([(5, 5), (50, 50)])
    run = shapes_pipe.sampler(PROMPT, steps=2, progress=False, control=lab.Control("scribble", pad.image),
                              recorders=[lab.ResidualRecorder()]).run()
    rv = widgets.ResidualViewer(run)
    assert rv.show() is None and "maps=True" in rv.caption.value
    with pytest.raises(ValueError, match="no residuals"):
        widgets.ResidualViewer(shapes_pipe.sampler(PROMPT, steps=1, progress=False).run())


def test_residual_viewer_steps_outside_the_control_window(shapes_pipe):
    pad = widgets.ScribblePad(64)
    pad.add_stroke([(5, 5), (50, 50)])
    run = shapes_pipe.sampler(PROMPT, steps=6, progress=False, control=lab.Control("scribble", pad.image, start=0.5),
                              recorders=[lab.ResidualRecorder(maps=True)]).run()
    rv = widgets.ResidualViewer(run)  # step 0 has no residual: the viewer still finds the maps of later steps
    assert rv.has_maps and rv.step.max == 5
    assert rv.show(step=1) is None and "added nothing" in rv.caption.value and rv.map.value == b""
    m = rv.show(block=2, step=4)  # the slider position is the run's step
    np.testing.assert_allclose(m.values, run.residual_map("scribble", 2, 4))
    assert rv.map.value


# ---------------------------------------------------------------------------- studio
def test_studio_generate_equals_the_plain_call(shapes_pipe, tmp_path):
    st = widgets.Studio(shapes_pipe, steps=5, seed=7, control="scribble", workdir=tmp_path / "studio")
    st.pad.add_stroke([(10, 10), (54, 10), (54, 54), (10, 54), (10, 10)])
    st.scale.value, st.window.value, st.mode.value = 0.8, (0.0, 0.6), "prompt"
    run = st.generate(wait=True)
    assert st.run is run and len(run.steps) == 5 and st.image.value
    assert st.explorer is not None and st.residual_viewer is not None and st.viewer.n_frames == 5
    kw = st.sampler_kwargs()
    assert kw["control"].scale == 0.8 and kw["control"].end == 0.6 and kw["control"].mode == "prompt"
    plain = shapes_pipe.sampler(**kw, progress=False).run()
    assert torch.equal(plain.final_latents, run.final_latents), "the studio is a thin wrapper over lab"
    assert "pipe.sampler(" in st.code.value and "seed=7" in st.code.value
    # the code it shows runs as it stands (issue 25: `pad` was undefined and the residual recorder left out)
    # and makes the same run: the model load, the drawing from its PNG, both recorders
    assert "lab.ResidualRecorder(maps=True)" in st.code_text and "lab.load('shapes'" in st.code_text
    ns: dict = {}
    exec(st.code_text, ns)
    assert torch.equal(ns["run"].final_latents, run.final_latents)
    assert ns["run"].residual_map("scribble", 2, 1) is not None  # maps recorded: the residual recorder is there
    # the shapes model's 16x16 latents: self-attention and every head recorded, for the explorer's views
    assert "AttentionRecorder(kind='both', heads='all')" in st.code_text and st.explorer.has_self
    assert "self" in ns["run"].attention["16x16"].to_dataset()
    # a new Generate clears the last run's result and views while it is live
    st.viewer.follow = lambda sampler, on_done: None  # keep the new run from starting: look at the page as it is
    st.generate()
    assert st.results.children == () and "sampling 5 steps" in st.image_caption.value
    st.control.value = "none"
    assert "control" not in st.sampler_kwargs()


def test_studio_forks_at_the_shown_step_with_changes(shapes_pipe):
    st = widgets.Studio(shapes_pipe, steps=8, seed=4)
    st.control.value = "none"
    assert st.fork_box.layout.display == "none" and st.fork_button.disabled
    with pytest.raises(RuntimeError, match="Generate a run first"):
        st.fork()
    run = st.generate(wait=True)
    assert st.fork_box.layout.display is None and not st.fork_button.disabled
    with pytest.raises(ValueError, match="changes nothing"):
        st.fork(3, wait=True)
    st.viewer.show(3)  # the trajectory shows step 3: the fork goes back to just before it
    st.fork_prompt.value = "a small green triangle on a white background"
    st.fork_guidance.value = 7.0
    assert st.fork_changes() == {"prompt": "a small green triangle on a white background", "guidance": 7.0}
    branch = st.fork(wait=True)
    # the same as lab's own fork: steps 0..2 shared, then the new prompt and guidance
    plain = shapes_pipe.sampler(PROMPT, steps=8, seed=4, guidance=5.0, progress=False)
    plain.run()
    expect = plain.fork(at=3, prompt="a small green triangle on a white background", guidance=7.0).run()
    assert torch.equal(branch.final_latents, expect.final_latents)
    assert all(torch.equal(branch.steps[i].latents, run.steps[i].latents) for i in range(4))
    assert not torch.equal(branch.final_latents, run.final_latents)
    # side by side: the run as generated, then each branch with what it changed
    cards = st.branches.children
    assert len(cards) == 2 and "as generated" in cards[0].children[1].value
    assert "fork at step 3" in cards[1].children[1].value and "green triangle" in cards[1].children[1].value
    st.fork(6, wait=True, seed=11)
    assert len(st.branches.children) == 3 and [f[0] for f in st.forks] == [3, 6]
    with pytest.raises(IndexError, match="outside the run"):
        st.fork(8, seed=1)
    with pytest.raises(ValueError, match="prompt is empty"):
        st.fork(2, prompt=" ")
    st.generate(wait=True)  # a new run starts without the old branches
    assert st.branches.children == () and st.forks == []


def test_studio_errors_show_in_the_widget(shapes_pipe):
    st = widgets.Studio(shapes_pipe, steps=2)
    st.prompt.value = "   "
    with pytest.raises(ValueError, match="prompt is empty"):
        st.generate()
    assert "prompt is empty" in st.error_box.value and st.run is None
    quiet = widgets.Studio(shapes_pipe, steps=2, raise_errors=False)
    quiet.prompt.value = ""
    assert quiet.generate() is None and len(quiet.errors) == 1
    with pytest.raises(KeyError, match="no ControlNet"):
        widgets.Studio(shapes_pipe, control="depth")


def test_studio_stop(shapes_pipe):
    st = widgets.Studio(shapes_pipe, steps=60, panels=("x0",))
    hit = threading.Event()
    st.viewer.observe(lambda ch: (st.stop(), hit.set()) if ch["new"] == 2 else None, "n_frames")
    st.generate()
    assert st.generate_button.disabled or hit.is_set()
    run = st.viewer.wait(timeout=120)
    assert hit.is_set() and run.interrupted and len(run.steps) < 60
    assert "stopped after" in st.image_caption.value and not st.generate_button.disabled

"""analysis: heat maps, IoU, entropy and plots, checked on constructed attention with known answers
and on real recorded runs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import xarray as xr

import analysis as an
import lab

WORDS = ["", "a", "red", "cir", "", ""]  # token 3 and 4 together spell one word below


def _tree(maps: dict[int, np.ndarray], steps=3) -> xr.DataTree:
    """Cross-attention [step, batch, layer, head, y, x, token] where token t has map maps[t] (others uniform)."""
    h, w = 8, 8
    n_tok = 6
    a = np.full((steps, 1, 2, 1, h, w, n_tok), 1e-3, np.float32)
    for t, m in maps.items():
        a[..., t] = m
    a /= a.sum(-1, keepdims=True)
    words = ["", "a", "red", "circle", "circle", ""]
    ds = xr.Dataset({"cross": (("step", "batch", "layer", "head", "query_y", "query_x", "token"), a)},
                    coords={"step": np.arange(steps), "layer": ["unet.a.attn2", "unet.b.attn2"], "head": ["mean"],
                            "query_y": np.arange(h), "query_x": np.arange(w), "token": np.arange(n_tok),
                            "word": (("batch", "token"), [words]),
                            "word_index": (("batch", "token"), [[-1, 0, 1, 2, 2, -1]]),
                            "token_str": (("batch", "token"), [["<s>", "a", "red", "cir", "cle", "</s>"]])})
    return xr.DataTree.from_dict({"/8x8": ds})


def test_word_heatmap_finds_the_region_and_merges_subword_tokens():
    blob = np.zeros((8, 8), np.float32)
    blob[1:4, 5:8] = 1.0
    tree = _tree({3: blob * 0.5, 4: blob * 0.5, 2: np.roll(blob, 4, axis=0)})
    hm = an.word_heatmap(tree, "circle", size=(8, 8))
    assert hm.dims == ("y", "x") and float(hm.max()) == pytest.approx(1.0)
    mask = blob > 0
    assert an.heatmap_iou(hm, mask) > 0.9
    assert an.heatmap_iou(an.word_heatmap(tree, "red", size=(8, 8)), mask) < 0.1
    up = an.word_heatmap(tree, "circle", size=64)
    assert up.shape == (64, 64) and float(up.min()) >= 0
    with pytest.raises(KeyError, match="did you mean"):
        an.word_heatmap(tree, "circel")


def test_heatmap_iou_by_hand():
    h = np.array([[1.0, 0.5], [0.3, 0.0]])
    m = np.array([[True, False], [True, False]])
    assert an.heatmap_iou(h, m, threshold=0.4) == pytest.approx(1 / 3)
    # min-max normalised as DAAM does: an offset map is not "hot" everywhere
    offset = np.array([[1.0, 0.9], [0.8, 0.7]])  # -> [[1, 2/3], [1/3, 0]]
    assert an.heatmap_iou(offset, np.array([[True, True], [False, False]])) == pytest.approx(1.0)
    assert an.heatmap_iou(np.full((2, 2), 0.5), m) == 0.0  # a flat map finds nothing
    with pytest.raises(ValueError, match="shape"):
        an.heatmap_iou(h, np.zeros((3, 3), bool))


def test_entropy_of_uniform_attention_is_log_tokens():
    tree = _tree({})
    e = an.entropy(tree)
    assert e.dims == ("step", "layer")
    np.testing.assert_allclose(e.values, np.log(6), rtol=1e-4)


@pytest.fixture(scope="module")
def recorded(shapes_pipe):
    rec = lab.AttentionRecorder(kind="both")
    return shapes_pipe.sampler("a large red circle on a gray background", steps=8, guidance=5.0, seed=0,
                               recorders=[rec], progress=False).run()


def test_on_a_recorded_run(recorded):
    hm = an.word_heatmap(recorded, "circle")
    assert hm.shape == (64, 64)
    maps = an.token_heatmaps(recorded)
    assert list(maps["word"].values) == ["a", "large", "red", "circle", "on", "gray", "background"]
    win = an.word_heatmap(recorded, "red", steps=(0.5, 1.0), layers="*up_blocks*")
    assert win.attrs["layers"] == 4
    over = an.attention_over_time(recorded, "red")
    assert over.dims == ("step", "layer") and over.shape == (8, 7)
    assert (over.values > 0).all() and (over.values < 1).all()
    comps = an.self_attention_components(recorded, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1", 7, k=3)
    assert comps.shape == (3, 16, 16)
    assert (np.diff(comps["singular_value"].values) <= 0).all()
    with pytest.raises(KeyError):
        an.self_attention_components(recorded, "unet.nope.attn1", 0)


def test_plots_return_axes(recorded):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    assert an.overlay(recorded.image, an.word_heatmap(recorded, "circle"), ax=ax) is ax
    axes = an.plot_heatmaps(recorded, ["red", "circle"])
    assert len(axes) == 2 and axes[0].get_title() == "red"
    plt.close("all")

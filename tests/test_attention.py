"""Attention recording: invariance, exact probabilities, the layer-name contract, scoping, budgets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from components import PROMPT, tiny_sd_components

import lab
from lab.recording import attention_layer_names

SHAPES_CROSS_LAYERS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "unet.up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2",
]


@pytest.fixture(scope="module")
def tiny_pipe():
    return lab.Pipeline.from_components(**tiny_sd_components())


def test_layer_names_of_the_shapes_model_are_a_contract(shapes_pipe):
    rec = lab.AttentionRecorder()
    run = shapes_pipe.sampler("a large red circle on a gray background", steps=2, recorders=[rec],
                              progress=False).run()
    assert rec.layer_names == SHAPES_CROSS_LAYERS
    assert sorted(run.steps[0].records) == sorted(SHAPES_CROSS_LAYERS)
    tree = run.attention
    assert sorted(tree.children) == ["16x16", "4x4", "8x8"]
    assert list(tree["16x16"]["layer"].values) == [SHAPES_CROSS_LAYERS[i] for i in (0, 4, 5)]
    assert list(tree["4x4"]["layer"].values) == [SHAPES_CROSS_LAYERS[6]]
    selfs = [n for n in attention_layer_names(shapes_pipe.unet) if n.endswith("attn1")]
    assert selfs == [n.replace("attn2", "attn1") for n in SHAPES_CROSS_LAYERS]


@pytest.mark.parametrize("kind", ["cross", "self", "both"])
def test_recording_does_not_change_the_output(tiny_pipe, kind):
    kw = dict(steps=4, guidance=5.0, scheduler="euler_a", seed=0, height=32, width=32, progress=False)
    plain = tiny_pipe.sampler(PROMPT, **kw).run()
    rec = lab.AttentionRecorder(kind=kind, heads="all", half="both", dtype=torch.float32)
    recorded = tiny_pipe.sampler(PROMPT, recorders=[rec], **kw).run()
    assert (plain.final_latents - recorded.final_latents).abs().max().item() < 1e-5
    for n, p in recorded.steps[0].records.items():
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-4), n  # probabilities sum to 1 over keys


def test_recording_does_not_change_the_shapes_model(shapes_pipe):
    kw = dict(steps=6, guidance=5.0, seed=3, progress=False)
    plain = shapes_pipe.sampler(PROMPT, **kw).run()
    rec = shapes_pipe.sampler(PROMPT, recorders=[lab.AttentionRecorder()], **kw).run()
    assert (plain.final_latents - rec.final_latents).abs().max().item() < 1e-5


def test_probabilities_equal_diffusers_vanilla_attention_scores(tiny_pipe):
    """Independent check: the recorded map equals ``Attention.get_attention_scores`` (the vanilla
    processor's own computation) on the layer's actual inputs."""
    unet = tiny_pipe.unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = dict(unet.named_modules())[name]
    seen = {}

    def hook(mod, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach().clone())
        seen.setdefault("c", kwargs["encoder_hidden_states"].detach().clone())

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rec = lab.AttentionRecorder(layers=f"unet.{name}", heads="all", half="both", dtype=torch.float32)
        run = tiny_pipe.sampler(PROMPT, steps=1, guidance=5.0, seed=0, height=32, width=32, recorders=[rec],
                                progress=False).run()
    finally:
        h.remove()
    q = attn.head_to_batch_dim(attn.to_q(seen["x"]))
    k = attn.head_to_batch_dim(attn.to_k(seen["c"]))
    want = attn.get_attention_scores(q, k, None)  # [batch*heads, Q, K]
    got = run.steps[0].records[f"unet.{name}"]  # [batch, heads, Q, K]
    assert torch.allclose(got.reshape(want.shape), want, atol=1e-5)


def test_processors_are_restored_even_on_error(tiny_pipe, monkeypatch):
    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    rec = lab.AttentionRecorder()
    s = tiny_pipe.sampler(PROMPT, steps=3, height=32, width=32, recorders=[rec], progress=False)
    real = tiny_pipe.unet.forward

    def fail(*a, **k):
        real(*a, **k)
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_pipe.unet, "forward", fail)
    with pytest.raises(RuntimeError, match="boom"):
        s.run()
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before
    monkeypatch.setattr(tiny_pipe.unet, "forward", real)
    s.step()  # a direct step attaches and detaches around itself
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before
    assert s.history[0].records


def test_unknown_layer_and_budget(tiny_pipe):
    with pytest.raises(KeyError, match="did you mean"):
        tiny_pipe.sampler(PROMPT, steps=2, height=32, width=32, progress=False,
                          recorders=[lab.AttentionRecorder(layers="unet.down_blocks.0.attentions.0.transformer_blocks.0.atn2")]).run()
    rec = lab.AttentionRecorder(kind="self", heads="all", half="both", max_bytes=10_000)
    with pytest.raises(lab.RecordingBudgetError, match="MiB"):
        tiny_pipe.sampler(PROMPT, steps=20, height=32, width=32, recorders=[rec], progress=False).run()
    with pytest.raises(ValueError, match="heads"):
        lab.AttentionRecorder(heads="max")


def test_steps_filter_and_data_model(tiny_pipe):
    rec = lab.AttentionRecorder(steps=[1, 3], heads="all")
    run = tiny_pipe.sampler(PROMPT, steps=4, guidance=3.0, height=32, width=32, recorders=[rec], progress=False).run()
    node = run.attention["16x16"].to_dataset()
    assert list(node["step"].values) == [1, 3]
    assert node["cross"].dims == ("step", "batch", "layer", "head", "query_y", "query_x", "token")
    assert node.sizes["head"] == 2 and node.sizes["token"] == 32
    words = list(node["word"].isel(batch=0).values[:6])
    assert words == ["", "a", "large", "red", "circle", "and"]
    assert list(node["token_str"].isel(batch=0).values[:3]) == ["<|startoftext|>", "a", "large"]
    assert node["word_index"].isel(batch=0).values[4] == 3


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_attention_is_saved_with_the_run(tiny_pipe, tmp_path, suffix):
    run = tiny_pipe.sampler(PROMPT, steps=2, guidance=3.0, height=32, width=32, progress=False,
                            recorders=[lab.AttentionRecorder(kind="both")]).run()
    back = lab.Run.load(run.save(tmp_path / f"r{suffix}"))
    for res in run.attention.children:
        xr.testing.assert_identical(run.attention[res].to_dataset(), back.attention[res].to_dataset())


@pytest.mark.parametrize("arch,heads,res", [("sd15", 8, ["8x8", "4x4", "2x2", "1x1"]),
                                            ("sd21", 5, ["8x8", "4x4", "2x2", "1x1"]),
                                            ("sdxl", 10, ["4x4", "2x2"])])
def test_recording_on_real_architectures(arch, heads, res):
    from lab.architectures import random_pipeline
    pipe = random_pipeline(arch, width=10 if arch != "sdxl" else 20, max_depth=1, layers=2)
    rec = lab.AttentionRecorder(heads="all")
    run = pipe.sampler("a red circle", steps=1, guidance=5.0, height=64, width=64, recorders=[rec],
                       progress=False).run()
    tree = run.attention
    assert sorted(tree.children, key=lambda r: -int(r.split("x")[0])) == res
    first = tree[res[0]].to_dataset()
    if arch == "sdxl":  # SDXL: no attention at the top level; 10 heads at 1280 -> here 20 heads would not divide
        assert first.sizes["head"] in (heads, 1, 2)
    else:
        assert first.sizes["head"] == heads or arch == "sd21" and first.sizes["head"] in (1, 5)


def test_reweight_by_one_is_a_no_op_and_other_weights_act(shapes_pipe):
    kw = dict(steps=8, guidance=5.0, seed=2, progress=False)
    cap = "a large red circle on a gray background"
    plain = shapes_pipe.sampler(cap, **kw).run()
    same = shapes_pipe.sampler(cap, recorders=[lab.AttentionRecorder(record=False, edits=[lab.Reweight({"red": 1.0})])],
                               **kw).run()
    assert (plain.final_latents - same.final_latents).abs().max().item() < 1e-4  # explicit softmax vs SDPA
    boosted = shapes_pipe.sampler(cap, recorders=[lab.AttentionRecorder(edits=[lab.Reweight({"red": 4.0})])],
                                  **kw).run()
    assert (plain.final_latents - boosted.final_latents).abs().max().item() > 1e-2
    # the edit shows in what was recorded: more mass on "red" than without
    ref = shapes_pipe.sampler(cap, recorders=[lab.AttentionRecorder()], **kw).run()
    import analysis as an
    assert float(an.attention_over_time(boosted, "red").mean()) > 2 * float(an.attention_over_time(ref, "red").mean())
    with pytest.raises(KeyError, match="not in the prompt"):
        shapes_pipe.sampler(cap, recorders=[lab.AttentionRecorder(edits=[lab.Reweight({"blue": 2.0})])], **kw).run()


def test_replace_attention_keeps_the_source_layout(shapes_pipe):
    from lab.recording import token_alignment
    kw = dict(steps=10, guidance=5.0, seed=4, progress=False)
    src = shapes_pipe.sampler("a large red circle on a gray background",
                              recorders=[lab.AttentionRecorder(heads="all")], **kw).run()
    # with the source's own prompt, replacing all maps reproduces the source
    itself = shapes_pipe.sampler("a large red circle on a gray background", **kw, recorders=[
        lab.AttentionRecorder(record=False, edits=[lab.ReplaceAttention(src, steps=(0.0, 1.0))])]).run()
    assert (itself.final_latents - src.final_latents).abs().max().item() < 1e-3
    target = "a large blue circle on a gray background"
    plain = shapes_pipe.sampler(target, **kw).run()
    edited = shapes_pipe.sampler(target, **kw, recorders=[
        lab.AttentionRecorder(record=False, edits=[lab.ReplaceAttention(src, steps=(0.0, 1.0))])]).run()
    d_edit = (edited.final_latents - src.final_latents).norm().item()
    d_plain = (plain.final_latents - src.final_latents).norm().item()
    assert d_edit < d_plain
    assert token_alignment(["", "a", "red", "circle", ""], ["", "a", "blue", "circle", ""]) == [0, 1, 2, 3, 4]
    assert token_alignment(["", "a", "circle", ""], ["", "a", "red", "circle", ""]) == [0, 1, -1, 2, 3]


def test_edits_through_a_fork(shapes_pipe):
    s = shapes_pipe.sampler("a large red circle on a gray background", steps=8, guidance=5.0, seed=1, progress=False)
    for _ in range(3):
        s.step()
    f = s.fork(recorders=[lab.AttentionRecorder(edits=[lab.Reweight({"circle": 3.0})])])
    a, b = s.run(), f.run()
    assert torch.equal(a.steps[2].prev_latents, b.steps[2].prev_latents)
    assert (a.final_latents - b.final_latents).abs().max().item() > 1e-3


def test_spill_to_disk_equals_memory_and_reads_lazily(shapes_pipe, tmp_path):
    import analysis as an
    prompt = "a large red circle and a small blue square on a gray background"
    kw = dict(steps=4, guidance=5.0, seed=2, progress=False)
    spec = dict(kind="both", heads="all", half="both")
    mem = shapes_pipe.sampler(prompt, **kw, recorders=[lab.AttentionRecorder(**spec)]).run()
    rec = lab.AttentionRecorder(**spec, spill=tmp_path / "spill", max_bytes=1)  # the memory budget does not apply
    disk = shapes_pipe.sampler(prompt, **kw, recorders=[rec]).run()
    torch.testing.assert_close(disk.final_latents, mem.final_latents, rtol=0, atol=0)
    folder = next((tmp_path / "spill").iterdir())
    files = sorted(folder.glob("layer*.npy"))
    assert len(files) == len(rec.layer_names)
    stored = sum(np.load(f, mmap_mode="r").nbytes for f in files)
    assert stored == sum(int(np.prod(shape)) * 2 for shape in rec.meta["spill"]["shapes"].values())  # float16
    for res, node in mem.attention.children.items():
        for var in node.to_dataset().data_vars:
            lazy = disk.attention[res][var]
            assert type(lazy.data).__module__.startswith("dask"), "spilled attention is read lazily"
            np.testing.assert_array_equal(lazy.values, node[var].values)
            assert lazy.dims == node[var].dims
    # the records are bit-equal (above); a heat map reduces the lazy (dask) layers in another order than
    # the in-memory ones, so float32 sums may differ in the last bits
    np.testing.assert_allclose(an.word_heatmap(disk, "square").values, an.word_heatmap(mem, "square").values,
                               rtol=1e-4, atol=1e-9)
    saved = lab.Run.load(disk.save(tmp_path / "run.zarr"))
    np.testing.assert_array_equal(saved.attention["8x8"]["cross"].values, mem.attention["8x8"]["cross"].values)
    # a spilled run works as the source of an attention edit too
    target = "a large blue circle and a small blue square on a gray background"
    src_disk = shapes_pipe.sampler(prompt, **kw, recorders=[lab.AttentionRecorder(spill=tmp_path / "s2")]).run()
    src_mem = shapes_pipe.sampler(prompt, **kw, recorders=[lab.AttentionRecorder()]).run()
    a = shapes_pipe.sampler(target, **kw, recorders=[lab.AttentionRecorder(
        record=False, edits=[lab.ReplaceAttention(src_disk, steps=(0.0, 0.5))])]).run()
    b = shapes_pipe.sampler(target, **kw, recorders=[lab.AttentionRecorder(
        record=False, edits=[lab.ReplaceAttention(src_mem, steps=(0.0, 0.5))])]).run()
    torch.testing.assert_close(a.final_latents, b.final_latents, rtol=0, atol=0)


def test_spill_refuses_without_disk_room_before_sampling(shapes_pipe, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    sampler = shapes_pipe.sampler("a red circle", steps=3, progress=False,
                                  recorders=[lab.AttentionRecorder(spill=tmp_path / "s")])
    with pytest.raises(lab.RecordingBudgetError, match="on disk"):
        sampler.run()
    assert sampler.position == 0 and list((tmp_path / "s").iterdir()) == []
    with pytest.raises(ValueError, match="float16 or float32"):
        shapes_pipe.sampler("a red circle", steps=1, progress=False, recorders=[
            lab.AttentionRecorder(spill=tmp_path / "b", dtype=torch.bfloat16)]).run()


def test_spill_when_stepping_by_hand_rewinding_and_forking(shapes_pipe, tmp_path):
    """A sampler stepped by hand attaches its recorders every step: one spill folder all the same. Rewound
    steps get new slots (the file grows into a second one), so a fork made before the rewind still reads
    its own steps, and every run equals the same recording in memory."""
    prompt = "a large red circle on a gray background"
    kw = dict(steps=4, guidance=5.0, seed=2, progress=False)
    mem = shapes_pipe.sampler(prompt, **kw, recorders=[lab.AttentionRecorder()]).run()
    s = shapes_pipe.sampler(prompt, **kw, recorders=[lab.AttentionRecorder(spill=tmp_path)])
    for _ in range(3):
        s.step()
    fork = s.fork(at=2)
    s.rewind(1)
    for _ in s:
        pass
    assert len(list(tmp_path.iterdir())) == 1, "one folder per sampler, not one per step"
    assert list(next(tmp_path.iterdir()).glob("*+.npy")), "re-stepped steps went to new slots"
    run = s.to_run()
    np.testing.assert_array_equal(run.attention["16x16"]["cross"].values, mem.attention["16x16"]["cross"].values)
    fork_run = fork.to_run()
    np.testing.assert_array_equal(fork_run.attention["16x16"]["cross"].values,
                                  mem.attention["16x16"]["cross"].values[:2])


def test_layers_not_recorded_keep_sdpa_while_recording(tiny_pipe, monkeypatch):
    """Issue 8: SDPA is kept on the layers not recorded. While a run records the cross-attention layers, every
    layer carries a LayerDispatch around its own AttnProcessor2_0 (F.scaled_dot_product_attention); only the
    recorded layers take the explicit path, the others call their own processor; afterwards all are as before."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lab.recording import dispatch
    before = dict(tiny_pipe.unet.attn_processors)
    assert all(type(p) is AttnProcessor2_0 for p in before.values())
    during, explicit, own = [], set(), []
    real_attend, real_call = dispatch.attend, AttnProcessor2_0.__call__

    def spy_attend(attn, *a, **k):
        explicit.add(attn)
        return real_attend(attn, *a, **k)

    def spy_call(self, attn, *a, **k):
        own.append(attn)
        return real_call(self, attn, *a, **k)
    monkeypatch.setattr(dispatch, "attend", spy_attend)
    monkeypatch.setattr(AttnProcessor2_0, "__call__", spy_call)
    tiny_pipe.sampler(PROMPT, steps=2, guidance=5.0, seed=0, progress=False,
                      recorders=[lab.AttentionRecorder()]).run(
        callback=lambda st: during.append(dict(tiny_pipe.unet.attn_processors)))
    mods = {f"unet.{n}": m for n, m in tiny_pipe.unet.named_modules()}
    assert {n for n, m in mods.items() if m in explicit} == {n for n in mods if n.endswith("attn2")}
    assert {id(m) for m in own} == {id(m) for n, m in mods.items() if n.endswith("attn1")}
    assert all(type(p) is dispatch.LayerDispatch and type(p.inner) is AttnProcessor2_0 for p in during[0].values())
    assert tiny_pipe.unet.attn_processors == before

"""The shapes world: data, oracle, the seed's zero-convolution properties, and the training code."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.loading import BUNDLED
from lab.shapes import evaluator, train, world


def test_dataset_is_deterministic_and_chunk_independent():
    a = world.generate(12, seed=5)
    b = world.generate(12, seed=5, chunk=5)
    c = world.generate(12, seed=6)
    assert a["caption"] == b["caption"]
    for k in ("image", "scribble", "segmentation", "edges", "mask_union", "object_masks"):
        assert np.array_equal(a[k], b[k]), k
    assert np.array_equal(a["object_masks"].any(1), a["mask_union"])
    assert a["caption"] != c["caption"]
    assert a["image"].shape == (12, 64, 64, 3) and a["image"].dtype == np.uint8


def test_world_covers_its_grammar():
    exs = [world.make_example(0, i) for i in range(300)]
    objs = [o for e in exs for o in e["scene"].objects]
    assert {o.shape for o in objs} == set(world.SHAPES)
    assert {o.colour for o in objs} == set(world.COLOURS) and len(world.COLOURS) >= 6
    assert {o.size for o in objs} == {"small", "large"}
    assert {e["scene"].background for e in exs} == set(world.BACKGROUNDS) and len(world.BACKGROUNDS) >= 3
    assert {len(e["scene"].objects) for e in exs} == {1, 2}
    e = exs[0]
    assert e["caption"].endswith(f"on a {e['scene'].background} background")
    for m, o in zip(e["masks"], e["scene"].objects):
        assert m.sum() > 50
    # conditions come from the masks: segmentation colours are class colours, scribbles lie near outlines
    assert set(map(tuple, e["segmentation"].reshape(-1, 3))) <= set(world.SEG_PALETTE.values())
    assert e["scribble"].any() and e["edges"].any()


def test_every_caption_category_comes_out_as_often_as_its_attributes_say():
    """Issue 18: attributes are drawn before places, so two large objects (which fit only along opposite sides)
    are a quarter of the two-object scenes (they were 0.24% when a size was redrawn with each place); same shape
    a third, same colour a sixth; each background a third."""
    from collections import Counter
    scenes = [world.sample_scene(np.random.default_rng([7, i, 0])) for i in range(4000)]
    two = [s for s in scenes if len(s.objects) == 2]
    cats = Counter(world.caption_category(s) for s in two)
    share = lambda pred: sum(v for k, v in cats.items() if pred(k)) / len(two)  # noqa: E731
    assert 0.42 <= len(two) / len(scenes) <= 0.52  # 0.5, less the held-out combinations training never sees
    assert 0.21 <= share(lambda k: k.startswith("two_large")) <= 0.29
    assert 0.21 <= share(lambda k: k.startswith("two_small")) <= 0.29
    assert 0.29 <= share(lambda k: "same_shape" in k) <= 0.38
    assert 0.13 <= share(lambda k: "same_colour" in k) <= 0.21
    assert len(cats) == 12 and min(cats.values()) >= 10  # every category, the rarest (both shared) ~1.3%
    bgs = Counter(s.background for s in scenes)
    assert set(bgs) == set(world.BACKGROUNDS) and min(bgs.values()) > 0.3 * len(scenes)
    for s in two:  # two large objects really are placed apart
        a, b = s.objects
        assert world._apart(a, b)
    mixed = [world.sample_scene(np.random.default_rng([7, i, 0]), two_share=0.75) for i in range(1000)]
    assert 0.66 <= np.mean([len(s.objects) == 2 for s in mixed]) <= 0.76  # the harder training mix


def test_eval_caption_categories_and_duplicates():
    from lab.shapes.evaluate import CATEGORIES, category_captions, is_duplicate
    for cat in CATEGORIES:
        caps = category_captions(cat, 3)
        assert len(caps) == 3 and len(set(caps)) >= 2
        for c in caps:
            objs, bg = evaluator.parse_caption(c)
            attrs = [(shape, colour, size) for size, colour, shape in objs]
            assert world.caption_category(attrs) == cat and world.is_held_out(attrs, bg)
    assert all("large" in c and "small" not in c for c in category_captions("two_large", 5))
    with pytest.raises(ValueError, match="caption category"):
        category_captions("three_large", 1)
    # one object drawn twice is a duplicate; the right pair, or a swap of attributes, is not
    cap = "a small purple square and a small blue circle on a gray background"
    twice = world.Scene((world.ShapeObject("square", "purple", "small", 14, 14),
                         world.ShapeObject("square", "purple", "small", 46, 46)), "gray")
    right = world.Scene((world.ShapeObject("square", "purple", "small", 14, 14),
                         world.ShapeObject("circle", "blue", "small", 46, 46)), "gray")
    swapped = world.Scene((world.ShapeObject("circle", "purple", "small", 14, 14),
                           world.ShapeObject("square", "blue", "small", 46, 46)), "gray")
    for scene, dup in ((twice, True), (right, False), (swapped, False)):
        score = evaluator.evaluate(world.render(scene)[0], cap)
        assert is_duplicate(cap, score) is dup
        assert score["all_ok"] is (scene is right)
    same = "a small purple square and a small purple square on a gray background"
    assert not is_duplicate(same, evaluator.evaluate(world.render(twice)[0], same))


def test_heldout_combinations_never_appear_in_training():
    for i in range(200):
        s = world.make_example(0, i)["scene"]
        assert not world.is_held_out(s.objects, s.background)
        h = world.make_example(0, i, split="heldout", n_objects=2)["scene"]
        assert world.is_held_out(h.objects, h.background)


def test_evaluator_is_right_on_ground_truth():
    ok, ious = 0, []
    for i in range(1000):
        ex = world.make_example(1, i, split="heldout")
        r = evaluator.evaluate(ex["image"], ex["caption"])
        ok += bool(r["all_ok"] and r["background_ok"])
        if i < 100:
            ious.append(evaluator.mask_iou(r["foreground"], ex["masks"].any(0)))
    assert ok / 1000 >= 0.98
    # the oracle's masks are the objects' (anti-aliased rims and the 3x3 opening cost small shapes a little)
    assert np.mean(ious) > 0.85 and min(ious) > 0.7


def test_touching_scenes_abut_in_two_colours_and_leave_the_training_mix_alone():
    for i in range(200):
        ex = world.make_example(2, i, split="heldout", n_objects=2, touching=True)
        a, b = ex["scene"].objects
        assert a.colour != b.colour
        ax0, ay0, ax1, ay1 = a.bbox
        bx0, by0, bx1, by1 = b.bbox
        gaps = (bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
        assert max(gaps) == pytest.approx(0.0, abs=1e-6)  # abutting on one side, not overlapping
    # touching is a request: the default draws are unchanged by the option
    assert world.make_example(3, 7)["caption"] == world.make_example(3, 7, touching=False)["caption"]


def test_the_oracle_separates_touching_objects_by_colour():
    """Issue 18: two touching objects of different colours were one merged object. 1,000 such ground-truth
    scenes (the eval's ``evaluator_accuracy_touching``), and the 1,000 usual ones, are read right."""
    from lab.shapes.evaluate import oracle_accuracy
    assert oracle_accuracy(1000, touching=True) >= 0.99
    assert oracle_accuracy(1000) >= 0.99


def test_the_oracle_after_a_vae_round_trip(shapes_pipe):
    """The VAE blurs: small triangles lose their tip (they read as squares by template IoU), a touching
    neighbour's seam cuts their base corners (the rest reads as a circle), and colours drift at seams (red and
    yellow blur to orange). On 200 scenes each: usual scenes >= 0.99, touching ones >= 0.98 (on 1,000: 0.999
    and 0.995; with seed 2, 1.000 and 0.993; 0.977 before the enclosing-triangle rule)."""
    from lab.shapes.evaluate import oracle_accuracy
    assert oracle_accuracy(200, vae=shapes_pipe.vae) >= 0.99
    assert oracle_accuracy(200, touching=True, vae=shapes_pipe.vae) >= 0.98


def test_the_oracle_reads_a_cut_triangle_as_a_triangle():
    """What a seam leaves of a triangle still fills its minimum enclosing triangle; circles and squares do not,
    at both of the world's sizes, so the rule cannot turn them into triangles."""
    for side in (16, 28):
        tpl = evaluator._templates(side, side)
        assert evaluator._triangle_fill(tpl["triangle"]) >= evaluator.TRIANGLE_FILL
        assert evaluator._triangle_fill(tpl["circle"]) < evaluator.TRIANGLE_FILL
        assert evaluator._triangle_fill(tpl["square"]) < evaluator.TRIANGLE_FILL
    # a small triangle whose base a neighbour to its lower right cut: the corner rule has nothing to say and
    # the template fit prefers the circle, which is how 0.02 of touching scenes were misread after the VAE
    cut = evaluator._templates(16, 16)["triangle"].copy()
    cut[11:, 9:] = False
    cut = cut[:, :14]
    assert evaluator._corner_shape(cut) is None
    img = np.full((64, 64, 3), 128, np.uint8)
    img[20:36, 20:34][cut] = world.COLOURS["red"]
    (obj,) = evaluator.detect(img)[1]
    assert obj.key == ("small", "red", "triangle")


def test_evaluator_catches_wrong_captions():
    ex = world.make_example(1, 3, split="heldout", n_objects=1)
    size, colour, shape = evaluator.parse_caption(ex["caption"])[0][0]
    other_colour = next(c for c in world.COLOURS if c != colour)
    other_shape = next(s for s in world.SHAPES if s != shape)
    assert not evaluator.evaluate(ex["image"], f"a {size} {other_colour} {shape} on a gray background")["colour_ok"]
    assert not evaluator.evaluate(ex["image"], f"a {size} {colour} {other_shape}")["shape_ok"]
    blank = np.full((64, 64, 3), 128, np.uint8)
    r = evaluator.evaluate(blank, ex["caption"])
    assert r["n_detected"] == 0 and not r["colour_ok"]


def test_tokenizer_makes_each_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from lab.shapes.tokenizer import write_tokenizer
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path, world.VOCABULARY))
    for w in world.VOCABULARY:
        assert len(tok(w).input_ids) == 3, w  # bos, word, eos
    assert len(tok("a zebra").input_ids) > 4  # unknown words still tokenize (bytes)


def _tiny_unet_and_controlnet(init="zero"):
    from diffusers import ControlNetModel, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    if init == "gaussian":
        train.gaussian_init_zero_convs(net, generator=torch.Generator().manual_seed(0))
    return unet, net


def _forward(unet, net, x, t, c, hint):
    down, mid = net(x, t, encoder_hidden_states=c, controlnet_cond=hint, return_dict=False)
    return unet(x, t, encoder_hidden_states=c, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def test_zero_convolutions_leave_the_base_unchanged_yet_learn():
    """y_c = F(x) + Z(F(x + Z(c)); Theta_c): at zero init the output is exactly F(x), but dZ/dW = I != 0."""
    unet, net = _tiny_unet_and_controlnet()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    hint = torch.rand(2, 3, 16, 16, generator=g)  # one /2 step in the hint embedding
    t = torch.tensor([10, 500])
    unet.requires_grad_(False)
    base = unet(x, t, encoder_hidden_states=c).sample
    out = _forward(unet, net, x, t, c, hint)
    assert torch.equal(out, base)
    loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
    loss.backward()
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block]
    for conv in zero_convs:
        assert conv.weight.abs().sum() == 0
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.bias.grad.abs().sum() > 0
    # the trainable copy's own weights get no gradient yet (dZ/dI = sum_j W_ij = 0)
    assert net.conv_in.weight.grad is None or net.conv_in.weight.grad.abs().sum() == 0


def test_gaussian_init_changes_the_output_at_step_zero():
    unet, net = _tiny_unet_and_controlnet("gaussian")
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    hint = torch.rand(1, 3, 16, 16, generator=g)
    with torch.no_grad():
        base = unet(x, 10, encoder_hidden_states=c).sample
        out = _forward(unet, net, x, 10, c, hint)
    assert (out - base).abs().max() > 1e-4


@pytest.mark.slow
def test_training_smoke_every_stage(tmp_path):
    rows = train.train(None, tmp_path / "work", preset="smoke", export_to=tmp_path / "model", progress=False)
    assert [r["stage"] for r in rows] == list(train.STAGES)
    for r in rows:
        assert r["steps"] == 3 and np.isfinite(r["final_loss"])
        log = (tmp_path / "work" / "logs" / f"{r['stage']}.jsonl").read_text().splitlines()
        assert len(log) == 3 and all(np.isfinite(json.loads(line)["loss"]) for line in log)
    # resumable: running a stage again starts from its checkpoint and does no more steps
    again = train.train("vae", tmp_path / "work", preset="smoke", progress=False)
    assert again[0]["steps"] == 3
    from diffusers import ControlNetModel, StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert sd.unet.dtype == torch.float32
    ControlNetModel.from_pretrained(tmp_path / "model", subfolder="controlnet-edges")
    assert (tmp_path / "model" / "lab_preview.json").exists()
    # the preview decoder goes with the model, and the model's pipeline uses it
    import lab
    pipe = lab.load(tmp_path / "model")
    assert pipe.preview_decoder is not None and pipe.preview(torch.zeros(4, 16, 16)).shape == (64, 64, 3)
    # and the ablation variant
    g = train.train("controlnet-scribble", tmp_path / "work", preset="smoke", init="gaussian", progress=False)
    assert g[0]["stage"] == "controlnet-scribble-gaussian"


def test_word_groups_follow_the_grammar():
    assert world.word_groups("a large red circle on a gray background") == [-1, 0, 0, 0, -1, -1, 2, 2]
    two = "a small blue square and a large green triangle on a white background"
    assert world.word_groups(two) == [-1, 0, 0, 0, -1, -1, 1, 1, 1, -1, -1, 2, 2, 2][:len(two.split())]
    ex = world.make_example(0, 3, n_objects=2)
    words = ex["caption"].split()
    for k, obj in enumerate(ex["scene"].objects):  # each object's words name that object, in caption order
        named = [w for w, g in zip(words, world.word_groups(ex["caption"])) if g == k]
        assert named == [obj.size, obj.colour, obj.shape]


def test_grounding_loss_measures_attention_outside_the_region():
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, :8, :8] = 1  # object 0: the top-left quarter
    masks[0, 2] = 1 - masks[0, 0]  # background
    groups = torch.tensor([[-1, 0, 2, -1]])
    inside = torch.zeros(1, 1, 256, 4)
    inside[0, 0, :, :] = 1e-6
    inside.view(1, 1, 16, 16, 4)[0, 0, :8, :8, 1] = 1  # token 1 only attended from its object
    inside.view(1, 1, 16, 16, 4)[0, 0, 8:, :, 2] = 1  # token 2 from the background
    assert float(train.grounding_loss([inside], masks, groups)) < 1e-4
    uniform = torch.full((1, 2, 256, 4), 0.25)  # every query attends equally: share = region's area
    expected = ((1 - 0.25) ** 2 + (1 - 0.75) ** 2) / 2
    assert float(train.grounding_loss([uniform], masks, groups)) == pytest.approx(expected, rel=1e-5)
    # several resolutions average; the 8x8 map is compared with the area-averaged mask
    small = torch.full((1, 1, 64, 4), 0.25)
    assert float(train.grounding_loss([uniform, small], masks, groups)) == pytest.approx(expected, rel=1e-5)
    # nothing named (a dropped caption): no loss
    assert float(train.grounding_loss([uniform], masks, torch.full((1, 4), -1))) == 0.0


def test_pixel_grounding_loss_asks_maps_to_cover_their_region():
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, :8, :8] = 1  # object 0: the top-left quarter
    masks[0, 2] = 1 - masks[0, 0]
    groups = torch.tensor([[-1, 0, 2, -1]])
    cover = torch.zeros(1, 1, 256, 4)
    cover.view(1, 1, 16, 16, 4)[0, 0, :8, :8, 1] = 1  # token 1: all of its object, nothing else
    cover.view(1, 1, 16, 16, 4)[0, 0, 8:, :, 2] = 1
    cover.view(1, 1, 16, 16, 4)[0, 0, :8, 8:, 2] = 1  # token 2: all of the background
    cover[..., 0] = 1 - cover[..., 1:].sum(-1)
    assert float(train.pixel_grounding_loss([cover], masks, groups)) < 1e-4
    # a peak in the object's centre satisfies the token loss but not the pixel loss
    peak = torch.zeros(1, 1, 256, 4)
    peak[..., 0] = 1
    peak.view(1, 1, 16, 16, 4)[0, 0, 4, 4] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    peak.view(1, 1, 16, 16, 4)[0, 0, 12, 12] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert float(train.grounding_loss([peak], masks, groups)) < 1e-4
    assert float(train.pixel_grounding_loss([peak], masks, groups)) > 5
    # uniform attention 1/4 by hand: BCE = area * -log(1/4) + (1 - area) * -log(3/4), per token
    uniform = torch.full((1, 2, 256, 4), 0.25)
    bce = [a * -math.log(0.25) + (1 - a) * -math.log(0.75) for a in (0.25, 0.75)]
    assert float(train.pixel_grounding_loss([uniform], masks, groups)) == pytest.approx(sum(bce) / 2, rel=1e-5)
    assert float(train.pixel_grounding_loss([uniform], masks, torch.full((1, 4), -1))) == 0.0


def test_encoding_cache_serves_the_same_latents_and_follows_the_vae(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_LAB_CACHE", str(tmp_path / "cache"))
    vae_dir = Path(BUNDLED["shapes"]) / "vae"
    first = train.Trainer(tmp_path / "a", "smoke", base=BUNDLED["shapes"], progress=False)
    scale, mean, std = first._latent_stats(vae_dir)
    path = train._encoding_cache(vae_dir, 64, 0, torch.device("cpu"))
    assert path.exists() and path.parent.parent == tmp_path / "cache"
    second = train.Trainer(tmp_path / "b", "smoke", base=BUNDLED["shapes"], progress=False)
    second._encode_stats = None  # a second command must not encode again
    _, mean2, std2 = second._latent_stats(vae_dir)
    assert torch.equal(mean, mean2) and torch.equal(std, std2)
    # a copy of the VAE saved elsewhere is the same VAE; another VAE, set or seed: another entry
    other = tmp_path / "vae"
    shutil.copytree(vae_dir, other)
    config = json.loads((vae_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere"}))
    assert train._encoding_cache(other, 64, 0, torch.device("cpu")) == path
    (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.0}))
    keys = {path, train._encoding_cache(other, 64, 0, torch.device("cpu")),
            train._encoding_cache(vae_dir, 65, 0, torch.device("cpu")),
            train._encoding_cache(vae_dir, 64, 1, torch.device("cpu"))}
    assert len(keys) == 4
    monkeypatch.setenv("LATENT_LAB_CACHE", "off")
    assert train._encoding_cache(vae_dir, 64, 0, torch.device("cpu")) is None


def test_probs_processor_matches_sdpa_and_passes_gradients():
    from diffusers import UNet2DConditionModel

    from lab.recording import ProbsAttnProcessor
    from lab.shapes import configs
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs.UNET)
    z, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 32, 128, requires_grad=True)
    ref = unet(z, t, encoder_hidden_states=ctx).sample
    store: list = []
    unet.set_attn_processor({n: (ProbsAttnProcessor(store.append) if n.endswith("attn2.processor") else p)
                             for n, p in unet.attn_processors.items()})
    out = unet(z, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5)
    # down 16x16, 8x8; mid 4x4; up 8x8 twice, 16x16 twice (the decoder has layers_per_block + 1)
    assert [p.shape[2] for p in store] == [256, 64, 16, 64, 64, 256, 256]
    assert all(p.shape[:2] == (2, 4) and p.shape[3] == 32 for p in store)
    assert torch.allclose(store[0].sum(-1), torch.ones(2, 4, 256), atol=1e-5)
    masks = torch.rand(2, 3, 16, 16)
    groups = torch.randint(-1, 3, (2, 32))
    train.grounding_loss(store, masks, groups).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0


def test_training_smoke_fine_tunes_from_a_base_with_grounding(tmp_path):
    rows = train.train("unet", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"], grounding=0.05,
                       pixel=0.01, export_to=tmp_path / "model", progress=False)
    assert rows[0]["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "work" / "logs" / "unet.jsonl").read_text().splitlines()]
    assert all(0 < r["grounding"] < 1 and 0 < r["pixel"] < 5 for r in log)
    assert all(r["loss"] == pytest.approx(r["mse"] + 0.05 * r["grounding"] + 0.01 * r["pixel"], rel=1e-4) for r in log)
    # a fine-tune starts from the base: its first loss is the converged model's, not a fresh UNet's (~1)
    assert log[0]["mse"] < 0.2
    # the export takes what the work directory lacks (VAE, tokenizer, ControlNets) from the base
    from diffusers import ControlNetModel, StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(sd.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
                ).__name__ == "AttnProcessor2_0"
    ControlNetModel.from_pretrained(tmp_path / "model", subfolder="controlnet-scribble")
    # init="base": a ControlNet stage starts from the base's ControlNet (trained zero convolutions), not a
    # fresh copy whose zero convolutions are still ~0 after three small steps (the default, as notebook 04 needs)
    rows = train.train("controlnet-edges,controlnet-scribble", tmp_path / "work", preset="smoke",
                       base=BUNDLED["shapes"], init="base", progress=False)
    assert [r["stage"] for r in rows] == ["controlnet-edges", "controlnet-scribble"]
    tuned = ControlNetModel.from_pretrained(tmp_path / "work" / "controlnet-edges")
    shipped = ControlNetModel.from_pretrained(BUNDLED["shapes"], subfolder="controlnet-edges")
    w, w0 = tuned.controlnet_down_blocks[0].weight.detach(), shipped.controlnet_down_blocks[0].weight.detach().float()
    assert w0.abs().mean() > 1e-3 and float((w - w0).norm() / w0.norm()) < 0.5  # a fresh one: ~1.0
    fresh = train.train("controlnet-edges", tmp_path / "fresh", preset="smoke", base=BUNDLED["shapes"],
                        progress=False)[0]
    w1 = ControlNetModel.from_pretrained(tmp_path / "fresh" / "controlnet-edges").controlnet_down_blocks[0].weight
    assert fresh["stage"] == "controlnet-edges" and float(w1.detach().norm() / w0.norm()) < 0.5
    with pytest.raises(ValueError, match="unknown init"):
        train.train("controlnet-edges", tmp_path / "work", preset="smoke", init="ones", progress=False)
    with pytest.raises(FileNotFoundError, match="needs a ControlNet"):
        train.train("controlnet-edges", tmp_path / "nothing", preset="smoke", init="base", progress=False)
    with pytest.raises(KeyError, match="unknown stage"):
        train.train("controlnet-edges,controlnet-sketch", tmp_path / "work", preset="smoke", progress=False)

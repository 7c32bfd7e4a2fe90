"""Pose and depth (issue 21): the world's conditions, the preprocessors that read them back from an image,
ControlNet training as it happens (the condition probe), composition scoring and the eval's parts."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from lab.loading import BUNDLED
from lab.shapes import evaluate, preprocess, train, world


def test_pose_and_depth_are_deterministic_by_seed_and_follow_the_scene():
    a, b = world.make_example(7, 3, overlap=True), world.make_example(7, 3, overlap=True)
    for kind in world.CONDITION_KINDS:
        assert a[kind].shape == (64, 64, 3) and a[kind].dtype == np.uint8
        assert np.array_equal(a[kind], b[kind]), kind
    # every keypoint carries its slot's colour (a dot of 1.5 px radius: the nearest pixel is that colour)
    ex = world.make_example(7, 0, n_objects=1)
    obj = ex["scene"].objects[0]
    for slot, (x, y) in zip(world.POSE_SLOTS[obj.shape], world.keypoints(obj)[:-1]):
        px = ex["pose"][min(int(y), 63), min(int(x), 63)].astype(int)
        assert np.abs(px - world.OPENPOSE_COLOURS[slot]).max() < 60, (obj.shape, slot, px)
    cx, cy = world.keypoints(obj)[-1]
    assert ex["pose"][int(cy), int(cx)].min() > 200  # the centre is white
    # the three shapes use disjoint colour slots: the skeleton says the shape
    slots = [set(v) for v in world.POSE_SLOTS.values()]
    assert not (slots[0] & slots[1] or slots[0] & slots[2] or slots[1] & slots[2])


def test_depth_map_orders_objects_and_shades_them():
    circle = world.ShapeObject("circle", "red", "large", 20.0, 20.0)
    square = world.ShapeObject("square", "blue", "large", 44.0, 44.0)
    d = world.depth_map([circle, square])[:, :, 0].astype(int)
    assert d[2, 2] == 0  # background: far
    assert d[20, 20] > d[20, 8]  # a sphere bulges at its centre
    assert d[56, 44] > d[32, 44]  # a plane tilted back at the top
    assert d[44, 44] > d[20, 20] - world.DEPTH_RELIEF  # the later object is nearer
    # overlapping: where the two overlap the nearer (second) object's depth shows
    ex = next(e for e in (world.make_example(3, i, overlap=True) for i in range(50))
              if (e["masks"][0] & e["masks"][1]).sum() > 40)
    both = ex["masks"][0] & ex["masks"][1]
    back_only = ex["visible"][0]
    assert ex["depth"][both, 0].mean() > ex["depth"][back_only, 0].mean() + world.DEPTH_STEP / 2


def test_overlapping_scenes_hide_part_of_the_first_object_in_two_colours():
    n_hidden = 0
    for i in range(40):
        ex = world.make_example(5, i, split="heldout", overlap=True)
        (a, b) = ex["scene"].objects
        assert a.colour != b.colour and len(ex["masks"]) == 2
        assert np.array_equal(ex["visible"][1], ex["masks"][1])  # the nearer object is whole
        assert ex["visible"][0].sum() >= 0.25 * ex["masks"][0].sum()  # the back one stays in view
        n_hidden += int((ex["masks"][0] & ex["masks"][1]).sum() >= 10)
        # the segmentation condition shows what is in view
        seg_b = np.all(ex["segmentation"] == world.SEG_PALETTE[b.shape], axis=2)
        assert seg_b[ex["masks"][1]].all()
    assert n_hidden >= 30
    with pytest.raises(ValueError, match="two objects"):
        world.sample_scene(np.random.default_rng(0), n_objects=1, overlap=True)


def test_generate_mixes_in_overlaps_without_changing_the_other_scenes():
    plain = world.generate(40, seed=2)
    mixed = world.generate(40, seed=2, overlap_share=0.5, chunk=7)
    changed = [i for i in range(40) if plain["caption"][i] != mixed["caption"][i]
               or not np.array_equal(plain["image"][i], mixed["image"][i])]
    flagged = [i for i in range(40) if world.overlaps(2, i, 0.5)]
    assert set(changed) <= set(flagged) and 10 <= len(flagged) <= 30
    for k in world.CONDITION_KINDS:
        assert mixed[k].shape == (40, 64, 64, 3)
    with pytest.raises(ValueError, match="overlap_share"):
        world.generate(4, overlap_share=1.5)


def test_preprocessors_read_the_conditions_back_from_world_images():
    scores = preprocess.score(40, seed=401)
    assert scores["segmentation_miou"] >= 0.95, scores
    assert scores["pose_pck"] >= 0.95, scores
    assert scores["depth_order_accuracy"] >= 0.85 and scores["depth_order_n"] >= 30, scores
    # the conditions they draw equal the world's where they read the scene right
    ex = world.make_example(401, 1, split="heldout", n_objects=1)
    assert (preprocess.segmentation(ex["image"]) != ex["segmentation"]).any(2).mean() < 0.02
    assert np.abs(preprocess.depth(ex["image"]).astype(int) - ex["depth"]).mean() < 4
    assert (preprocess.pose(ex["image"]) != ex["pose"]).any(2).mean() < 0.05


def test_preprocessors_find_the_front_object_and_complete_the_hidden_one():
    for i in range(6):
        ex = world.make_example(402, i, split="heldout", overlap=True)
        if (ex["masks"][0] & ex["masks"][1]).sum() < 40:
            continue
        back, front = ex["scene"].objects
        found = preprocess.objects(ex["image"])
        assert [f.as_object().colour for f in found] == [back.colour, front.colour], ex["caption"]
        assert found[0].shape == back.shape and found[0].size == back.size  # completed under the front one
        assert abs(found[0].cx - back.cx) <= 1.5 and abs(found[0].cy - back.cy) <= 1.5


def test_preprocessors_reject_bad_input_and_find_nothing_in_an_empty_scene():
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess.objects(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess.segmentation(np.zeros((64, 64, 3), np.float32))
    empty = np.full((64, 64, 3), 128, np.uint8)
    assert preprocess.objects(empty) == []
    assert not preprocess.segmentation(empty).any() and not preprocess.pose(empty).any()
    assert not preprocess.depth(empty).any()


def test_composition_score_checks_places_and_order():
    ex = next(e for e in (world.make_example(210, i, split="heldout", overlap=True) for i in range(50))
              if (e["masks"][0] & e["masks"][1]).sum() >= 40)
    assert evaluate.composition_score(ex["image"], ex) == {"placed": True, "order": True, "ok": True}
    back, front = ex["scene"].objects
    swapped, _ = world.render(world.Scene((front, back), ex["scene"].background))  # the other one in front
    s = evaluate.composition_score(swapped, ex)
    assert not s["order"] and not s["ok"]
    blank = np.full_like(ex["image"], world.BACKGROUNDS[ex["scene"].background])
    assert not evaluate.composition_score(blank, ex)["placed"]


def test_controlnet_training_logs_the_condition_probe_and_the_drop_rate(tmp_path):
    p = replace(train.PRESETS["smoke"], probe_every=2, probe_n=2, probe_steps=2)
    rows = train.train("controlnet-depth", tmp_path / "w", preset=p, base=BUNDLED["shapes"], progress=False,
                       drop=0.0)
    r = rows[0]
    assert r["stage"] == "controlnet-depth-drop0" and r["prompt_drop"] == 0.0 and r["overlap_share"] == 0.5
    log = [json.loads(line) for line in (tmp_path / "w" / "logs" / "controlnet-depth-drop0.jsonl").read_text().splitlines()]
    probes = [row for row in log if "iou" in row]
    assert [row["step"] for row in probes] == [0, 2, 3]  # before the first step, every 2, and at the end
    assert all(0.0 <= row["iou"] <= 1.0 and 0.0 <= row["iou_no_prompt"] <= 1.0 for row in probes)
    assert all("loss" in row for row in log if "iou" not in row)
    with pytest.raises(ValueError, match="drop rate"):
        train.train("controlnet-pose", tmp_path / "w", preset="smoke", base=BUNDLED["shapes"], progress=False, drop=2.0)


def test_eval_parts_merge_into_an_existing_json(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"fidelity_single": 0.97, "controlnet_iou": {"scribble": 0.8},
                                "controlnet_fidelity_per_kind": {"scribble": 1.0}, "eval_seconds": 900.0}))
    res = evaluate.run_eval(4, parts=("vae",), json_path=path, progress=lambda *_: None)
    saved = json.loads(path.read_text())
    assert saved["fidelity_single"] == 0.97 and saved["eval_seconds"] == 900.0
    assert saved["vae_psnr_db"] == res["vae_psnr_db"] and "vae" in saved["updated_parts"]
    with pytest.raises(ValueError, match="unknown eval parts"):
        evaluate.run_eval(4, parts=("vea",))


def test_the_shipped_pose_and_depth_nets_steer_the_bundled_model():
    import lab
    from lab.shapes.evaluator import detect, mask_iou
    pipe = lab.load("shapes", controlnet=["pose", "depth"])
    exs = [world.make_example(230, i, split="heldout") for i in range(4)]
    for kind in ("pose", "depth"):
        record = json.loads((BUNDLED["shapes"] / f"controlnet-{kind}" / "lab_training.json").read_text())
        assert record["kind"] == kind and record["overlap_share"] == 0.5
        runs = {on: pipe.sampler([e["caption"] for e in exs], steps=15, guidance=5.0, seed=0, progress=False,
                                 control=lab.Control(kind, [e[kind] for e in exs]) if on else None).run()
                for on in (False, True)}
        iou = {on: np.mean([mask_iou(detect(np.asarray(im))[2], e["masks"].any(0))
                            for im, e in zip(runs[on].images, exs)]) for on in runs}
        assert iou[True] >= 0.5 and iou[True] > iou[False] + 0.2, (kind, iou)  # the net, not the text, places them

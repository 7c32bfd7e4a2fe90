"""``python -m lab eval views``: the view model (:mod:`lab.shapes.view_model`) on held-out camera changes, scored
by the world's oracle (:func:`lab.shapes.evaluator.detect`) against the ground-truth render of the target view.

The model is either layout of :mod:`lab.conditioning.views` (``layout`` in the results). Pairs:
:func:`lab.shapes.views.make_pair` with seed :data:`EVAL_SEED` (training used seed 0: new scenes, new
input cameras, new camera changes, drawn from the training ranges). Each target view is sampled from the input
view, the relative camera and the scene's caption (DDIM, ``steps``, guidance ``w`` against both conditions
dropped). An object of the target counts where the ground truth shows at least :data:`MIN_PIXELS` of it (the
oracle's smallest component); it is found when the oracle reads an object of its colour there (the detection
of that colour with the highest IoU with it).

* ``view_iou``: per object, IoU of the oracle's mask with the ground-truth mask (0 when not found), mean;
* ``view_center_error_px``: distance between the centroids of the two masks over found objects, mean;
* ``view_found``: the share of objects found;
* ``copy_baseline_iou``, ``warp_baseline_iou``: ``view_iou`` of the input view returned unchanged, and of the
  input view warped to the target camera with the pixels it has (:func:`lab.shapes.views.warp`);
* ``view_iou_revealed``: ``view_iou`` over objects whose target shows at least :data:`REVEALED` of their pixels
  where the warped input saw nothing of them (the frame cut them off): what only generation can give;
  ``view_iou_seen``: over objects the warped input saw almost whole (under :data:`MOSTLY_SEEN` of their target
  pixels unseen): what a copy of the warped view would give;
* ``left_frame_absent``: over objects wholly out of the target frame, the share the sample does not show (no
  detection of their colour beyond the objects in view);
* ``kept_*`` (the warped layout): the same keys for the samples with the input's seen pixels put back
  (:func:`lab.conditioning.keep_seen`): the model's pixels only where the warp saw nothing;
* ``*_no_caption``: the same with the empty caption (image and camera only); ``n``, ``eval_seconds``;
* ``ceiling_*``: the same keys for the true target views through the pipeline's VAE (encoded, the posterior
  mean decoded): the most a model in its latent space can score; ``decoder``: ``"vae-views"`` where the model has
  the view world's decoder adapter (:func:`lab.shapes.view_model.train_view_decoder`), with the plain VAE's
  ceiling beside it (``ceiling_plain_vae_*``), else ``"vae"``.
"""
from __future__ import annotations

import json
import numbers
import time
from pathlib import Path

import numpy as np

from . import views
from .evaluator import MIN_AREA, detect, mask_iou

EVAL_SEED = 2400
MIN_PIXELS = MIN_AREA
REVEALED = 0.2
MOSTLY_SEEN = 0.05
BATCH = 25


def _match(dets, colour: str, gt: np.ndarray):
    same = [d for d in dets if d.colour == colour]
    if not same:
        return None, 0.0
    ious = [mask_iou(d.mask, gt) for d in same]
    j = int(np.argmax(ious))
    return same[j], float(ious[j])


def score_view(image: np.ndarray, pair: dict) -> list[dict]:
    """Per object of ``pair`` (:func:`lab.shapes.views.make_pair`): how ``image`` shows it against the target
    render: ``{"status": "in"|"left"|"sliver", "iou", "found", "center_error", "revealed"}``."""
    _, dets, _ = detect(np.asarray(image))
    rows, used = [], set()
    warped = [views.warp(m.astype(np.uint8) * 255, pair["camera_in"], pair["camera_out"], background=0) >= 128
              for m in pair["input_masks"]]
    for k, (obj, gt) in enumerate(zip(pair["scene"].objects, pair["target_masks"])):
        area = int(gt.sum())
        if area == 0:
            rows.append({"status": "left", "colour": obj.colour})
            continue
        if area < MIN_PIXELS:
            rows.append({"status": "sliver"})
            continue
        det, iou = _match(dets, obj.colour, gt)
        found = det is not None and iou > 0
        row = {"status": "in", "iou": iou if found else 0.0, "found": found,
               "revealed": float((gt & ~warped[k]).sum() / area)}
        if found:
            used.add(id(det))
            ys, xs = np.nonzero(gt)
            dy, dx = np.nonzero(det.mask)
            row["center_error"] = float(np.hypot(xs.mean() - dx.mean(), ys.mean() - dy.mean()))
        rows.append(row)
    for row in rows:  # an object that left: absent unless a detection of its colour stands for nothing in view
        if row["status"] == "left":
            extra = [d for d in dets if d.colour == row["colour"] and id(d) not in used]
            row["absent"] = not extra
    return rows


def summarise(rows: list[dict], prefix: str = "view") -> dict:
    inn = [r for r in rows if r["status"] == "in"]
    found = [r for r in inn if r["found"]]
    rev = [r for r in inn if r["revealed"] >= REVEALED]
    seen = [r for r in inn if r["revealed"] < MOSTLY_SEEN]
    left = [r for r in rows if r["status"] == "left"]
    out = {f"{prefix}_iou": float(np.mean([r["iou"] for r in inn])) if inn else float("nan"),
           f"{prefix}_center_error_px": float(np.mean([r["center_error"] for r in found])) if found else float("nan"),
           f"{prefix}_found": len(found) / len(inn) if inn else float("nan"),
           f"{prefix}_iou_revealed": float(np.mean([r["iou"] for r in rev])) if rev else float("nan"),
           f"{prefix}_iou_seen": float(np.mean([r["iou"] for r in seen])) if seen else float("nan"),
           f"{prefix}_objects": len(inn), f"{prefix}_revealed_objects": len(rev)}
    if left:
        out[f"{prefix}_left_frame_absent"] = float(np.mean([r["absent"] for r in left]))
    out[f"{prefix}_left_objects"] = len(left)
    return out


def autoencoder_ceiling(vae, pairs: list[dict], prefix: str = "ceiling") -> dict:
    """:func:`summarise` of the target views of ``pairs`` through ``vae`` (:func:`lab.shapes.stage1.reconstruct`:
    encoded, the posterior mean decoded)."""
    from .stage1 import reconstruct
    images = reconstruct(vae, np.stack([p["target"] for p in pairs]))
    return summarise([r for im, p in zip(images, pairs) for r in score_view(im, p)], prefix)


def sample_views(pipe, pairs: list[dict], *, caption: bool = True, steps: int = 30, guidance: float = 3.0,
                 seed: int = 0, batch: int = BATCH) -> list[np.ndarray]:
    """The target view of each pair, sampled by the view model ``pipe`` (``lab.load("shapes", task="views")``)."""
    from ..conditioning import novel_view
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        prompts = [p["caption"] if caption else "" for p in chunk]
        run = pipe.sampler(prompts, steps=steps, guidance=guidance, scheduler="ddim", seed=seed + i, progress=False,
                           conditioning=novel_view([p["input"] for p in chunk], np.stack([p["camera"] for p in chunk]))).run()
        out += [np.asarray(im.convert("RGB")) for im in run.images]
    return out


def run_views_eval(n: int = 200, *, steps: int = 30, guidance: float = 3.0, seed: int = 0, model="shapes",
                   json_path=None, progress=print, pairs_seed: int | None = None) -> dict:
    """The keys of the module docstring on ``n`` held-out pairs of seed ``pairs_seed`` (default :data:`EVAL_SEED`;
    another seed gives another set from the same distribution; 0 is the training set's)."""
    import lab
    from ..settings import check_number
    pairs_seed = EVAL_SEED if pairs_seed is None else pairs_seed
    if isinstance(pairs_seed, numbers.Integral) and not isinstance(pairs_seed, bool):
        pairs_seed = int(pairs_seed)  # numpy's integers too
    check_number("pairs_seed", pairs_seed, minimum=0, integer=True)
    if pairs_seed == 0:
        raise ValueError("pairs_seed 0 is the training set's: held-out pairs need another seed")
    t0 = time.time()
    pipe = lab.load(model, task="views")
    pairs = [views.make_pair(pairs_seed, i) for i in range(n)]
    copy_rows, warp_rows = [], []
    for p in pairs:
        copy_rows += score_view(p["input"], p)
        warp_rows += score_view(views.warp(p["input"], p["camera_in"], p["camera_out"]), p)
    from ..conditioning.views import input_layout, keep_seen
    res: dict = {"n": n, "layout": input_layout(pipe.unet, pipe.vae), "steps": steps, "guidance": guidance, "scheduler": "ddim", "seed": seed,
                 "eval_seed": pairs_seed, "relative_range": {k: round(float(v), 4) for k, v in views.RELATIVE_RANGE.items()}}
    for caption, suffix in ((True, ""), (False, "_no_caption")):
        t1 = time.time()
        images = sample_views(pipe, pairs, caption=caption, steps=steps, guidance=guidance, seed=seed)
        rows = [r for im, p in zip(images, pairs) for r in score_view(im, p)]
        s = summarise(rows)
        res.update({k + suffix: v for k, v in s.items()})
        if res["layout"] == "warped":  # the same samples with the input's seen pixels put back
            kept = keep_seen(images, [p["input"] for p in pairs], np.stack([p["camera"] for p in pairs]))
            res.update({k + suffix: v for k, v in summarise([r for im, p in zip(kept, pairs)
                                                             for r in score_view(im, p)], "kept").items()})
        progress(f"[views{suffix}] iou {s['view_iou']:.3f} centre {s['view_center_error_px']:.2f}px "
                 f"({time.time() - t1:.0f}s)")
    res.update(autoencoder_ceiling(pipe.vae, pairs))
    from ..loading import resolve_path
    from ..token_encoders import ADAPTER_FILE, LORA_FILE
    from .view_model import DECODER
    adapter = resolve_path(model) / DECODER
    res["decoder"] = DECODER if (adapter / LORA_FILE).exists() else "vae"
    if res["decoder"] == DECODER:  # and the VAE it goes over, plain
        from diffusers import AutoencoderKL
        base = json.loads((adapter / ADAPTER_FILE).read_text())["base"] if (adapter / ADAPTER_FILE).exists() else "vae"
        plain = AutoencoderKL.from_pretrained(adapter.parent / base, dtype=pipe.vae.dtype).to(pipe.vae.device)
        res.update(autoencoder_ceiling(plain, pairs, "ceiling_plain_vae"))
    c, w = summarise(copy_rows, "copy"), summarise(warp_rows, "warp")
    res.update(copy_baseline_iou=c["copy_iou"], copy_baseline_center_error_px=c["copy_center_error_px"],
               warp_baseline_iou=w["warp_iou"], warp_baseline_center_error_px=w["warp_center_error_px"],
               warp_baseline_iou_revealed=w["warp_iou_revealed"], warp_baseline_iou_seen=w["warp_iou_seen"],
               warp_baseline_left_frame_absent=w.get("warp_left_frame_absent"))
    res["left_frame_absent"] = res.get("view_left_frame_absent")
    res["view_iou_over_copy"] = res["view_iou"] - res["copy_baseline_iou"]
    if "kept_iou" in res:
        res["kept_iou_over_copy"] = res["kept_iou"] - res["copy_baseline_iou"]
    res["eval_seconds"] = round(time.time() - t0, 1)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return res

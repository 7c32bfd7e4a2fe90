"""The view model (issue 24): Zero-1-to-3's recipe on the shapes world through a camera (:mod:`lab.shapes.views`).

What Zero-1-to-3 changes in Stable Diffusion, and what this model changes in a shapes UNet:

* **the input view by concatenation**, in one of two layouts (:mod:`lab.conditioning.views`):

  - ``"view"`` (Zero-1-to-3's own; ``--task views-zero123``): the text UNet takes 8 channels, ``[z_t, E(input
    view)]`` (the input's VAE posterior mean, scaled as the latents are); ``conv_in``'s 4 new channels start at
    zero, so the model starts as the text model (:func:`lab.shapes.tasks.widen_conv_in`) and learns them at
    :data:`NEW_LR_MULT` times the rate. The camera's geometry must be learned from the camera token alone;
    trained on 2 CPU cores for an hour, it was not (the model ignored the camera: README, notebook 12);
  - ``"warped"`` (the shipped one; ``--task views``): the input view moved to the target camera with the pixels
    it has (the similarity transform the relative camera defines, :func:`lab.conditioning.views.warp_views`)
    and the mask of what it did not see, in SD's inpainting layout ``[z_t, mask, E(warped view)]``, fine-tuned
    from the shapes inpainting UNet (:mod:`lab.shapes.tasks`). The camera reaches the UNet through the warp;
    the model learns what a warp cannot give (objects the input's frame cut off, made whole; the caption's
    objects that left the frame, left out) -- generative warping, as GenWarp and warp-then-inpaint methods do;

* **the camera by cross-attention**: the relative camera's five numbers (:data:`lab.shapes.views.CAMERA_FEATURES`)
  and the mean of the caption's states through a linear map started as ``[I | 0]`` make one more token after
  the caption's (:class:`lab.token_encoders.CameraTokenEncoder`: Zero-1-to-3's ``cc_projection`` with the
  caption standing in for the CLIP image embedding we do not have);
* **guidance by dropping both**: one time in ten in training the input view is the view of nothing seen (zero
  latents; in the warped layout the all-ones mask and the blank image's latents) and the context is the empty
  caption's with the null camera (zeros); at sampling the unconditional half gets that. Two times in ten only
  the caption is dropped, so the model also works from the image and the camera alone (``prompt=""``).

The fine-tune is a LoRA adapter (rank :data:`LORA_RANK` on every convolution and attention projection of the
UNet but ``conv_in``/``conv_out``; peft, as diffusers trains LoRA) with ``conv_in`` trained whole: the bundled
weights' budget (64 MB for every model) left about 1.4 MB, and the adapter is 0.96 MB in fp16. It ships as
``unet-views/pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_adapter`` format) beside
``unet-views/unet_partial.safetensors`` (``conv_in``), ``unet-views/lab_adapter.json`` (the UNet folder they go
over) and ``camera_embedder/``. ``lab.load("shapes", task="views")`` merges the adapter into that UNet's weights
(:func:`lab.token_encoders.merge_lora`).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..conditioning.views import nothing_seen, warp_views
from ..token_encoders import (ADAPTER_FILE, COORD_CHANNELS, LORA_FILE, PARTIAL_FILE, CameraTokenEncoder,
                              coordinate_channels, write_adapter_record)
from . import configs, views
from .tasks import (NEW_LR_MULT, TOKEN_LR_MULT, TRAINING_RECORD, SplitConvIn, continued_record, float_images,
                    widen_conv_in)

LORA_RANK = 8
#: every convolution and attention projection but conv_in (trained whole) and conv_out, by module name
LORA_TARGETS = r".*\.(conv1|conv2|conv_shortcut|conv|to_q|to_k|to_v|to_out\.0|proj_in|proj_out|proj|ff\.net\.2|time_emb_proj)$"
ADAPTER = "views"
VIEW_LR = 1e-3  # LoRA's usual rate: its B starts at zero and its updates are rank-limited
NULL_DROP = 0.1  # training: both conditions dropped (input view zeros, empty caption, null camera): guidance
CAPTION_DROP = 0.2  # training: the caption alone dropped (image and camera only)
#: training: how much more often a pair is drawn when its caption names an object that left the target frame (one
#: pair in nine has one): the text model's prior draws every object its caption names, and the model must learn
#: to leave these out
LEFT_WEIGHT = 3.0
VIEW_EMA = 0.995  # EMA decay: a window of ~200 steps (the preset's 0.999 averages over most of a CPU run)
CAMERA_EMBEDDER = "camera_embedder"
TASK = "views"
#: the two input layouts (:func:`lab.conditioning.views.input_layout`) and the UNet each starts from
LAYOUT_BASE = {"warped": "unet-inpaint", "view": "unet"}
#: the view world's decoder adapter (``--task views-decoder``): a LoRA over the VAE's decoder alone, so the latent
#: space (and every UNet trained in it) stays as it is -- SD's ft-MSE VAE decoder, fine-tuned the same way
DECODER = "vae-views"
DECODER_RANK = 8
DECODER_TARGETS = r"decoder\.(.*\.(conv1|conv2|conv_shortcut|conv|to_q|to_k|to_v|to_out\.0)|conv_in|conv_out)$"
DECODER_LR = 1e-3


def view_unet(base_unet, rank: int = LORA_RANK, coordinates: bool = False, layout: str = "view"):
    """A UNet made a view model for training, a LoRA adapter of ``rank`` on :data:`LORA_TARGETS` and ``conv_in``
    trained whole, every other weight frozen. Layout ``"view"`` (from the text UNet): ``conv_in`` widened by 4
    zero channels (and 2 for the coordinate channels with ``coordinates``; split so the new ones learn at their
    own rate, :class:`lab.shapes.tasks.SplitConvIn`). Layout ``"warped"`` (from the inpainting UNet, whose
    9 channels it keeps)."""
    from peft import LoraConfig
    if layout == "warped":
        if coordinates:
            raise ValueError("coordinate channels go with the 'view' layout")
        base_unet.requires_grad_(False)
        base_unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                         target_modules=LORA_TARGETS), adapter_name=ADAPTER)
        base_unet.conv_in.requires_grad_(True)
        return base_unet
    unet = widen_conv_in(base_unet, base_unet.config.out_channels + (COORD_CHANNELS if coordinates else 0))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=LORA_TARGETS),
                     adapter_name=ADAPTER)
    unet.conv_in = SplitConvIn(unet.conv_in, base_unet.config.in_channels)
    unet.conv_in.old_weight.requires_grad_(True)
    return unet


def save_view_model(unet, encoder: CameraTokenEncoder, out, dtype=torch.float32, base: str = "unet",
                    base_dir=None) -> None:
    """``out/unet-views/`` (the LoRA adapter, ``conv_in``, and :data:`ADAPTER_FILE` naming the ``base`` UNet
    folder they go over, with the digest of ``base_dir``'s weights, the ones it was trained over) and
    ``out/camera_embedder/``."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = Path(out)
    folder = out / f"unet-{TASK}"
    folder.mkdir(parents=True, exist_ok=True)
    conv = unet.conv_in.merged() if isinstance(unet.conv_in, SplitConvIn) else unet.conv_in
    save_file({"conv_in.weight": conv.weight.detach().to(dtype).contiguous(),
               "conv_in.bias": conv.bias.detach().to(dtype).contiguous()}, str(folder / PARTIAL_FILE))
    keep = unet.conv_in
    unet.conv_in = conv  # save_lora_adapter reads the peft state only; conv_in is not part of it
    unet.save_lora_adapter(folder, adapter_name=ADAPTER, weight_name=LORA_FILE)
    unet.conv_in = keep
    write_adapter_record(folder, base, base_dir)
    if dtype != torch.float32:
        with safe_open(str(folder / LORA_FILE), "pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k).to(dtype).contiguous() for k in f.keys()}
        save_file(state, str(folder / LORA_FILE), metadata=meta)
    encoder.to(dtype).save_pretrained(out / CAMERA_EMBEDDER)
    encoder.float()


def encode_views(vae, images_u8: torch.Tensor, batch: int = 1024, cameras: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, ...]:
    """VAE posterior mean and std (unscaled) of ``uint8 [n, H, W, 3]`` images. With relative ``cameras`` ``[n,
    5]`` (the warped layout's inputs) the views are warped to them first
    (:func:`lab.conditioning.views.warp_views`), and the unseen mask at the latent size comes before the two."""
    masks, means, stds = [], [], []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            x = float_images(images_u8[i:i + batch])
            if cameras is not None:
                x, unseen = warp_views(x, cameras[i:i + batch])
            post = vae.encode(x).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
            if cameras is not None:
                masks.append(F.interpolate(unseen, size=post.mean.shape[-2:]))
    return (*([torch.cat(masks)] if masks else []), torch.cat(means), torch.cat(stds))


def check_views_init(init: str, base, layout: str = "warped", coordinates: bool = False) -> Path | None:
    """Where a view model with ``init`` starts: ``None`` for ``"zero"`` (a fresh adapter over the base's UNet),
    ``base / unet-views`` for ``"base"`` (go on training the base's adapter and camera token, e.g. for longer than
    one run's budget), or a clear error: an unknown ``init``, no view model in ``base``, or one of another layout
    (its ``lab_training.json``)."""
    if layout not in LAYOUT_BASE:
        raise ValueError(f"layout is one of {sorted(LAYOUT_BASE)}, got {layout!r}")
    if coordinates and layout != "view":
        raise ValueError("coordinate channels go with the 'view' layout")
    if init not in ("zero", "base"):
        raise ValueError(f"unknown init {init!r} for the view model; expected 'zero' or 'base'")
    if init == "zero":
        return None
    start = Path(base) / f"unet-{TASK}"
    missing = [str(q) for q in (start / LORA_FILE, start / PARTIAL_FILE, Path(base) / CAMERA_EMBEDDER / "config.json")
               if not q.exists()]
    if missing:
        raise FileNotFoundError(f"init='base' needs a view model to go on from; {base} lacks {missing} (pass base=)")
    record = start / TRAINING_RECORD
    prev = json.loads(record.read_text()) if record.exists() else {}
    was = (prev.get("layout", layout), bool(prev.get("coordinates", False)))
    if was != (layout, coordinates):
        raise ValueError(f"init='base': {start} is a view model of layout {was[0]!r} (coordinates {was[1]}), "
                         f"not {layout!r} (coordinates {coordinates}); train that one with init='zero'")
    return start


def _continue_from(start: Path, unet, encoder: CameraTokenEncoder, base_dir: Path) -> None:
    """Put the view model in ``start`` (its LoRA, ``conv_in`` and camera token) into a freshly made ``unet``
    (:func:`view_unet`) and ``encoder``; warn when it was trained over other weights of ``base_dir``."""
    import warnings

    from safetensors.torch import load_file

    from ..token_encoders import weights_digest
    adapter = json.loads((start / ADAPTER_FILE).read_text()) if (start / ADAPTER_FILE).exists() else {}
    if adapter.get("base_digest") not in (None, weights_digest(base_dir)):
        warnings.warn(f"{start} was trained over other weights of {base_dir} (digest {adapter['base_digest']}); "
                      f"training goes on from it over these", stacklevel=3)
    own = unet.state_dict()
    lora = {k.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): v
            for k, v in load_file(str(start / LORA_FILE)).items()}
    bad = sorted(k for k in lora if k not in own or own[k].shape != lora[k].shape)
    bad += sorted(k for k in own if ".lora_" in k and k not in lora)  # a module it does not adapt would start afresh
    if bad:
        raise ValueError(f"{start / LORA_FILE} does not fit this view model (rank {LORA_RANK}): {bad[:3]}")
    conv = load_file(str(start / PARTIAL_FILE))
    target = unet.conv_in.merged() if isinstance(unet.conv_in, SplitConvIn) else unet.conv_in
    if conv["conv_in.weight"].shape != target.weight.shape:
        raise ValueError(f"{start / PARTIAL_FILE}'s conv_in is {tuple(conv['conv_in.weight'].shape)}, this view "
                         f"model's {tuple(target.weight.shape)}")
    with torch.no_grad():
        unet.load_state_dict({k: v.to(own[k].dtype) for k, v in lora.items()}, strict=False)
        if isinstance(unet.conv_in, SplitConvIn):
            unet.conv_in.load_merged(conv["conv_in.weight"], conv["conv_in.bias"])
        else:
            unet.conv_in.weight.copy_(conv["conv_in.weight"])
            unet.conv_in.bias.copy_(conv["conv_in.bias"])
        saved = CameraTokenEncoder.from_pretrained(start.parent / CAMERA_EMBEDDER)
        encoder.load_state_dict({k: v.to(encoder.state_dict()[k].dtype) for k, v in saved.state_dict().items()})


def check_left_weight(left_weight) -> float:
    """``left_weight`` (:data:`LEFT_WEIGHT` for ``None``) as a float >= 1, or a clear error."""
    from ..settings import check_number
    w = LEFT_WEIGHT if left_weight is None else left_weight
    try:
        check_number("left_weight", w, minimum=1)
    except ValueError as e:
        raise ValueError(f"{e} (how many times as often a pair with an object that left the frame is drawn)") from None
    return float(w)


def train_views(tr, coordinates: bool = False, layout: str = "warped", init: str = "zero",
                left_weight: float | None = None) -> dict:
    """Train the view model on a :class:`lab.shapes.train.Trainer`'s preset (pairs: its ``n_train``; time: its
    ``unet_seconds``; batch: its ``unet_batch``) from its base's UNet for ``layout`` (:data:`LAYOUT_BASE`): EMA
    weights to ``out/unet-views`` and ``out/camera_embedder`` (fp32; the export writes fp16). ``init="base"``
    goes on from the base's view model (:func:`check_views_init`) with a fresh schedule on top; the training
    record counts the runs before it. ``left_weight``: how much more often a pair with an object that left the
    frame is drawn (default :data:`LEFT_WEIGHT`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    start = check_views_init(init, tr.base, layout, coordinates)
    left_weight = check_left_weight(left_weight)
    p = tr.preset
    dev = tr.device
    t0 = time.time()
    d = views.generate_pairs(p.n_train, tr.seed, split="train", workers=p.workers)
    print(f"[views] {p.n_train} pairs in {time.time() - t0:.1f}s", flush=True)
    vae_dir = tr._component("vae")
    scale = AutoencoderKL.load_config(vae_dir)["scaling_factor"]
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).to(dev).eval().requires_grad_(False)
    t0 = time.time()
    cameras = torch.from_numpy(d["camera"]).to(dev)
    cache = tr.encoding_cache(vae_dir, p.n_train, tr.seed, dev)
    if cache is not None:  # the pairs' encoding, keyed as the world's is, by the layout, and by the code that
        from ..conditioning import views as cviews  # makes it (not by the recipe's constants)
        h = hashlib.sha256(Path(views.__file__).read_bytes() + Path(cviews.__file__).read_bytes()
                           + (inspect.getsource(encode_views) + inspect.getsource(float_images)).encode()
                           ).hexdigest()[:12]
        cache = cache.with_name(f"views-{layout}-{h}-{cache.name}")
    if cache is not None and cache.exists():
        ck = torch.load(cache, map_location=dev)
        print(f"[views] {2 * p.n_train} views' encoding from {cache}", flush=True)
    else:
        if layout == "warped":
            in_mask, in_mean, in_std = encode_views(vae, torch.from_numpy(d["input"]).to(dev), cameras=cameras)
            ck = {"in_mask": in_mask.cpu(), "in_mean": in_mean.cpu(), "in_std": in_std.cpu()}
        else:
            in_mean, _ = encode_views(vae, torch.from_numpy(d["input"]).to(dev))
            ck = {"in_mean": in_mean.cpu()}
        out_mean, out_std = encode_views(vae, torch.from_numpy(d["target"]).to(dev))
        ck.update(out_mean=out_mean.cpu(), out_std=out_std.cpu())
        print(f"[views] encoded {2 * p.n_train} views in {time.time() - t0:.1f}s", flush=True)
        if cache is not None:
            tr.save_ckpt(cache, ck)
    ck = {k: v.to(dev) for k, v in ck.items()}
    out_mean, out_std = ck["out_mean"], ck["out_std"]
    cond_latents = (ck["in_mean"] * scale).contiguous()
    if layout == "warped":
        null_mask, null_z = nothing_seen(vae, 1, d["input"].shape[1], dev)
    del vae
    text = CLIPTextModel.from_pretrained(tr._component("text_encoder"), dtype=torch.float32).to(dev).eval()
    text.requires_grad_(False)
    ids = tr._token_ids(d["caption"])
    empty = tr._token_ids([""])[0]
    draw = torch.where(torch.from_numpy(d["left"]) > 0, left_weight, 1.0).to(dev)
    print(f"[views] {int((d['left'] > 0).sum())} of {len(draw)} pairs have an object that leaves the frame "
          f"(drawn {left_weight:g}x as often)", flush=True)
    del d
    stage = f"task-{TASK}" + ("" if layout == "warped" else "-coords" if coordinates else "-zero123")
    base = UNet2DConditionModel.from_pretrained(tr._component(LAYOUT_BASE[layout]), dtype=torch.float32).to(dev)
    cross_dim = base.config.cross_attention_dim
    unet = view_unet(base, coordinates=coordinates, layout=layout).train()
    encoder = CameraTokenEncoder(cross_dim, len(views.CAMERA_FEATURES),
                                 list(views.CAMERA_FEATURES), coordinates).to(dev)
    coords = [coordinate_channels(1, configs.LATENT_SIZE, configs.LATENT_SIZE, device=dev)] if coordinates else []
    del base
    if start is not None:
        _continue_from(start, unet, encoder, tr._component(LAYOUT_BASE[layout]))
    lora = [q for n, q in unet.named_parameters() if "lora_" in n]
    if layout == "warped":  # conv_in already reads the mask and the masked view: trained whole at the LoRA's rate
        params = [{"params": lora + list(unet.conv_in.parameters())},
                  {"params": list(encoder.parameters()), "lr_mult": TOKEN_LR_MULT}]
    else:
        params = [{"params": lora + [unet.conv_in.old_weight, unet.conv_in.bias]},
                  {"params": [unet.conv_in.new_weight], "lr_mult": NEW_LR_MULT},
                  {"params": list(encoder.parameters()), "lr_mult": TOKEN_LR_MULT}]
    print(f"[views] trained: LoRA {sum(q.numel() for q in lora) / 1e6:.3f}M, conv_in, camera token "
          f"{sum(q.numel() for q in encoder.parameters()) / 1e6:.3f}M", flush=True)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_enc = copy.deepcopy(encoder).requires_grad_(False)
    abar = DDPMScheduler(**configs.TRAIN_SCHEDULER).alphas_cumprod.to(dev)
    torch.manual_seed(tr.seed + 24)
    g = tr._generator(tr.seed + 25)
    null_camera = torch.zeros(len(views.CAMERA_FEATURES), device=dev)

    def step_fn():
        idx = torch.multinomial(draw, p.unet_batch, replacement=True, generator=g)
        z0 = (out_mean[idx] + out_std[idx] * torch.randn(out_mean[idx].shape, generator=g, device=dev)) * scale
        u = torch.rand(len(idx), generator=g, device=dev)
        null = u < NULL_DROP
        tok = ids[idx].clone()
        tok[u < NULL_DROP + CAPTION_DROP] = empty
        if layout == "warped":  # the warped view's posterior sampled, as the inpainting model trained
            zv = (cond_latents[idx] + ck["in_std"][idx] * scale * torch.randn(cond_latents[idx].shape, generator=g,
                                                                               device=dev))
            nn = null[:, None, None, None]
            view = [torch.where(nn, null_mask, ck["in_mask"][idx]), torch.where(nn, null_z, zv)]
        else:
            view = [torch.where(null[:, None, None, None], 0.0, cond_latents[idx])]
        cam = torch.where(null[:, None], null_camera, cameras[idx])
        zt, t, eps = tr.forward_process(z0.contiguous(), abar, g)
        with torch.no_grad(), tr.autocast():
            states = text(tok).last_hidden_state
        with tr.autocast():
            x = torch.cat([zt, *view, *(c.expand(len(idx), -1, -1, -1) for c in coords)], 1)
            pred = unet(x, t, encoder_hidden_states=encoder(states, cam)).sample
        return F.mse_loss(pred.float(), eps), {}

    def trainable(m):
        return {k: v for k, v in m.state_dict().items() if "lora_" in k or k.startswith("conv_in.")}

    def state():
        return {"unet": trainable(unet), "ema_unet": trainable(ema_unet), "encoder": encoder.state_dict(),
                "ema_encoder": ema_enc.state_dict()}

    def load(ck):
        unet.load_state_dict(ck["unet"], strict=False)
        ema_unet.load_state_dict(ck["ema_unet"], strict=False)
        encoder.load_state_dict(ck["encoder"])
        ema_enc.load_state_dict(ck["ema_encoder"])

    tr.preset = replace(p, ema_decay=min(p.ema_decay, VIEW_EMA))
    try:
        summary = tr._loop_with_ema(stage, params, p.unet_seconds, VIEW_LR, step_fn, state, load, g,
                                    [(ema_enc, encoder), (ema_unet, unet)], p.unet_batch,
                                    record=None if start is None else continued_record(start))
    finally:
        tr.preset = p
    summary.update(layout=layout, base_unet=LAYOUT_BASE[layout], lora_rank=LORA_RANK, null_drop=NULL_DROP,
                   caption_drop=CAPTION_DROP, left_weight=left_weight, coordinates=coordinates,
                   relative_range={k: round(float(v), 4) for k, v in views.RELATIVE_RANGE.items()})
    # the record of what is now in out/unet-views (whichever layout), where the export looks for it
    (tr.out / "logs" / f"task-{TASK}.summary.json").write_text(json.dumps(summary, indent=2))  # with these keys
    save_view_model(ema_unet, ema_enc, tr.out, base=LAYOUT_BASE[layout], base_dir=tr._component(LAYOUT_BASE[layout]))
    return summary



def train_view_decoder(tr) -> dict:
    """The view world's decoder adapter (:data:`DECODER`): a LoRA of rank :data:`DECODER_RANK` over the stage-1
    VAE's decoder (:data:`DECODER_TARGETS`; the encoder, so the latents, untouched), trained on the target views of
    the :class:`lab.shapes.train.Trainer` preset's training pairs (``n_train``; time: ``vae_seconds``; batch:
    ``vae_batch``) with stage 1's reconstruction loss (MSE + 0.5 L1) from latents drawn from the encoder's
    posterior, as the VAE itself trained. The world through a camera cuts objects at the frame's edge, which the
    VAE never saw: it pulls them in from the edge (notebook 12). EMA weights to ``out/vae-views`` (fp32; the export
    writes fp16), with :data:`~lab.token_encoders.ADAPTER_FILE` naming ``vae`` and its weights."""
    from diffusers import AutoencoderKL
    from peft import LoraConfig

    p = tr.preset
    dev = tr.device
    t0 = time.time()
    targets = torch.from_numpy(views.generate_pairs(p.n_train, tr.seed, split="train", workers=p.workers)["target"])
    pairs_seconds = time.time() - t0
    print(f"[views-decoder] {p.n_train} target views in {pairs_seconds:.1f}s", flush=True)
    vae_dir = tr._component("vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).to(dev).requires_grad_(False)
    t0 = time.time()
    mean, std = encode_views(vae, targets.to(dev))
    encoding_seconds = time.time() - t0
    print(f"[views-decoder] encoded in {encoding_seconds:.1f}s", flush=True)
    vae.add_adapter(LoraConfig(r=DECODER_RANK, lora_alpha=DECODER_RANK, init_lora_weights=True,
                               target_modules=DECODER_TARGETS), adapter_name=ADAPTER)
    lora = [q for n, q in vae.named_parameters() if "lora_" in n]  # peft leaves only these trainable
    print(f"[views-decoder] trained: LoRA {sum(q.numel() for q in lora) / 1e6:.3f}M over the decoder", flush=True)
    ema = copy.deepcopy(vae).requires_grad_(False)
    g = tr._generator(tr.seed + 26)

    def step_fn():
        idx = torch.randint(0, len(mean), (p.vae_batch,), generator=g, device=dev)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=dev)
        x = float_images(targets[idx.cpu()]).to(dev)
        with tr.autocast():
            rec = vae.decode(z).sample
        rec = rec.float()
        return F.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean(), {}

    def state():
        return {"vae": {k: v for k, v in vae.state_dict().items() if "lora_" in k},
                "ema": {k: v for k, v in ema.state_dict().items() if "lora_" in k}}

    def load(ck):
        vae.load_state_dict(ck["vae"], strict=False)
        ema.load_state_dict(ck["ema"], strict=False)

    tr.preset = replace(p, ema_decay=min(p.ema_decay, VIEW_EMA))
    try:
        summary = tr._loop_with_ema(DECODER, lora, p.vae_seconds, DECODER_LR, step_fn, state, load, g,
                                    [(ema, vae)], p.vae_batch)
    finally:
        tr.preset = p
    summary.update(base_vae="vae", lora_rank=DECODER_RANK, loss="MSE + 0.5 L1", data=f"{p.n_train} target views",
                   making_pairs_seconds=round(pairs_seconds, 1), encoding_seconds=round(encoding_seconds, 1))
    (tr.out / "logs" / f"{DECODER}.summary.json").write_text(json.dumps(summary, indent=2))
    folder = tr.out / DECODER
    folder.mkdir(parents=True, exist_ok=True)
    ema.save_lora_adapter(folder, adapter_name=ADAPTER, weight_name=LORA_FILE)
    write_adapter_record(folder, "vae", vae_dir)
    return summary


def view_pipeline(pipe, *, seed: int = 0, layout: str = "view"):
    """Zero-1-to-3's architecture over any text-to-image :class:`lab.Pipeline` of the SD family (its UNet, VAE,
    text encoder, tokenizer and scheduler): the UNet with ``conv_in`` widened (zero) by the latent channels
    (``layout="view"``) or by a mask and the latent channels (``"warped"``, SD's inpainting layout), and a
    :class:`~lab.token_encoders.CameraTokenEncoder` of the UNet's cross-attention width, started as
    Zero-1-to-3 starts its projection. What fine-tuning starts from; on a real architecture with random
    weights, what shows the lab's sampler drives that design (``kind == "views"``)."""
    from ..pipeline import Pipeline
    if layout not in LAYOUT_BASE:
        raise ValueError(f"layout is one of {sorted(LAYOUT_BASE)}, got {layout!r}")
    torch.manual_seed(seed)
    unet = widen_conv_in(pipe.unet, pipe.unet.config.out_channels + (layout == "warped"))
    enc = CameraTokenEncoder(pipe.unet.config.cross_attention_dim, len(views.CAMERA_FEATURES),
                             list(views.CAMERA_FEATURES)).to(pipe.device, pipe.dtype)
    parts = {k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    return Pipeline.from_components(unet=unet, camera_embedder=enc, name=f"{pipe.name}+views", device=pipe.device,
                                    dtype=pipe.dtype, **parts)


def export_view_model(src, dest, part: str = "unet") -> None:
    """Copy a trained view model's ``part`` into the pipeline directory ``dest`` in fp16 (the adapters keep their
    ``lora_adapter_metadata``): ``"unet"``, ``src/unet-views`` and ``src/camera_embedder``; ``"decoder"``, the
    decoder adapter ``src/vae-views``."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, dest = Path(src), Path(dest)
    parts = {"unet": (f"unet-{TASK}", (LORA_FILE, PARTIAL_FILE)), "decoder": (DECODER, (LORA_FILE,))}
    if part not in parts:
        raise ValueError(f"unknown part {part!r} of the view model; expected one of {sorted(parts)}")
    folder, names = parts[part]
    (dest / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        with safe_open(str(src / folder / name), "pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k).half().contiguous() for k in f.keys()}
        save_file(state, str(dest / folder / name), metadata=meta)
    if (src / folder / ADAPTER_FILE).exists():
        (dest / folder / ADAPTER_FILE).write_text((src / folder / ADAPTER_FILE).read_text())
    if part == "unet":
        CameraTokenEncoder.from_pretrained(src / CAMERA_EMBEDDER).to(torch.float16).save_pretrained(
            dest / CAMERA_EMBEDDER)

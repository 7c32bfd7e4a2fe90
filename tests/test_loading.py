"""lab.load: the bundled model, local directories, cached repo ids, and typed errors."""
from __future__ import annotations

import time

import pytest
import torch
from components import tiny_sd_components

import lab
from lab import IncompleteModel, ModelNotAvailable, ModelNotFound


def test_bundled_shapes_model(shapes_pipe):
    assert shapes_pipe.kind == "sd"
    assert shapes_pipe.default_size == 64 and shapes_pipe.vae_scale_factor == 4
    assert sorted(shapes_pipe.controlnets) == ["edges", "scribble", "segmentation"]
    assert shapes_pipe.dtype == torch.float32


def test_shipped_directory_loads_with_plain_diffusers():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from lab.loading import bundled_path
    path = bundled_path("shapes")
    sd = StableDiffusionPipeline.from_pretrained(path)
    sd.set_progress_bar_config(disable=True)
    out = sd("a large red circle on a gray background", num_inference_steps=3, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    for kind in ("scribble", "segmentation", "edges"):
        net = ControlNetModel.from_pretrained(path, subfolder=f"controlnet-{kind}")
        StableDiffusionControlNetPipeline(**sd.components, controlnet=net)
    weights = sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    assert weights <= 64e6, f"bundled weights are {weights / 1e6:.1f} MB (budget 64 MB for every model)"
    # the task models beside the text model load the same way (issue 19)
    from safetensors.torch import load_file

    from lab.shapes.tasks import PARTIAL_FILE
    for sub in path.glob("unet-*"):
        if (sub / PARTIAL_FILE).exists():  # a CA task model: weights over the text UNet, by the UNet's own names
            part = load_file(str(sub / PARTIAL_FILE))
            # a widened conv_in (the layout model's coordinate channels): the text UNet's config with more inputs
            wide = {"in_channels": part["conv_in.weight"].shape[1], "low_cpu_mem_usage": False,
                    "ignore_mismatched_sizes": True} if "conv_in.weight" in part else {}
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **wide)
            missing, unexpected = unet.load_state_dict(part, strict=False)
            assert not unexpected and len(missing) < len(unet.state_dict())
        else:
            UNet2DConditionModel.from_pretrained(path, subfolder=sub.name)
    assert all(p.suffix == ".safetensors" for p in path.rglob("*") if p.stat().st_size > 1e6)


def test_fp16_on_cpu_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="float32"):
        pipe = lab.load("shapes", device="cpu", dtype=torch.float16)
    assert pipe.dtype == torch.float32 and pipe.unet.dtype == torch.float32


def test_missing_repo_fails_fast_with_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    with pytest.raises(ModelNotFound) as err:
        lab.load("runwayml/stable-diffusion-v1-5")
    assert time.time() - t0 < 10
    assert isinstance(err.value, ModelNotAvailable)
    msg = str(err.value)
    assert "Hugging Face cache" in msg and "local directory" in msg and "huggingface-cli download" in msg
    assert len(err.value.tried) >= 3


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelNotFound, match="not available offline"):
        lab.load(str(tmp_path / "nope"))


def test_incomplete_directory(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(IncompleteModel) as err:
        lab.load(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(IncompleteModel, match="model_index.json"):
        lab.load(str(tmp_path))
    for garbled in ('{"_class_name": "StableDiff', '["not", "an", "object"]'):
        (tmp_path / "model_index.json").write_text(garbled)
        with pytest.raises(IncompleteModel, match="model_index.json (is not valid JSON|does not hold a JSON object)"):
            lab.load(str(tmp_path))


def test_controlnet_directory_passed_as_base_is_explained():
    from lab.loading import bundled_path
    with pytest.raises(IncompleteModel, match="is a ControlNet"):
        lab.load(str(bundled_path() / "controlnet-scribble"))


def test_unknown_controlnet_kind_lists_the_shipped_ones():
    with pytest.raises(ModelNotFound, match="scribble"):
        lab.load("shapes", controlnet="normal")


def test_local_directory_roundtrip(tmp_path):
    """A saved SD 1.x layout directory loads through lab.load and samples the same as in memory."""
    from diffusers import StableDiffusionPipeline
    comps = tiny_sd_components()
    StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    pipe = lab.load(str(tmp_path / "sd"))
    mem = lab.Pipeline.from_components(**comps)
    a = pipe.sampler("a red circle", steps=2, seed=0, height=32, width=32, progress=False).run()
    b = mem.sampler("a red circle", steps=2, seed=0, height=32, width=32, progress=False).run()
    assert torch.allclose(a.final_latents, b.final_latents, atol=1e-6)


def test_cached_repo_id_resolves_offline(tmp_path, monkeypatch):
    """A repo id whose snapshot is in the HF cache loads with no network (HF_HUB_OFFLINE=1)."""
    from diffusers import StableDiffusionPipeline
    hub = tmp_path / "hub"
    snap = hub / "models--lab--tiny-sd" / "snapshots" / ("0" * 40)
    StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(snap)
    (hub / "models--lab--tiny-sd" / "refs").mkdir()
    (hub / "models--lab--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    pipe = lab.load("lab/tiny-sd")
    assert pipe.kind == "sd" and pipe.path == snap


def test_sdxl_and_inpainting_layouts_and_controlnet_dirs(tmp_path):
    from components import controlnet, tiny_sdxl_components
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLPipeline
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(tmp_path / "xl")
    xl = lab.load(str(tmp_path / "xl"))
    assert xl.kind == "sdxl" and xl.text_encoder_2 is not None
    comps = tiny_sd_components(in_channels=9)
    StableDiffusionInpaintPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "inpaint")
    ip = lab.load(str(tmp_path / "inpaint"))
    assert ip.kind == "inpaint" and ip.unet.config.in_channels == 9
    with pytest.raises(ValueError, match="image= and mask_image="):
        ip.sampler("x", steps=1, height=32, width=32)
    base = tiny_sd_components()
    controlnet(base["unet"]).save_pretrained(tmp_path / "cn-lines")
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline(**base, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    pipe = lab.load(str(tmp_path / "sd"), controlnet=str(tmp_path / "cn-lines"))
    assert list(pipe.controlnets) == ["cn-lines"]
    pipe2 = lab.load(str(tmp_path / "sd"), controlnet={"lines": str(tmp_path / "cn-lines")})
    assert list(pipe2.controlnets) == ["lines"]


def test_control_inputs_are_validated(shapes_pipe):
    import numpy as np
    from PIL import Image
    ok = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="64x64"):
        shapes_pipe.sampler("x", control=lab.Control("scribble", np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        shapes_pipe.sampler("x", control=lab.Control("scribble", "scribble.png"))
    with pytest.raises(TypeError, match="mode"):
        shapes_pipe.sampler("x", control=lab.Control("scribble", Image.new("CMYK", (64, 64))))
    with pytest.raises(ValueError, match="start <= end"):
        shapes_pipe.sampler("x", control=lab.Control("scribble", ok, start=0.8, end=0.2))
    with pytest.raises(ValueError, match="start <= end"):
        shapes_pipe.sampler("x", control=lab.Control("scribble", ok, end=1.5))
    with pytest.raises(KeyError, match="did you mean"):
        shapes_pipe.sampler("x", control=lab.Control("scribbles", ok))
    with pytest.raises(ValueError, match="exactly one loaded ControlNet"):
        shapes_pipe.sampler("x", control=ok)
    with pytest.raises(ValueError, match="3 control images for 2 prompts"):
        shapes_pipe.sampler(["a", "b"], control=lab.Control("scribble", [ok, ok, ok]))
    # float images are documented as 0..1: a 0..255 float image is refused (before the text encoder runs)
    calls = []
    real = shapes_pipe.text_encoder.forward
    shapes_pipe.text_encoder.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for bad in (ok.astype(np.float32) * 0 + 255.0, torch.full((3, 64, 64), 255.0)):
            with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[255, 255\].*divide"):
                shapes_pipe.sampler("x", control=lab.Control("scribble", bad))
        with pytest.raises(ValueError, match="64x64"):
            shapes_pipe.sampler("x", control=lab.Control("scribble", np.zeros((32, 32, 3), np.uint8)))
    finally:
        del shapes_pipe.text_encoder.forward
    assert not calls, "the text encoder ran before the control image was checked"
    u8 = shapes_pipe.sampler("x", steps=1, progress=False,
                             control={"scribble": torch.full((3, 64, 64), 255, dtype=torch.uint8)})
    f01 = shapes_pipe.sampler("x", steps=1, progress=False, control={"scribble": torch.ones(3, 64, 64)})
    assert torch.equal(u8.run().final_latents, f01.run().final_latents)  # uint8 tensors are scaled to 0..1
    # documented modes are converted: L and bool arrays work
    s = shapes_pipe.sampler("x", steps=1, progress=False, control={"scribble": Image.new("L", (64, 64))})
    s2 = shapes_pipe.sampler("x", steps=1, progress=False, control={"edges": ok[..., 0] > 0})
    assert s.num_steps == s2.num_steps == 1

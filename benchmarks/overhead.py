"""Recording overhead against the plain diffusers pipeline on the same modules and seed.

    python benchmarks/overhead.py [--json PATH] [--device cpu|cuda] [--repeats 5] [--models shapes,sd15,...]

Models. CPU: the bundled shapes model (64 px, 30 steps), with its scribble ControlNet, and an SD 1.5
architecture with random weights at a CPU-feasible size (width/4, 256 px, 10 steps). CUDA (issue 8): the
same shapes runs, then the real sizes in float16 with random weights: SD 1.5 at 512x512, 50 steps, with
and without a ControlNet (the SD 1.5 ControlNet architecture), and SDXL at 1024x1024, 30 steps.

Variants, each the median of ``--repeats`` runs after a warm-up, interleaved round by round:

* ``plain``: ``diffusers.StableDiffusionPipeline`` (``...XLPipeline``, ``...ControlNetPipeline``)
  ``(output_type="latent")``;
* ``record_off``: the lab sampler with no recorder (it always keeps latents, x0 and eps per step: they
  are the loop's own tensors, so this equals ``latents``, the default record);
* ``cross_attention``: the lab sampler with ``AttentionRecorder()`` (all cross-attention layers, all
  steps, head mean, cond half);
* ``vanilla_processor``: the DAAM / prompt-to-prompt way: diffusers' pipeline with the recorded layers
  switched to a vanilla (non-SDPA) processor that keeps its ``attention_probs``;
* ControlNet: ``control`` (one net, no recorder) and ``control_residuals`` (+ ``ResidualRecorder()``).

Ratios are times over ``plain``; ``it_per_s`` is steps per second. Targets (issues 4, 5, 8): record_off
<= 1.02 (CPU) and >= 90% of the plain it/s (CUDA), cross_attention <= 1.10 and below vanilla_processor,
controlnet_residuals <= 1.05. On CUDA also ``gpu_peak_mb`` (peak allocated during a run, over the memory
held before it) per variant and ``extra_gpu_mb`` (default record and cross-attention over plain; target
<= 256 MB), and ``host_record_mb``: host memory of the default record, measured as the process's resident
memory growth over a run that is kept together with its ``to_xarray()`` (target <= 1 GB for SD 1.5).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor

import lab

from _report import emit  # benchmarks/ is on sys.path when a benchmark runs as a script


class VanillaRecordingProcessor(AttnProcessor):
    """diffusers' vanilla processor, keeping the head-mean probabilities of the cond half (DAAM's approach)."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(ctx))
        value = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.append(probs.view(batch, attn.heads, *probs.shape[1:])[batch // 2:].mean(1).to("cpu", torch.float16))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_all(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds per variant, the variants interleaved round by round (so drift in machine load hits
    all of them alike), after one warm-up round."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _gpu_peaks(fns: dict, device: str) -> dict:
    """Peak CUDA memory allocated during one run of each variant, over what was allocated before it (MiB)."""
    if device != "cuda":
        return {}
    out = {}
    for k, fn in fns.items():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        out[k] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _host_record(sample) -> dict:
    """Host memory of the default record: resident-memory growth over a run kept with its labelled arrays."""
    gc.collect()
    before = _rss_mb()
    run = sample()
    ds = run.to_xarray()
    grown = _rss_mb() - before
    return {"host_record_mb": grown, "to_xarray_mb": ds.nbytes / 2**20}


class _Lab:
    """The lab sampler as a timed variant; a run that ends in NonFiniteError (random float16 weights can
    overflow) is counted, not fatal: its loop was timed all the same."""

    def __init__(self):
        self.nonfinite = 0

    def __call__(self, pipe, prompt, **kw):
        def go():
            try:
                return pipe.sampler(prompt, seed=0, progress=False, **kw).run()
            except lab.NonFiniteError as e:
                self.nonfinite += 1
                return e.run
        return go


def _plain_pipeline(pipe, controlnet=None):
    import diffusers
    keys = ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    comps = {k: v for k, v in pipe.components.items() if k in keys and v is not None}
    if pipe.kind == "sdxl":
        cls = diffusers.StableDiffusionXLControlNetPipeline if controlnet else diffusers.StableDiffusionXLPipeline
        extra = {}
    else:
        cls = diffusers.StableDiffusionControlNetPipeline if controlnet else diffusers.StableDiffusionPipeline
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if controlnet is not None:
        extra["controlnet"] = controlnet
    plain = cls(**comps, **extra)
    plain.set_progress_bar_config(disable=True)
    return plain


def _results(fns: dict, *, plain: str, ratios: dict, steps: int, size: int, repeats: int, pipe, device: str) -> dict:
    """Time the variants; ``ratio_<name>`` = time of variant ``ratios[name]`` over ``plain``; on CUDA each
    variant's peak memory (``gpu_peak_mb``) and its excess over plain (``extra_gpu_mb``)."""
    t = _time_all(fns, repeats, device)
    res = {"seconds": t, "it_per_s": {k: steps / v for k, v in t.items()},
           **{f"ratio_{name}": t[k] / t[plain] for name, k in ratios.items()},
           "steps": steps, "size": size, "repeats": repeats, "dtype": str(pipe.dtype).removeprefix("torch.")}
    peaks = _gpu_peaks(fns, device)
    if peaks:
        res["gpu_peak_mb"] = peaks
        res["extra_gpu_mb"] = {k: v - peaks[plain] for k, v in peaks.items() if k != plain}
    return res


def measure(pipe, *, prompt: str, steps: int, size: int, repeats: int, device: str) -> dict:
    plain_pipe = _plain_pipeline(pipe)
    kw = dict(num_inference_steps=steps, guidance_scale=5.0, height=size, width=size, output_type="latent")
    ours = _Lab()

    def plain():
        plain_pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)

    def lab_run(recorders=()):
        return ours(pipe, prompt, steps=steps, guidance=5.0, height=size, width=size, recorders=list(recorders))

    def vanilla():
        store: list = []
        original = plain_pipe.unet.attn_processors
        procs = {k: (VanillaRecordingProcessor(store) if k.endswith("attn2.processor") else v)
                 for k, v in original.items()}
        plain_pipe.unet.set_attn_processor(procs)
        try:
            plain()
        finally:
            plain_pipe.unet.set_attn_processor(original)

    fns = {"plain": plain, "record_off": lab_run(), "cross_attention": lambda: lab_run([lab.AttentionRecorder()])(),
           "vanilla_processor": vanilla}
    if repeats == 0:  # memory of the default record only (e.g. the CUDA configuration on a CPU)
        ours(pipe, prompt, steps=2, guidance=5.0, height=size, width=size)()  # warm-up: allocator, kernels
        return {**_host_record(lab_run()), "steps": steps, "size": size,
                "dtype": str(pipe.dtype).removeprefix("torch.")}
    res = _results(fns, plain="plain", steps=steps, size=size, repeats=repeats, pipe=pipe, device=device,
                   ratios={"record_off": "record_off", "latents": "record_off", "cross_attention": "cross_attention",
                           "vanilla_processor": "vanilla_processor"})
    res["it_per_s_fraction_default_record"] = res["seconds"]["plain"] / res["seconds"]["record_off"]
    res.update(_host_record(lab_run()))
    res["nonfinite_runs"] = ours.nonfinite
    return res


def measure_controlnet(pipe, *, prompt: str, condition, steps: int, repeats: int, device: str,
                       size: int | None = None) -> dict:
    """``ratio_controlnet_residuals``: the lab sampler with one ControlNet and a ResidualRecorder (norms)
    over diffusers' ControlNet pipeline on the same modules."""
    from PIL import Image
    net_name = next(iter(pipe.controlnets))
    ref = _plain_pipeline(pipe, controlnet=pipe.controlnets[net_name])
    image = Image.fromarray(condition)
    size = size or pipe.default_size
    ours = _Lab()

    def plain():
        ref(prompt, image=image, num_inference_steps=steps, guidance_scale=5.0, output_type="latent", height=size,
            width=size, generator=torch.Generator().manual_seed(0))

    def lab_run(record):
        return ours(pipe, prompt, steps=steps, guidance=5.0, height=size, width=size,
                    control=lab.Control(net_name, condition), recorders=[lab.ResidualRecorder()] if record else [])

    fns = {"plain_controlnet": plain, "control": lab_run(False), "control_residuals": lab_run(True)}
    res = _results(fns, plain="plain_controlnet", steps=steps, size=size, repeats=repeats, pipe=pipe, device=device,
                   ratios={"control": "control", "controlnet_residuals": "control_residuals"})
    res["nonfinite_runs"] = ours.nonfinite
    return res


def _scribble(size: int):
    """A scribble condition at ``size`` px: the shapes world's held-out scribble, scaled up."""
    import numpy as np
    from PIL import Image

    from lab.shapes import world
    ex = world.make_example(0, 1, split="heldout")
    return ex["caption"], np.asarray(Image.fromarray(ex["scribble"]).resize((size, size), Image.NEAREST))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5, help="0: no timing, only the host memory of the default "
                    "record (shapes and SD 1.5)")
    ap.add_argument("--models", default=None, help="comma-separated subset of: shapes, shapes_controlnet, sd15, "
                    "sd15_controlnet, sdxl (default: all for the device)")
    ap.add_argument("--width", type=int, default=None, help="divide the random models' channels (a quick check "
                    "of the CUDA configuration on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="override the random models' step counts")
    ap.add_argument("--size", type=int, default=None, help="override the random models' sizes (px)")
    args = ap.parse_args()
    from lab.architectures import random_pipeline
    dev = args.device
    cuda = dev == "cuda"
    res = {"device": dev, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name()
    everything = ["shapes", "shapes_controlnet", "sd15"] + (["sd15_controlnet", "sdxl"] if cuda else [])
    models = args.models.split(",") if args.models else everything
    dtype = torch.float16 if cuda else torch.float32
    width = args.width or (1 if cuda else 4)
    prompt = "a large red circle and a small blue square on a gray background"

    def timed(key, fn):
        t0 = time.perf_counter()
        res[key] = fn()
        res[key]["wall_seconds"] = time.perf_counter() - t0
        print(f"{key}: {res[key]['wall_seconds']:.0f} s", flush=True)
        if args.json:  # what is done so far survives a time limit
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if not args.repeats:  # memory only: no ControlNet variants
        models = [m for m in models if "controlnet" not in m]

    def rep(least):
        return max(least, args.repeats // 2) if args.repeats else 0

    if "shapes" in models:
        timed("shapes", lambda: measure(lab.load("shapes", device=dev), prompt=prompt, steps=30, size=64,
                                        repeats=args.repeats, device=dev))
    if "shapes_controlnet" in models:
        caption, scribble = _scribble(64)
        timed("shapes_controlnet", lambda: measure_controlnet(
            lab.load("shapes", controlnet="scribble", device=dev), prompt=caption, condition=scribble, steps=30,
            repeats=args.repeats, device=dev))
    rp = dict(width=width, dtype=dtype, device=dev, init_device=dev)
    if not cuda and width > 1:  # the CPU-feasible SD 1.5: shallow text encoder too
        rp.update(max_depth=1, layers=4)
    sd_size, sd_steps = args.size or (512 if cuda else 256), args.steps or (50 if cuda else 10)
    tag = f"w{width}_{sd_size}px_{sd_steps}steps_{str(dtype).removeprefix('torch.')}"
    if "sd15" in models:
        timed(f"sd15_random_{tag}", lambda: measure(random_pipeline("sd15", **rp), prompt="a red circle",
                                                    steps=sd_steps, size=sd_size, repeats=rep(3), device=dev))
    if "sd15_controlnet" in models:
        caption, scribble = _scribble(sd_size)
        timed(f"sd15_controlnet_random_{tag}", lambda: measure_controlnet(
            random_pipeline("sd15", controlnet=True, **rp), prompt=caption, condition=scribble, steps=sd_steps,
            size=sd_size, repeats=rep(3), device=dev))
    if "sdxl" in models:
        xl_size, xl_steps = args.size or (1024 if cuda else 256), args.steps or (30 if cuda else 10)
        timed(f"sdxl_random_w{width}_{xl_size}px_{xl_steps}steps_{str(dtype).removeprefix('torch.')}",
              lambda: measure(random_pipeline("sdxl", **rp), prompt="a red circle", steps=xl_steps, size=xl_size,
                              repeats=rep(2), device=dev))
    emit(res, args.json)


if __name__ == "__main__":
    main()

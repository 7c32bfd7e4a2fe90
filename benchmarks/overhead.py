"""Recording overhead against the plain diffusers pipeline on the same modules and seed.

    python benchmarks/overhead.py [--json PATH] [--device cpu|cuda] [--repeats 5]

For each model (the bundled shapes model at 64 px, 30 steps; an SD 1.5 architecture with random weights
at a CPU-feasible size) it times, median of ``--repeats`` runs after a warm-up:

* ``plain``: ``diffusers.StableDiffusionPipeline(...)(output_type="latent")``;
* ``record_off``: the lab sampler with no recorder (it always keeps latents, x0 and eps per step: they
  are the loop's own tensors, so this equals ``latents``);
* ``cross_attention``: the lab sampler with ``AttentionRecorder()`` (all cross-attention layers, all
  steps, head mean, cond half);
* ``vanilla_processor``: the DAAM / prompt-to-prompt way: diffusers' pipeline with the recorded layers
  switched to a vanilla (non-SDPA) processor that keeps its ``attention_probs``.

Ratios are times over ``plain``. Targets (issue 4): record_off <= 1.02, latents <= 1.03,
cross_attention <= 1.10, and cross_attention below vanilla_processor. ControlNet (issue 5):
``ratio_controlnet_residuals`` (one net + residual-norm recording vs diffusers' ControlNet pipeline) <= 1.05.
"""
from __future__ import annotations

import argparse
import statistics
import time

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


def _time_all(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds per variant, the variants interleaved round by round (so drift in machine load hits
    all of them alike), after one warm-up round."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(pipe, *, prompt: str, steps: int, size: int, repeats: int, device: str) -> dict:
    from diffusers import StableDiffusionPipeline
    comps = {k: v for k, v in pipe.components.items() if k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")}
    plain_pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    plain_pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, guidance_scale=5.0, height=size, width=size, output_type="latent")

    def plain():
        plain_pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)

    def lab_run(recorders=()):
        return lambda: pipe.sampler(prompt, steps=steps, guidance=5.0, height=size, width=size, seed=0,
                                    recorders=list(recorders), progress=False).run()

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

    t = _time_all({"plain": plain, "off": lab_run(), "cross": lambda: lab_run([lab.AttentionRecorder()])(),
                   "vanilla": vanilla}, repeats, device)
    t_plain, t_off, t_cross, t_vanilla = t["plain"], t["off"], t["cross"], t["vanilla"]
    return {"seconds": {"plain": t_plain, "record_off": t_off, "cross_attention": t_cross, "vanilla_processor": t_vanilla},
            "ratio_record_off": t_off / t_plain, "ratio_latents": t_off / t_plain,
            "ratio_cross_attention": t_cross / t_plain, "ratio_vanilla_processor": t_vanilla / t_plain,
            "steps": steps, "size": size, "repeats": repeats}


def measure_controlnet(pipe, *, prompt: str, condition, steps: int, repeats: int, device: str) -> dict:
    """``ratio_controlnet_residuals``: the lab sampler with one ControlNet and a ResidualRecorder (norms)
    over diffusers' StableDiffusionControlNetPipeline on the same modules."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image
    net_name = next(iter(pipe.controlnets))
    comps = {k: v for k, v in pipe.components.items() if k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")}
    ref = StableDiffusionControlNetPipeline(**comps, controlnet=pipe.controlnets[net_name], safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(condition)

    def plain():
        ref(prompt, image=image, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
            generator=torch.Generator().manual_seed(0))

    def ours(record):
        return lambda: pipe.sampler(prompt, steps=steps, guidance=5.0, seed=0, progress=False,
                                    control=lab.Control(net_name, condition),
                                    recorders=[lab.ResidualRecorder()] if record else []).run()

    t = _time_all({"plain": plain, "control": ours(False), "rec": ours(True)}, repeats, device)
    t_plain, t_control, t_rec = t["plain"], t["control"], t["rec"]
    return {"seconds": {"plain_controlnet": t_plain, "control": t_control, "control_residuals": t_rec},
            "ratio_control": t_control / t_plain, "ratio_controlnet_residuals": t_rec / t_plain,
            "steps": steps, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from lab.architectures import random_pipeline
    res = {"device": args.device, "torch_threads": torch.get_num_threads()}
    shapes = lab.load("shapes", device=args.device)
    res["shapes"] = measure(shapes, prompt="a large red circle and a small blue square on a gray background",
                            steps=30, size=64, repeats=args.repeats, device=args.device)
    from lab.shapes import world
    ex = world.make_example(0, 1, split="heldout")
    shapes_cn = lab.load("shapes", controlnet="scribble", device=args.device)
    res["shapes_controlnet"] = measure_controlnet(shapes_cn, prompt=ex["caption"], condition=ex["scribble"], steps=30,
                                                  repeats=args.repeats, device=args.device)
    sd15 = random_pipeline("sd15", width=4, max_depth=1, layers=4, device=args.device)
    res["sd15_random_width4_256px"] = measure(sd15, prompt="a red circle", steps=10, size=256,
                                              repeats=max(3, args.repeats // 2), device=args.device)
    emit(res, args.json)


if __name__ == "__main__":
    main()

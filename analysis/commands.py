"""The command-line commands that compose the layers: ``demo`` and ``eval``.

They are registered with ``python -m lab`` / ``latent-lab`` through the entry-point group
``latent_lab.commands`` (see ``pyproject.toml`` and :mod:`lab.cli`): the command line sits above
``analysis``, while ``lab`` itself never imports this package.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lab
from lab.shapes import world

from .evaluate import attention_eval
from .report import write_report


def demo(args) -> int:
    """The main job on the bundled model: a captioned scene under a scribble ControlNet, everything
    recorded, and an HTML report (trajectory, word heat maps, residual norms, settings)."""
    t0 = time.time()
    ex = world.make_example(args.seed, 0, split="heldout")
    print(f"model: bundled 'shapes' (trained by this project; see README)\nprompt: {ex['caption']!r}")
    pipe = lab.load("shapes", controlnet="scribble")
    run = pipe.sampler(ex["caption"], steps=30, guidance=5.0, scheduler="ddim", seed=args.seed,
                       control=lab.Control("scribble", ex["scribble"]),
                       recorders=[lab.AttentionRecorder(), lab.ResidualRecorder(maps=True)]).run()
    sampled = time.time() - t0
    out = Path(args.out)
    run.save(out / "run.zarr")
    path = write_report(run, out, condition=ex["scribble"], title=f"latent-lab demo: {ex['caption']}",
                        seconds=sampled)
    print(f"report: {path.resolve()}\nrun: {(out / 'run.zarr').resolve()}\ntook {time.time() - t0:.1f}s")
    return 0


def evaluate(args) -> int:
    """``eval shapes``: the model's bars against the oracle; ``eval attention``: word heat maps vs masks;
    ``eval tasks``: the task table's models (:mod:`lab.shapes.evaluate_tasks`); ``eval sds``: score distillation
    under the text model (:mod:`lab.shapes.evaluate_sds`); ``eval video``: Text2Video-Zero
    (:mod:`lab.shapes.evaluate_video`); ``eval stage1``: the VQGAN, rate-distortion and the pixel-vs-latent race
    (:mod:`lab.shapes.evaluate_stage1`); ``eval views``: the view model (:mod:`lab.shapes.evaluate_views`)."""
    args.guidance_given = args.guidance is not None
    if args.guidance is None:
        args.guidance = 5.0
    if args.what == "stage1":
        from lab.shapes.evaluate_stage1 import run_stage1_eval
        res = run_stage1_eval(n=args.n or 500, n_samples=args.samples, json_path=args.json, work=args.work,
                              model=args.model)
    elif args.what == "video":
        from lab.loading import load
        from lab.shapes.evaluate_video import run_video_eval
        res = run_video_eval(load(args.model), seeds=args.seeds, t0=args.t0, t1=args.t1)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2))
        res = {k: v for k, v in res.items() if k != "rows"}
    elif args.what == "views":
        from lab.shapes.evaluate_views import run_views_eval
        res = run_views_eval(args.n or 200, steps=args.steps, guidance=args.guidance if args.guidance_given else 3.0,
                             json_path=args.json, model=args.model, pairs_seed=args.pairs_seed)
    elif args.what == "sds":
        from lab.shapes.evaluate_sds import run_sds_ablations, run_sds_eval
        if args.ablations:
            res = run_sds_ablations(json_path=args.json, model=args.model,
                                    which=args.ablations.split(",") if args.ablations != "all" else None)
        else:
            res = run_sds_eval(seeds=args.seeds, json_path=args.json, model=args.model)
            res = {k: v for k, v in res.items() if k != "per_prompt"}
    elif args.what == "tasks":
        from lab.shapes.evaluate_tasks import EVAL_TASKS, run_task_eval
        res = run_task_eval(args.n or 200, tasks=args.tasks.split(",") if args.tasks else EVAL_TASKS, steps=args.steps,
                            guidance=args.guidance, json_path=args.json, model=args.model)
    elif args.what == "attention":
        res = attention_eval(args.n or 100, steps=args.steps, guidance=args.guidance, json_path=args.json,
                             model=args.model)
    else:
        from lab.shapes.evaluate import run_eval
        from lab.shapes import world
        from lab.shapes.evaluate import PARTS
        res = run_eval(args.n or 200, steps=args.steps, guidance=args.guidance, json_path=args.json,
                       model=args.model, attend_and_excite=args.attend_and_excite,
                       syntax_binding=args.syntax_binding,
                       parts=tuple(args.parts.split(",")) if args.parts else PARTS,
                       kinds=tuple(args.kinds.split(",")) if args.kinds else world.CONDITION_KINDS)
        res = {k: v for k, v in res.items() if k != "preprocessors"}
    print(json.dumps(res, indent=2))
    return 0


def register(sub) -> None:
    """Add ``demo`` and ``eval`` to the ``python -m lab`` parser (entry point ``latent_lab.commands``)."""
    d = sub.add_parser("demo", help="the main job on the bundled model (make demo)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=3)
    d.set_defaults(func=demo)

    e = sub.add_parser("eval", help="measure the bundled model against the shapes world's oracle")
    e.add_argument("what", choices=["shapes", "attention", "tasks", "sds", "video", "stage1", "views"],
                   help="shapes: the model's bars; attention: word heat maps vs object masks; tasks: the task "
                        "table's models; sds: score distillation of a soft shapes renderer; video: Text2Video-Zero; "
                        "stage1: the VQ autoencoder, the rate-distortion sweep and the pixel-vs-latent race; views: "
                        "the Zero-1-to-3 view model on held-out camera changes")
    e.add_argument("--seeds", type=int, default=3, help="eval sds: random starts per prompt; eval video: seeds per prompt (18 prompts)")
    e.add_argument("--ablations", default=None,
                   help="eval sds: instead, the SDS settings with one thing changed (all, or comma-separated "
                        "names of lab.shapes.evaluate_sds.ABLATIONS), merged into --json")
    e.add_argument("--t0", type=int, default=None, help="eval video: Text2Video-Zero's t0 (default the eval's)")
    e.add_argument("--t1", type=int, default=None, help="eval video: Text2Video-Zero's t1 (default the eval's)")
    e.add_argument("--tasks", default=None, help="eval tasks: which, comma-separated (default: all)")
    e.add_argument("--pairs-seed", type=int, default=None,
                   help="eval views: the seed of the held-out pairs (default lab.shapes.evaluate_views.EVAL_SEED, "
                        "2400; training used 0): another set of the same distribution, to see how much of a "
                        "difference is the sample's")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--work", default="runs/stage1/work",
                   help="eval stage1: the training directory of the sweep and race models (train shapes --stage ...)")
    e.add_argument("--samples", type=int, default=100, help="eval stage1: captions sampled per race model")
    e.add_argument("--n", type=int, default=None, help="captions (default 200 for shapes, 100 for attention; stage1: held-out scenes, 500)")
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default 5; eval views: 3, Zero-1-to-3's)")
    e.add_argument("--model", default="shapes",
                   help="the bundled model or a pipeline directory (a training run's --export; eval shapes "
                        "needs its controlnet-KIND subfolders)")
    e.add_argument("--parts", default=None,
                   help="eval shapes: measure only these parts, comma-separated (vae, oracle, fidelity, binding, "
                        "controlnet, composition, preprocessors, speed), merged into an existing --json")
    e.add_argument("--kinds", default=None,
                   help="eval shapes: the ControlNets measured, comma-separated (default: all five kinds)")
    e.add_argument("--attend-and-excite", action="store_true",
                   help="eval shapes: also the two-object keys sampled with Attend-and-Excite on the shape words")
    e.add_argument("--syntax-binding", action="store_true",
                   help="eval shapes: also the two-object keys sampled with SynGen's syntax binding on the shape words")
    e.set_defaults(func=evaluate)

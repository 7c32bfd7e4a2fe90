"""Guidance on the latents at sampling time: a gradient step on x_t before the denoising step.

:class:`AttendAndExcite` (Chefer et al. 2023, "Attend-and-Excite"): a caption's subject tokens should each
hold a strong cross-attention peak somewhere; a subject the model neglects (the missing object, or the one
drawn as a copy of the other) has only weak attention everywhere. At the guided steps the conditional UNet is
run with gradients, each subject token's map (averaged over heads and the cross-attention layers at
``resolution``, a softmax over the caption's tokens without the start token, Gaussian-smoothed) gives its
maximum ``a_s``, and

    L = max_s (1 - a_s),        x_t <- x_t - alpha_i * dL/dx_t,    alpha_i = step_size * sqrt(1 - i / (2 n))

(the paper's ``step_size * sqrt(scale)``, scale from 1.0 to 0.5 over the trajectory). At the ``refine``
steps the update repeats until every subject's ``a_s`` reaches the threshold (at most ``max_refine`` times).

    guide = lab.AttendAndExcite(["circle", "square"])
    run = pipe.sampler("a red circle and a blue square", guides=[guide], seed=0).run()

:class:`SyntaxBinding` (Rassin et al. 2023, "SynGen"): the same machinery with another loss. A caption's
nouns and their modifiers ("small", "purple" for "square") should attend to the same place, and each noun's
group away from the other nouns' groups; its loss (symmetric KL between the maps as distributions over pixels)
targets attribute leakage, the "two purple squares for a purple square and a blue circle" failure, where
Attend-and-Excite only asks each noun for a strong peak somewhere.

A guide belongs to one sampler (``Sampler(guides=...)``): it reads the sampler's batch layout and tokens,
runs the UNet through the lab's attention dispatch with its own hooks, and leaves the UNet as it found it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .conditioning.text import STOP_WORDS
from .recording.dispatch import attention_probs, dispatching, layer_name
from .steps import check_steps, in_fraction_window


@dataclass
class LatentGuide:
    """What every guide shares: the subject ``words``, the guided window ``steps`` (fractions of the
    trajectory), ``step_size`` (alpha), the cross-attention map ``resolution`` (``None``: 16 where the UNet has
    16x16 maps, as the papers on Stable Diffusion, else the largest), the Gaussian ``sigma`` (3x3 kernel), and
    ``refine``/``max_refine`` (Attend-and-Excite's iterative refinement; empty for guides without it). A guide
    names its tokens per row (:meth:`targets`) and a loss per row from the layers' attention probabilities
    (:meth:`loss`); :meth:`guide` takes the gradient steps."""

    words: list = field(default_factory=list)
    steps: tuple = (0.0, 0.5)
    step_size: float = 20.0
    resolution: int | None = None
    sigma: float = 0.5
    refine: dict = field(default_factory=dict)
    max_refine: int = 20

    kind = "guide"

    def __post_init__(self):
        if isinstance(self.words, str):
            self.words = [self.words]
        self.words = [str(w) for w in self.words]
        if not self.words:
            raise ValueError(f"{type(self).__name__} needs the subject words to guide, e.g. ['circle', 'square']")
        check_steps(self.steps)
        if not (isinstance(self.steps, tuple) and len(self.steps) == 2 and all(isinstance(v, float)
                                                                               for v in self.steps)):
            raise ValueError(f"{type(self).__name__}'s steps is a window of fractions such as (0.0, 0.5), "
                             f"got {self.steps!r}")
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"step_size must be a finite number >= 0, got {self.step_size}")
        self.refine = {str(float(k)): float(v) for k, v in dict(self.refine).items()}
        if any(not 0.0 <= float(k) <= 1.0 or not 0.0 <= v <= 1.0 for k, v in self.refine.items()):
            raise ValueError(f"refine maps fractions of the trajectory to thresholds, both in [0, 1]: {self.refine}")
        if self.max_refine < 0:
            raise ValueError(f"max_refine must be >= 0, got {self.max_refine}")

    # ------------------------------------------------------------------ the sampler's side
    def subject_tokens(self, tokens: dict, layout) -> list[list[int]]:
        """For each conditional row of the batch, the token positions of the subject words (``KeyError`` when
        no prompt of the batch has any of them)."""
        prompts = tokens["prompts"]
        wanted = {x.lower() for x in self.words}
        rows = []
        for j in range(layout.batch):
            words = [w.lower() for w in prompts[layout.prompt_of(j)]["words"]]
            rows.append([t for t, w in enumerate(words) if w in wanted])
        if not any(rows):
            self._none_found(prompts)
        return rows

    def _none_found(self, prompts):
        all_words = sorted({w for p in prompts for w in p["words"] if w})
        raise KeyError(f"none of the subject words {self.words} is in the prompt ({all_words})")

    def targets(self, tokens: dict, layout) -> list:
        """What :meth:`loss` needs of each conditional row's tokens (here: the subject tokens)."""
        return self.subject_tokens(tokens, layout)

    def loss(self, probs: list[torch.Tensor], targets: list, n_words: list[int]) -> torch.Tensor:
        """The loss of each row ``[batch]`` from the layers' cross-attention probabilities."""
        raise NotImplementedError

    def text_maps(self, probs: list[torch.Tensor], n_words: list[int]) -> list[torch.Tensor]:
        """Per row, the maps of the prompt's tokens ``[tokens, side, side]`` (token ``t`` at ``t - 1``): the
        layers' probabilities ``[batch, heads, Q, K]`` averaged over heads and layers, softmax(100 * A) over the
        tokens without the start and end tokens (the papers' ``aggregate_attention`` and re-normalisation),
        Gaussian-smoothed."""
        a = torch.stack([p.mean(1) for p in probs]).mean(0)  # [batch, Q, K]
        side = int(math.isqrt(a.shape[1]))
        kernel = _gaussian(self.sigma, a.device, a.dtype)
        out = []
        for b in range(a.shape[0]):
            text = (a[b, :, 1:n_words[b] - 1] * 100).softmax(-1)  # [Q, words]
            maps = text.T.reshape(-1, 1, side, side)
            out.append(F.conv2d(F.pad(maps, (1, 1, 1, 1), mode="reflect"), kernel)[:, 0])
        return out

    def guide(self, x: torch.Tensor, i: int, n: int, run_cond) -> tuple[torch.Tensor, dict]:
        """``x`` (one half, ``[batch, C, h, w]``) after this step's updates, and what was done
        (``loss`` before them, ``losses`` at each evaluation ``[evaluations, batch]``, ``updates``).
        ``run_cond(x)`` runs the conditional UNet on ``x`` with the attention hooks and returns the loss of each
        row ``[batch]`` (via :meth:`loss`)."""
        if not in_fraction_window(i, n, *self.steps):
            return x, {}
        alpha = self.step_size * math.sqrt(1.0 - i / (2.0 * n))
        threshold = next((v for k, v in self.refine.items() if round(float(k) * n) == i), None)
        updates, losses = 0, []
        for _ in range(1 + (self.max_refine if threshold is not None else 0)):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                loss = run_cond(xg)  # [batch]
                losses.append(loss.detach().float().cpu())
                if threshold is not None and updates > 0 and bool((loss <= 1.0 - threshold).all()):
                    break
                grad, = torch.autograd.grad(loss.sum(), xg)
            x = (x - alpha * grad.to(x.dtype)).detach()
            updates += 1
            if threshold is None or bool((loss.detach() <= 1.0 - threshold).all()):
                break
        # loss: before this step's first update; losses: before each update (and after the last one, when the
        # refinement checked it)
        return x, {"loss": losses[0], "losses": torch.stack(losses), "updates": updates}

    def layers(self, unet) -> list[str]:
        """The cross-attention layers whose maps are ``resolution`` on a side (square latents)."""
        return [name for name, _ in _cross_layers(unet, self.resolution)]

    def describe(self) -> dict:
        return {"kind": self.kind, "words": list(self.words), "steps": list(self.steps), "step_size": self.step_size,
                "resolution": self.resolution, "refine": dict(self.refine), "max_refine": self.max_refine}


@dataclass
class AttendAndExcite(LatentGuide):
    """Attend-and-Excite on the subject ``words`` (each occurrence of each word in a prompt is a subject token;
    a word absent from one prompt of a batch is skipped there, from every prompt is a ``KeyError``).

    ``steps``: the guided window (the paper: the first 25 of 50 steps); ``step_size``: alpha (the paper: 20);
    ``refine``: ``{fraction of the trajectory: threshold}``, the paper's iterative refinement at steps 0, 10, 20
    of 50; ``max_refine``: the most extra updates per refine step (the paper: 20)."""

    refine: dict = field(default_factory=lambda: {"0.0": 0.05, "0.2": 0.5, "0.4": 0.8})

    kind = "attend-and-excite"

    def loss(self, probs, targets, n_words) -> torch.Tensor:
        """``max_s (1 - a_s)`` per row: the most neglected subject (rows without subjects: 0)."""
        return (1.0 - self.maxima(probs, targets, n_words)).amax(dim=1)

    def maxima(self, probs: list[torch.Tensor], subjects: list[list[int]], n_words: list[int]) -> torch.Tensor:
        """Each subject token's smoothed attention maximum ``[batch, max subjects]`` (missing subjects: 1)."""
        maps = self.text_maps(probs, n_words)
        k = max(len(s) for s in subjects)
        out = torch.ones(len(maps), k, device=maps[0].device, dtype=maps[0].dtype)
        for b, toks in enumerate(subjects):
            for m, t in enumerate(toks):
                out[b, m] = maps[b][t - 1].amax()
        return out


@dataclass
class SyntaxBinding(LatentGuide):
    """SynGen (Rassin et al. 2023, "Linguistic Binding in Diffusion Models"): each noun's modifiers should
    attend where the noun does, and nowhere near the other nouns and their modifiers. ``words``: the nouns
    (e.g. the shape words); a noun's modifiers are the words just before it back to a stop word, a punctuation
    mark or another noun ("a small purple square and a blue circle": square <- small, purple; circle <- blue),
    the rule the paper's dependency parse gives on such prompts. With each token's map normalised to a distribution over
    the pixels and ``dist`` the symmetric KL divergence,

        L = mean over (modifier m, its noun n) of dist(A_m, A_n)
            - mean over (w in one noun's group, u in another's) of dist(A_w, A_u)

    a gradient step on x_t at the guided steps (the paper: step size 20 over the first 25 of 50 steps), with
    Attend-and-Excite's step-size decay. No refinement: its loss is not a probability to reach."""

    kind = "syntax-binding"

    def __post_init__(self):
        super().__post_init__()
        if self.refine:
            raise ValueError("SyntaxBinding has no refinement (refine must be empty): its loss has no threshold")

    def targets(self, tokens, layout) -> list[list[tuple[list[int], list[list[int]]]]]:
        """Per row, each noun's group: ``(the noun's tokens, [each modifier's tokens])``."""
        nouns = {w.lower() for w in self.words}
        rows = []
        for j in range(layout.batch):
            row = tokens["prompts"][layout.prompt_of(j)]
            by_word: dict[int, list[int]] = {}
            text: dict[int, str] = {}
            for t, (w, word) in enumerate(zip(row["word_index"], row["words"])):
                if w >= 0:
                    by_word.setdefault(w, []).append(t)
                    text[w] = word.lower()
            groups = []
            for w in sorted(by_word):
                if text[w] not in nouns:
                    continue
                mods, v = [], w - 1
                while (v in by_word and text[v] not in STOP_WORDS and text[v] not in nouns
                       and any(ch.isalnum() for ch in text[v])):  # punctuation ends a group too
                    mods.insert(0, by_word[v])
                    v -= 1
                groups.append((by_word[w], mods))
            rows.append(groups)
        if not any(rows):
            self._none_found(tokens["prompts"])
        return rows

    def loss(self, probs, targets, n_words) -> torch.Tensor:
        maps = self.text_maps(probs, n_words)
        out = []
        for b, groups in enumerate(targets):
            m = maps[b]

            def dist_of(toks):
                d = m[[t - 1 for t in toks]].mean(0).flatten()
                return d / d.sum().clamp_min(1e-12)

            pos, neg = [], []
            words = [[dist_of(noun)] + [dist_of(mod) for mod in mods] for noun, mods in groups]
            for g in words:
                pos += [_sym_kl(mod, g[0]) for mod in g[1:]]
            for a in range(len(words)):
                for c in range(a + 1, len(words)):
                    neg += [_sym_kl(p, q) for p in words[a] for q in words[c]]
            zero = m.sum() * 0
            out.append((torch.stack(pos).mean() if pos else zero) - (torch.stack(neg).mean() if neg else zero))
        return torch.stack(out)


GUIDES = {"AttendAndExcite": AttendAndExcite, "SyntaxBinding": SyntaxBinding}  # the recipe's registry


def _sym_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    p, q = p + eps, q + eps
    return 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())


def _gaussian(sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(3, device=device, dtype=dtype) - 1
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).reshape(1, 1, 3, 3)


def _cross_layers(unet, resolution):
    """``(layer name, map side)`` of the cross-attention layers at ``resolution`` (None: 16 if present, else
    the largest), for a ``sample_size`` latent; map sides follow the UNet's down and up blocks."""
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    sides = {}
    for key in unet.attn_processors:
        name = layer_name(key)
        if not name.endswith("attn2"):
            continue
        parts = name.split(".")
        if parts[1] == "down_blocks":
            side = size // (2 ** int(parts[2]))
        elif parts[1] == "up_blocks":
            side = size // (2 ** (len(unet.config.block_out_channels) - 1 - int(parts[2])))
        else:
            side = size // (2 ** (len(unet.config.block_out_channels) - 1))
        sides[name] = side
    if not sides:
        raise ValueError("this UNet has no cross-attention layers to guide")
    want = resolution if resolution is not None else (16 if 16 in sides.values() else max(sides.values()))
    chosen = [(n, s) for n, s in sides.items() if s == want]
    if not chosen:
        raise ValueError(f"this UNet has no {want}x{want} cross-attention maps at sample_size {size} "
                         f"(it has {sorted(set(sides.values()))})")
    return chosen


def check_guides(guides) -> tuple:
    """``guides`` as a tuple, each one a guide (:class:`AttendAndExcite`, :class:`SyntaxBinding`); TypeError
    naming what else was given."""
    if isinstance(guides, LatentGuide):
        guides = (guides,)
    try:
        guides = tuple(guides)
    except TypeError:
        raise TypeError(f"guides must be a list of guides such as lab.AttendAndExcite([...]), got {guides!r}") from None
    bad = [g for g in guides if not isinstance(g, LatentGuide)]
    if bad:
        raise TypeError(f"guides must be lab.AttendAndExcite or lab.SyntaxBinding instances, got {bad!r}")
    return guides


class GuideHooks:
    """The attention hooks of one guided UNet call: the chosen layers compute their probabilities explicitly
    (kept in the autograd graph) and output ``probs @ V``, as :class:`lab.recording.dispatch.AttentionHooks`."""

    def __init__(self, layers):
        self.layers = frozenset(layers)
        self.probs: list[torch.Tensor] = []

    def core(self, name, attn, is_cross):
        def run(query, key, value, mask):
            probs = attention_probs(query, key, attn.scale, mask)
            self.probs.append(probs)
            return probs.to(value.dtype) @ value
        return run


def guided_step_latents(sampler, x: torch.Tensor, i: int, make_inputs) -> tuple[torch.Tensor, list[dict]]:
    """Apply ``sampler``'s guides to ``x`` at step ``i``. ``make_inputs(x)`` builds the step's
    :class:`~lab.conditioning.base.UNetInputs` for latents ``x`` (every plug-in applied), from which the
    conditional half is taken."""
    layout, unet = sampler.layout, sampler.pipe.unet
    tokens = sampler._text.tokens  # the sampler refused guides without a text prompt
    notes = []
    for g in sampler._guides:
        if not in_fraction_window(i, sampler.num_steps, *g.steps):
            continue
        layers = sampler._guide_layers[id(g)]
        targets = g.targets(tokens, layout)
        n_words = [_n_words(tokens["prompts"][layout.prompt_of(j)]) for j in range(layout.batch)]

        def run_cond(xg, g=g, layers=layers, targets=targets, n_words=n_words):
            inputs = make_inputs(xg)
            cond = layout.half("cond")
            hooks = GuideHooks(layers)
            kw = inputs.unet_kwargs()
            kw = {k: _rows(v, cond, layout.rows) for k, v in kw.items()}
            with dispatching(unet, hooks.layers):
                unet(inputs.sample[cond], inputs.timestep, **kw, cross_attention_kwargs={"lab_hooks": hooks})
            return g.loss(hooks.probs, targets, n_words)

        x, note = g.guide(x, i, sampler.num_steps, run_cond)
        if note:
            notes.append({"guide": g.kind, **note})
    return x, notes


def _n_words(row: dict) -> int:
    """Tokens up to and including the end token (the paper's ``last``: start, the words, end)."""
    idx = row["word_index"]
    last = max((t for t, w in enumerate(idx) if w >= 0), default=0)
    return last + 2


def _rows(v, rows: slice, n: int):
    """``v``'s conditional rows: tensors whose first dimension is the batch's ``n`` rows, in lists and dicts."""
    if isinstance(v, torch.Tensor):
        return v[rows] if v.dim() > 0 and v.shape[0] == n else v
    if isinstance(v, (list, tuple)):
        return [_rows(a, rows, n) for a in v]
    if isinstance(v, dict):
        return {k: _rows(a, rows, n) for k, a in v.items()}
    return v

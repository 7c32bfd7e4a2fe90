"""Text conditioning by cross-attention ("CA"): prompt embeddings, and SDXL's pooled embeddings and time ids.

Encoding is diffusers' own (``pipe.encode_prompt``, ``_get_add_time_ids``), so the embeddings equal those of
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``. Under classifier-free guidance the batch is
``[negative, positive]`` (:mod:`lab.batch`). This module also says how the tokenizer split each prompt into
words (:func:`token_words`), the one word-of-token mapping of the lab, and which words carry no content
(:data:`STOP_WORDS`).
"""
from __future__ import annotations

import warnings

import torch

from ..batch import BatchLayout
from .base import Conditioning, Setup, StepInfo, UNetInputs

#: function words that name nothing in an image: left out of default word lists (heat maps, reports, widgets)
STOP_WORDS = frozenset({"a", "an", "the", "and", "on", "of", "in", "with", "at", "to", "by"})
PROMPT_KEYS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")
#: SDXL's size and crop conditioning ("micro-conditioning"), as StableDiffusionXLPipeline names it
MICRO_KEYS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
              "negative_crops_coords_top_left", "negative_target_size")


def content_words(words) -> list[str]:
    """``words`` in order, each once, without empty strings and :data:`STOP_WORDS`."""
    return [w for w in dict.fromkeys(str(x) for x in words) if w and w.lower() not in STOP_WORDS]


def token_words(tok, ids) -> dict:
    """How ``tok`` split a prompt into token ``ids``: ``tokens`` (strings), ``word_index`` (the word of the
    prompt each token belongs to; -1 for special and padding tokens) and ``words`` (that word's text)."""
    toks = tok.convert_ids_to_tokens(list(ids))
    words, word_idx, w, current = [], [], 0, ""
    for t in toks:
        if t in (tok.bos_token, tok.eos_token, tok.pad_token):
            word_idx.append(-1)
            words.append("")
            continue
        word_idx.append(w)
        current += t.removesuffix("</w>")
        words.append(None)
        if t.endswith("</w>"):
            for j in range(len(words)):
                if words[j] is None:
                    words[j] = current
            current, w = "", w + 1
    words = [x if x is not None else current for x in words]
    return {"tokens": [t.removesuffix("</w>") for t in toks], "word_index": word_idx, "words": words}


def token_table(tokenizer, prompt) -> dict:
    """Token strings and word indices of each prompt as the text encoder saw it (padded, truncated)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True).input_ids
    return {"n_tokens": n, "prompts": [token_words(tokenizer, row) for row in ids]}


class Text(Conditioning):
    """Prompts (and SDXL's second prompts) through the pipeline's text encoder(s), into cross-attention.

    Owns the batch: ``len(prompts) x per_prompt`` images, with the unconditional half when
    ``guidance > 1`` (and the UNet is not guidance-distilled)."""

    kind, enters = "text", "CA"
    forkable = PROMPT_KEYS

    def __init__(self, prompt="", negative_prompt=None, prompt_2=None, negative_prompt_2=None, *, per_prompt: int = 1,
                 micro: dict | None = None):
        self.prompts = dict(prompt=prompt, negative_prompt=negative_prompt, prompt_2=prompt_2,
                            negative_prompt_2=negative_prompt_2)
        self.per_prompt = per_prompt
        self.micro = {k: v for k, v in (micro or {}).items() if v is not None}
        for k, v in self.micro.items():
            if k not in MICRO_KEYS:
                raise ValueError(f"unknown size conditioning {k!r}; SDXL's: {MICRO_KEYS}")
            if not (isinstance(v, (tuple, list)) and len(v) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)):
                raise ValueError(f"{k} must be a pair of non-negative ints (height, width), got {v!r}")
            self.micro[k] = tuple(v)
        self.truncated: dict[str, str] = {}
        self.tokens: dict | None = None
        self._embeds = self._added = None

    @property
    def n_prompts(self) -> int:
        p = self.prompts["prompt"]
        return 1 if isinstance(p, str) else len(p)

    def setup(self, s: Setup) -> None:
        pipe = s.pipe
        if self.micro and pipe.kind != "sdxl":
            raise ValueError(f"{sorted(self.micro)}: size and crop conditioning is SDXL's; this is a {pipe.kind!r} "
                             "model")
        cfg = s.settings["guidance"] > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        if s.layout is not None and (s.layout.n_prompts, s.layout.cfg) != (self.n_prompts, cfg):
            raise ValueError(f"a fork must keep the batch: {s.layout.n_prompts} prompts with guidance "
                             f"{'on' if s.layout.cfg else 'off'}")
        s.layout = BatchLayout(self.n_prompts, self.per_prompt, cfg)
        with torch.no_grad():
            self._embeds, self._added = self._encode(s, cfg)
        s.dtype = self._embeds.dtype
        self.tokens = token_table(pipe.tokenizer, self.prompts["prompt"])

    def _report_truncation(self, pipe, text: str) -> None:
        for tok in [pipe.tokenizer, pipe.tokenizer_2]:
            if tok is None or not text:
                continue
            ids = tok(text, truncation=False, add_special_tokens=True).input_ids
            n = tok.model_max_length
            if len(ids) > n and text not in self.truncated:
                self.truncated[text] = dropped = tok.decode(ids[n - 1:-1]).strip()
                warnings.warn(f"prompt is longer than the text encoder's {n} tokens; dropped: {dropped!r}",
                              stacklevel=6)

    def _encode(self, s: Setup, cfg: bool):
        pipe, dp, p, device = s.pipe, s.pipe.diffusers, self.prompts, s.device
        negative = p["negative_prompt"]
        for text in ([p["prompt"]] if isinstance(p["prompt"], str) else list(p["prompt"])) + (
                [negative] if isinstance(negative, str) else list(negative or [])):
            self._report_truncation(pipe, text)
        if pipe.kind != "sdxl":
            pe, npe = dp.encode_prompt(p["prompt"], device, self.per_prompt, cfg, negative)
            return (torch.cat([npe, pe]) if cfg else pe), None
        pe, npe, pooled, npooled = dp.encode_prompt(
            prompt=p["prompt"], prompt_2=p["prompt_2"], device=device, num_images_per_prompt=self.per_prompt,
            do_classifier_free_guidance=cfg, negative_prompt=negative, negative_prompt_2=p["negative_prompt_2"])
        proj = int(pooled.shape[-1]) if dp.text_encoder_2 is None else dp.text_encoder_2.config.projection_dim
        size, m = (s.settings["height"], s.settings["width"]), self.micro
        time_ids = dp._get_add_time_ids(m.get("original_size", size), m.get("crops_coords_top_left", (0, 0)),
                                        m.get("target_size", size), dtype=pe.dtype, text_encoder_projection_dim=proj)
        neg_time_ids = time_ids  # as diffusers: the negative ids only when both negative sizes are given
        if "negative_original_size" in m and "negative_target_size" in m:
            neg_time_ids = dp._get_add_time_ids(m["negative_original_size"], m.get("negative_crops_coords_top_left",
                                                (0, 0)), m["negative_target_size"], dtype=pe.dtype,
                                                text_encoder_projection_dim=proj)
        if cfg:
            pe = torch.cat([npe, pe], 0)
            pooled = torch.cat([npooled, pooled], 0)
            time_ids = torch.cat([neg_time_ids, time_ids], 0)
        batch = self.n_prompts * self.per_prompt
        added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(batch, 1)}
        return pe.to(device), added

    @property
    def embeddings(self) -> torch.Tensor:
        """The prompt embeddings of the whole batch ``[rows, tokens, dim]`` (negative half first)."""
        return self._embeds

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        x.encoder_hidden_states = self._embeds
        x.added_cond_kwargs = self._added

    def changed(self, s: Setup, **changes) -> "Text":
        new = Text(**{**self.prompts, **changes}, per_prompt=self.per_prompt, micro=self.micro)
        new.setup(s)
        return new

    def describe(self) -> dict:
        return {**super().describe(), **{k: v for k, v in self.prompts.items() if v is not None}, **self.micro}

"""Attention editing on the explicit attention path (prompt-to-prompt, Hertz et al. 2022).

Edits act on the conditional half of the batch only (as prompt-to-prompt's controller does) and on
cross-attention layers matched by ``layers`` during ``steps`` (:mod:`lab.steps`: ``(0.0, 0.6)`` is the first
60% of the trajectory). An edited layer computes ``probs = softmax(Q K^T / sqrt(d))`` explicitly, edits it,
and outputs ``probs @ V`` (:mod:`lab.recording.dispatch`); unedited layers keep their processor. An edit is
called as ``edit(layer, probs, info)`` with an :class:`lab.recording.attention.EditInfo` (step, batch layout,
tokens).

    src = pipe.sampler("a large red circle on a gray background", seed=0,
                       recorders=[lab.AttentionRecorder(heads="all")]).run()
    # "replace": same noise, new prompt, the source's cross-attention maps for the first 60% of steps
    rec = lab.AttentionRecorder(edits=[lab.ReplaceAttention(src, steps=(0.0, 0.6))])
    swapped = pipe.sampler("a large blue circle on a gray background", seed=0, recorders=[rec]).run()
    # "reweight": scale the attention to a word
    rec = lab.AttentionRecorder(edits=[lab.Reweight({"red": 2.0})])
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field


from ..batch import BatchLayout
from ..steps import check_steps, select_steps


@dataclass
class _Edit:
    steps: tuple[float, float] = (0.0, 1.0)
    layers: str = "*attn2"

    def __post_init__(self):
        check_steps(self.steps)

    def applies(self, name: str, i: int, n: int, is_cross: bool) -> bool:
        if not is_cross or not fnmatch.fnmatchcase(name, self.layers):
            return False
        # asked at every layer of every step: the selection is made once per trajectory length
        key = (n, repr(self.steps))
        cache = self.__dict__.setdefault("_chosen", {})
        if key not in cache:
            cache[key] = frozenset(select_steps(self.steps, n))
        return i in cache[key]


@dataclass
class Reweight(_Edit):
    """Multiply the attention to each word of ``words`` by its factor (prompt-to-prompt's "reweight";
    like prompt-to-prompt, the row is not renormalised)."""

    words: dict = field(default_factory=dict)

    def __init__(self, words: dict, steps=(0.0, 1.0), layers="*attn2"):
        super().__init__(steps, layers)
        self.words = dict(words)

    def __call__(self, name, probs, info):
        probs = probs.clone()
        sel = info.layout.half("cond")
        rows = info.tokens["prompts"]
        for j in range(sel.start, sel.stop):
            words = rows[info.layout.prompt_of(j)]["words"]
            for w, factor in self.words.items():
                idx = [t for t, x in enumerate(words) if x.lower() == w.lower()]
                if not idx:
                    raise KeyError(f"word {w!r} is not in the prompt ({sorted(set(x for x in words if x))})")
                probs[j, :, :, idx] *= factor
        return probs


def token_alignment(source_words: list[str], target_words: list[str]) -> list[int]:
    """For each target token, the source token it takes its map from (-1: none). Equal lengths map
    position by position (a word swap, prompt-to-prompt's "replace"); otherwise tokens are matched by
    ``difflib.SequenceMatcher`` on their words ("refine")."""
    if len(source_words) == len(target_words) and sum(a != b for a, b in zip(source_words, target_words)) <= len(
            source_words) // 2:
        return list(range(len(target_words)))
    out = [-1] * len(target_words)
    sm = difflib.SequenceMatcher(a=source_words, b=target_words, autojunk=False)
    for blk in sm.get_matching_blocks():
        for k in range(blk.size):
            out[blk.b + k] = blk.a + k
    return out


class ReplaceAttention(_Edit):
    """Use the cross-attention maps recorded in ``source`` (a run sampled from the same noise, recorded
    with ``heads="all"`` or ``"mean"``) in place of the current prompt's, token-aligned
    (:func:`token_alignment`): prompt-to-prompt's "replace" and "refine"."""

    def __init__(self, source, steps=(0.0, 0.8), layers="*attn2"):
        super().__init__(steps, layers)
        if "attention" not in source.recording_meta:
            raise ValueError("the source run recorded no attention; sample it with "
                             "recorders=[lab.AttentionRecorder(heads='all')]")
        self.source = source
        self._maps = None

    def __call__(self, name, probs, info):
        i = info.step
        if i >= len(self.source.steps) or name not in self.source.steps[i].records:
            raise KeyError(f"the source run has no recording of {name} at step {i}")
        src = self.source.steps[i].records[name]
        src = (src.tensor() if hasattr(src, "tensor") else src).to(probs.device, probs.dtype)  # [b_src, heads', Q, K]
        meta = self.source.recording_meta["attention"]
        src_rows = meta["tokens"]["prompts"]
        src_layout = BatchLayout(len(src_rows), meta.get("per_prompt", 1), meta["cfg"])
        if src.shape[0] == src_layout.rows and src_layout.cfg:  # recorded with half="both": take its cond half
            src = src[src_layout.half("cond")]
        sel = info.layout.half("cond")
        tgt_rows = info.tokens["prompts"]
        out = probs.clone()
        for j in range(sel.start, sel.stop):
            k = min(j - sel.start, src.shape[0] - 1)
            s = src[k]  # [heads', Q, K]
            align = token_alignment(src_rows[src_layout.prompt_of(k)]["words"],
                                    tgt_rows[info.layout.prompt_of(j)]["words"])
            for t, a in enumerate(align):
                if a >= 0:
                    out[j, :, :, t] = s[:, :, a]
        return out

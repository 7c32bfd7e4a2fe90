"""A tiny CLIP tokenizer for the shapes world, in the files ``CLIPTokenizer`` reads.

CLIP's tokenizer is byte-level BPE: a word is split into bytes (the last one carrying ``</w>``) and
merged by ranked merge rules. We keep CLIP's 512 byte tokens (so any text tokenizes, one byte per
token for unknown words) and add just the merges that make every word of the shapes grammar a single
token. Merges are found by simulating BPE word by word and appending, for each word that is not yet a
single token, the merge of its first two current tokens. A merge appended later has a higher rank, so
it can never change how an earlier word is tokenized: the result is consistent by construction.
"""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (same as transformers' CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    word = list(word)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = word[i], word[i + 1]
        merged, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(word[j])
                j += 1
        word = merged
    return tuple(word)


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    byte_enc = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        chars = [byte_enc[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        while True:
            toks = _bpe(tuple(chars), ranks)
            if len(toks) == 1:
                break
            pair = (toks[0], toks[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_tokenizer(directory: str | Path, words: list[str], model_max_length: int = 32) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the configs of a CLIP tokenizer whose vocabulary makes
    each of ``words`` one token. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = build_merges(sorted(set(words)))
    base = list(bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return directory

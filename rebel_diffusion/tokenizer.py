"""The CLIP BPE tokenizer, built offline from the vocabulary that open_clip_torch ships.

Stable Diffusion pipelines expect a `transformers.CLIPTokenizer` (vocab.json + merges.txt). The same byte-level BPE
table is inside open_clip as `bpe_simple_vocab_16e6.txt.gz`, so tests and the tiny pretrained model can use the real
tokenizer without a download.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the shipped table (the rest are unused).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_tokenizer_files(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write a `CLIPTokenizer` (vocab.json, merges.txt, configs) to `out_dir` and return the folder."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : _NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out)
    return out


def build_clip_tokenizer(cache_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer, written to `cache_dir` once and loaded from there."""
    out = Path(cache_dir)
    if not (out / "vocab.json").exists():
        write_clip_tokenizer_files(out, model_max_length)
    return CLIPTokenizer.from_pretrained(out)

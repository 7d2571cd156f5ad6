"""A SentencePiece ``.model`` file (SigLIP 1's ``spiece.model``, T5's) as a ``tokenizers`` Unigram tokenizer.

The file is a protobuf ``ModelProto``; the few fields a Unigram tokenizer needs are read here with a
protobuf wire-format reader (no ``sentencepiece`` or ``protobuf`` import): the pieces with their scores
and types, the unknown id and byte fallback of the trainer spec, and the normaliser spec (the precompiled
character map, extra whitespace removal, whitespace escaping, the dummy "▁" prefix). The pipeline is
SentencePiece's own order: normalise, remove extra spaces, escape them as "▁", prefix one "▁", then the
Viterbi segmentation over the pieces' log-probabilities. Control pieces (``</s>``, ``<pad>``) and the
unknown piece are never produced from text, as in SentencePiece (their text is hidden behind a NUL: a
text that itself holds a NUL before "</s>" is the one way to reach them). Equal ids to ``SentencePieceProcessor``
are tested on a model trained by ``sentencepiece`` itself.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1
HIDDEN = "\x00"  # prefixed to the pieces SentencePiece never emits from text (control, unknown, unused): no text
# reaches the segmentation with it, so "</s>" written in a text is not the end token (a score would not do: the
# unknown-character penalty sits below the lowest score)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def proto_fields(buf: bytes) -> Iterator[tuple[int, object]]:
    """(field number, value) of one protobuf message: varints as ints, 32-bit values as floats,
    length-delimited ones (strings, bytes, sub-messages) as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} (field {field}) is not a SentencePiece model's")
        if i > len(buf):
            raise ValueError(f"field {field} runs past the end of the message (a file cut short?)")
        yield field, value


def read_model(path: str | Path) -> dict:
    """The fields of a SentencePiece model file a Unigram tokenizer needs (SentencePiece's defaults where absent)."""
    out = {"pieces": [], "model_type": UNIGRAM, "unk_id": 0, "byte_fallback": False, "charsmap": b"",
           "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    trainer = {3: "model_type", 40: "unk_id", 35: "byte_fallback"}
    normalizer = {2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    try:
        for field, value in proto_fields(Path(path).read_bytes()):
            if field == 1:  # a piece: (text, score, type)
                piece = dict(proto_fields(value))
                out["pieces"].append((piece.get(1, b"").decode("utf-8"), piece.get(2, 0.0), piece.get(3, NORMAL)))
            elif field in (2, 3):  # the trainer spec, the normaliser spec
                names = trainer if field == 2 else normalizer
                out.update({names[f]: v for f, v in proto_fields(value) if f in names})
    except (IndexError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path} is not a SentencePiece model file ({e})") from None
    if not out["pieces"]:
        raise ValueError(f"{path} is not a SentencePiece model file (no pieces)")
    return out


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` giving the ids of ``SentencePieceProcessor(path).encode(text)``."""
    spec = read_model(path)
    if spec["model_type"] != UNIGRAM:
        raise ValueError(f"{path}: only Unigram SentencePiece models are read (SigLIP, T5), "
                         f"this one has model type {spec['model_type']}")
    vocab = [(text, score) if kind in (NORMAL, USER_DEFINED, BYTE) else (HIDDEN + ("⁇" if kind == UNKNOWN else text), score)
             for text, score, kind in spec["pieces"]]
    tok = Tokenizer(models.Unigram(vocab, unk_id=spec["unk_id"], byte_fallback=bool(spec["byte_fallback"])))
    steps = [normalizers.Precompiled(spec["charsmap"])] if spec["charsmap"] else []
    if spec["remove_extra_whitespaces"]:  # spaces only: other whitespace (newlines) is left as it is
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec["add_dummy_prefix"]:  # one "▁" more, even before a text that starts with one (Metaspace would not)
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Replace(HIDDEN, ""), *([decoders.ByteFallback()] if spec["byte_fallback"]
                                                                  else []), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok

"""Text tokenizers through the ``tokenizers`` library: OpenAI CLIP's BPE, any ``tokenizer.json``,
and a CLIP-style byte-level BPE trained on a caption corpus (for models trained from scratch).

Every tokenizer is a :class:`TextTokenizer`: ``tok(texts, context_length)`` gives padded
``input_ids`` and ``attention_mask`` tensors with the start/end tokens added, truncated so that
the end token is always kept (the CLIP text tower pools at it).

OpenAI CLIP (Radford et al. 2021) tokenises lower-cased, whitespace-normalised text with a
byte-level BPE whose words end in ``</w>``; :func:`clip_tokenizer` builds it from the vocabulary
file ``bpe_simple_vocab_16e6.txt.gz`` (shipped by ``open_clip_torch``, read by path, never
imported) and gives the ids of open_clip's ``SimpleTokenizer``.
"""
from __future__ import annotations

import gzip
import heapq
import html
import importlib.util
import itertools
import json
import re
import string
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

CLIP_BOS, CLIP_EOS = "<start_of_text>", "<end_of_text>"
CLIP_CONTEXT = 77
# OpenAI CLIP's word pattern: contractions, runs of letters, single digits, runs of other symbols.
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
META = "vlkit_tokenizer.json"
MIN_TRAINED_VOCAB = 512  # train_bpe: 256 bytes + 158 byte word ends + 3 special tokens, then merges  # next to tokenizer.json: which ids are bos / eos / pad


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """CLIP's cleaning before tokenising: ftfy (when installed), HTML entities, whitespace runs."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return html.unescape(html.unescape(text)).strip()


def siglip_canonical(text: str, lower: bool = True) -> str:
    """SigLIP's text canonicalisation (``SiglipTokenizer.canonicalize_text``): lower-cased (``lower``: its
    ``do_lower_case``), ASCII punctuation removed, whitespace runs made one space, stripped. (``SiglipTokenizer``
    first splits a text at special tokens written in it, reading a written ``</s>`` or ``<unk>`` as that token;
    here that is text, without its punctuation.)"""
    text = (text.lower() if lower else text).translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def _clip_pipeline(tok: Tokenizer) -> Tokenizer:
    """The normaliser, pre-tokeniser and decoder of CLIP's tokenizer, set on ``tok``."""
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the start / end / padding ids a text tower needs.

    ``__call__(texts, context_length)`` -> ``{"input_ids": LongTensor (B, L), "attention_mask":
    LongTensor (B, L)}`` with L = ``context_length`` (or the longest text when None); each row is
    ``[bos] + ids + [eos]`` cut to L with ``eos`` kept last, then padded with ``pad_id``.
    ``clean``: apply :func:`clean_text` first (CLIP does); ``canonical``: :func:`siglip_canonical` first
    (SigLIP 1's ``SiglipTokenizer`` does); ``byte_words``: the vocabulary is CLIP's
    byte-level alphabet with ``</w>`` word ends (decoded here, ``tokenizers`` has no such decoder).
    """

    def __init__(self, tokenizer: Tokenizer, bos_id: Optional[int], eos_id: Optional[int], pad_id: int = 0,
                 clean: bool = False, byte_words: bool = False, canonical: bool = False, lower: bool = True):
        tokenizer.no_padding()  # a tokenizer.json may pad / truncate on its own (MiniLM's pads to 128):
        tokenizer.no_truncation()  # __call__ does both, keeping the end token
        self.tokenizer, self.bos_id, self.eos_id, self.pad_id = tokenizer, bos_id, eos_id, pad_id
        self.clean, self.byte_words, self.canonical, self.lower = clean, byte_words, canonical, lower

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no start / end tokens."""
        text = siglip_canonical(text, self.lower) if self.canonical else clean_text(text) if self.clean else text
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens and padding dropped)."""
        ids = [int(i) for i in ids]
        if not self.byte_words:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        special = {self.bos_id, self.eos_id, self.pad_id}
        text = "".join(self.tokenizer.id_to_token(i) or "" for i in ids if i not in special)
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        words = text.split("</w>")
        raw = b" ".join(bytes(inverse[c] for c in w if c in inverse) for w in words)
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: Optional[int] = CLIP_CONTEXT) -> dict:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if context_length is not None and context_length < 1 + (self.bos_id is not None) + (self.eos_id is not None):
            raise ValueError(f"context_length {context_length} leaves no room for a token")
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None else [self.eos_id]
        rows = []
        for text in texts:
            ids = head + self.encode(text) + tail
            if context_length is not None and len(ids) > context_length:
                ids = ids[:context_length - len(tail)] + tail
            rows.append(ids)
        length = context_length or max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and the special ids to ``folder``; :meth:`from_file` reads them back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "clean": self.clean,
                "canonical": self.canonical, "lower": self.lower, "byte_words": self.byte_words}
        (folder / META).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def from_file(cls, path: str | Path, bos: Optional[str] = None, eos: Optional[str] = None,
                  pad: Optional[str] = None) -> "TextTokenizer":
        """Any HF ``tokenizer.json`` (or a folder holding one). Special ids come from vlkit's
        side file when present, else from the named tokens ``bos`` / ``eos`` / ``pad``, else none
        (pad 0): an HF tokenizer's own post-processor is not applied, :meth:`__call__` adds them."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = Tokenizer.from_file(str(file))
        meta_file = file.parent / META
        if meta_file.is_file() and bos is None and eos is None and pad is None:
            return cls(tok, **json.loads(meta_file.read_text()))
        return cls._named(tok, bos, eos, pad, file)

    @classmethod
    def _named(cls, tok: Tokenizer, bos: Optional[str], eos: Optional[str], pad: Optional[str], source: Path,
               **kwargs) -> "TextTokenizer":
        from vlkit.data.sentencepiece import HIDDEN

        def token_id(name: Optional[str]) -> Optional[int]:
            if name is None:
                return None
            i = tok.token_to_id(name)
            i = tok.token_to_id(HIDDEN + name) if i is None else i  # a SentencePiece control piece
            if i is None:
                raise ValueError(f"token {name!r} is not in the vocabulary of {source}")
            return i

        return cls(tok, token_id(bos), token_id(eos), token_id(pad) or 0, **kwargs)

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> "TextTokenizer":
        """An HF model folder's ``tokenizer.json`` (else its SentencePiece ``spiece.model``, SigLIP 1's, with
        ``SiglipTokenizer``'s canonicalisation when the config names that class) with the special tokens its
        ``tokenizer_config.json`` names: the end token added unless ``add_eos_token`` is false (SigLIP's
        SentencePiece convention), the start token only with ``add_bos_token``, padding with ``pad_token``
        (else the end token)."""
        folder = Path(folder)
        conf = hf_tokenizer_config(folder)
        eos = conf.get("eos_token") if conf.get("add_eos_token", True) else None
        bos = conf.get("bos_token") if conf.get("add_bos_token", False) else None
        pad = conf.get("pad_token") or conf.get("eos_token")
        if not (folder / "tokenizer.json").is_file() and (folder / "spiece.model").is_file():
            from vlkit.data.sentencepiece import sentencepiece_tokenizer

            spm = folder / "spiece.model"
            return cls._named(sentencepiece_tokenizer(spm), bos, eos, pad, spm,
                              canonical=conf.get("tokenizer_class") == "SiglipTokenizer",
                              lower=conf.get("do_lower_case", True))
        return cls.from_file(folder, bos=bos, eos=eos, pad=pad)


def hf_tokenizer_config(folder: Path) -> dict:
    """``tokenizer_config.json`` of an HF folder with its special tokens as strings ({} when absent)."""
    path = folder / "tokenizer_config.json"
    conf = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v.get("content") if isinstance(v, dict) and k.endswith("_token") else v for k, v in conf.items()}


def hf_lm_tokenizer(folder: str | Path) -> TextTokenizer:
    """A language model folder's ``tokenizer.json`` for chat-templated prompts: no start or end token
    added (the template writes what the model expects, as ``apply_chat_template`` encodes without
    special tokens; the model's end token ends generation), padding with ``pad_token`` (else ``eos_token``)."""
    conf = hf_tokenizer_config(Path(folder))
    return TextTokenizer.from_file(folder, pad=conf.get("pad_token") or conf.get("eos_token"))


def clip_bpe_path() -> Path:
    """``bpe_simple_vocab_16e6.txt.gz`` of the installed ``open_clip_torch`` (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("OpenAI CLIP's BPE vocabulary comes with open_clip_torch: "
                                "pip install --no-deps open_clip_torch==3.3.0")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer(bpe_path: str | Path | None = None) -> TextTokenizer:
    """OpenAI CLIP's tokenizer (49,408 ids; start 49406, end 49407, padding 0) as a ``tokenizers``
    BPE: the same ids as open_clip's ``SimpleTokenizer``."""
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab={v: i for i, v in enumerate(vocab)}, merges=merges,
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.add_special_tokens([AddedToken(CLIP_BOS, normalized=False), AddedToken(CLIP_EOS, normalized=False)])
    return TextTokenizer(_clip_pipeline(tok), tok.token_to_id(CLIP_BOS), tok.token_to_id(CLIP_EOS), 0, clean=True,
                         byte_words=True)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> TextTokenizer:
    """A CLIP-style BPE (lower-cased, ``</w>`` word ends, byte-level alphabet) trained on ``texts``.

    Ids: ``<pad>`` 0, ``<start_of_text>`` 1, ``<end_of_text>`` 2, the 256 byte characters, the byte
    characters that end a word (``"s</w>"``: any text encodes without loss), then the merges, most
    frequent pair first (:func:`learn_merges`), up to ``vocab_size`` (>= 512) or until no pair occurs
    ``min_frequency`` times. The same texts give the same tokenizer in any process: ``tokenizers``' own
    trainer numbers characters of equal frequency in hash-map order, which changes from one process to
    the next (and with it the ids, and which of two equally frequent pairs merges first).
    """
    if vocab_size < MIN_TRAINED_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} < {MIN_TRAINED_VOCAB}: the byte alphabet, its word ends and "
                         "the special tokens alone take about 420 ids")
    tok = _clip_pipeline(Tokenizer(models.BPE(end_of_word_suffix="</w>")))
    # Every byte must also exist as a word end ("z</w>"), or an unseen final character is lost: one
    # line of single-character words ends in every ASCII byte and every UTF-8 continuation byte
    # (U+2080..U+20BF: uncased, so the lower-casing normaliser keeps all 64).
    coverage = " ".join(chr(c) for c in [*range(33, 127), *range(0x2080, 0x20C0)])
    words: dict[str, int] = {}
    for text in itertools.chain([coverage], (clean_text(t) for t in texts)):
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            words[word] = words.get(word, 0) + 1
    alphabet = list(bytes_to_unicode().values())
    rank = {c: i for i, c in enumerate(alphabet)}
    vocab = ["<pad>", CLIP_BOS, CLIP_EOS, *alphabet,
             *(c + "</w>" for c in sorted({w[-1] for w in words}, key=rank.__getitem__))]
    symbols = {(*w[:-1], w[-1] + "</w>"): n for w, n in words.items()}
    merges = learn_merges(symbols, vocab_size, min_frequency, known=vocab)
    tok.model = models.BPE(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
                           fuse_unk=False)
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in vocab[:3]])
    return TextTokenizer(tok, 1, 2, 0, clean=True, byte_words=True)


def learn_merges(words: dict[tuple[str, ...], int], vocab_size: int, min_frequency: int,
                 known: list[str]) -> list[tuple[str, str]]:
    """BPE training (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair of symbols
    over ``words`` (symbol tuples -> counts), ties to the pair that sorts first, appending each new symbol
    to ``known`` (the vocabulary, in place) until it holds ``vocab_size`` symbols or the best pair occurs
    fewer than ``min_frequency`` times. Pair counts are updated only in the words that hold the pair."""
    seqs, counts = [list(w) for w in words], list(words.values())
    pairs: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, seq in enumerate(seqs):
        for p in zip(seq, seq[1:]):
            pairs[p] = pairs.get(p, 0) + counts[i]
            where.setdefault(p, set()).add(i)
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    seen, merges = set(known), []
    while len(known) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs.get(pair, 0):
            continue  # a stale entry: the pair's count changed since it was pushed
        if -n < min_frequency:
            break
        merges.append(pair)
        new = pair[0] + pair[1]
        if new not in seen:
            seen.add(new)
            known.append(new)
        changed = set()
        for i in sorted(where.pop(pair)):
            seq, c = seqs[i], counts[i]
            merged, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == pair:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            for p in zip(seq, seq[1:]):
                pairs[p] -= c
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pairs[p] = pairs.get(p, 0) + c
                where.setdefault(p, set()).add(i)
                changed.add(p)
            seqs[i] = merged
        for p in sorted(changed):
            if pairs[p] > 0 and p != pair:
                heapq.heappush(heap, (-pairs[p], p))
    return merges


GGUF_CONTROL = 3  # tokenizer.ggml.token_type of control (special) tokens
GGUF_USER_DEFINED = 4


def gguf_pre_tokenizer(pre: Optional[str]):
    """llama.cpp's pre-tokeniser name -> the ``tokenizers`` one: GPT-2's byte-level regex split, with
    SmolLM's digits split one by one first ("smollm", as in SmolLM's own tokenizer.json)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2)")


def gguf_tokenizer(reader) -> TextTokenizer:
    """The byte-level BPE stored in a GGUF file (``tokenizer.ggml.model == "gpt2"``), as a
    :class:`TextTokenizer`: vocabulary, merges, control tokens kept whole, the file's bos (only when
    ``add_bos_token``) and padding ids; no end token is appended (prompts go on)."""
    from tokenizers import AddedToken, decoders, models

    fields = reader.fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    kind = value("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE)")
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    tok.pre_tokenizer = gguf_pre_tokenizer(value("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == GGUF_CONTROL]
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED])
    bos = value("tokenizer.ggml.bos_token_id") if value("tokenizer.ggml.add_bos_token", False) else None
    pad = value("tokenizer.ggml.padding_token_id", value("tokenizer.ggml.eos_token_id", 0))
    return TextTokenizer(tok, bos, None, pad)  # no end token appended: the model's eos ends generation

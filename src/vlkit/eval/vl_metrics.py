"""Captioning and VQA metrics.

- :func:`caption_metrics`: CIDEr (Vedantam et al. 2015), BLEU-4 (Papineni et al. 2002) and ROUGE-L
  through ``pycocoevalcap``, after its PTB tokenizer (Java, as the COCO evaluation does).
- :func:`vqa_accuracy`: the VQA v2 metric (Antol et al. 2015; the official evaluation script's
  answer normalisation: lower case, punctuation, number words to digits, articles and
  contractions) with accuracy = min(1, #humans who gave the answer / 3), averaged over the 10
  choose-9 subsets of reference answers as the official script does; one reference answer =
  exact match after normalisation.
"""
from __future__ import annotations

import re
import shutil
from typing import Sequence

CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "couldnt": "couldn't",
                "shouldnt": "shouldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't",
                "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                "whats": "what's", "its": "it's", "lets": "let's"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (processPunctuation + processDigitArticle)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_NUM, text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = NUMBERS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one answer against its reference answers (10 in VQA v2, 1 in easy-VQA)."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):  # leave-one-out over the human answers
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3.0))
    return sum(scores) / len(scores)


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_metrics(predictions: dict, references: dict) -> dict[str, float]:
    """{"CIDEr", "BLEU-4", "ROUGE-L"} (x 100) of ``predictions`` {id: caption} against
    ``references`` {id: [captions]} (every prediction id must have references)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no reference caption (e.g. id {missing[0]!r})")
    if not predictions:
        raise ValueError("no predictions to score")
    if not java_available():
        raise RuntimeError("pycocoevalcap's PTB tokenizer needs Java: apt-get install default-jre-headless")
    tok = PTBTokenizer()
    res = tok.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    gts = tok.tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    return {"CIDEr": 100 * Cider().compute_score(gts, res)[0], "BLEU-4": 100 * bleu,
            "ROUGE-L": 100 * Rouge().compute_score(gts, res)[0]}

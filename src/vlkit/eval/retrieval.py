"""Image-text retrieval and zero-shot classification from embeddings.

- :func:`retrieval_metrics`: image->text and text->image Recall@K and mean / median rank, where
  an image may have several captions (``text_to_image[j]`` = the image of caption j).
- :func:`zero_shot_classifier`: class embeddings from class names through prompt templates,
  ensembled (CLIP sec. 3.1.4: mean of the normalised prompt embeddings, renormalised).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def _ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """scores (Q, N), positives (Q, N) bool -> (Q,) 1-based rank of the best-ranked positive."""
    order = scores.argsort(dim=1, descending=True)
    hit = positives.gather(1, order)
    if not hit.any(1).all():
        raise ValueError("a query has no matching item")
    return hit.float().argmax(1) + 1


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """image_embeds (N, D), text_embeds (M, D) (normalised or not: cosine similarity is used);
    ``text_to_image`` (M,) image index of each caption (default: caption j describes image j).

    Returns {"i2t_R@k", "t2i_R@k" (percent), "i2t_mean_rank", "t2i_mean_rank", "i2t_median_rank",
    "t2i_median_rank", "rsum"}: an image query counts a hit when ANY of its captions is in the top k.
    """
    img, txt = F.normalize(image_embeds.float(), dim=-1), F.normalize(text_embeds.float(), dim=-1)
    if text_to_image is None:
        if len(img) != len(txt):
            raise ValueError(f"{len(img)} images and {len(txt)} texts: pass text_to_image")
        text_to_image = torch.arange(len(txt))
    match = text_to_image.view(1, -1) == torch.arange(len(img)).view(-1, 1)  # (N, M)
    scores = img @ txt.T
    out = {}
    for name, ranks in (("i2t", _ranks(scores, match)), ("t2i", _ranks(scores.T, match.T))):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.float().mean().item()
        out[f"{name}_median_rank"] = ranks.float().median().item()
    out["rsum"] = sum(out[f"{n}_R@{k}"] for n in ("i2t", "t2i") for k in ks)
    return out


@torch.no_grad()
def zero_shot_classifier(encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(num_classes, D) normalised class embeddings: each class's prompts encoded by ``encode_text``
    (list of strings -> (P, D)), normalised, averaged, renormalised."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs class names and at least one template")
    weights = []
    for name in class_names:
        emb = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


def zero_shot_logits(image_embeds: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(B, num_classes) cosine similarities of images to the class embeddings."""
    return F.normalize(image_embeds.float(), dim=-1) @ classifier.T

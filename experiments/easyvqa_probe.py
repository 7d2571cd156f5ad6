"""Where is easy-VQA's bottleneck with frozen parts? Two measurements:

1. the image encoder: linear probes (L-BFGS logistic regression on standardised, spatially averaged
   features) for the shape and the colour of easy-VQA images, trained on train images and scored on
   test images, for each feature extraction the VLM recipes can use;
2. the language model (``--oracle``): frozen SmolLM2-135M-Instruct answering the yes/no questions from
   a PERFECT description ("The image shows a blue circle."), with its chat template and greedy decoding.

    .venv/bin/python experiments/easyvqa_probe.py --images 1500 --threads 2 [--oracle 200]

Labels come from the questions themselves (an image's answer to "what color ..." / "what shape ...").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.models.classifier import ClassifierConfig, build_classifier
from vlkit.models.vlm import InjectionConfig, VisualFeatures

COLORS = {"green", "red", "gray", "teal", "black", "yellow", "brown", "blue"}
SHAPES = {"circle", "rectangle", "triangle"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the easy-VQA recipes' transform


def labelled_images(split: str, limit: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """(N, 3, 64, 64) normalised images with both a colour and a shape answer, and those answers."""
    import easy_vqa

    train = split == "train"
    questions, answers, image_ids = easy_vqa.get_train_questions() if train else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if train else easy_vqa.get_test_image_paths()
    colour, shape = {}, {}
    for answer, i in zip(answers, image_ids):
        if answer in COLORS:
            colour[i] = answer
        elif answer in SHAPES:
            shape[i] = answer
    keep = [i for i in colour if i in shape][:limit]
    pixels = [torch.from_numpy(np.asarray(Image.open(paths[i]).convert("RGB")).copy()) for i in keep]
    x = torch.stack(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, [colour[i] for i in keep], [shape[i] for i in keep]


@torch.no_grad()
def pooled_features(extract: VisualFeatures, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([extract(images[j:j + batch]).mean(1) for j in range(0, len(images), batch)])


def probe_accuracy(train: torch.Tensor, test: torch.Tensor, y_train: list[str], y_test: list[str]) -> float:
    classes = {c: k for k, c in enumerate(sorted(set(y_train)))}
    mu, sd = train.mean(0), train.std(0) + 1e-5
    a, b = (train - mu) / sd, (test - mu) / sd
    y = torch.tensor([classes[c] for c in y_train])
    y_test_ids = torch.tensor([classes.get(c, -1) for c in y_test])
    w = torch.zeros(a.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias).argmax(1) == y_test_ids).float().mean().item() * 100


def yes_no_from_text(limit: int) -> dict:
    """Frozen SmolLM2's yes/no accuracy (%) from a perfect description, overall and on negated questions."""
    import re

    import easy_vqa

    from vlkit.cli import load_recipe
    from vlkit.decoders.generate import GenerationConfig, generate, left_pad
    from vlkit.tasks.vlm import ConversationEncoder, build_decoder, build_text

    cfg, _ = load_recipe("vlm_easyvqa", ["system="])
    lm = build_decoder(cfg).eval()
    tok, chat, eos = build_text(cfg, Path("."), None)
    encoder = ConversationEncoder(tok, chat, lm.cfg.vocab_size, 1, eos, cfg.system)
    questions, answers, image_ids = easy_vqa.get_test_questions()
    colour = {i: a for a, i in zip(answers, image_ids) if a in COLORS}
    shape = {i: a for a, i in zip(answers, image_ids) if a in SHAPES}
    rows = [(q, a, i) for q, a, i in zip(questions, answers, image_ids)
            if a in ("yes", "no") and i in colour and i in shape][:limit]
    right = {"all": [], "negated": []}
    for j in range(0, len(rows), 50):
        chunk = rows[j:j + 50]
        prompts = [encoder.prompt([{"role": "user", "content": f"The image shows a {colour[i]} {shape[i]}.\n{q} "
                                    "Answer yes or no."}]) for q, _, i in chunk]
        ids, mask = left_pad(prompts, tok.pad_id)
        out = generate(lm, ids, mask, GenerationConfig(max_new_tokens=2))
        for (q, a, _), new in zip(chunk, out.tolist()):
            ok = tok.decode(new).strip().lower().startswith(a)
            right["all"].append(ok)
            if re.search(r"\b(not|no)\b", q):
                right["negated"].append(ok)
    return {k: 100 * sum(v) / max(len(v), 1) for k, v in right.items()} | {"questions": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1500, help="labelled images per split")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--oracle", type=int, default=0, help="also: yes/no questions answered from a perfect description")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.oracle:
        print("frozen SmolLM2-135M-Instruct, yes/no from a perfect description:", yes_no_from_text(args.oracle))
    net = build_classifier(ClassifierConfig(arch="efficientnet_lite0", num_classes=1, pretrained=True,
                                            input_mean=MEAN, input_std=STD, convnet_size=128)).eval()
    train_x, train_colour, train_shape = labelled_images("train", args.images)
    test_x, test_colour, test_shape = labelled_images("test", args.images)
    print("| features | dim | colour probe % | shape probe % | seconds |\n|---|---|---|---|---|")
    for features, n in [("last", 1), ("last_n", 1), ("last_n", 3), ("last_n", 5)]:
        start = time.time()
        extract = VisualFeatures(net, InjectionConfig(features=features, num_layers=n))
        train, test = pooled_features(extract, train_x), pooled_features(extract, test_x)
        colour = probe_accuracy(train, test, train_colour, test_colour)
        shape = probe_accuracy(train, test, train_shape, test_shape)
        name = "last (head conv, 1280)" if features == "last" else f"last_n, n={n} (stage outputs)"
        print(f"| {name} | {extract.dim} | {colour:.1f} | {shape:.1f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Does a VLM's answer relevance map (occlusion or Grad-CAM) point at the object its answer is about?
The pointing game (Zhang et al. 2016).

    .venv/bin/python experiments/vlm_pointing.py runs/easyvqa/idefics2 --limit 300
    .venv/bin/python experiments/vlm_pointing.py runs/quickstart/vlm --limit 300     # a synthetic-world VQA run

    .venv/bin/python experiments/vlm_pointing.py runs/easyvqa/idefics2 --method grad_cam

For each test question (easy-VQA: every question is about the one shape; synthetic world: the colour and
shape questions, about the object named), the run answers, :func:`vlkit.models.relevance.answer_relevance`
maps where the answer comes from, and a hit is the map's peak (upsampled to pixels) inside the object's box
widened by ``--tolerance`` pixels (the game's 15 px at 224 px, scaled); a flat map (all zero: nothing
lowered the answer's likelihood) points nowhere, a miss, counted in ``flat``. The object's box: easy-VQA, the
pixels that differ from the background colour; the world, its annotated box. Printed next to it, on the
same questions: the hit rate of the image centre and of a uniformly random point (the mean widened-box
area), both for every question and for the correctly answered ones. Writes ``--out``/pointing.json and a
grid of the first ``--shown`` maps (maps.png).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlkit.data.images import load_image
from vlkit.data.vl import easy_vqa_answer_type
from vlkit.models.relevance import answer_relevance
from vlkit.tasks.vlm import _decode, build_transform, load_vlm, user_turn


def easyvqa_items(limit: int):
    """(image, question, answer, box (x0, y0, x1, y1) in pixels, answer type) over easy-VQA's test questions."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    for q, a, i in list(zip(questions, answers, image_ids))[:limit]:
        image = load_image(paths[i])
        pixels = np.asarray(image.convert("RGB")).astype(int)
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[counts.argmax()]
        ys, xs = np.nonzero(np.abs(pixels - background).max(-1) > 40)
        yield image, q, a, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), easy_vqa_answer_type(a)


def world_items(cfg, limit: int):
    """Colour questions ("... of the <shape>?") and shape questions ("... the <colour> object?") of the
    synthetic world's test split, with the box of the one object they name."""
    from vlkit.data.world import WorldDataset

    data = WorldDataset(cfg.data.world, "test", length=cfg.data.world.test_length, task="vqa")
    n = 0
    for i in range(len(data)):
        s = data[i]
        side = s["image"].size[0]
        for q, a, kind in zip(s["questions"], s["answers"], s["question_types"]):
            key = "shape" if kind == "colour" else "colour" if kind == "shape" else None
            named = [o for o in s["objects"] if key and f" {o[key]} " in f" {q.rstrip('?')} "]
            if len(named) != 1:
                continue
            cx, cy, w, h = (v * side for v in named[0]["box"])
            yield s["image"], q, a, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), kind
            n += 1
            if n >= limit:
                return


def peak(cam: torch.Tensor, size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) of the upsampled map's maximum, in pixels."""
    up = F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    y, x = divmod(int(up.argmax()), size[1])
    return x + 0.5, y + 0.5


def inside(point, box, tol: float) -> bool:
    x, y = point
    return box[0] - tol <= x <= box[2] + tol and box[1] - tol <= y <= box[3] + tol


def widened_area(box, tol: float, w: int, h: int) -> float:
    x0, y0, x1, y1 = max(0, box[0] - tol), max(0, box[1] - tol), min(w, box[2] + tol), min(h, box[3] + tol)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / (w * h)


def summarise(rows: list[dict]) -> dict:
    """Hit rates of the map, the image centre and a random point: all questions, the correctly answered
    ones, and per question type."""
    parts = {"all": rows, "correct": [r for r in rows if r["correct"]]}
    for kind in sorted({r["type"] for r in rows}):
        parts[kind] = [r for r in rows if r["type"] == kind]
    return {name: {"questions": len(part), "map": float(np.mean([r["hit"] for r in part])),
                   "centre": float(np.mean([r["centre_hit"] for r in part])),
                   "random": float(np.mean([r["chance"] for r in part])),
                   "flat": sum(r["flat"] for r in part)} for name, part in parts.items() if part}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--tolerance", type=float, default=0.0, help="pixels (default: 15/224 of the image side)")
    p.add_argument("--method", default="occlusion", choices=["occlusion", "grad_cam"])
    p.add_argument("--layer", default="auto", choices=["auto", "features", "block"], help="grad_cam's layer")
    p.add_argument("--grid", type=int, default=8, help="occlusion cells per side")
    p.add_argument("--shown", type=int, default=6, help="maps drawn in maps.png")
    p.add_argument("--out", default="")
    a = p.parse_args()
    model, cfg, encoder = load_vlm(a.run)
    transform = build_transform(cfg.transform, train=False)
    easy = cfg.data.dataset == "easy_vqa"
    items = easyvqa_items(a.limit) if easy else world_items(cfg, a.limit)
    rows, shown = [], []
    for image, q, answer_true, box, kind in tqdm(items, total=a.limit, desc="pointing"):
        w, h = image.size
        tol = a.tolerance or 15 / 224 * max(w, h)
        pixels = transform(image, torch.Generator())
        ids = torch.tensor([encoder.prompt([{"role": "user", "content": user_turn(q, cfg.data.image_position)}])])
        new = model.generate(ids, None, pixels[None], cfg.generation)[0].tolist()
        eos = set(cfg.generation.eos_token_ids or (model.decoder.cfg.eos_token_id,))
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        if cut == 0:
            continue
        cam, _ = answer_relevance(model, ids, pixels[None], new[:cut], a.method, a.layer, a.grid)
        point = peak(cam, (h, w))
        said = _decode(encoder.tok, new)
        rows.append({"question": q, "type": kind, "answer": said, "correct": said.lower() == str(answer_true).lower(),
                     "hit": bool(cam.max() > 0 and inside(point, box, tol)), "flat": bool(cam.max() <= 0),
                     "centre_hit": bool(inside((w / 2, h / 2), box, tol)),
                     "chance": float(widened_area(box, tol, w, h))})
        if len(shown) < a.shown:
            shown.append((pixels, cam, f"{q}\n-> {said}"))
    summary = summarise(rows)
    out = Path(a.out or Path(a.run) / "pointing")
    out.mkdir(parents=True, exist_ok=True)
    method = {"method": a.method, "layer": a.layer} if a.method == "grad_cam" else {"method": a.method, "grid": a.grid}
    (out / "pointing.json").write_text(json.dumps({"run": a.run, **method, "summary": summary, "rows": rows}, indent=1))
    from vlkit.viz.attention import save_attention_grid

    if shown:
        save_attention_grid(torch.stack([s[0] for s in shown]), [torch.stack([s[1].flatten() for s in shown])],
                            tuple(shown[0][1].shape), out / "maps.png", ["answer relevance"], [s[2] for s in shown])
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

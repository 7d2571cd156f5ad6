"""The ``vlkit`` command line: train, eval, predict, search, quickstart.

Every command reads its configuration the same way: a YAML recipe (a path, or the name of a
file in ``configs/``) and ``key=value`` overrides (``train.lr=1e-3 model.vit.depth=6``).
Multi-process: ``torchrun --nproc_per_node N -m vlkit.cli train RECIPE``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vlkit.config import ConfigError, apply_overrides, from_dict, read_yaml
from vlkit.checkpoints.io import CheckpointError
from vlkit.data.images import BadImageError

log = logging.getLogger("vlkit")

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def recipe_path(name: str) -> Path:
    """A recipe file: ``name`` itself if it exists, else ``configs/<name>[.yaml]``."""
    for candidate in (Path(name), CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))) if CONFIGS_DIR.is_dir() else "none"
    raise FileNotFoundError(f"no recipe {name!r} (not a file; recipes in {CONFIGS_DIR}: {known})")


def tasks() -> dict:
    """task name -> (recipe dataclass, train(cfg, run_dir, resume) -> result)."""
    from vlkit.tasks import classification, continual, contrastive, detection, segmentation, vlm

    return {"classification": (classification.ClassificationConfig, classification.train),
            "contrastive": (contrastive.ContrastiveConfig, contrastive.train),
            "detection": (detection.DetectionConfig, detection.train),
            "segmentation": (segmentation.SegmentationConfig, segmentation.train),
            "continual": (continual.ContinualConfig, continual.train),
            "vlm": (vlm.VLMConfig, vlm.train)}


def merge(base: dict, child: dict) -> dict:
    """``child`` deep-merged over ``base`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in child.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_recipe(name: str, seen: tuple[str, ...] = ()) -> dict:
    """Recipe ``name`` as a dict; a ``base: other_recipe`` key inherits ``other_recipe`` first."""
    path = recipe_path(name)
    if str(path) in seen:
        raise ConfigError("base", f"recipes inherit in a cycle: {' -> '.join(seen)} -> {path}")
    data = read_yaml(path)
    base = data.pop("base", None)
    return merge(read_recipe(base, (*seen, str(path))), data) if base else data


def load_recipe(name: str, overrides: list[str]):
    """(recipe config, train function) for recipe ``name`` with ``overrides`` applied."""
    data = apply_overrides(read_recipe(name), overrides)
    task = data.get("task", "classification")
    registry = tasks()
    if task not in registry:
        raise ConfigError("task", f"unknown task {task!r}; known: {', '.join(registry)}")
    config_cls, train_fn = registry[task]
    return from_dict(config_cls, data), train_fn


def cmd_train(args) -> int:
    from vlkit.train.distributed import cleanup, init_distributed, is_main

    cfg, train_fn = load_recipe(args.recipe, args.overrides)
    init_distributed()
    try:
        result = train_fn(cfg, args.run_dir, resume=args.resume)
    finally:
        cleanup()
    if is_main():
        print_eval(result.get("eval", {}))
        print(f"run folder: {result['run_dir']}")
    return 0


def print_eval(evals: dict) -> None:
    from vlkit.tasks.report import metrics_table

    rows = {k: v for k, v in evals.items() if isinstance(v, dict) and "top1" in v}
    if rows:
        print(metrics_table(rows))
    others = {k: v for k, v in evals.items() if isinstance(v, dict) and v and "top1" not in v and "i2t_R@1" not in v}
    if others:  # zero-shot only (LiT), captioning and VQA scores
        keys = list(dict.fromkeys(k for m in others.values() for k in m))
        print("| split | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for split, m in others.items():
            print(f"| {split} | " + " | ".join(f"{m[k]:.2f}" if k in m else "" for k in keys) + " |")
    retrieval = {k: v for k, v in evals.items() if isinstance(v, dict) and "i2t_R@1" in v}
    if retrieval:
        keys = ["zero_shot_top1", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "i2t_mean_rank", "t2i_mean_rank"]
        keys = [k for k in keys if any(k in m for m in retrieval.values())]  # image-caption pairs: no zero-shot
        print("| split | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for split, m in retrieval.items():
            print(f"| {split} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |")


def cmd_eval(args) -> int:
    import importlib

    from vlkit.config import read_yaml

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml)")
    task = (read_yaml(run / "config.yaml") or {}).get("task", "classification")
    known = tasks()
    if task not in known:
        raise ConfigError("task", f"{run / 'config.yaml'}: unknown task {task!r}; known: {', '.join(known)}")
    doc = importlib.import_module(f"vlkit.tasks.{task}").evaluate_run(run, args.overrides)
    evals = doc["eval"]
    print_eval(evals)
    for t, row in enumerate(doc.get("matrix", [])):  # class-incremental runs: accuracy per task after each
        print(f"after task {t + 1}: " + " ".join(f"{a:5.1f}" for a in row))
    out = run / "eval-cli.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"metrics written to {out}")
    return 0


def _architecture(path: str) -> str:
    from vlkit.checkpoints.hub import read_model_config

    try:
        doc = read_model_config(path)
    except Exception:  # noqa: BLE001 - not a folder we can read: the classifier path reports it
        return ""
    return "vlm" if doc.get("model_type") == "idefics2" else doc.get("architecture", "")


def cmd_predict(args) -> int:
    from vlkit.tasks.predict import predict_files

    arch = _architecture(args.run)
    if arch in ("detr", "segmenter"):
        from vlkit.tasks.dense_predict import predict_dense

        results = predict_dense(args.run, args.images, args.out, args.threshold, attention=args.attention,
                                min_boxes=args.min_boxes)
        for r in results:
            if "error" in r:
                print(f"{r['path']}: skipped ({r['error']})")
            else:
                found = r.get("detections", r.get("classes"))
                print(f"{r['path']}: {found} -> {r['picture']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    if arch == "vlm":
        from vlkit.tasks.answer import answer_files

        results = answer_files(args.run, args.images, args.prompt, int8=args.int8, speculative=args.speculative,
                               relevance_dir=args.out if args.attention else None, relevance=args.relevance)
        for r in results:
            print(f"{r['path']}: " + (f"skipped ({r['error']})" if "error" in r else r["answer"])
                  + (f" -> {r['picture']}" if "picture" in r else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0

    results = predict_files(args.run, args.images, top_k=args.top_k)
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"{r['path']}: skipped ({r['error']})")
        else:
            print(f"{r['path']}: " + ", ".join(f"{c} {p:.3f}" for c, p in r["top"]))
    if len(ok) < len(results):
        print(f"{len(results) - len(ok)} of {len(results)} images skipped")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


def cmd_search_index(args) -> int:
    from vlkit.search import Embedder, build_index

    index_dir = args.index or str(Path(args.folder) / ".vlkit_index")
    _, stats = build_index(Embedder.load(args.model), args.folder, index_dir, backend=args.backend,
                           batch_size=args.batch_size, progress=sys.stderr.isatty())
    print(f"index {index_dir}: {stats['files']} images ({stats['added']} added, {stats['kept']} kept, "
          f"{stats['removed']} removed), {stats['skipped']} unreadable skipped ({stats['new_skipped']} new), "
          f"{stats['backend']} search, {stats['seconds']:.1f} s")
    return 0


def cmd_search_query(args) -> int:
    from vlkit.search import Embedder, SearchIndex
    from vlkit.viz.grid import RetrievalRow, save_retrieval_grid

    if bool(args.text) == bool(args.image):
        raise ConfigError("query", "give a text query or --image PATH (one of them)")
    index = SearchIndex.load(args.index)
    embedder = Embedder.load(args.model or index.model_path())
    query = embedder.images([args.image]) if args.image else embedder.texts([" ".join(args.text)])
    hits = index.search(query, args.k)[0]
    for rank, (path, score) in enumerate(hits, 1):
        print(f"{rank:>3}  {score:.4f}  {path}")
    if args.json:
        Path(args.json).write_text(json.dumps([{"path": p, "score": s} for p, s in hits], indent=2))
    if args.picture:
        from vlkit.data.images import load_image

        row = RetrievalRow(" ".join(args.text), [load_image(p) for p, _ in hits],
                           [f"{s:.3f} {Path(p).name}" for p, s in hits],
                           query_image=load_image(args.image) if args.image else None)
        print(f"picture: {save_retrieval_grid([row], args.picture)}")
    return 0


def cmd_chat(args) -> int:
    from vlkit.tasks.answer import ChatSession

    session = ChatSession(args.run, args.image, int8=args.int8, speculative=args.speculative)
    print(f"chatting about {args.image} (empty line or Ctrl-D to stop)")
    for line in sys.stdin:
        if not line.strip():
            break
        print(f"assistant: {session.ask(line.strip())}", flush=True)
    return 0


def cmd_convert(args) -> int:
    from vlkit.checkpoints.convert import convert

    print(f"wrote {convert(args.src, args.dst, args.dtype)}")
    return 0


def cmd_quickstart(args) -> int:
    from vlkit.tasks.quickstart import run_quickstart

    report = run_quickstart(Path(args.out), tiny=args.tiny, overrides=args.overrides, everything=args.all)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlkit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe: vlkit train RECIPE [key=value ...]")
    t.add_argument("recipe", help="YAML recipe path or name in configs/")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3")
    t.add_argument("--run-dir", default=None, help="run folder (default: output_dir/name from the recipe)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run on its data: vlkit eval RUN [key=value ...]")
    e.add_argument("run")
    e.add_argument("overrides", nargs="*", help="overrides of the run's recipe, e.g. data.eval_limit=1000")
    e.set_defaults(fn=cmd_eval)
    r = sub.add_parser("predict", help="classify images: vlkit predict RUN IMAGE...")
    r.add_argument("run", help="run folder, vlkit model folder, HF ViT/DeiT folder or HF Idefics2 folder")
    r.add_argument("images", nargs="+")
    r.add_argument("--top-k", type=int, default=3)
    r.add_argument("--json", default="", help="also write the predictions to this JSON file")
    r.add_argument("--prompt", default="Describe the image.", help="VLM runs: the question (default: caption)")
    r.add_argument("--out", default="predictions", help="DETR / Segmenter runs, VLM runs with --attention: "
                                                         "folder of the drawn pictures")
    r.add_argument("--threshold", type=float, default=0.5, help="DETR runs: minimum score of a drawn box")
    r.add_argument("--min-boxes", type=int, default=0, metavar="N",
                   help="DETR runs: also draw the N best-scored boxes of each image, even below the threshold")
    r.add_argument("--int8", action="store_true", help="VLM runs: the language model with int8 weights (CPU)")
    r.add_argument("--attention", action="store_true",
                   help="DETR runs: also draw where each detection's object query looks (decoder cross-attention); "
                        "VLM runs: where in the image the answer comes from (see --relevance)")
    r.add_argument("--relevance", choices=["occlusion", "grad_cam"], default="occlusion",
                   help="VLM runs with --attention: occlusion (the answer's likelihood drop per masked cell, "
                        "65 forwards) or grad_cam (one backward)")
    r.set_defaults(fn=cmd_predict)
    c = sub.add_parser("chat", help="talk about an image with a VLM run: vlkit chat RUN IMAGE (questions on stdin)")
    c.add_argument("run", help="VLM run folder or HF Idefics2 folder (with its processor's files)")
    c.add_argument("image")
    c.add_argument("--int8", action="store_true", help="the language model with int8 weights (faster on a CPU)")
    c.set_defaults(fn=cmd_chat)
    for vlm_cmd in (r, c):
        vlm_cmd.add_argument("--speculative", type=int, default=0, metavar="K", help="VLM runs: the same "
                             "greedy answers, K tokens a round drafted by an int4 copy of the language model")
    _search_parser(sub)
    v = sub.add_parser("convert", help="write an HF folder or GGUF file as a vlkit folder: vlkit convert SRC DST")
    v.add_argument("src", help="HF ViT/CLIP/SigLIP/BERT/Llama/Mistral/GPT-2 folder or .gguf file")
    v.add_argument("dst", help="vlkit model folder to write")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store the weights in this dtype (default: as loaded, float32)")
    v.set_defaults(fn=cmd_convert)
    q = sub.add_parser("quickstart", help="train, evaluate and report the main job (about 5 CPU minutes)")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--tiny", action="store_true", help="a seconds-long version (smoke test)")
    q.add_argument("--all", action="store_true", help="also the detection and segmentation stages")
    q.add_argument("overrides", nargs="*", help="overrides of configs/quickstart.yaml")
    q.set_defaults(fn=cmd_quickstart)
    return p


def _search_parser(sub) -> None:
    s = sub.add_parser("search", help="index a folder of images with a CLIP-style model, query it by text or image")
    ssub = s.add_subparsers(dest="search_command", required=True)
    i = ssub.add_parser("index", help="vlkit search index MODEL FOLDER: embed (new) images into an index")
    i.add_argument("model", help="contrastive run folder, vlkit CLIP model folder or HF CLIPModel folder")
    i.add_argument("folder", help="folder of images (searched recursively; hidden entries skipped)")
    i.add_argument("--index", default="", help="index folder (default: FOLDER/.vlkit_index)")
    i.add_argument("--backend", choices=["auto", "exact", "faiss"], default="auto",
                   help="exact search, or FAISS IVF (auto: FAISS from 50,000 images)")
    i.add_argument("--batch-size", type=int, default=64)
    i.set_defaults(fn=cmd_search_index)
    q = ssub.add_parser("query", help='vlkit search query INDEX "a red circle" | --image PATH')
    q.add_argument("index", help="index folder written by vlkit search index")
    q.add_argument("text", nargs="*", help="text query")
    q.add_argument("--image", default="", help="query by this image instead")
    q.add_argument("-k", type=int, default=5, help="results to return")
    q.add_argument("--model", default="", help="model to embed the query (default: the one that built the index)")
    q.add_argument("--json", default="", help="also write the results to this JSON file")
    q.add_argument("--picture", default="", help="also draw the query and its results into this PNG")
    q.set_defaults(fn=cmd_search_query)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, BadImageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

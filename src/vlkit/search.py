"""Image search with a CLIP-style model: index a folder once, then query it by text or by image.

``vlkit search index MODEL FOLDER`` embeds every image under ``FOLDER`` (a vlkit contrastive run,
a vlkit CLIP model folder, an HF ``CLIPModel`` or ``SiglipModel`` folder as ``MODEL``) into an index folder:

- ``index.json``: the model, the indexed root, one entry per file (relative path, size,
  mtime) in the row order of the embeddings, the files that could not be read (with why), and
  the search backend;
- ``embeddings.safetensors``: the L2-normalised image embeddings (N, D), float32;
- ``index.faiss`` (when the backend is FAISS): an IVF-Flat inner-product index of the same rows.

Re-indexing is incremental: unchanged files (same size and mtime) keep their embeddings, new or
changed files are embedded, deleted ones dropped; unreadable files are counted, listed and not
retried until they change. Search is exact (a matrix product, chunked) by default and FAISS from
:data:`FAISS_MIN` images on (``backend="auto"``) or when asked; ``vlkit search query INDEX "text"``
(or ``--image PATH``) prints the top-k paths with cosine scores.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlkit.config import from_dict
from vlkit.data.images import BadImageError, load_image
from vlkit.data.tokenizers import TextTokenizer, clip_tokenizer
from vlkit.data.transforms import TransformConfig, build_transform

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
FAISS_MIN = 50_000  # backend "auto": an approximate FAISS index from this many images on
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
Backend = Literal["auto", "exact", "faiss"]


@dataclass
class Embedder:
    """A CLIP-style model with the tokenizer and image preprocessing it was trained with."""

    model: Any  # vlkit.models.clip.CLIP
    tokenizer: TextTokenizer
    transform: Callable
    context_length: int
    model_id: str  # the model folder and a fingerprint of its files: an index remembers what built it

    @classmethod
    def load(cls, path: str | Path) -> "Embedder":
        import vlkit
        from vlkit.checkpoints.hub import model_folder, read_model_config
        from vlkit.models.clip import CLIP

        folder, doc = model_folder(path), read_model_config(path)
        model = vlkit.load(folder)
        if not isinstance(model, CLIP):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a CLIP-style model (image + text towers)")
        converted = doc.get("architecture") == "clip_towers"  # vlkit convert of an HF folder: its own files
        if doc.get("format") == "vlkit" and not converted:
            cfg = doc["config"]
            data = cfg.get("data", "world")
            tdict = cfg["transform"] if data == "world" else cfg[data]["transform"]  # classes / pairs
            tcfg = from_dict(TransformConfig, tdict)
            tok_dir = next((d for d in (folder / "tokenizer", folder.parent / "tokenizer")
                            if (d / "tokenizer.json").is_file()), None)
            if tok_dir is None:
                raise FileNotFoundError(f"no tokenizer/ next to {folder} (a vlkit contrastive run saves one)")
            tokenizer, context = TextTokenizer.from_file(tok_dir), cfg["text"]["context_length"]
        else:  # HF CLIPModel: OpenAI's BPE and preprocessing; SiglipModel: its tokenizer.json or spiece.model, mean = std = 0.5
            siglip = (doc.get("meta", {}) if converted else doc).get("model_type") == "siglip"
            prep_file = folder / "preprocessor_config.json"
            prep = json.loads(prep_file.read_text()) if prep_file.is_file() else {}
            mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (OPENAI_MEAN, OPENAI_STD)
            tcfg = TransformConfig(image_size=model.visual.cfg.image_size, crop_pct=1.0, interpolation="bicubic",
                                   mean=tuple(prep.get("image_mean", mean)), std=tuple(prep.get("image_std", std)),
                                   eval_squash=siglip)  # SiglipImageProcessor resizes to a square, no crop
            if siglip and not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
                raise FileNotFoundError(f"{folder}: a SigLIP folder needs its tokenizer: tokenizer.json (SigLIP 2) "
                                        "or spiece.model (SigLIP 1)")
            tokenizer = TextTokenizer.from_hf_folder(folder) if siglip else clip_tokenizer()
            context = model.text.cfg.context_length  # SigLIP reads its text padded to this length
        return cls(model, tokenizer, build_transform(tcfg, train=False), context, _fingerprint(folder))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings."""
        ids = self.tokenizer(list(texts), self.context_length)
        return F.normalize(self.model.encode_text(ids["input_ids"], ids["attention_mask"]).float(), dim=-1)

    @torch.no_grad()
    def pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings of preprocessed ``pixels`` (N, C, H, W)."""
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def image_tensor(self, path: str | Path) -> torch.Tensor:
        """The preprocessed image at ``path``; :class:`BadImageError` when it cannot be used."""
        return self.transform(load_image(path), torch.Generator())

    def images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        return self.pixels(torch.stack([self.image_tensor(p) for p in paths]))


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{folder.resolve()}#{h.hexdigest()[:16]}"


def scan(folder: str | Path) -> dict[str, tuple[int, int]]:
    """Image files under ``folder`` (recursive, hidden entries skipped): relative path -> (size, mtime_ns)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            st = path.stat()
            found[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return dict(sorted(found.items()))


def exact_search(db: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of each query (Q, D) against ``db`` (N, D), rows of ``chunk`` at a
    time (memory Q x chunk): (scores (Q, k), indices (Q, k)), best first."""
    k = min(k, len(db))
    best_s = torch.full((len(queries), 0), float("-inf"))
    best_i = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(db), chunk):
        s = queries @ db[start:start + chunk].T
        top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
        cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + start], 1)
        best_s, order = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, order)
    return best_s, best_i


def build_faiss(db: torch.Tensor, nlist: int = 0, nprobe: int = 32, seed: int = 0):
    """An IVF-Flat inner-product FAISS index of ``db`` (N, D): ``nlist`` (default sqrt(N), FAISS's
    lower guideline, which keeps k-means quick on a CPU) cells trained on at most 64 vectors per
    cell, ``nprobe`` cells visited per query."""
    import faiss

    x = db.float().contiguous().numpy()
    nlist = nlist or max(1, min(len(x) // 39, int(math.sqrt(len(x)))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(x), generator=g)[:64 * nlist].sort().values.numpy()
    index.cp.seed = seed
    index.train(x[sample])
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    return index


@dataclass
class SearchIndex:
    """Embeddings of the images under ``root``, searchable exactly or through FAISS."""

    root: str
    model_id: str
    files: list[dict]  # {"path" (relative to root), "size", "mtime_ns"}, row order of embeddings
    embeddings: torch.Tensor  # (N, D) L2-normalised
    skipped: list[dict] = field(default_factory=list)  # unreadable files: {"path", "size", "mtime_ns", "error"}
    backend: str = "exact"
    faiss_index: Any = None

    @classmethod
    def load(cls, index_dir: str | Path) -> "SearchIndex":
        index_dir = Path(index_dir)
        meta_file = index_dir / "index.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{index_dir} is not a search index (no index.json): vlkit search index MODEL FOLDER")
        meta = json.loads(meta_file.read_text())
        emb = load_file(str(index_dir / "embeddings.safetensors"))["embeddings"]
        if len(emb) != len(meta["files"]):
            raise ValueError(f"{index_dir}: {len(emb)} embeddings for {len(meta['files'])} files (damaged index)")
        index = None
        if meta["backend"] == "faiss":
            import faiss

            index = faiss.read_index(str(index_dir / "index.faiss"))
            index.nprobe = meta.get("nprobe", index.nprobe)
        return cls(meta["root"], meta["model_id"], meta["files"], emb, meta.get("skipped", []), meta["backend"], index)

    def save(self, index_dir: str | Path) -> Path:
        """Write the index; each file is written aside and renamed in place (a crash leaves the old one)."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.float().contiguous()}, str(index_dir / "embeddings.safetensors.tmp"))
        os.replace(index_dir / "embeddings.safetensors.tmp", index_dir / "embeddings.safetensors")
        faiss_file = index_dir / "index.faiss"
        if self.faiss_index is not None:
            import faiss

            faiss.write_index(self.faiss_index, str(faiss_file) + ".tmp")
            os.replace(str(faiss_file) + ".tmp", faiss_file)
        elif faiss_file.exists():
            faiss_file.unlink()
        meta = {"root": self.root, "model_id": self.model_id, "backend": self.backend, "count": len(self.files),
                "dim": int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0,
                "nprobe": getattr(self.faiss_index, "nprobe", None), "files": self.files, "skipped": self.skipped}
        (index_dir / "index.json.tmp").write_text(json.dumps(meta))
        os.replace(index_dir / "index.json.tmp", index_dir / "index.json")
        return index_dir

    def model_path(self) -> str:
        return self.model_id.split("#")[0]

    def search(self, queries: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per query (Q, D), the top-``k`` (path under root, cosine score), best first."""
        if not self.files:
            return [[] for _ in range(len(queries))]
        queries = F.normalize(queries.float(), dim=-1)
        if self.faiss_index is not None:
            scores, ids = self.faiss_index.search(queries.numpy(), min(k, len(self.files)))
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        else:
            scores, ids = exact_search(self.embeddings, queries, k)
        root = Path(self.root)
        return [[(str(root / self.files[i]["path"]), float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores.tolist(), ids.tolist())]


def _embed_files(embedder: Embedder, root: Path, paths: list[str], batch_size: int, progress: bool):
    """(embeddings of the readable ``paths`` (M, D), their paths, {path: error} of the others)."""
    done, rows, errors = [], [], {}
    bar = tqdm(total=len(paths), desc="indexing", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch, ok = [], []
        for rel in paths[start:start + batch_size]:
            try:
                batch.append(embedder.image_tensor(root / rel))
                ok.append(rel)
            except (BadImageError, OSError) as e:
                errors[rel] = getattr(e, "reason", str(e))
        if batch:
            rows.append(embedder.pixels(torch.stack(batch)))
            done.extend(ok)
        bar.update(len(paths[start:start + batch_size]))
    bar.close()
    return (torch.cat(rows) if rows else torch.zeros(0, 0)), done, errors


def _reusable(index_dir: Path, root: Path, embedder: Embedder) -> Optional[SearchIndex]:
    if not (index_dir / "index.json").is_file():
        return None
    old = SearchIndex.load(index_dir)
    if old.model_id != embedder.model_id or Path(old.root) != root:
        log.info("the index at %s was built with another model or folder: rebuilding it", index_dir)
        return None
    return old


def build_index(embedder: Embedder, folder: str | Path, index_dir: str | Path, backend: Backend = "auto",
                batch_size: int = 64, progress: bool = True) -> tuple[SearchIndex, dict]:
    """Index (or re-index, incrementally) the images under ``folder`` into ``index_dir``.

    Returns the index and counts: files (indexed), added, kept, removed, skipped (unreadable,
    total), new_skipped, seconds."""
    t0, root = time.perf_counter(), Path(folder).resolve()
    current, index_dir = scan(root), Path(index_dir)
    old = _reusable(index_dir, root, embedder)
    same = lambda e: current.get(e["path"]) == (e["size"], e["mtime_ns"])  # noqa: E731
    kept_rows = [i for i, e in enumerate(old.files) if same(e)] if old else []
    kept_bad = [e for e in old.skipped if same(e)] if old else []
    known = {old.files[i]["path"] for i in kept_rows} | {e["path"] for e in kept_bad}
    todo = [p for p in current if p not in known]
    new_emb, new_paths, errors = _embed_files(embedder, root, todo, batch_size, progress)
    entries = [old.files[i] for i in kept_rows] + [{"path": p, "size": current[p][0], "mtime_ns": current[p][1]}
                                                   for p in new_paths]
    parts = ([old.embeddings[kept_rows]] if kept_rows else []) + ([new_emb] if new_paths else [])
    emb = torch.cat(parts) if parts else torch.zeros(0, 0)
    order = sorted(range(len(entries)), key=lambda i: entries[i]["path"])
    entries, emb = [entries[i] for i in order], emb[order] if len(order) else emb
    skipped = kept_bad + [{"path": p, "size": current[p][0], "mtime_ns": current[p][1], "error": err}
                          for p, err in errors.items()]
    use_faiss = backend == "faiss" or (backend == "auto" and len(entries) >= FAISS_MIN)
    index = SearchIndex(str(root), embedder.model_id, entries, emb, sorted(skipped, key=lambda e: e["path"]),
                        "faiss" if use_faiss and entries else "exact",
                        build_faiss(emb) if use_faiss and entries else None)
    index.save(index_dir)
    stats = {"files": len(entries), "added": len(new_paths), "kept": len(kept_rows),
             "removed": (len(old.files) - len(kept_rows)) if old else 0, "skipped": len(skipped),
             "new_skipped": len(errors), "backend": index.backend, "seconds": round(time.perf_counter() - t0, 3)}
    for path, err in errors.items():
        log.warning("skipped %s: %s", path, err)
    return index, stats

"""Image-text conversation datasets for vision-language models.

Every sample is ``{"image": PIL image, "messages": [{"role": "user" | "assistant", "content": str}],
"references": [str], "id": str}``: the user turn holds ``<image>`` where the image goes; the
loss is taken on assistant turns only; ``references`` are the answers / captions the evaluation
compares generations with. Sources:

- the synthetic world: captioning ("Describe the image." -> caption) and VQA (its questions);
- easy-VQA (ASSETS.md): 64x64 shapes, 13 one-word answers;
- COCO-format caption JSON (``images`` + ``annotations``) with an image folder;
- LLaVA-style conversation JSON: ``[{"id", "image", "conversations": [{"from": "human" | "gpt",
  "value"}]}]``, several turns; ``"image"`` may be a list (several ``<image>`` marks, in order);
- interleaved image-text documents (OBELICS / MMC4, Idefics2's pre-training): :class:`InterleavedDocuments`.
Samples with several images carry ``"images"`` (a list, in order of their ``<image>`` marks) instead
of ``"image"``; a document is one message of role ``"document"``, all of its text trained on.
Unreadable images give ``None`` (counted and skipped by the collate), never a crash.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from vlkit.data.base import sample_seed
from vlkit.data.images import BadImageError, load_image
from vlkit.data.world import WorldConfig, WorldDataset

log = logging.getLogger(__name__)

IMAGE = "<image>"
CAPTION_PROMPT = "Describe the image."


def user_turn(prompt: str, image_position: str = "before") -> str:
    """The first user turn: the ``<image>`` mark before the prompt (LLaVA's order) or after it (the
    visual tokens then sit right before the answer, after the question they may have read)."""
    if image_position not in ("before", "after"):
        raise ValueError(f"image_position must be 'before' or 'after', not {image_position!r}")
    return f"{IMAGE}\n{prompt}" if image_position == "before" else f"{prompt}\n{IMAGE}"


class ImageAfterPrompt(Dataset):
    """A single-image dataset whose first user turn ``"<image>\n{prompt}"`` becomes ``"{prompt}\n<image>"``
    (``data.image_position: after``); other samples unchanged."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        if hasattr(dataset, "messages"):
            self.messages = lambda i: self._moved(dataset.messages(i))

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def _moved(messages: list[dict]) -> list[dict]:
        first, head = messages[0], f"{IMAGE}\n"
        if first["role"] != "user" or not first["content"].startswith(head):
            return messages
        return [first | {"content": user_turn(first["content"][len(head):], "after")}] + messages[1:]

    def __getitem__(self, i: int) -> Optional[dict]:
        sample = self.dataset[i]
        return sample if sample is None else sample | {"messages": self._moved(sample["messages"])}


def single_turn(image, prompt: str, answer: str, references: list[str], sid: str) -> dict:
    return {"image": image, "messages": [{"role": "user", "content": user_turn(prompt)},
                                         {"role": "assistant", "content": answer}],
            "references": references, "id": sid}


class WorldCaptions(Dataset):
    def __init__(self, world: WorldConfig, split: str, length: Optional[int] = None):
        self.world = WorldDataset(world, split, length=length, task="captioning")
        self.split = split

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> dict:
        s = self.world[i]
        return single_turn(s["image"], CAPTION_PROMPT, s["caption"], [s["caption"]], f"{self.split}/{i}")


class WorldVQA(Dataset):
    """``qa_per_scene`` questions of each scene (scene i // q, question i % q of its list); with
    ``shuffle_questions`` the question is picked by a hash of (scene, k) instead of the list order."""

    def __init__(self, world: WorldConfig, split: str, length: Optional[int] = None, qa_per_scene: int = 4,
                 shuffle_questions: bool = False):
        self.world = WorldDataset(world, split, length=length, task="vqa")
        self.split, self.q, self.shuffle = split, qa_per_scene, shuffle_questions

    def __len__(self) -> int:
        return len(self.world) * self.q

    def __getitem__(self, i: int) -> dict:
        scene, k = divmod(i, self.q)
        s = self.world[scene]
        k = (sample_seed(17, k, scene) if self.shuffle else k) % len(s["questions"])
        return single_turn(s["image"], s["questions"][k], s["answers"][k], [s["answers"][k]],
                           f"{self.split}/{scene}/{k}") | {"question_type": s["question_types"][k]}


class Interleave(Dataset):
    """Samples of ``a`` and ``b`` alternating (a0, b0, a1, b1, ...), as long as the shorter lasts:
    one model trained on captioning and VQA at once."""

    def __init__(self, a: Dataset, b: Dataset):
        self.parts = (a, b)
        self.n = min(len(a), len(b))

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i: int):
        return self.parts[i % 2][i // 2]


EASY_VQA_COLOURS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})


def easy_vqa_answer_type(answer: str) -> str:
    """VQA's answer types for easy-VQA (scores are also reported per type): yes/no, colour, shape."""
    return "yes/no" if answer in ("yes", "no") else "colour" if answer in EASY_VQA_COLOURS else "shape"


class EasyVQA(Dataset):
    """easy-VQA's questions (``split`` train or test); ``question_type`` is the answer type."""

    def __init__(self, split: str = "train", length: Optional[int] = None):
        import easy_vqa

        questions = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
        self.paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
        self.rows = list(zip(*questions))[:length]  # (question, answer, image id)
        self.split = split

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self, i: int) -> list[dict]:
        """Sample ``i``'s conversation without loading its image (lengths for length-grouped batching)."""
        question, answer, _ = self.rows[i]
        return single_turn(None, question, answer, [], "")["messages"]

    def __getitem__(self, i: int) -> Optional[dict]:
        question, answer, image_id = self.rows[i]
        image = _load(self.paths[image_id])
        if image is None:
            return None
        sample = single_turn(image, question, answer, [answer], f"{self.split}/{i}")
        return sample | {"question_type": easy_vqa_answer_type(answer)}


def _load(path) -> Optional[object]:
    try:
        return load_image(path)
    except BadImageError as e:
        log.warning("skipped %s: %s", path, e.reason)
        return None


class CocoCaptions(Dataset):
    """COCO caption JSON (``images`` [{id, file_name}], ``annotations`` [{image_id, caption}]): one
    sample per image; the trained caption is drawn per (seed, epoch, image), all are references."""

    def __init__(self, annotations: str | Path, image_root: str | Path, seed: int = 0):
        doc = json.loads(Path(annotations).read_text())
        caps: dict = {}
        for a in doc.get("annotations", []):
            text = str(a.get("caption", "")).strip()
            if text:  # empty captions are dropped (and counted)
                caps.setdefault(a["image_id"], []).append(text)
        self.images = [im for im in doc.get("images", []) if im["id"] in caps]
        dropped = len(doc.get("images", [])) - len(self.images)
        if dropped:
            log.warning("%s: %d images without a non-empty caption skipped", annotations, dropped)
        self.caps, self.root, self.seed, self.epoch = caps, Path(image_root), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _pick(self, i: int) -> str:
        refs = self.caps[self.images[i]["id"]]
        return refs[sample_seed(self.seed, self.epoch, i) % len(refs)]

    def messages(self, i: int) -> list[dict]:
        """Sample ``i``'s conversation without loading its image (lengths for length-grouped batching)."""
        return single_turn(None, CAPTION_PROMPT, self._pick(i), [], "")["messages"]

    def __getitem__(self, i: int) -> Optional[dict]:
        info = self.images[i]
        image = _load(self.root / info["file_name"])
        if image is None:
            return None
        return single_turn(image, CAPTION_PROMPT, self._pick(i), self.caps[info["id"]], str(info["id"]))


class LlavaConversations(Dataset):
    """LLaVA-style JSON: turns "human" -> user, "gpt" -> assistant; the image path is relative to
    ``image_root``; the last assistant turn is the reference."""

    ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

    def __init__(self, path: str | Path, image_root: str | Path):
        self.rows = json.loads(Path(path).read_text())
        self.root = Path(image_root)
        for r in self.rows:
            turns = r.get("conversations", [])
            if not turns or any(t.get("from") not in self.ROLES for t in turns):
                raise ValueError(f"{path}: sample {r.get('id')!r} has no turns or an unknown speaker")

    def __len__(self) -> int:
        return len(self.rows)

    def _paths(self, i: int) -> list[str]:
        image = self.rows[i]["image"]
        return image if isinstance(image, list) else [image]

    def messages(self, i: int) -> list[dict]:
        """Sample ``i``'s turns, ``<image>`` marks put first when it has none (no image is loaded)."""
        r, n = self.rows[i], len(self._paths(i))
        messages = [{"role": self.ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
        marks = sum(m["content"].count(IMAGE) for m in messages)
        if not marks:
            messages[0]["content"] = IMAGE * n + f"\n{messages[0]['content']}"
        elif marks != n:
            raise ValueError(f"sample {r.get('id', i)!r}: {marks} {IMAGE} marks for {n} images")
        return messages

    def __getitem__(self, i: int) -> Optional[dict]:
        r = self.rows[i]
        several = isinstance(r["image"], list)
        images = [_load(self.root / p) for p in self._paths(i)]
        if any(im is None for im in images):
            return None
        messages = self.messages(i)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        sample = {"messages": messages, "references": answers[-1:], "id": str(r.get("id", i))}
        return sample | ({"images": images} if several else {"image": images[0]})


class InterleavedDocuments(Dataset):
    """Interleaved image-text documents, the web-document data of Flamingo (M3W), MMC4 and OBELICS
    (Idefics2's pre-training). A JSON list or a JSON-lines file of documents, each either
    OBELICS-style parallel lists ``{"texts": [str | null], "images": [path | null]}`` (every position
    holds a text or an image) or ``{"text": "... <image> ...", "images": [paths]}``. A sample is
    ``{"images": [PIL], "messages": [{"role": "document", "content": text with <image> marks}]}``;
    a document with an unreadable image is ``None`` (counted), one without text is dropped at load."""

    def __init__(self, path: str | Path, image_root: str | Path):
        path = Path(path)
        raw = path.read_text()
        docs = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines()
                                                                      if x.strip()]
        self.root, self.docs = Path(image_root), []
        for k, doc in enumerate(docs):
            text, images = self.parse(doc, f"{path}: document {k}")
            if text.replace(IMAGE, "").strip():
                self.docs.append((text, images, str(doc.get("id", k))))
        if len(self.docs) < len(docs):
            log.warning("%s: %d documents without text skipped", path, len(docs) - len(self.docs))

    @staticmethod
    def parse(doc: dict, where: str) -> tuple[str, list[str]]:
        if "texts" in doc:
            texts, images = doc["texts"], doc.get("images", [])
            if len(texts) != len(images) or any((t is None) == (p is None) for t, p in zip(texts, images)):
                raise ValueError(f"{where}: texts and images must be parallel lists, one of the two set per position")
            text = "".join(IMAGE if t is None else t for t in texts)
            return text, [p for p in images if p is not None]
        text, images = str(doc.get("text", "")), list(doc.get("images", []))
        if text.count(IMAGE) != len(images):
            raise ValueError(f"{where}: {text.count(IMAGE)} {IMAGE} marks for {len(images)} images")
        return text, images

    def __len__(self) -> int:
        return len(self.docs)

    def messages(self, i: int) -> list[dict]:
        return [{"role": "document", "content": self.docs[i][0]}]

    def __getitem__(self, i: int) -> Optional[dict]:
        _, paths, doc_id = self.docs[i]
        images = [_load(self.root / p) for p in paths]
        if any(im is None for im in images):
            return None
        return {"images": images, "messages": self.messages(i), "references": [], "id": doc_id}

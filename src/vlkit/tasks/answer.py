"""Answering about images with a VLM: ``vlkit predict`` and ``vlkit chat``, and where an answer comes from.

A trained vlkit VLM run and an HF ``Idefics2ForConditionalGeneration`` folder (its processor's files
alongside: ``tokenizer.json``, ``preprocessor_config.json``, the chat template) both become an
:class:`Assistant`: the model, its prompt encoder, its image pipeline and its decoding settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image

from vlkit.config import ConfigError
from vlkit.data.images import BadImageError, load_image
from vlkit.data.transforms import build_transform
from vlkit.decoders.generate import GenerationConfig
from vlkit.models.vlm import VLM

Pixels = Union[torch.Tensor, list]  # what VLM.generate takes for one sample: (1, C, H, W), or crops of several sizes


@dataclass
class Assistant:
    """A VLM ready to answer: ``encoder.prompt(messages)`` -> ids, ``encoder.first_turn(question)`` -> the
    first user turn's content, ``encoder.tok`` decodes; ``pixels(image)`` -> one sample's images."""

    model: VLM
    encoder: object
    pixels: Callable[[Image.Image], Pixels]
    generation: GenerationConfig

    def answer(self, messages: list[dict], pixels: Pixels) -> tuple[torch.Tensor, list[int], str]:
        """(prompt ids (1, T), new token ids, answer text) for the conversation's next turn."""
        ids = torch.tensor([self.encoder.prompt(messages)])
        new = self.model.generate(ids, None, pixels, self.generation)[0].tolist()
        return ids, new, self.encoder.tok.decode(new).strip()


def _hf_idefics2(folder: Path, int8: bool, speculative: int, prepack: bool) -> Assistant:
    from vlkit.checkpoints.hf_idefics2 import Idefics2Images, Idefics2Prompts, load_hf_idefics2
    from vlkit.tasks.vlm import for_decoding, hf_eos_ids

    model = for_decoding(load_hf_idefics2(folder), int8, prepack)
    images = Idefics2Images.from_folder(folder)
    encoder = Idefics2Prompts(folder, model.num_visual_tokens, images.crops)
    raw = json.loads((folder / "config.json").read_text())
    text_eos = raw.get("text_config", {}).get("eos_token_id")
    text_eos = text_eos if isinstance(text_eos, list) else [text_eos]
    eos = tuple(int(i) for i in (encoder.end_of_utterance, *hf_eos_ids(folder), *text_eos) if i is not None)
    return Assistant(model, encoder, images, GenerationConfig(eos_token_ids=tuple(dict.fromkeys(eos)),
                                                              speculative=speculative))


def load_assistant(path: str | Path, int8: bool = False, speculative: int = 0, prepack: bool = False) -> Assistant:
    """A vlkit VLM run (or model folder) or an HF Idefics2 folder, ready to answer (``int8``, ``speculative``
    and ``prepack`` as :func:`vlkit.tasks.vlm.load_vlm` takes them)."""
    from vlkit.checkpoints.hub import model_folder, read_model_config
    from vlkit.tasks.vlm import check_speculative, load_vlm

    if read_model_config(path).get("model_type") == "idefics2":
        if speculative:
            check_speculative(int8)
        return _hf_idefics2(model_folder(path), int8, speculative, prepack)
    model, cfg, encoder = load_vlm(path, int8, speculative, prepack)
    transform = build_transform(cfg.transform, train=False)
    return Assistant(model, encoder, lambda image: transform(image, torch.Generator())[None], cfg.generation)


def answer_files(run: str | Path, images, prompt: str, int8: bool = False, speculative: int = 0,
                 relevance_dir: Optional[str | Path] = None, relevance: str = "occlusion") -> list[dict]:
    """``[{"path", "answer"}]`` (or ``{"path", "error"}`` for unreadable images) with a VLM run or an HF
    Idefics2 folder (``int8`` and ``speculative`` as :func:`load_assistant` takes them; float32 weights prepacked).
    ``relevance_dir``: also draw where each answer comes from in its image (``relevance``: ``occlusion`` or
    ``grad_cam``, :mod:`vlkit.models.relevance`) into ``relevance_dir/<image stem>_relevance.png`` (``"picture"``)."""
    grads = relevance_dir is not None and relevance == "grad_cam"
    if grads and int8:
        raise ConfigError("int8", "Grad-CAM differentiates the model: not with int8 weights (occlusion is fine)")
    assistant = load_assistant(run, int8, speculative, prepack=not grads)
    out, stems = [], set()
    for path in images:
        try:
            pixels = assistant.pixels(load_image(path))
        except BadImageError as e:
            out.append({"path": str(path), "error": e.reason})
            continue
        turn = {"role": "user", "content": assistant.encoder.first_turn(prompt)}
        ids, new, text = assistant.answer([turn], pixels)
        record = {"path": str(path), "answer": text}
        if relevance_dir is not None:
            stem = _unique(Path(path).stem, stems)
            shown = "".join(c if c.isprintable() else "?" for c in text)  # a weak model's answer may hold controls
            record.update(_draw_relevance(assistant, ids, pixels, new, stem, f"{prompt}\n-> {shown}",
                                          Path(relevance_dir), relevance))
        out.append(record)
    return out


def _unique(stem: str, taken: set) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... when an earlier image of the call had that name (a.jpg, a.png)."""
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


def explain_answer(model: VLM, generation: GenerationConfig, ids: torch.Tensor, pixels: torch.Tensor, new: list[int],
                   method: str = "occlusion") -> Optional[tuple[torch.Tensor, float]]:
    """(relevance map, log-likelihood) of a generated answer ``new`` (cut at its first end token, ``generation``'s
    or the language model's) to the prompt ``ids`` (1, T) about the image ``pixels`` (C, H, W); None for an
    empty answer."""
    from vlkit.models.relevance import answer_relevance

    eos = set(generation.eos_token_ids or (model.decoder.cfg.eos_token_id,))
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return answer_relevance(model, ids, pixels[None], new[:cut], method) if cut else None


def _draw_relevance(assistant: Assistant, ids: torch.Tensor, pixels: Pixels, new: list[int], stem: str,
                    title: str, folder: Path, method: str) -> dict:
    """The relevance map of the answer drawn over the image."""
    from vlkit.viz.attention import save_attention_grid

    if len(pixels) != 1:
        raise ConfigError("relevance", f"the image reaches the model as {len(pixels)} crops (Idefics2's image "
                                       "splitting): maps are drawn for one image; set do_image_splitting false")
    image = pixels[0]
    explained = explain_answer(assistant.model, assistant.generation, ids, image, new, method)
    if explained is None:
        return {"relevance_error": "empty answer: nothing to explain"}
    cam, logp = explained
    picture = save_attention_grid(image[None], [cam.flatten()[None]], tuple(cam.shape),
                                  folder / f"{stem}_relevance.png", [f"relevance ({method})"],
                                  titles=[title])
    return {"picture": str(picture), "answer_logprob": logp}


class ChatSession:
    """A multi-turn conversation about one image: each question sees the whole history."""

    def __init__(self, run: str | Path, image: str | Path, int8: bool = False, speculative: int = 0):
        self.assistant = load_assistant(run, int8, speculative, prepack=True)
        self.pixels = self.assistant.pixels(load_image(image))
        self.messages: list[dict] = []

    @property
    def model(self) -> VLM:
        return self.assistant.model

    @model.setter
    def model(self, model: VLM) -> None:
        self.assistant = replace(self.assistant, model=model)

    def ask(self, question: str) -> str:
        content = question if self.messages else self.assistant.encoder.first_turn(question)
        self.messages.append({"role": "user", "content": content})
        answer = self.assistant.answer(self.messages, self.pixels)[2]
        self.messages.append({"role": "assistant", "content": answer})
        return answer

"""An HF-format ``Idefics2ForConditionalGeneration`` folder as a vlkit :class:`~vlkit.models.vlm.VLM`
(Laurençon et al. 2024, "What matters when building vision-language models?"):

- vision: SigLIP's tower without its pooling head (:func:`~vlkit.models.clip.convert_hf_siglip_vision`),
  all its patch tokens after the final LayerNorm;
- connector: :class:`~vlkit.connectors.idefics2.Idefics2Connector` (SwiGLU modality projection to the
  language model's intermediate width, Perceiver resampler of grouped-query attention, K latents);
- language model: the Mistral / Llama decoder (:func:`~vlkit.decoders.loading.convert_llama`);
- injection: the K visual tokens replace the K ``<image>`` tokens (``image_token_id``) of the prompt.

``vlkit.load(folder)`` returns it; ``forward(input_ids, attention_mask, images)`` gives transformers'
logits for images of any size (sides multiples of the patch size; the patch positions are Idefics2's
fractional buckets, ``ViTConfig.pos_resize='bucket'``); images of one call share their size (transformers
pads a batch of sizes and masks the padding: vlkit encodes the images of a list a size at a time). ``generate`` decodes
greedily or by sampling / beams. :func:`idefics2_prompt`
frames each ``<image>`` of a prompt as the processor does. Mistral's sliding
window is not applied: prompts and answers up to ``sliding_window`` tokens (4,096) are exact.

The processor's side, for ``vlkit predict`` / ``vlkit chat`` on such a folder: :class:`Idefics2Images` (the
image pipeline of ``preprocessor_config.json``, image splitting included) and :class:`Idefics2Prompts` (the
folder's chat template, ``<image>`` framing and ``tokenizer.json``), compared with transformers' processor in
the tests.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict
from vlkit.connectors.idefics2 import Idefics2Connector, idefics2_state_from_hf
from vlkit.data.chat import ChatTemplate
from vlkit.data.tokenizers import TextTokenizer
from vlkit.decoders.loading import causal_lm_from_state, convert_llama, llama_config, read_folder_weights
from vlkit.encoders.vit import VisionTransformer
from vlkit.models.clip import siglip_vision_config, convert_hf_siglip_vision
from vlkit.models.vlm import VLM, InjectionConfig

log = logging.getLogger(__name__)

FAKE_IMAGE, IMAGE = "<fake_token_around_image>", "<image>"


def idefics2_prompt(text: str, image_seq_len: int = 64, crops: int = 1) -> str:
    """``text`` with each ``<image>`` expanded as transformers' ``Idefics2Processor`` does: ``image_seq_len``
    image tokens between two ``<fake_token_around_image>`` per crop (``crops=5`` with image splitting: four
    quarters, then the whole image), boundaries shared by neighbours, a space after a closing boundary
    followed by text."""
    if image_seq_len < 1 or crops < 1:
        raise ValueError(f"image_seq_len and crops must be >= 1, got {image_seq_len}, {crops}")
    text = text.replace(IMAGE, f"{FAKE_IMAGE}{IMAGE * image_seq_len}{FAKE_IMAGE}" * crops)
    text = text.replace(FAKE_IMAGE + FAKE_IMAGE, FAKE_IMAGE)
    return re.sub(rf"{re.escape(FAKE_IMAGE)}(?=[^\s<])", FAKE_IMAGE + " ", text)


def _split(state: dict, prefix: str, to: str = "") -> dict:
    return {to + k[len(prefix):]: w for k, w in state.items() if k.startswith(prefix)}


def load_hf_idefics2(folder: str | Path) -> VLM:
    """The VLM of an HF ``Idefics2ForConditionalGeneration`` folder (config.json + safetensors)."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    state = read_folder_weights(folder)
    text, perceiver = raw["text_config"], raw.get("perceiver_config", {})
    if text.get("model_type", "mistral") not in ("mistral", "llama"):
        raise CheckpointError(f"{folder}: Idefics2 text model {text.get('model_type')!r} is not supported "
                              "(mistral, llama)")
    vcfg = siglip_vision_config({"patch_size": 32, **raw["vision_config"], "vision_use_head": False})
    vcfg = replace(vcfg, pos_resize="bucket")
    vision = VisionTransformer(vcfg)
    load_state_dict_strict(vision, convert_hf_siglip_vision(_split(state, "model.vision_model.", "vision_model."),
                                                            vcfg.depth), source=f"{folder} (vision)")
    dcfg = llama_config({**text, "tie_word_embeddings": raw.get("tie_word_embeddings", False)})
    lm_state = {**_split(state, "model.text_model.", "model."), **_split(state, "lm_head.", "lm_head.")}
    decoder = causal_lm_from_state(dcfg, convert_llama(lm_state, dcfg), f"{folder} (language model)")
    connector = Idefics2Connector(vcfg.embed_dim, dcfg.hidden_size, dcfg.intermediate_size,
                                  num_tokens=perceiver.get("resampler_n_latents", 64),
                                  depth=perceiver.get("resampler_depth", 3),
                                  num_heads=perceiver.get("resampler_n_heads", 16),
                                  kv_heads=perceiver.get("num_key_value_heads", 4),  # transformers' defaults
                                  head_dim=perceiver.get("resampler_head_dim", 96),
                                  eps=perceiver.get("rms_norm_eps", 1e-6))
    load_state_dict_strict(connector, idefics2_state_from_hf(_split(state, "model.connector.")),
                           source=f"{folder} (connector)")
    model = VLM(vision, connector, decoder, InjectionConfig(style="tokens", features="last"),
                image_token_id=raw.get("image_token_id", 32001), num_visual_tokens=connector.latents.shape[0])
    log.info("loaded Idefics2 from %s: %d visual tokens per image", folder, model.num_visual_tokens)
    return model.eval()


@dataclass(frozen=True)
class Idefics2Images:
    """Idefics2's image pipeline, as transformers' ``Idefics2ImageProcessor`` (PIL backend) runs it: with
    ``split`` the image's four quarters, then the whole image; each resized (bilinear) so that a side over
    ``longest_edge`` comes down to it with the aspect kept, then each side raised to ``shortest_edge`` at
    least; scaled by ``rescale`` and normalised. No padding: crops of several sizes are encoded a size at a
    time (transformers pads them to one size and masks the padding). A side that is not a multiple of the
    patch loses its last pixels in the vision tower, as in transformers' patch convolution."""

    shortest_edge: int = 378
    longest_edge: int = 980
    split: bool = False
    resize: bool = True
    resample: int = 2  # PIL's BILINEAR
    rescale: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Idefics2Images":
        """``preprocessor_config.json`` of an Idefics2 folder, else the ``image_processor`` of its
        ``processor_config.json`` (as transformers 5 saves it); transformers' defaults where both are silent."""
        path = Path(folder) / "preprocessor_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        if not path.is_file() and (Path(folder) / "processor_config.json").is_file():
            path = Path(folder) / "processor_config.json"
            raw = json.loads(path.read_text()).get("image_processor", {})
        size = raw.get("size") or {}
        if size and not {"shortest_edge", "longest_edge"} <= set(size):
            raise CheckpointError(f"{path}: size {size} is not Idefics2's shortest_edge / longest_edge")
        return cls(shortest_edge=size.get("shortest_edge", 378), longest_edge=size.get("longest_edge", 980),
                   split=bool(raw.get("do_image_splitting", False)), resize=raw.get("do_resize", True),
                   resample=raw.get("resample", 2),
                   rescale=raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) else 1.0,
                   mean=tuple(raw.get("image_mean", (0.5,) * 3)) if raw.get("do_normalize", True) else (0.0,),
                   std=tuple(raw.get("image_std", (0.5,) * 3)) if raw.get("do_normalize", True) else (1.0,))

    @property
    def crops(self) -> int:
        """Images the model sees per image given: 5 with splitting (four quarters, the whole), else 1."""
        return 5 if self.split else 1

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, with transformers' truncations."""
        if width >= height and width > self.longest_edge:
            width, height = self.longest_edge, int(self.longest_edge / (width / height))
        elif height > width and height > self.longest_edge:
            height, width = self.longest_edge, int(self.longest_edge * (width / height))
        return max(height, self.shortest_edge), max(width, self.shortest_edge)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        """An RGB image -> its crops, each (3, H, W) float32, in the order their ``<image>`` runs take."""
        if image.mode != "RGB":
            from vlkit.data.images import to_rgb

            image = to_rgb(image)
        w, h = image.size
        crops = [image]
        if self.split:
            mw, mh = w // 2, h // 2
            crops = [image.crop(box) for box in ((0, 0, mw, mh), (mw, 0, w, mh), (0, mh, mw, h), (mw, mh, w, h))]
            crops.append(image)
        out = []
        for crop in crops:
            if self.resize:
                height, width = self.size(crop.height, crop.width)
                crop = crop.resize((width, height), resample=self.resample)
            x = np.asarray(crop, dtype=np.float32) * np.float32(self.rescale)
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
        return out


def _parts(content) -> list[dict]:
    """A message's content as Idefics2's template reads it: typed parts; a string's ``<image>`` marks become
    image parts between its text parts."""
    if not isinstance(content, str):
        return list(content)
    pieces = content.split(IMAGE)
    parts: list[dict] = []
    for i, text in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts or [{"type": "text", "text": ""}]  # an empty answer is still a turn the template can read


class Idefics2Prompts:
    """Chat turns -> prompt ids as ``Idefics2Processor`` makes them: the folder's chat template over typed
    parts, each ``<image>`` framed (:func:`idefics2_prompt`, ``image_seq_len`` tokens per crop), then the
    folder's ``tokenizer.json`` with its own special tokens (Mistral's start token), as it is written (as
    transformers 4, which Idefics2 was released with, reads it; transformers 5's ``LlamaTokenizer`` rebuilds its
    own pre-tokenizer and can put a "▁" after ``<fake_token_around_image>``)."""

    def __init__(self, folder: str | Path, image_seq_len: int, crops: int = 1):
        folder = Path(folder)
        self.tok = TextTokenizer.from_file(folder)
        try:
            self.chat = ChatTemplate.from_hf(folder)
        except ValueError:  # a folder saved without its processor's template: Idefics2's own
            self.chat = ChatTemplate(CHAT_TEMPLATE)
        self.image_seq_len, self.crops = image_seq_len, crops
        self.end_of_utterance = self.tok.tokenizer.token_to_id(END_OF_UTTERANCE)

    def first_turn(self, question: str) -> list[dict]:
        """A conversation's first user turn: the image, then ``question`` (the processor's examples)."""
        return [{"type": "image"}, {"type": "text", "text": question}]

    def text(self, messages: Sequence[dict]) -> str:
        turns = [{**m, "content": _parts(m["content"])} for m in messages]
        return idefics2_prompt(self.chat.render(turns, add_generation_prompt=True), self.image_seq_len, self.crops)

    def prompt(self, messages: Sequence[dict]) -> list[int]:
        return self.tok.tokenizer.encode(self.text(messages), add_special_tokens=True).ids


END_OF_UTTERANCE = "<end_of_utterance>"
CHAT_TEMPLATE = ("{% for message in messages %}{{message['role'].capitalize()}}"
                 "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

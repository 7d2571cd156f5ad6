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
pads a batch of sizes and masks the padding: give vlkit one size per call). ``generate`` decodes
greedily or by sampling / beams. :func:`idefics2_prompt`
frames each ``<image>`` of a prompt as the processor does. Mistral's sliding
window is not applied: prompts and answers up to ``sliding_window`` tokens (4,096) are exact.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict
from vlkit.connectors.idefics2 import Idefics2Connector, idefics2_state_from_hf
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

"""Vision-language models as ``VLM(vision encoder, connector, language model)``, with the ways of
injecting the visual tokens that the DePALM survey (Shukor et al. 2024) distinguishes:

- ``tokens``: visual tokens spliced into the text where ``<image>`` placeholders stand, several
  images per sample, anywhere in the text (LLaVA, Liu et al. 2023; BLIP-2, Li et al. 2023;
  Idefics2, Laurençon et al. 2024). The prompt carries ``num_visual_tokens`` placeholder ids per
  image (as transformers' LLaVA processors write them); their embeddings are replaced.
- ``cross_attention``: Flamingo (Alayrac et al. 2022, §2.2, eq. in Fig. 4): a gated cross-attention
  + dense block before every ``cross_attention_every``-th decoder layer; text tokens attend to the
  visual tokens of the last image before them; ``tanh`` gates start at 0, so the model is exactly
  the language model at initialisation. Each image is marked in the text by ONE placeholder,
  whose embedding is a learned ``media_embed``.
- ``inject``: eP-ALM (Shukor et al. 2023, §3): the class tokens of the encoder's last n layers,
  projected, replace the hidden state of a single placeholder token at the input of n decoder
  layers (``inject_layers``, default the last n).
- ``adapter``: LLaMA-Adapter (Zhang et al. 2024, §3.1-3.3): K learned adaption prompts in each of the
  last L decoder layers, the image's projected feature added to every prompt (one token, broadcast, or
  K tokens, one each); every text token's query attends to the prompts in a softmax of their own, scaled
  by a per-head ``tanh`` gate that starts at 0 (zero-init attention), added to the layer's
  self-attention output: the model is exactly the language model at initialisation. One image per
  sample, marked in the text by ONE placeholder (a learned ``media_embed``, as Flamingo's).

Feature extraction (``features``): patch tokens of the last layer (``last``), of the n last layers
concatenated along channels (``last_n``), their class tokens (``cls_last_n``, what eP-ALM injects),
or the pooled output (``pooled``, one token). A convnet (EfficientNet-Lite) gives the positions of
its final map (``last``), its global average (``pooled``), or for ``last_n`` the outputs of its n last
stages, each average-pooled to the final grid and concatenated along channels: the earlier stages
keep what the ImageNet head discards (colour, thin edges), the multi-scale features of FPN-style
detectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigError
from vlkit.decoders.causal_lm import CausalLM
from vlkit.decoders.generate import GenerationConfig, generate
from vlkit.nn.attention import Attention
from vlkit.nn.kv_cache import SharedPrefix
from vlkit.nn.layers import Linear, linear
from vlkit.nn.mlp import Mlp
from vlkit.nn.rope import apply_rope

IGNORE_INDEX = -100


@dataclass
class InjectionConfig:
    """How visual tokens reach the language model."""

    style: Literal["tokens", "cross_attention", "inject", "adapter"] = "tokens"
    features: Literal["last", "last_n", "cls_last_n", "pooled"] = "last"
    num_layers: int = 1  # n for last_n / cls_last_n
    keep_prefix_tokens: bool = False  # features=last: keep the class (and distillation) tokens too
    cross_attention_every: int = 1  # cross_attention: a gated block before every n-th decoder layer
    cross_attention_heads: int = 8
    inject_layers: tuple[int, ...] = ()  # inject: decoder layers receiving the n tokens (default: the last n)
    adapter_layers: int = 0  # adapter: adaption prompts in the last L decoder layers (0: every layer)
    adapter_prompts: int = 10  # adapter: K prompts per layer (LLaMA-Adapter: 10 in the last 30 of 32 layers)

    def __post_init__(self):
        if self.adapter_layers < 0:
            raise ConfigError("adapter_layers", f"must be >= 0 (0: every layer), got {self.adapter_layers}")
        if self.adapter_prompts < 1:
            raise ConfigError("adapter_prompts", f"must be >= 1, got {self.adapter_prompts}")


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or float64 for a float64 model (gradient checks)."""
    return logits if logits.dtype == torch.float64 else logits.float()


class VisualFeatures(nn.Module):
    """images (B, C, H, W) -> visual features (B, N, C_v) from a vlkit ViT or a convnet feature map."""

    def __init__(self, encoder: nn.Module, cfg: InjectionConfig):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.is_vit = hasattr(encoder, "blocks") and hasattr(encoder, "num_prefix_tokens")
        if not self.is_vit and cfg.features == "cls_last_n":
            raise ValueError("features='cls_last_n' needs a ViT encoder (a convnet has no class token)")
        if self.is_vit:
            width = getattr(encoder, "num_features", None) or encoder.cfg.embed_dim
            self.dim = width * cfg.num_layers if cfg.features == "last_n" else width
        elif cfg.features == "last_n":
            stages = encoder.stage_channels
            if not 1 <= cfg.num_layers <= len(stages):
                raise ValueError(f"features='last_n': num_layers must be in 1..{len(stages)} stages, "
                                 f"got {cfg.num_layers}")
            self.dim = sum(stages[-cfg.num_layers:])
        else:
            self.dim = encoder.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._vit(images) if self.is_vit else self._convnet(images)

    def _convnet(self, images: torch.Tensor) -> torch.Tensor:
        cfg, enc = self.cfg, self.encoder
        if cfg.features == "last_n":
            maps = enc.forward_intermediates(images, cfg.num_layers)
            grid = maps[-1].shape[-2:]
            fmap = torch.cat([F.adaptive_avg_pool2d(m, grid) for m in maps], dim=1)  # (B, sum C_s, h, w)
        else:
            fmap = enc.forward_features(images)  # (B, C, h, w)
        if cfg.features == "pooled":
            return enc.forward_head(fmap, pre_logits=True)[:, None]
        return fmap.flatten(2).transpose(1, 2)

    def _vit(self, images: torch.Tensor) -> torch.Tensor:
        cfg, enc = self.cfg, self.encoder
        p = 0 if cfg.keep_prefix_tokens else enc.num_prefix_tokens
        if cfg.features == "last":
            return enc.forward_features(images)[:, p:]
        if cfg.features == "pooled":
            return enc.forward_head(enc.forward_features(images), pre_logits=True)[:, None]
        layers = enc.forward_intermediates(images, cfg.num_layers, norm=True)
        if cfg.features == "cls_last_n":
            return torch.stack([t[:, 0] for t in layers], dim=1)  # (B, n, C)
        return torch.cat([t[:, p:] for t in layers], dim=-1)  # (B, N, n C)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: x + tanh(a) xattn(x, visual); then + tanh(b) ffw(x); a = b = 0 at init."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads, kv_dim=dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), visual (B, S, C), allowed (B, T, S) bool; rows with no allowed key get 0."""
        seen = allowed.any(-1, keepdim=True)  # (B, T, 1) tokens after at least one image
        mask = (allowed | ~seen)[:, None]  # (B, 1, T, S); rows without images attend to all, then zeroed
        out = self.attn(self.norm1(x), visual.to(x.dtype), mask=mask) * seen
        x = x + torch.tanh(self.attn_gate) * out
        return x + torch.tanh(self.ff_gate) * self.mlp(self.norm2(x))


class AdaptionPrompt(nn.Module):
    """LLaMA-Adapter's zero-init attention for one decoder layer: K learned prompts (plus the image's
    projected feature); their keys and values come from the layer's own projections (no rotary position),
    each text token's query (with its rotary position) attends to them in a softmax of their own, and
    ``tanh(gate)`` per head (0 at init) scales the result. What the paper writes as one attention over
    [prompts; words] with the scores [g softmax(S_p); softmax(S_w)] is the layer's attention plus this term."""

    def __init__(self, dim: int, num_prompts: int, num_heads: int, init_std: float = 0.02):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_prompts, dim) * init_std)
        self.gate = nn.Parameter(torch.zeros(num_heads))

    def keys_values(self, attn: nn.Module, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts plus ``visual`` (B, 1 or K, C), through the layer's key and value projections: (B, Hkv,
        K, D) each, without rotary position; the same at every step of a generation."""
        H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        prompts = self.prompts.to(visual.dtype) + visual  # (B, K, C)
        B, K = prompts.shape[:2]
        _, k, v = attn.qkv(prompts).split([H * D, Hkv * D, Hkv * D], dim=-1)
        return k.view(B, K, Hkv, D).transpose(1, 2), v.view(B, K, Hkv, D).transpose(1, 2)

    def forward(self, attn: nn.Module, h: torch.Tensor, rope: Optional[tuple],
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """attn: the layer's attention; h (B, T, C) its normed input; kv: :meth:`keys_values` -> (B, T, C)."""
        B, T, _ = h.shape
        H, D = attn.num_heads, attn.head_dim
        qkv = attn.qkv
        if type(qkv) in (nn.Linear, Linear):  # the query rows only (a LoRA-wrapped projection: all of it)
            q = linear(h, qkv.weight[:H * D], None if qkv.bias is None else qkv.bias[:H * D])
        else:
            q = qkv(h)[..., :H * D]
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if rope is not None:
            q = apply_rope(q, *rope)
        out = F.scaled_dot_product_attention(q, *kv, enable_gqa=H != kv[0].shape[1])  # every token sees every prompt
        out = (out * torch.tanh(self.gate).to(out.dtype)[:, None, None]).transpose(1, 2).reshape(B, T, H * D)
        return attn.proj(out) - attn.proj(out.new_zeros(1, 1, H * D))  # the projection's bias is the layer's


class VLM(nn.Module):
    """forward(input_ids (B, T), attention_mask (B, T), images (M, C, H, W) in order of appearance,
    labels (B, T) | None) -> {"logits" (B, T, V)} without labels, {"loss"} with them (-100 ignored; the
    vocabulary projection only where a target is)."""

    def __init__(self, vision: nn.Module, connector: nn.Module, decoder: CausalLM, cfg: InjectionConfig,
                 image_token_id: int, num_visual_tokens: int, prompt_tokens: int = 0):
        super().__init__()
        self.features = VisualFeatures(vision, cfg)
        self.connector, self.decoder, self.cfg = connector, decoder, cfg
        self.image_token_id, self.num_visual_tokens = image_token_id, num_visual_tokens
        dim, L = decoder.cfg.hidden_size, decoder.cfg.num_layers
        self.xattn = nn.ModuleDict()
        if cfg.style == "cross_attention":
            for i in range(0, L, cfg.cross_attention_every):
                self.xattn[str(i)] = GatedCrossAttentionBlock(dim, cfg.cross_attention_heads)
        self.adapter = nn.ModuleDict()
        if cfg.style == "adapter":
            first = L - (cfg.adapter_layers or L)
            if first < 0:
                raise ConfigError("injection.adapter_layers",
                                  f"must be in 0..{L} (0: every layer), got {cfg.adapter_layers}")
            for i in range(first, L):
                self.adapter[str(i)] = AdaptionPrompt(dim, cfg.adapter_prompts, decoder.cfg.num_heads,
                                                      decoder.cfg.init_std)
        if cfg.style in ("cross_attention", "adapter"):
            self.media_embed = nn.Parameter(torch.randn(dim) * decoder.cfg.init_std)
        # prompt tuning (Lester et al. 2021): learned embeddings before every sequence
        self.prompt = nn.Parameter(torch.randn(prompt_tokens, dim) * decoder.cfg.init_std) if prompt_tokens else None
        self.inject_layers = tuple(cfg.inject_layers) or tuple(range(L - cfg.num_layers, L))
        if cfg.style == "inject" and len(self.inject_layers) != cfg.num_layers:
            raise ValueError(f"inject: {len(self.inject_layers)} layers for {cfg.num_layers} visual tokens")
        self.frozen_parts: tuple[str, ...] = ()  # set by apply_tuning; kept in eval mode
        self.share_prefix = True  # see shared_prefix (off: every position through the whole batch)
        self.blank_image_size: Optional[int] = None  # side of the images it reads (set by the task)
        self.always_encode = False  # sharded training: see prepare_sharding

    def train(self, mode: bool = True) -> "VLM":
        """Frozen components stay in eval mode (BLIP-2 keeps its frozen ViT so): their BatchNorm statistics
        never drift and their dropout is off, so the saved run (which omits them) is the model trained."""
        super().train(mode)
        for name in self.frozen_parts:
            getattr(self, name).eval()
        return self

    def prepare_sharding(self) -> None:
        """Before FSDP sharding (:func:`vlkit.train.fsdp.shard`): each forward gathers a sharded block's
        weights with every rank, so every rank must run the same blocks in each step: the batch-dependent
        shared prefix (an extra decoder pass on some ranks) goes, and a batch without images still runs the
        vision tower and connector, on a blank image whose result is multiplied by 0."""
        self.share_prefix = False
        self.always_encode = True

    def _idle_hook(self, device: torch.device, inner=None):
        """A decoder layer hook adding 0, computed through the vision tower and the connector on a blank image,
        where visual tokens would enter (see :meth:`prepare_sharding`): the same blocks run forward and
        backward, in the same order, on a rank without images as on one with. ``inner``: the hook of a batch
        without images (LLaMA-Adapter's prompts), run after it."""
        if self.blank_image_size is None:
            raise ValueError("a batch without images in sharded training: set model.blank_image_size")
        feats = self.features(torch.zeros(1, 3, self.blank_image_size, self.blank_image_size, device=device))
        text = (feats.new_zeros(1, 1, self.decoder.cfg.hidden_size),) if getattr(self.connector, "reads_text", False) else ()
        zero = self.connector(feats, *text).sum() * 0
        if self.cfg.style in ("cross_attention", "adapter"):
            extra = [*self.xattn.parameters(), *self.adapter.parameters()]
            zero = zero + (self.media_embed.sum() + sum(p.sum() for p in extra)) * 0
        entry = min(self.inject_layers) if self.cfg.style == "inject" else 0

        def hook(i: int, x: torch.Tensor, past: int):
            if i == entry and not past:
                x = x + zero.to(x.dtype)
            return x if inner is None else inner(i, x, past)
        return hook

    def placeholders_per_image(self) -> int:
        """Placeholder ids a prompt carries per image: K visual tokens (tokens), else one marker."""
        return self.num_visual_tokens if self.cfg.style == "tokens" else 1

    def encode_images(self, images: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        """(M, C, H, W) -> visual tokens in the language model's space (M, K, C_lm). An instruction-aware
        connector also reads, for each image, the text of its sample (``input_ids``). ``images`` may also be
        a list of M (C, H, W) images of several sizes (Idefics2's crops and whole image): they are encoded a
        size at a time, and must give as many visual tokens each (a resampler's K)."""
        text = None
        if getattr(self.connector, "reads_text", False):
            if input_ids is None:
                raise ValueError("this connector reads the prompt's text: pass input_ids with the images")
            text = self.instruction(input_ids, attention_mask, labels, len(images))
        if torch.is_tensor(images):
            return self.connector(self.features(images), *(text or ()))
        return self._encode_by_size(list(images), text)

    def _encode_by_size(self, images: list[torch.Tensor], text: Optional[tuple[torch.Tensor, torch.Tensor]]
                        ) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        out: list[Optional[torch.Tensor]] = [None] * len(images)
        for idx in groups.values():
            feats = self.features(torch.stack([images[i] for i in idx]))
            tokens = self.connector(feats, *(t[idx] for t in text or ()))
            for i, t in zip(idx, tokens):
                out[i] = t
        if len({t.shape for t in out}) > 1:
            raise ValueError(f"images of sizes {sorted(groups)} give different numbers of visual tokens "
                             f"({sorted({t.shape[0] for t in out})}): give images of one size to this connector")
        return torch.stack(out)

    def instruction(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the text of its sample as the frozen input embeddings (M, T, C_lm) and a mask (M, T)
        of the tokens to read: real, not a placeholder, and not a training target (``labels`` != -100),
        so the answer never reaches the visual tokens and training sees what generation sees: the prompt."""
        is_img = input_ids == self.image_token_id
        per_row = is_img.sum(1) // self.placeholders_per_image()
        if int(per_row.sum()) != num_images:
            raise ValueError(f"{int(per_row.sum())} images marked in the text for {num_images} images")
        keep = ~is_img
        if attention_mask is not None:
            keep = keep & attention_mask.bool()
        if labels is not None:
            keep = keep & (labels == IGNORE_INDEX)
        with torch.no_grad():
            text = self.decoder.embed_tokens(input_ids.masked_fill(is_img, 0))
        rows = torch.repeat_interleave(torch.arange(len(per_row), device=input_ids.device), per_row)
        return text[rows], keep[rows]

    def _embed(self, input_ids: torch.Tensor, visual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        is_img = input_ids == self.image_token_id
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_img, 0))
        n_marks = int(is_img.sum())
        if visual is None:
            if n_marks:
                raise ValueError(f"{n_marks} image placeholders but no images")
            return embeds, is_img
        per_image = self.placeholders_per_image()
        if n_marks != visual.shape[0] * per_image:
            raise ValueError(f"{n_marks} image placeholders for {visual.shape[0]} images x {per_image} each")
        if self.cfg.style == "tokens":
            fill = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
        elif self.cfg.style in ("cross_attention", "adapter"):
            fill = self.media_embed.to(embeds.dtype).expand(n_marks, -1)
        else:
            return embeds, is_img  # inject: the placeholder keeps its token embedding until the first injection
        return embeds.masked_scatter(is_img[..., None], fill), is_img

    def _hook(self, visual: Optional[torch.Tensor], is_img: torch.Tensor):
        """The decoder layer hook for cross-attention / injection / adaption prompts (None for spliced tokens,
        and without images but for the prompts, which every sample reads)."""
        if self.cfg.style == "adapter":
            return self._adapter_hook(visual, is_img)
        if visual is None or self.cfg.style == "tokens":
            return None
        if self.cfg.style == "inject":
            return self._inject_hook(visual, is_img)
        return self._xattn_hook(visual, is_img)

    def _adapter_hook(self, visual: Optional[torch.Tensor], is_img: torch.Tensor):
        B = is_img.shape[0]
        counts = is_img.sum(1)
        if int(counts.max()) > 1:
            raise ValueError(f"adapter: one image per sample (its feature joins the prompts), got {int(counts.max())}")
        K = self.cfg.adapter_prompts
        if visual is not None and visual.shape[1] not in (1, K):
            raise ValueError(f"adapter: the connector gives {visual.shape[1]} tokens per image; the prompts take "
                             f"1 (added to each of the {K}) or {K} (one each)")
        per_row = self.media_embed.new_zeros(B, 1, self.media_embed.shape[0]) if visual is None else \
            visual.new_zeros(B, *visual.shape[1:])  # a sample without an image: the prompts alone
        if visual is not None:
            per_row[counts.bool()] = visual

        kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, rows): once per generation

        def hook(i: int, x: torch.Tensor, past: int):
            if str(i) not in self.adapter:
                return x
            prompt, rows = self.adapter[str(i)], x.shape[0] // B  # beam search repeats each sample

            def extra(attn: nn.Module, h: torch.Tensor, rope: Optional[tuple]) -> torch.Tensor:
                if (i, rows) not in kv:
                    kv[i, rows] = prompt.keys_values(attn, per_row.repeat_interleave(rows, 0).to(h.dtype))
                return prompt(attn, h, rope, kv[i, rows])
            return x, extra
        return hook

    def _inject_hook(self, visual: torch.Tensor, is_img: torch.Tensor):
        slots = {layer: j for j, layer in enumerate(self.inject_layers)}

        def hook(i: int, x: torch.Tensor, past: int) -> torch.Tensor:
            if i not in slots or past:  # decoding steps: the slot lives in the cache already
                return x
            rows = x.shape[0] // is_img.shape[0]  # beam search repeats each sample
            where = is_img.repeat_interleave(rows, 0)[..., None]
            return x.masked_scatter(where, visual[:, slots[i]].repeat_interleave(rows, 0).to(x.dtype))
        return hook

    def _xattn_hook(self, visual: torch.Tensor, is_img: torch.Tensor):
        B, T = is_img.shape
        M, K, C = visual.shape
        counts = is_img.sum(1)  # images per sample
        starts = torch.cumsum(counts, 0) - counts
        m_max = int(counts.max())
        media = visual.new_zeros(B, m_max, K, C)
        for b in range(B):
            media[b, :int(counts[b])] = visual[int(starts[b]):int(starts[b] + counts[b])]
        last_image = is_img.long().cumsum(1)  # (B, T): images up to and including each position (1-based)
        key_image = torch.arange(m_max, device=is_img.device).repeat_interleave(K) + 1  # (m_max K,)
        state = {"last": last_image[:, -1:]}  # decoding: new tokens follow every image

        def hook(i: int, x: torch.Tensor, past: int) -> torch.Tensor:
            block = self.xattn[str(i)] if str(i) in self.xattn else None
            if block is None:
                return x
            rows = x.shape[0] // B  # beam search repeats each sample
            lid = last_image if not past else state["last"].expand(-1, x.shape[1])
            allowed = (lid[:, :, None] == key_image[None, None]).repeat_interleave(rows, 0)
            return block(x, media.flatten(1, 2).repeat_interleave(rows, 0), allowed)
        return hook

    def apply_tuning(self, cfg) -> dict[str, int]:
        """Freeze / unfreeze / LoRA-wrap the components as ``cfg`` (a :class:`~vlkit.models.peft.TuningConfig`)
        says; the Flamingo blocks, LLaMA-Adapter's prompts and gates and the media embedding train with the
        connector, the soft prompt always (it exists to be trained). Returns trainable counts per component."""
        from vlkit.models.peft import set_tuning, trainable_summary

        set_tuning(self.features, cfg.vision, cfg)
        set_tuning(self.connector, cfg.connector, cfg)
        set_tuning(self.decoder, cfg.decoder, cfg)
        modes = {"features": cfg.vision, "connector": cfg.connector, "decoder": cfg.decoder}
        self.frozen_parts = tuple(name for name, mode in modes.items() if mode == "frozen")
        self.train(self.training)
        self.xattn.requires_grad_(cfg.connector != "frozen")
        self.adapter.requires_grad_(cfg.connector != "frozen")
        if self.cfg.style in ("cross_attention", "adapter"):
            self.media_embed.requires_grad_(cfg.connector != "frozen")
        return trainable_summary(self)

    def _with_prompt(self, embeds: torch.Tensor, is_img: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        if self.prompt is None:
            return embeds, is_img, attention_mask
        B, n = embeds.shape[0], self.prompt.shape[0]
        embeds = torch.cat([self.prompt.to(embeds.dtype).expand(B, -1, -1), embeds], 1)
        is_img = torch.cat([is_img.new_zeros(B, n), is_img], 1)
        if attention_mask is None:
            attention_mask = torch.ones(is_img.shape[0], is_img.shape[1] - n, dtype=torch.long, device=embeds.device)
        attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], 1)
        return embeds, is_img, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                logits_to_keep: int = 0, visual: Optional[torch.Tensor] = None) -> dict:
        """Training (``labels``: the loss) or scoring (the logits). ``visual``: the images' tokens already
        encoded (:meth:`encode_images`), e.g. from the prompt alone by an instruction-aware connector."""
        if visual is None and images is not None:
            visual = self.encode_images(images, input_ids, attention_mask, labels)
        embeds, is_img = self._embed(input_ids, visual)
        embeds, is_img, attention_mask = self._with_prompt(embeds, is_img, attention_mask)
        P = self.shared_prefix(input_ids, attention_mask, labels) if labels is not None else 0
        cache = self._prefix_cache(embeds[:1, :P]) if P else None
        hook = self._hook(visual, is_img)
        if visual is None and self.always_encode:
            hook = self._idle_hook(input_ids.device, hook)
        hidden = self.decoder.forward_hidden(inputs_embeds=embeds[:, P:], cache=cache, layer_hook=hook,
                                             attention_mask=None if attention_mask is None else attention_mask[:, P:])
        hidden = hidden[:, hidden.shape[1] - (input_ids.shape[1] - P):]  # drop the soft prompt's positions
        if labels is None:  # logits_to_keep: only the last positions' (scoring a known continuation)
            return {"logits": _wide(self.decoder.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))}
        return {"loss": self.loss(hidden, labels[:, P:])}

    def shared_prefix(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor) -> int:
        """How many leading positions a training forward computes once for the whole batch: with a frozen
        language model and spliced visual tokens, the tokens before the first image that every row shares
        (the system prompt and the chat header, a fifth of an easy-VQA sample) are the same constants in
        every row and every step; their keys and values come from one row, and nothing is backpropagated
        through them. 0 when the model or the batch does not allow it (trainable decoder parameters,
        a soft prompt, other injections, left padding)."""
        if (not self.share_prefix or self.cfg.style != "tokens" or self.prompt is not None or input_ids.shape[0] < 2
                or any(p.requires_grad for p in self.decoder.parameters())):
            return 0
        same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != self.image_token_id)
        if attention_mask is not None:
            same &= attention_mask.bool().all(0)
        quiet = (labels[:, 1:] == IGNORE_INDEX).all(0)  # no target predicted from positions 0 .. P-1
        return min(int(same.long().cumprod(0).sum()), int(quiet.long().cumprod(0).sum()))

    @torch.no_grad()
    def _prefix_cache(self, embeds: torch.Tensor) -> SharedPrefix:
        cache = self.decoder.new_cache(1, embeds.shape[1])
        self.decoder.forward_hidden(inputs_embeds=embeds, cache=cache)
        return SharedPrefix(cache.k, cache.v)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, the vocabulary projection only at the positions whose next token is
        a target: with answers of a few tokens after a long prompt and a 49k vocabulary, projecting
        every position was a quarter of a training step."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = _wide(self.decoder.lm_head(hidden[:, :-1][keep]))
        if not len(logits):  # every answer cut off by max_length: nothing to learn, not a NaN
            return logits.sum()
        return F.cross_entropy(logits, targets[keep])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], images: Optional[torch.Tensor],
                 cfg: GenerationConfig = GenerationConfig(), stop_fn=None) -> torch.Tensor:
        """New tokens (B, <= max_new_tokens) after left-padded prompts with their images (a tensor, or a list
        of images of several sizes as :meth:`encode_images` takes them)."""
        visual = self.encode_images(images, input_ids, attention_mask) if images is not None else None
        embeds, is_img = self._embed(input_ids, visual)
        embeds, is_img, attention_mask = self._with_prompt(embeds, is_img, attention_mask)
        ids = input_ids.new_zeros(embeds.shape[:2])  # only its shape and device are read
        return generate(self.decoder, ids, attention_mask, cfg, stop_fn, inputs_embeds=embeds,
                        layer_hook=self._hook(visual, is_img))

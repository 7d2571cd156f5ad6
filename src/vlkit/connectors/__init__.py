"""Connectors: visual tokens (B, N, C_v) -> tokens in the language model's space (B, K, C_l).

One family per file (``simple``, ``resampler``, ``qformer``, ``cabstractor``, ``clipcap``, ``idefics2``);
:class:`ConnectorConfig` picks one and :func:`build_connector` builds it for given widths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from vlkit.config import ConfigError
from vlkit.connectors.cabstractor import CAbstractor
from vlkit.connectors.clipcap import ClipCapMapper
from vlkit.connectors.idefics2 import Idefics2Connector
from vlkit.connectors.qformer import QFormer
from vlkit.connectors.resampler import PerceiverResampler
from vlkit.connectors.simple import AvgPoolConnector, IdentityConnector, LinearConnector, MlpConnector, \
    PixelShuffleConnector

KINDS = ("identity", "linear", "mlp", "avgpool", "pixel_shuffle", "resampler", "qformer", "cabstractor", "clipcap",
         "idefics2")


@dataclass
class ConnectorConfig:
    """Which connector, and its sizes (fields not used by a kind are ignored)."""

    kind: Literal["identity", "linear", "mlp", "avgpool", "pixel_shuffle", "resampler", "qformer",
                  "cabstractor", "clipcap", "idefics2"] = "mlp"
    num_tokens: int = 64  # K output tokens: all but identity, linear, mlp, pixel_shuffle (a square for grids)
    depth: int = 2  # resampler / Q-Former / idefics2 layers; C-Abstractor blocks per stage; clipcap: 0 = MLP mapper
    num_heads: int = 8  # resampler / Q-Former / idefics2 attention heads
    width: int = 0  # internal width of resampler / Q-Former / C-Abstractor (0 = the vision width); idefics2: the
    # modality projection's inner width (0 = the language model's intermediate size)
    kv_heads: int = 0  # idefics2: key/value heads shared by groups of query heads (0 = num_heads)
    head_dim: int = 0  # idefics2: width of a head (0 = the language model's width / num_heads)
    mlp_ratio: float = 4.0
    scale: int = 2  # pixel_shuffle: r x r tokens -> 1
    max_frames: int = 1  # resampler: learned temporal embeddings
    cross_attention_every: int = 1  # Q-Former: cross-attention in every n-th layer (BLIP-2: 2)
    instruction: bool = False  # Q-Former: InstructBLIP's instruction-aware queries (read the prompt's text)

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ConfigError("num_tokens", f"must be >= 1, got {self.num_tokens}")
        if self.instruction and self.kind != "qformer":
            raise ConfigError("instruction", f"only the qformer connector reads the instruction, not {self.kind!r}")


def build_connector(cfg: ConnectorConfig, in_dim: int, out_dim: int, lm_intermediate: int = 0) -> nn.Module:
    """``in_dim``: the visual tokens' width; ``out_dim``: the language model's; ``lm_intermediate``: its
    feed-forward width (idefics2's default projection width; 0 = 4 x ``out_dim``)."""
    k = cfg.kind
    if k == "identity":
        return IdentityConnector(in_dim, out_dim)
    if k == "linear":
        return LinearConnector(in_dim, out_dim)
    if k == "mlp":
        return MlpConnector(in_dim, out_dim)
    if k == "avgpool":
        return AvgPoolConnector(in_dim, out_dim, cfg.num_tokens)
    if k == "pixel_shuffle":
        return PixelShuffleConnector(in_dim, out_dim, cfg.scale)
    if k == "resampler":
        return PerceiverResampler(in_dim, out_dim, cfg.num_tokens, cfg.depth, cfg.num_heads, cfg.width,
                                  cfg.mlp_ratio, cfg.max_frames)
    if k == "qformer":
        return QFormer(in_dim, out_dim, cfg.num_tokens, cfg.depth, cfg.num_heads, cfg.width, cfg.mlp_ratio,
                       cfg.cross_attention_every, cfg.instruction)
    if k == "cabstractor":
        return CAbstractor(in_dim, out_dim, cfg.num_tokens, cfg.depth, cfg.width)
    if k == "clipcap":
        return ClipCapMapper(in_dim, out_dim, cfg.num_tokens, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
    if k == "idefics2":
        return Idefics2Connector(in_dim, out_dim, cfg.width or lm_intermediate or 4 * out_dim, cfg.num_tokens,
                                 cfg.depth, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_ratio)
    raise ConfigError("kind", f"unknown connector {k!r}; known: {', '.join(KINDS)}")

"""Connectors: output shapes, every parameter trained, the exact token arithmetic of pooling and pixel shuffle."""
import pytest
import torch

from vlkit.config import ConfigError
from vlkit.connectors import KINDS, ConnectorConfig, build_connector


@pytest.mark.parametrize("kind", KINDS)
def test_every_connector_maps_tokens_and_trains_all_parameters(kind):
    torch.manual_seed(0)
    in_dim = 24 if kind != "identity" else 40
    cfg = ConnectorConfig(kind=kind, num_tokens=4, depth=2, num_heads=4, width=16 if kind != "cabstractor" else 0)
    conn = build_connector(cfg, in_dim, 40)
    x = torch.randn(3, 16, in_dim, requires_grad=True)  # a 4 x 4 grid of visual tokens
    out = conn(x)
    expected = {"identity": 16, "linear": 16, "mlp": 16, "pixel_shuffle": 4}.get(kind, 4)
    assert out.shape == (3, expected, 40)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if kind == "identity":
        return
    torch.optim.SGD(conn.parameters(), lr=0.1).step()  # zero-initialised gates (C-Abstractor) open after a step
    conn.zero_grad()
    conn(x).square().mean().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind}: no gradient reaches {name}"


def test_avgpool_on_the_grid_averages_blocks():
    conn = build_connector(ConnectorConfig(kind="avgpool", num_tokens=4), 2, 2)
    conn.mlp = torch.nn.Identity()
    x = torch.arange(16 * 2, dtype=torch.float32).reshape(1, 16, 2)  # grid 4 x 4, row-major
    out = conn(x)
    grid = x.reshape(4, 4, 2)
    assert torch.allclose(out[0, 0], grid[:2, :2].reshape(-1, 2).mean(0))
    assert torch.allclose(out[0, 3], grid[2:, 2:].reshape(-1, 2).mean(0))
    assert conn(torch.randn(1, 10, 2)).shape == (1, 4, 2)  # not a square: 1D pooling


def test_pixel_shuffle_groups_each_block_of_tokens():
    conn = build_connector(ConnectorConfig(kind="pixel_shuffle", scale=2), 3, 12)
    conn.mlp = torch.nn.Identity()
    x = torch.randn(2, 16, 3)
    out = conn(x)  # (2, 4, 12)
    grid = x.reshape(2, 4, 4, 3)
    assert torch.equal(out[:, 1], grid[:, 0:2, 2:4].reshape(2, 12))  # top-right block, row-major inside
    with pytest.raises(ValueError, match="square grid"):
        conn(torch.randn(1, 15, 3))


def test_resampler_gives_k_tokens_for_any_input_and_frames():
    conn = build_connector(ConnectorConfig(kind="resampler", num_tokens=5, max_frames=3, num_heads=2), 8, 6)
    assert conn(torch.randn(2, 7, 8)).shape == (2, 5, 6)
    assert conn(torch.randn(2, 3, 9, 8)).shape == (2, 5, 6)  # 3 frames of 9 tokens
    with pytest.raises(ValueError, match="max_frames"):
        conn(torch.randn(2, 4, 9, 8))


def test_qformer_cross_attention_every_other_layer_and_config_errors():
    conn = build_connector(ConnectorConfig(kind="qformer", num_tokens=3, depth=4, num_heads=2,
                                           cross_attention_every=2), 8, 6)
    assert [layer.cross_attn is not None for layer in conn.layers] == [True, False, True, False]
    with pytest.raises(ValueError, match="identity connector"):
        build_connector(ConnectorConfig(kind="identity"), 8, 6)
    with pytest.raises(ConfigError, match="num_tokens"):
        ConnectorConfig(num_tokens=0)


def test_clipcap_maps_one_global_embedding_to_a_prefix():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 24)
    for depth in (0, 1):  # MLP mapper, transformer mapper with learned constants
        conn = build_connector(ConnectorConfig(kind="clipcap", num_tokens=5, depth=depth, num_heads=4), 24, 40)
        out = conn(x)
        assert out.shape == (2, 5, 40)
        shuffled = x[:, torch.randperm(16)]  # only the global (average) embedding matters
        assert torch.allclose(conn(shuffled), out, atol=1e-5)
        assert not torch.allclose(out[:, 0], out[:, 1])  # K different prefix tokens
    with pytest.raises(ValueError, match="divisible"):
        build_connector(ConnectorConfig(kind="clipcap", depth=1, num_heads=3), 24, 40)


def _hf_idefics2_connector(in_dim, hidden, intermediate, latents, depth, heads, kv_heads, head_dim):
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector as HFConnector
    cfg = Idefics2Config(
        vision_config={"hidden_size": in_dim, "intermediate_size": 2 * in_dim, "num_hidden_layers": 1,
                       "num_attention_heads": 2},
        text_config={"model_type": "mistral", "hidden_size": hidden, "intermediate_size": intermediate,
                     "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                     "hidden_act": "silu"},
        perceiver_config={"hidden_size": hidden, "resampler_n_latents": latents, "resampler_depth": depth,
                          "resampler_n_heads": heads, "num_key_value_heads": kv_heads, "resampler_head_dim": head_dim,
                          "rms_norm_eps": 1e-6})
    cfg.perceiver_config._attn_implementation = "eager"
    return HFConnector(cfg).eval()


def test_idefics2_connector_equals_transformers_with_the_same_weights():
    """Modality projection + GQA Perceiver resampler = transformers' Idefics2Connector, padded visual tokens too."""
    from vlkit.connectors.idefics2 import idefics2_state_from_hf
    torch.manual_seed(0)
    hf = _hf_idefics2_connector(24, 32, 48, latents=5, depth=2, heads=4, kv_heads=2, head_dim=12)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)  # latents and norms off their constant initialisation
    cfg = ConnectorConfig(kind="idefics2", num_tokens=5, depth=2, num_heads=4, kv_heads=2, head_dim=12)
    ours = build_connector(cfg, 24, 32, lm_intermediate=48).eval()
    missing, unexpected = ours.load_state_dict(idefics2_state_from_hf(hf.state_dict()), strict=True)
    assert not missing and not unexpected
    x = torch.randn(3, 10, 24)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # an image with 4 padding patches
    with torch.no_grad():
        expected = hf(x, attention_mask=mask)
        got = ours(x, mask)
        assert got.shape == (3, 5, 32)
        assert (got - expected).abs().max() < 1e-5
        assert not torch.allclose(got[1], ours(x)[1], atol=1e-3)  # the mask matters
        assert torch.allclose(got[0], ours(x)[0], atol=1e-6)  # and only where there is padding


def test_idefics2_connector_rejects_heads_not_grouping():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        build_connector(ConnectorConfig(kind="idefics2", num_heads=4, kv_heads=3), 8, 16)

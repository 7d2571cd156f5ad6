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

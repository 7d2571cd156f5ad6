"""Building blocks: attention (SDPA == manual, masks, cross/class attention), Linear, Mlp,
LayerScale, DropPath, patch/hybrid embedding, position embeddings."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn import layers
from vlkit.nn.attention import Attention, ClassAttention, causal_mask
from vlkit.nn.layers import DropPath, LayerScale, Linear, drop_path, linear
from vlkit.nn.mlp import Mlp
from vlkit.nn.patch_embed import HybridEmbed, PatchEmbed
from vlkit.nn.pos_embed import resample_pos_embed, sincos_2d_pos_embed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def both_paths(attn, x, **kw):
    fast = attn(x, **kw)
    slow, weights = attn(x, return_attn=True, **kw)
    return fast, slow, weights


def test_self_attention_sdpa_matches_manual():
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 7, 32)
    fast, slow, weights = both_paths(attn, x)
    assert fast.shape == (2, 7, 32) and weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


def test_attention_matches_reference_formula():
    """softmax(q k^T / sqrt(d)) v with q, k, v the three row blocks of the fused qkv projection."""
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(1, 5, 16)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(16, dim=-1)
    heads = [torch.softmax(q[..., h * 8:(h + 1) * 8] @ k[..., h * 8:(h + 1) * 8].transpose(1, 2) / math.sqrt(8), -1)
             @ v[..., h * 8:(h + 1) * 8] for h in range(2)]
    ref = F.linear(torch.cat(heads, -1), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_causal_and_mask_paths_agree():
    attn = Attention(32, num_heads=4, causal=True).eval()
    x = torch.randn(2, 6, 32)
    fast, slow, weights = both_paths(attn, x)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert torch.all(weights.triu(1) == 0)
    # a later token never changes an earlier output
    y = attn(torch.cat([x[:, :4], torch.randn(2, 2, 32)], 1))
    torch.testing.assert_close(y[:, :4], fast[:, :4], atol=1e-6, rtol=0)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[1, ..., 4:] = False  # sample 1 has two padded keys
    fast, slow, weights = both_paths(attn, x, mask=pad)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert torch.all(weights[1, :, :, 4:] == 0)
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_cross_and_class_attention():
    cross = Attention(32, num_heads=4, kv_dim=24).eval()
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 9, 24)
    fast, slow, weights = both_paths(cross, x, context=ctx)
    assert fast.shape == (2, 3, 32) and weights.shape == (2, 4, 3, 9)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="context"):
        cross(x)
    with pytest.raises(ValueError, match="cross-attention"):
        Attention(32, num_heads=4)(x, context=ctx)
    ca = ClassAttention(32, num_heads=4).eval()
    tokens = torch.randn(2, 10, 32)
    out, w = ca(tokens, return_attn=True)
    assert out.shape == (2, 1, 32) and w.shape == (2, 4, 1, 10)
    torch.testing.assert_close(out, ca(tokens[:, :1], context=tokens), atol=1e-6, rtol=0)
    torch.testing.assert_close(ca(tokens), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 5, 63])
def test_linear_with_few_rows_matches_torch_forward_and_backward(rows):
    lin, ref = Linear(12, 20), nn.Linear(12, 20)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(1, rows, 12, requires_grad=True)  # decoding / speculative verification shapes
    xr = x.detach().clone().requires_grad_(True)
    y, yr = lin(x), ref(xr)
    assert y.shape == (1, rows, 20)
    assert y.is_contiguous()  # a transposed result would send attention to SDPA's slow math kernel
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    y.backward(torch.ones_like(y))
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("onednn_weight_grad", [True, False])  # dW by oneDNN (AVX-512 CPUs) or by MKL
def test_linear_matches_torch_forward_and_backward(onednn_weight_grad, monkeypatch):
    monkeypatch.setattr(layers, "ONEDNN_WEIGHT_GRAD", onednn_weight_grad)
    calls, real = [], layers._onednn_mm
    monkeypatch.setattr(layers, "_onednn_mm", lambda *a: calls.append(1) or real(*a))
    lin = Linear(12, 20)
    x = torch.randn(4, 20, 12, requires_grad=True)  # 80 rows >= ONEDNN_MIN_ROWS
    ref = nn.Linear(12, 20)
    ref.load_state_dict(lin.state_dict())
    xr = x.detach().clone().requires_grad_(True)
    y, yr = lin(x), ref(xr)
    if layers.ONEDNN_LINEAR:
        assert "OneDNN" in type(y.grad_fn).__name__
        assert "OneDNN" not in type(lin(x[:1, :3]).grad_fn).__name__  # a few rows (decoding): (W @ x^T)^T
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    calls.clear()
    y.backward(g)
    yr.backward(g)
    if layers.ONEDNN_LINEAR:  # dx always by oneDNN, dW by oneDNN or MKL as chosen
        assert len(calls) == (2 if onednn_weight_grad else 1)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)
    assert lin.weight.grad.is_contiguous()
    # strided input, no bias, float64 (plain F.linear path)
    xs = torch.randn(12, 4).t()
    torch.testing.assert_close(linear(xs, lin.weight), xs @ lin.weight.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(xs.double(), lin.weight.double()), xs.double() @ lin.weight.double().t())


@pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="oneDNN linear unavailable")
@pytest.mark.parametrize("loss", ["sum", "transposed"])
def test_linear_backward_gives_onednn_dense_gradients(loss, monkeypatch):
    """``y.sum()`` sends back a stride-0 gradient, a loss on ``y.transpose`` a transposed one: the
    backward copies them dense first (oneDNN's dW GEMM is ~1000x slower on a stride-0 operand)."""
    operands = []
    real = layers._onednn_mm

    def spy(x, weight, bias):
        operands.append((x, weight))
        return real(x, weight, bias)

    monkeypatch.setattr(layers, "_onednn_mm", spy)
    monkeypatch.setattr(layers, "ONEDNN_WEIGHT_GRAD", True)  # as on AVX-512 CPUs
    lin, ref = Linear(12, 20), nn.Linear(12, 20)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(80, 12, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    m = torch.randn(20, 80)
    for model, inp in ((lin, x), (ref, xr)):
        y = model(inp)
        (y.sum() if loss == "sum" else (y.t() * m).sum()).backward()
    assert len(operands) == 3  # forward, dx = dy W, dW = (x^T dy)^T
    (dy, _), (_, dy_t) = operands[1], operands[2]
    assert dy.is_contiguous() and dy_t.t().is_contiguous()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)


def test_mlp_shapes_and_activation():
    mlp = Mlp(8, 32, act_layer=nn.ReLU)
    assert mlp(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert isinstance(Mlp(8).act, nn.GELU) and Mlp(8).act.approximate == "none"
    assert Mlp(8, 16, out_features=4).fc2.out_features == 4


def test_layer_scale():
    ls = LayerScale(6, init_values=1e-3)
    assert torch.all(ls.gamma == 1e-3)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(ls(x), x * 1e-3)


def test_drop_path_identity_in_eval_and_per_sample_in_train():
    dp = DropPath(0.5)
    x = torch.randn(64, 4, 8) + 3
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert torch.all(kept | dropped), "a sample is either kept whole or dropped whole"
    assert 10 < int(dropped.sum()) < 54
    torch.testing.assert_close(y[kept], x[kept] * 2)  # kept samples scaled by 1 / keep
    assert torch.equal(drop_path(x, 0.0, training=True), x)


def test_patch_embed():
    pe = PatchEmbed(patch_size=4, in_chans=3, embed_dim=16)
    assert pe(torch.randn(2, 3, 16, 12)).shape == (2, 4, 3, 16)
    assert pe.grid_size((16, 12)) == (4, 3)
    assert torch.all(pe.proj.bias == 0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        pe(torch.randn(1, 3, 15, 16))


class TinyConvNet(nn.Module):
    """A stand-in convnet: forward_features(images) -> (B, 8, H / 4, W / 4)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward_features(self, images):
        return self.conv2(torch.relu(self.conv1(images)))


def test_hybrid_embed():
    he = HybridEmbed(TinyConvNet(), None, embed_dim=16, img_size=32)
    assert he.feature_dim == 8 and he.grid_size((32, 32)) == (8, 8)
    assert he(torch.randn(2, 3, 32, 24)).shape == (2, 8, 6, 16)
    with pytest.raises(TypeError, match="forward_features"):
        HybridEmbed(nn.Conv2d(3, 8, 3), 8, 16)


def test_sincos_2d_pos_embed():
    pe = sincos_2d_pos_embed(16, (3, 5), num_prefix_tokens=1)
    assert pe.shape == (1, 16, 16)
    assert torch.all(pe[0, 0] == 0)
    grid = pe[0, 1:].reshape(3, 5, 16)
    # first half encodes the column: constant down a column, and sin(0) = 0, cos(0) = 1 at x = 0
    torch.testing.assert_close(grid[:, 2, :8], grid[:1, 2, :8].expand(3, 8))
    torch.testing.assert_close(grid[:, :, 8:], grid[:, :1, 8:].expand(3, 5, 8))
    assert torch.all(grid[0, 0, :4] == 0) and torch.all(grid[0, 0, 4:8] == 1)
    torch.testing.assert_close(grid[0, 1, 0], torch.tensor(math.sin(1.0)))
    torch.testing.assert_close(grid[2, 0, 12], torch.tensor(math.cos(2.0)))
    assert len({tuple(r.tolist()) for r in pe[0, 1:]}) == 15, "every position is distinct"


def test_resample_pos_embed():
    pe = torch.randn(1, 2 + 16, 8)
    assert resample_pos_embed(pe, (4, 4), num_prefix_tokens=2) is pe
    out = resample_pos_embed(pe, (6, 3), (4, 4), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 18, 8)
    assert torch.equal(out[:, :2], pe[:, :2])
    ref = F.interpolate(pe[:, 2:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 3), mode="bicubic",
                        align_corners=False)
    torch.testing.assert_close(out[:, 2:], ref.permute(0, 2, 3, 1).reshape(1, 18, 8))
    # a constant embedding stays constant
    const = torch.ones(1, 1 + 9, 4)
    torch.testing.assert_close(resample_pos_embed(const, (5, 5), num_prefix_tokens=1), torch.ones(1, 26, 4))


def test_bucket_pos_embed_spreads_a_small_grid_over_the_learned_one():
    from vlkit.nn.pos_embed import bucket_pos_embed

    pos = torch.arange(1 + 16, dtype=torch.float32).view(1, 17, 1)  # a prefix row, then a 4 x 4 grid
    assert bucket_pos_embed(pos, (4, 4), num_prefix_tokens=1) is pos
    got = bucket_pos_embed(pos, (2, 3), num_prefix_tokens=1).flatten().tolist()
    # rows at 0 and 1/2 -> cells 0, 2; columns at 0, 1/3, 2/3 -> cells 0, 1, 2
    assert got == [0, 1 + 0, 1 + 1, 1 + 2, 1 + 8, 1 + 9, 1 + 10]

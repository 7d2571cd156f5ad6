"""VLM = vision encoder + connector + language model, four injection styles: splicing at placeholders,
Flamingo gated cross-attention (= the bare LM at init, per-image media masking), eP-ALM injection,
LLaMA-Adapter's zero-init attention to adaption prompts (= the bare LM at init; the paper's formula);
KV-cached generation equals step-by-step full forwards in every style."""
import pytest
import torch
import torch.nn.functional as F

from vlkit.config import ConfigError
from vlkit.connectors import ConnectorConfig, build_connector
from vlkit.decoders.causal_lm import CausalLM, DecoderConfig
from vlkit.decoders.generate import GenerationConfig
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.models.peft import TuningConfig
from vlkit.models.vlm import VLM, InjectionConfig

IMG = 99  # placeholder id (outside the tiny vocabulary: never embedded as a token)


def make_vlm(style="tokens", features="last", connector="avgpool", **kw) -> VLM:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=4, num_classes=0, embed_dim=24, depth=3, num_heads=2))
    dec = CausalLM(DecoderConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                 intermediate_size=48, eos_token_id=None))
    cfg = InjectionConfig(style=style, features=features, cross_attention_heads=2, **kw)
    in_dim = 24 * cfg.num_layers if features == "last_n" else 24
    conn = build_connector(ConnectorConfig(kind=connector, num_tokens=4), in_dim, 32)
    return VLM(vit, conn, dec, cfg, image_token_id=IMG, num_visual_tokens=4).eval()


def prompt(model: VLM, images_per_row=(2, 1)):
    per = model.placeholders_per_image()
    rows = []
    for n in images_per_row:
        row = [5, 6]
        for _ in range(n):
            row += [IMG] * per + [7, 8]
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask, torch.randn(sum(images_per_row), 3, 16, 16)


def test_spliced_tokens_land_on_the_placeholders_in_order():
    model = make_vlm("tokens")
    ids, mask, images = prompt(model)
    visual = model.encode_images(images)  # (3, 4, 32)
    embeds = model.decoder.embed_tokens(ids.masked_fill(ids == IMG, 0))
    for row, image in ((0, 0), (0, 1), (1, 2)):
        pos = (ids[row] == IMG).nonzero()[:, 0]
        pos = pos[4 * (image - (2 if row else 0)):][:4]
        embeds[row, pos] = visual[image]
    ref = model.decoder(inputs_embeds=embeds, attention_mask=mask)
    assert torch.allclose(model(ids, mask, images)["logits"], ref, atol=1e-6)
    with pytest.raises(ValueError, match="placeholders"):
        model(ids, mask, images[:2])


def test_flamingo_equals_the_language_model_at_init_and_masks_media():
    model = make_vlm("cross_attention", connector="resampler")
    ids, mask, images = prompt(model)
    out = model(ids, mask, images)["logits"]
    embeds, _ = model._embed(ids, model.encode_images(images))
    assert torch.equal(out, model.decoder(inputs_embeds=embeds, attention_mask=mask))  # tanh(0) gates
    for block in model.xattn.values():
        torch.nn.init.constant_(block.attn_gate, 1.0)
        torch.nn.init.constant_(block.ff_gate, 1.0)
    base = model(ids, mask, images)["logits"]
    changed = images.clone()
    changed[1] = torch.randn(3, 16, 16)  # the second image of row 0
    after = model(ids, mask, changed)["logits"]
    second = (ids[0] == IMG).nonzero()[1, 0].item()
    assert torch.allclose(after[0, :second], base[0, :second], atol=1e-6)  # tokens before image 2 do not see it
    assert not torch.allclose(after[0, second:], base[0, second:], atol=1e-4)
    assert torch.allclose(after[1], base[1], atol=1e-6)  # the other sample is untouched


def test_ep_alm_injects_class_tokens_of_the_last_layers():
    model = make_vlm("inject", features="cls_last_n", connector="linear", num_layers=2)
    assert model.inject_layers == (2, 3) and model.features(torch.randn(1, 3, 16, 16)).shape == (1, 2, 24)
    ids, mask, images = prompt(model, (1, 1))
    base = model(ids, mask, images)["logits"]
    other = model(ids, mask, torch.randn_like(images))["logits"]
    slot = (ids[0] == IMG).nonzero()[0, 0].item()
    assert torch.allclose(other[0, :slot], base[0, :slot], atol=1e-6)
    assert not torch.allclose(other[0, slot:], base[0, slot:], atol=1e-4)


def test_llama_adapter_equals_the_language_model_at_init_and_reads_the_image():
    model = make_vlm("adapter", features="pooled", connector="mlp", adapter_layers=2, adapter_prompts=3)
    assert sorted(model.adapter) == ["2", "3"] and model.placeholders_per_image() == 1
    ids, mask, images = prompt(model, (1, 1))
    out = model(ids, mask, images)["logits"]
    embeds, _ = model._embed(ids, model.encode_images(images))
    assert torch.equal(out, model.decoder(inputs_embeds=embeds, attention_mask=mask))  # tanh(0) gates
    for adapter in model.adapter.values():
        torch.nn.init.constant_(adapter.gate, 1.0)
    base = model(ids, mask, images)["logits"]
    changed = images.clone()
    changed[0] = torch.randn(3, 16, 16)
    after = model(ids, mask, changed)["logits"]
    start = int((mask[0] == 0).sum())
    assert not torch.allclose(after[0, start:], base[0, start:], atol=1e-4)  # every token reads the prompts
    assert torch.allclose(after[1], base[1], atol=1e-6)  # the other sample is untouched
    with pytest.raises(ValueError, match="one image per sample"):
        model(*prompt(model, (2, 1)))
    ids, mask, images = prompt(model, (1, 0))  # a text-only row reads the prompts alone, in any batch
    alone = model(ids[1:, -4:], mask[1:, -4:])["logits"]
    assert torch.allclose(model(ids, mask, images[:1])["logits"][1, -4:], alone[0], atol=1e-5)
    assert not torch.allclose(alone, model.decoder(ids[1:, -4:], mask[1:, -4:]), atol=1e-4)


def test_adaption_prompts_are_the_papers_gated_attention_over_prompts_and_words():
    """attention + AdaptionPrompt == one attention over [prompts; words] with the scores
    [tanh(g) softmax(S_prompts); softmax(S_words)] (LLaMA-Adapter eq. 8-9), prompts without rotary position."""
    from vlkit.models.vlm import AdaptionPrompt
    from vlkit.nn.rope import apply_rope

    dec = make_vlm("adapter").decoder
    attn, B, T, K, H, D = dec.blocks[1].attn, 2, 5, 3, 4, 8
    adapter = AdaptionPrompt(32, K, H, init_std=1.0)  # prompts far apart: their scores differ by query
    torch.nn.init.normal_(adapter.gate)
    h, visual = torch.randn(B, T, 32), torch.randn(B, 1, 32)
    positions = torch.arange(T)[None].expand(B, -1)
    rope = dec.rope(positions)
    got = attn(h, rope, None, True) + adapter(attn, h, rope, adapter.keys_values(attn, visual))
    q, k, v = attn.qkv(h).split([H * D, 2 * D, 2 * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    _, kp, vp = attn.qkv(adapter.prompts + visual).split([H * D, 2 * D, 2 * D], dim=-1)
    kp, vp = (t.view(B, K, -1, D).transpose(1, 2) for t in (kp, vp))
    k, v, kp, vp = (t.repeat_interleave(2, dim=1) for t in (k, v, kp, vp))  # 2 query heads per key head
    words = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    scores = torch.cat([torch.tanh(adapter.gate)[:, None, None] * (q @ kp.transpose(-1, -2) / D ** 0.5).softmax(-1),
                        words.softmax(-1)], dim=-1)  # (B, H, T, K + T)
    want = attn.proj((scores @ torch.cat([vp, v], dim=2)).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style,features,connector", [("tokens", "last", "qformer"),
                                                      ("tokens", "last_n", "mlp"),
                                                      ("cross_attention", "last", "resampler"),
                                                      ("inject", "cls_last_n", "linear"),
                                                      ("adapter", "pooled", "mlp")])
def test_cached_generation_equals_full_forwards(style, features, connector):
    model = make_vlm(style, features, connector, num_layers=2 if features not in ("last", "pooled") else 1)
    for block in model.xattn.values():
        torch.nn.init.constant_(block.attn_gate, 0.5)
    for adapter in model.adapter.values():
        torch.nn.init.constant_(adapter.gate, 0.5)
    ids, mask, images = prompt(model, (1, 1))
    new = model.generate(ids, mask, images, GenerationConfig(max_new_tokens=5))
    seq, m = ids, mask
    for t in range(5):  # greedy by full forwards
        nxt = model(seq, m, images)["logits"][:, -1].argmax(-1)
        assert torch.equal(nxt, new[:, t])
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    beams = model.generate(ids, mask, images, GenerationConfig(max_new_tokens=3, num_beams=2))
    assert beams.shape[0] == 2


def test_loss_only_on_labelled_tokens():
    model = make_vlm("tokens")
    ids, mask, images = prompt(model, (1, 1))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    out = model(ids, mask, images, labels)
    logits = model(ids, mask, images)["logits"]
    logp = logits[:, -3:-1].log_softmax(-1)
    ref = -logp.gather(-1, ids[:, -2:, None]).mean()
    assert set(out) == {"loss"} and torch.allclose(out["loss"], ref, atol=1e-6)
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(out["loss"], full, atol=1e-6)  # the same as projecting every position
    nothing = model(ids, mask, images, torch.full_like(ids, -100))["loss"]  # answers cut off by max_length
    nothing.backward()
    assert float(nothing) == 0.0


@pytest.mark.parametrize("vision,connector,decoder,prompt", [("frozen", "full", "frozen", 0),
                                                             ("bias_norm", "full", "lora", 0),
                                                             ("frozen", "frozen", "frozen", 3),
                                                             ("lora", "full", "full", 0)])
def test_gradients_reach_exactly_the_trainable_parameters(vision, connector, decoder, prompt):

    torch.manual_seed(0)
    base = make_vlm("cross_attention", connector="resampler")
    model = VLM(base.features.encoder, base.connector, base.decoder, base.cfg, IMG, 4, prompt_tokens=prompt)
    counts = model.apply_tuning(TuningConfig(vision=vision, connector=connector, decoder=decoder))
    for block in model.xattn.values():  # open the gates so every path carries gradient
        torch.nn.init.constant_(block.attn_gate, 0.5)
        torch.nn.init.constant_(block.ff_gate, 0.5)
    trainable, got = trainable_and_reached(model)
    assert got == trainable and counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if decoder == "lora":
        assert trainable & {n for n, _ in model.decoder.named_parameters(prefix="decoder")} == \
            {n for n in trainable if n.startswith("decoder.") and ".lora_" in n}
    if vision == "bias_norm":
        vis = {n for n in trainable if n.startswith("features.")}
        assert vis and all(n.endswith("bias") or "norm" in n for n in vis)
    if prompt:
        assert trainable == {"prompt"}


@pytest.mark.parametrize("decoder", ["frozen", "lora"])
def test_llama_adapter_trains_its_prompts_gates_and_projection_only(decoder):
    model = make_vlm("adapter", features="pooled", connector="mlp", adapter_layers=2, adapter_prompts=3)
    counts = model.apply_tuning(TuningConfig(vision="frozen", connector="full", decoder=decoder))
    for adapter in model.adapter.values():  # open the gates: at 0 only they receive gradient
        torch.nn.init.constant_(adapter.gate, 0.5)
    trainable, got = trainable_and_reached(model)
    assert got == trainable and counts["adapter"] == 2 * (3 * 32 + 4)
    assert {n for n in trainable if not n.startswith(("connector.", "decoder."))} == \
        {"media_embed", *(f"adapter.{i}.{p}" for i in (2, 3) for p in ("prompts", "gate"))}


def trainable_and_reached(model: VLM) -> tuple[set, set]:
    """(names of trainable parameters, names a training step's gradient reaches), LoRA's B (zero at init)
    set random first."""
    for m in model.modules():
        if hasattr(m, "lora_b"):
            torch.nn.init.normal_(m.lora_b, std=0.1)
    ids, mask, images = prompt_inputs(model)
    model.train()
    model(ids, mask, images, labels=ids.masked_fill(ids == IMG, -100))["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return trainable, {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def prompt_inputs(model):
    return prompt(model, (1, 1))


def test_lora_merge_keeps_outputs():
    from vlkit.nn.lora import apply_lora, merge_lora

    model = make_vlm("tokens")
    names = apply_lora(model.decoder, r"attn\.(qkv|proj)$", rank=4)
    assert len(names) == 8
    for m in model.modules():
        if hasattr(m, "lora_b"):
            torch.nn.init.normal_(m.lora_b, std=0.1)
    ids, mask, images = prompt(model, (1, 1))
    before = model(ids, mask, images)["logits"]
    assert merge_lora(model) == 8
    assert torch.allclose(model(ids, mask, images)["logits"], before, atol=1e-5)
    with pytest.raises(ValueError, match="match no Linear"):
        apply_lora(model.decoder, "nothing_here")


def test_convnet_features_last_n_pools_stages_to_the_final_grid():
    """A convnet's last_n: its n last stage outputs, each averaged onto the final map's grid, then
    concatenated along channels (the earlier stages keep colour the head discards); pooled is one token."""
    from vlkit.encoders.convnet import EfficientNetLite, EfficientNetLiteConfig
    from vlkit.models.vlm import VisualFeatures

    torch.manual_seed(0)
    stages = ((1, 3, 1, 1, 8), (1, 3, 2, 2, 16), (1, 3, 2, 2, 24))
    net = EfficientNetLite(EfficientNetLiteConfig(stages=stages, head_chs=20, num_classes=0)).eval()
    images = torch.rand(2, 3, 32, 32)
    feats = VisualFeatures(net, InjectionConfig(features="last_n", num_layers=2))
    assert feats.dim == 16 + 24
    out = feats(images)
    assert out.shape == (2, 4 * 4, 40)  # final grid 32 / 8 = 4
    mid, last = net.forward_intermediates(images, 2)  # (2, 16, 8, 8), (2, 24, 4, 4)
    expected_mid = mid.reshape(2, 16, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 averages
    torch.testing.assert_close(out[:, :, :16], expected_mid.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out[:, :, 16:], last.flatten(2).transpose(1, 2))
    pooled = VisualFeatures(net, InjectionConfig(features="pooled"))
    assert pooled.dim == 20 and pooled(images).shape == (2, 1, 20)
    torch.testing.assert_close(pooled(images)[:, 0], net.forward_features(images).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="num_layers must be in 1..3"):
        VisualFeatures(net, InjectionConfig(features="last_n", num_layers=4))
    with pytest.raises(ValueError, match="class token"):
        VisualFeatures(net, InjectionConfig(features="cls_last_n", num_layers=1))


def test_frozen_parts_stay_in_eval_mode_while_training():
    """A frozen convnet's BatchNorm statistics must not drift (the saved run omits them), and a frozen
    decoder runs without dropout; the trained parts do switch to train mode."""
    from vlkit.encoders.convnet import EfficientNetLite, EfficientNetLiteConfig

    torch.manual_seed(0)
    net = EfficientNetLite(EfficientNetLiteConfig(stages=((1, 3, 1, 1, 8), (1, 3, 2, 2, 16)), head_chs=24,
                                                  num_classes=0))
    dec = CausalLM(DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=48, eos_token_id=None))
    model = VLM(net, build_connector(ConnectorConfig(kind="mlp"), 24, 32), dec, InjectionConfig(), IMG, 4)
    model.apply_tuning(TuningConfig(vision="frozen", connector="full", decoder="frozen"))
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    model.train()
    assert model.training and model.connector.training
    assert not net.training and not model.decoder.training and not any(m.training for m in net.modules())
    ids = torch.tensor([[5] + [IMG] * 4 + [6, 7]] * 2)
    out = model(ids, images=torch.rand(2, 3, 32, 32) * 4, labels=ids.masked_fill(ids == IMG, -100))
    out["loss"].backward()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in stats.items())
    assert all(p.grad is not None for p in model.connector.parameters())
    model.apply_tuning(TuningConfig(vision="full", connector="full", decoder="frozen"))
    assert model.train().features.training


def test_instruction_aware_qformer_reads_the_prompt_but_never_the_answer():
    """InstructBLIP: the visual tokens depend on the question; the target tokens (labels != -100),
    padding and placeholders are not read, so a training forward sees what generation sees."""
    torch.manual_seed(0)
    model = make_vlm(connector="qformer")
    model.connector = build_connector(ConnectorConfig(kind="qformer", num_tokens=4, width=16, num_heads=2,
                                                      instruction=True), 24, 32)
    images = torch.randn(1, 3, 16, 16)
    prompt = [5] + [IMG] * 4 + [6, 7]
    answer_a, answer_b = prompt + [10, 11], prompt + [20, 21]
    labels = lambda ids: torch.tensor([[-100] * len(prompt) + ids[len(prompt):]])  # noqa: E731
    va = model.encode_images(images, torch.tensor([answer_a]), None, labels(answer_a))
    vb = model.encode_images(images, torch.tensor([answer_b]), None, labels(answer_b))
    vp = model.encode_images(images, torch.tensor([prompt]))
    torch.testing.assert_close(va, vb)
    torch.testing.assert_close(va, vp)
    padded = model.encode_images(images, torch.tensor([[0, 0] + prompt]), torch.tensor([[0, 0] + [1] * len(prompt)]))
    torch.testing.assert_close(padded, vp)
    other = model.encode_images(images, torch.tensor([[9] + [IMG] * 4 + [6, 7]]))
    assert (other - vp).abs().max() > 1e-4  # another question, other visual tokens
    with pytest.raises(ValueError, match="input_ids"):
        model.encode_images(images)
    with pytest.raises(ConfigError, match="only the qformer"):
        ConnectorConfig(kind="mlp", instruction=True)
    model.apply_tuning(TuningConfig(vision="frozen", connector="full", decoder="frozen"))
    out = model(torch.tensor([answer_a]), images=images, labels=labels(answer_a))
    out["loss"].backward()
    assert model.connector.text_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())
    new = model.generate(torch.tensor([prompt] * 2), None, torch.cat([images, images]), GenerationConfig(max_new_tokens=3))
    assert new.shape == (2, 3)


def test_shared_prefix_is_computed_once_with_the_same_loss_and_gradients():
    """With a frozen language model, the tokens every row shares before its first image (system prompt,
    chat header) are computed for one row only and not backpropagated: loss and gradients unchanged."""
    model = make_vlm("tokens", connector="mlp")
    model.apply_tuning(TuningConfig(vision="frozen", connector="full", decoder="frozen"))
    model.train()
    head, img = [3, 4, 5], [IMG] * model.placeholders_per_image()
    rows = [head + img + [6, 7, 8, 9], head + img + [10, 11], head + img + [12, 13, 14]]  # right padding
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        labels[i, len(r) - 2:len(r)] = ids[i, len(r) - 2:len(r)]
    images = torch.randn(3, 3, 16, 16)
    assert model.shared_prefix(ids, mask, labels) == 3
    results = []
    for share in (True, False):
        model.share_prefix = share
        model.zero_grad()
        loss = model(ids, mask, images, labels)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.connector.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.decoder.parameters())
    model.share_prefix = True
    labels[0, 2] = 5  # a target inside the shared tokens: only the positions before it are shared
    assert model.shared_prefix(ids, mask, labels) == 1
    ids[1, 0] = 9  # rows that differ from the first token on: nothing shared
    assert model.shared_prefix(ids, mask, labels) == 0
    model.apply_tuning(TuningConfig(vision="frozen", connector="full", decoder="lora"))
    assert model.shared_prefix(ids[:, 1:], mask[:, 1:], labels[:, 1:] * 0 - 100) == 0  # a trainable decoder


def test_hf_idefics2_folder_gives_transformers_logits_and_greedy_answer(tmp_path):
    """A whole Idefics2 (SigLIP tower, connector, Mistral) through vlkit.load: the same logits for a batch with
    one and two images per sample, and the same greedy tokens."""
    transformers = pytest.importorskip("transformers")
    import vlkit

    cfg = transformers.Idefics2Config(
        vision_config={"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        text_config={"model_type": "mistral", "vocab_size": 120, "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 256},
        perceiver_config={"hidden_size": 32, "resampler_n_latents": 5, "resampler_depth": 2, "resampler_n_heads": 4,
                          "num_key_value_heads": 2, "resampler_head_dim": 12, "rms_norm_eps": 1e-6},
        image_token_id=110)
    torch.manual_seed(0)
    hf = transformers.Idefics2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # latents, norms and biases off their constant initialisation
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = vlkit.load(tmp_path)
    assert type(ours).__name__ == "VLM" and ours.num_visual_tokens == 5
    img = [110] * 5
    ids = torch.tensor([[1, 5, 6, *img, 7, 8, 9, 10, 11, 12, 13], [1, 4, *img, 3, 9, *img, 8]])
    images = torch.randn(3, 3, 32, 32)
    pixels = torch.zeros(2, 2, 3, 32, 32)  # (B, images per sample, ...): all-zero = no image
    pixels[0, 0], pixels[1] = images[0], images[1:]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(ids, mask, images)["logits"]
        assert (got - ref).abs().max() <= 1e-4
        expected = hf.generate(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1, :1],
                               max_new_tokens=6, do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
        answer = ours.generate(ids[:1], mask[:1], images[:1], GenerationConfig(max_new_tokens=6, eos_token_ids=(999,)))
    assert answer.tolist() == expected.tolist()
    small = torch.randn(1, 3, 24, 16)  # 3 x 2 patches: their positions are buckets of the 4 x 4 grid
    with torch.no_grad():
        ref = hf(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=small[None]).logits
        assert (ours(ids[:1], mask[:1], small)["logits"] - ref).abs().max() <= 1e-4


def test_idefics2_prompt_frames_images_as_the_processor_does():
    from vlkit.checkpoints.hf_idefics2 import idefics2_prompt

    f, i = "<fake_token_around_image>", "<image>"
    assert idefics2_prompt("User:<image>What is it?", 2) == f"User:{f}{i}{i}{f} What is it?"
    assert idefics2_prompt("<image><image>\nand", 1) == f"{f}{i}{f}{i}{f}\nand"  # boundary shared
    assert idefics2_prompt(f"A {i}", 1, crops=5) == "A " + f + f"{i}{f}" * 5
    with pytest.raises(ValueError):
        idefics2_prompt(i, 0)


# ---------------------------------------------------------------------------- where an answer comes from
def one_prompt(model: VLM):
    return torch.tensor([[5, 6, *[IMG] * model.placeholders_per_image(), 7, 8]])


@pytest.mark.parametrize("instruction", [False, True])
def test_answer_logprobs_score_the_answer_as_the_training_loss_does(instruction):
    """Also with InstructBLIP's Q-Former, which reads the prompt: never the answer being scored (training
    masks it too), so the score does not depend on the answer through the visual tokens."""
    from vlkit.models.relevance import answer_logprobs

    model = make_vlm()
    if instruction:
        model.connector = build_connector(ConnectorConfig(kind="qformer", num_tokens=4, width=16, num_heads=2,
                                                          instruction=True), 24, 32)
    ids, images, answer = one_prompt(model), torch.rand(3, 3, 16, 16), [9, 10, 11]
    logp = answer_logprobs(model, ids, images, answer, batch_size=2)  # 2 chunks
    full = torch.cat([ids, torch.tensor([answer])], 1)
    for i in range(3):
        labels = torch.full_like(full, -100)
        labels[:, ids.shape[1]:] = torch.tensor(answer)
        loss = model(full, None, images[i:i + 1], labels)["loss"]
        assert logp[i].item() == pytest.approx(-3 * loss.item(), rel=1e-5)


def test_occlusion_flags_exactly_the_cell_that_changes_the_image():
    """A flat image painted the fill colour except in cell (row 1, column 3) of a 4 x 4 grid: occluding any
    other cell leaves the image unchanged, so only that cell's log-likelihood drop is non-zero."""
    from vlkit.models.relevance import occlusion_relevance

    model = make_vlm()
    fill = torch.tensor([0.2, -0.1, 0.4])
    image = fill.view(3, 1, 1).expand(3, 16, 16).clone()
    image[:, 4:8, 12:16] = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    drop, logp = occlusion_relevance(model, one_prompt(model), image[None], [9, 10], grid=4, fill=fill, signed=True)
    assert drop.shape == (4, 4) and logp < 0
    others = torch.ones(4, 4, dtype=torch.bool)
    others[1, 3] = False
    assert drop[others].abs().max() < 1e-5 and drop[1, 3].abs() > 1e-3, drop
    cam, _ = occlusion_relevance(model, one_prompt(model), image[None], [9, 10], grid=4, fill=fill)
    assert cam.min() >= 0 and cam.max() <= 1
    with pytest.raises(ValueError, match="empty"):
        occlusion_relevance(model, one_prompt(model), image[None], [], grid=4)
    with pytest.raises(ValueError, match="one prompt with one image"):
        occlusion_relevance(model, one_prompt(model), torch.rand(2, 3, 16, 16), [9], grid=4)


@pytest.mark.parametrize("style, features, layer", [("tokens", "last", "features"), ("tokens", "last", "block"),
                                                    ("cross_attention", "last", "auto"),
                                                    ("inject", "cls_last_n", "auto"),
                                                    ("adapter", "last", "auto")])
def test_grad_cam_gradient_equals_finite_differences(style, features, layer):
    """d logp / dA from the captured activation equals the central difference of the answer's log-likelihood
    along a random direction added to that activation (float64), through each injection style."""
    from vlkit.models.relevance import _target_module, answer_gradient, answer_logprobs, answer_relevance

    extra = {"adapter_prompts": 16} if style == "adapter" else {}  # the 16 visual tokens, one per prompt
    layers = 2 if features == "cls_last_n" else 1
    model = make_vlm(style, features, connector="mlp", num_layers=layers, **extra).double()
    for adapter in model.adapter.values():
        torch.nn.init.constant_(adapter.gate, 0.5)
    ids, image, answer = one_prompt(model), torch.rand(1, 3, 16, 16, dtype=torch.float64), [9, 10, 3]
    acts, grad, logp = answer_gradient(model, ids, image, answer, layer)
    direction = torch.randn(acts.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    module, where = _target_module(model, layer)
    scores = []
    for eps in (1e-5, -1e-5):
        if where == "pre":
            handle = module.register_forward_pre_hook(lambda m, args, e=eps: (args[0] + e * direction, *args[1:]))
        else:
            handle = module.register_forward_hook(lambda m, args, out, e=eps: out + e * direction)
        scores.append(answer_logprobs(model, ids, image, answer)[0])
        handle.remove()
    numeric = (scores[0] - scores[1]) / 2e-5
    assert numeric.item() == pytest.approx((grad * direction).sum().item(), rel=1e-6, abs=1e-9)
    assert logp == pytest.approx(answer_logprobs(model, ids, image, answer)[0].item(), rel=1e-9)
    cam, _ = answer_relevance(model, ids, image, answer, "grad_cam", layer)
    assert cam.shape == (4, 4) and 0 <= cam.min() and cam.max() <= 1


def test_grad_cam_formula():
    """alpha_c = mean_n dA; map = ReLU(sum_c alpha_c A_n), prefix tokens dropped, / max."""
    from vlkit.models.relevance import grad_cam

    acts = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])  # class token + 2x2
    grad = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [1.0, 2.0]]])  # alpha = (1, 1)
    cam = grad_cam(acts, grad, (2, 2))
    torch.testing.assert_close(cam, torch.tensor([[1.0, 1.0], [4.0, 0.0]]) / 4)
    fmap = acts[0, 1:].T.reshape(1, 2, 2, 2)  # the same as a (1, C, h, w) map
    torch.testing.assert_close(grad_cam(fmap, grad[0, 1:].T.reshape(1, 2, 2, 2), (2, 2)), cam)


def test_fsdp_rank_without_images_runs_the_same_blocks_and_gradients_match_one_process():
    """Sharded training where one rank's batch has no image: the vision tower and connector still run (on a
    blank image, times 0) where visual tokens would enter, and no shared prefix is computed, so both ranks
    gather the same blocks in the same order (gloo aborts on a mismatch); with spliced tokens + an
    instruction-aware Q-Former, Flamingo cross-attention, eP-ALM injection and LLaMA-Adapter prompts (read by
    text-only rows too), the gathered gradients equal one unsharded process's on both batches
    (tests/_fsdp_vlm_worker.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent / "src")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(here / "_fsdp_vlm_worker.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in ("tokens instruction_qformer", "cross_attention resampler", "inject linear", "adapter mlp"):
        assert f"ok {case}" in done.stdout

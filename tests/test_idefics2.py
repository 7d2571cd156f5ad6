"""An HF Idefics2 folder (model and processor files) answering through vlkit predict / chat as transformers does."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vlkit.checkpoints.hf_idefics2 import CHAT_TEMPLATE, Idefics2Images, Idefics2Prompts  # noqa: E402
from vlkit.cli import main  # noqa: E402

SPECIAL = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
SIZE = {"shortest_edge": 32, "longest_edge": 64}


def _image_processor(split: bool):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2ImageProcessorPil(size=SIZE, do_image_splitting=split, image_mean=[0.4, 0.5, 0.6],
                                     image_std=[0.2, 0.3, 0.25])


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("split", [False, True])
def test_idefics2_images_equal_transformers_processor(tmp_path, split):
    """Resizing (long side down to longest_edge, each side up to shortest_edge), splitting into four quarters
    and the whole, scaling and normalising: transformers' pixels, without its padding."""
    hf = _image_processor(split)
    hf.save_pretrained(tmp_path)
    ours = Idefics2Images.from_folder(tmp_path)
    assert (ours.shortest_edge, ours.longest_edge, ours.split, ours.crops) == (32, 64, split, 5 if split else 1)
    for w, h in [(50, 37), (90, 40), (20, 70), (16, 16)]:
        image = _picture(w, h)
        ref = hf(images=[[image]], return_tensors="pt")
        crops = ours(image)
        assert len(crops) == ref["pixel_values"].shape[1]
        for j, crop in enumerate(crops):
            mask = ref["pixel_attention_mask"][0, j]
            h_, w_ = int(mask[:, 0].sum()), int(mask[0].sum())
            assert crop.shape == (3, h_, w_) and int(mask.sum()) == h_ * w_
            torch.testing.assert_close(crop, ref["pixel_values"][0, j, :, :h_, :w_], atol=1e-5, rtol=0)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = ["what is in the picture?", "a red circle next to a blue square", "User: Assistant: yes no"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # Mistral's
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")


def _idefics2_folder(folder, split: bool):
    """A tiny random Idefics2 (SigLIP tower, connector of 5 latents, Mistral) with its processor's files."""
    fast = _tokenizer()
    cfg = transformers.Idefics2Config(
        vision_config={"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 64, "patch_size": 8},
        text_config={"model_type": "mistral", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "eos_token_id": 2},
        perceiver_config={"hidden_size": 32, "resampler_n_latents": 5, "resampler_depth": 2, "resampler_n_heads": 4,
                          "num_key_value_heads": 2, "resampler_head_dim": 12, "rms_norm_eps": 1e-6},
        image_token_id=fast.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    hf = transformers.Idefics2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    processor = transformers.Idefics2Processor(image_processor=_image_processor(split), tokenizer=fast,
                                               image_seq_len=5, chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return hf, processor


def _reference(hf, processor, messages, image, eos):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[[image]], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=64, do_sample=False, eos_token_id=list(eos))
    new = out[0, inputs["input_ids"].shape[1]:]
    return inputs["input_ids"][0].tolist(), new.tolist(), processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("split", [False, True])
def test_hf_idefics2_folder_answers_and_chats_as_transformers(tmp_path, split, capsys):
    """vlkit predict / chat on an HF Idefics2 folder: the processor's prompt ids (chat template, framed image
    runs, one per crop, start token), its pixels, and transformers' greedy answers, over two turns."""
    from vlkit.tasks.answer import ChatSession, answer_files, load_assistant

    folder = tmp_path / "idefics2"
    hf, processor = _idefics2_folder(folder, split)
    image = _picture(80, 48, seed=1)  # 38 x 64 whole; quarters 32 x 40 (5 x 4 patches of 8)
    path = tmp_path / "x.png"
    image.save(path)
    assistant = load_assistant(folder)
    eos = assistant.generation.eos_token_ids
    assert processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>") in eos and 2 in eos
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]
    ref_ids, ref_new, ref_text = _reference(hf, processor, first, image, eos)
    turn = [{"role": "user", "content": assistant.encoder.first_turn("what is in the picture?")}]
    ids, new, text = assistant.answer(turn, assistant.pixels(image))
    assert ids[0].tolist() == ref_ids and ids[0, 0] == 1 and len(assistant.pixels(image)) == (5 if split else 1)
    assert new == ref_new and text == ref_text
    assert answer_files(folder, [path], "what is in the picture?")[0]["answer"] == ref_text
    if not split:  # drafted by an int4 copy, checked by the float model: the same greedy answer
        assert answer_files(folder, [path], "what is in the picture?", speculative=3)[0]["answer"] == ref_text
        assert answer_files(folder, [path, tmp_path / "missing.png"], "what?", int8=True)[1]["error"]

    session = ChatSession(folder, path)
    assert session.ask("what is in the picture?") == ref_text
    second = first + [{"role": "assistant", "content": [{"type": "text", "text": ref_text}]},
                      {"role": "user", "content": [{"type": "text", "text": "is it red?"}]}]
    assert session.ask("is it red?") == _reference(hf, processor, second, image, eos)[2]

    capsys.readouterr()
    args = ["predict", str(folder), str(path), "--prompt", "what is in the picture?", "--attention", "--out",
            str(tmp_path / "pics")]
    if split:  # a map over one image: not over five crops
        assert main(args) == 2 and "image splitting" in capsys.readouterr().err
    else:
        assert main(args) == 0
        assert (tmp_path / "pics" / "x_relevance.png").is_file() and ref_text in capsys.readouterr().out


def test_idefics2_prompts_fall_back_to_idefics2_template_and_read_string_turns(tmp_path):
    fast = _tokenizer()
    fast.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    prompts = Idefics2Prompts(tmp_path, image_seq_len=2, crops=1)  # no chat template saved: Idefics2's own
    f, i = "<fake_token_around_image>", "<image>"
    text = prompts.text([{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "yes"},
                         {"role": "user", "content": "and?"}])
    assert text == f"User:{f}{i}{i}{f} what?<end_of_utterance>\nAssistant: yes<end_of_utterance>\nUser: and?" \
                   "<end_of_utterance>\nAssistant:"
    empty = prompts.text([{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "and?"}])  # an empty answer in the history: still a turn
    assert "Assistant: <end_of_utterance>\nUser: and?" in empty
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # transparent: over the background, as load_image does
    crops = Idefics2Images(shortest_edge=16, longest_edge=32)(rgba)
    assert crops[0].shape == (3, 16, 32)

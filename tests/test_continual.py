"""DyTox and the class-incremental protocol on tiny sizes: expansion freezes old tokens and heads,
metrics from the accuracy matrix, a killed protocol resumes, the three methods run, the final model
is saved for vlkit.load / predict, vlkit eval rebuilds the matrix."""
import json

import pytest
import torch

from vlkit.cli import main
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.models.dytox import DyTox, distillation_loss
from vlkit.tasks.continual import summarise

TINY = ["data.dataset=world", "data.world.image_size=28", "data.world.train_length=80", "data.world.val_length=16",
        "data.world.test_length=32", "data.world.compositional_length=8", "num_tasks=4", "train.max_steps=3",
        "train.batch_size=8", "train.warmup_steps=1", "train.checkpoint_every=3", "train.progress=false",
        "vit.depth=1", "vit.embed_dim=32", "vit.num_heads=2", "tab_heads=2", "memory_size=8", "eval_batch_size=16", "balanced_steps=2"]


def tiny_dytox() -> DyTox:
    """A 16 px DyTox (d 32, one block, 2 heads) without tasks, seeded."""
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(image_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=1, num_heads=2,
                                      class_token=False, global_pool="avg"))
    return DyTox(enc, 32, 2)


def test_expansion_adds_tokens_and_heads_and_freezes_the_old_ones():
    model = tiny_dytox()
    model.add_task(2)
    assert model(torch.randn(3, 3, 16, 16))["logits"].shape == (3, 2)
    model.add_task(3)
    out = model(torch.randn(3, 3, 16, 16))
    assert out["logits"].shape == (3, 5) and out["embeddings"].shape == (3, 2, 32)
    assert not model.task_tokens[0].requires_grad and model.task_tokens[1].requires_grad
    assert not any(p.requires_grad for p in model.heads[0].parameters())
    old = torch.randn(4, 2)
    assert distillation_loss(torch.cat([old, torch.randn(4, 3)], 1), old).abs() < 1e-5


def test_summary_metrics():
    m = summarise([[90.0], [60.0, 80.0], [50.0, 70.0, 90.0]], [2, 2, 2])
    assert m["acc_after_task"] == pytest.approx([90.0, 70.0, 70.0])
    assert m["avg_incremental_acc"] == pytest.approx(230 / 3) and m["final_acc"] == pytest.approx(70.0)
    assert m["forgetting"] == pytest.approx(((90 - 50) + (80 - 70)) / 2)


@pytest.mark.parametrize("method", ["dytox", "finetune", "joint"])
def test_methods_run_and_report(tmp_path, method):
    run = tmp_path / method
    assert main(["train", f"{method}_fmnist", *TINY, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert len(doc["matrix"]) == (1 if method == "joint" else 4)
    assert 0 <= doc["eval"]["test"]["avg_incremental_acc"] <= 100 and (run / "tasks.png").is_file()


@pytest.mark.parametrize("lost, extra", [("task3", []),  # killed in the last task / after its steps, before its state
                                         ("task3/state", ["divergence_weight=0.1", "memory_selection=herding"])])
def test_killed_protocol_resumes_from_the_last_finished_task(tmp_path, lost, extra):
    import shutil

    import vlkit

    run = tmp_path / "dytox"
    assert main(["train", "dytox_fmnist", *TINY, *extra, "--run-dir", str(run)]) == 0
    full = json.loads((run / "eval.json").read_text())["matrix"]
    memory = json.loads((run / "task3" / "state" / "state.json").read_text())["memory"]
    shutil.rmtree(run / lost)  # as if killed before the last task finished
    (run / "eval.json").unlink()
    assert main(["train", "dytox_fmnist", *TINY, *extra, "--run-dir", str(run), "--resume"]) == 0
    assert json.loads((run / "eval.json").read_text())["matrix"] == full
    assert json.loads((run / "task3" / "state" / "state.json").read_text())["memory"] == memory
    assert vlkit.load(run).classes_per_task == [2, 2, 2, 2]  # the divergence head is not part of the model


def test_divergence_head_targets_and_loss():
    from vlkit.models.dytox import WithDivergenceHead, divergence_targets
    from vlkit.tasks.continual import ContinualConfig, classification_loss, objective_fn

    assert divergence_targets(torch.tensor([0, 3, 4, 5, 2]), 4).tolist() == [0, 0, 1, 2, 0]
    model = tiny_dytox()
    model.add_task(3)
    import copy

    old = copy.deepcopy(model).eval()
    model.add_task(2)
    wrapped = WithDivergenceHead(model)
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 3, 1, 4])}
    out = wrapped(batch["image"])
    assert out["div_logits"].shape == (4, 3) and out["logits"].shape == (4, 5)
    cfg = ContinualConfig(divergence_weight=0.1)
    res = objective_fn(old, cfg)(wrapped, batch)
    div = classification_loss(out["div_logits"], torch.tensor([0, 1, 0, 2]))
    torch.testing.assert_close(res["div"], div)
    torch.testing.assert_close(res["loss"], res["ce"] + res["kd"] + 0.1 * div)
    res["loss"].backward()  # while it trains, the head learns from the newest embedding only
    assert wrapped.head[1].weight.grad.abs().sum() > 0 and model.task_tokens[1].grad.abs().sum() > 0
    assert model.task_tokens[0].grad is None


def test_herding_ranks_towards_the_class_mean_and_memory_shrinks_in_rank_order():
    from vlkit.tasks.continual import _update_memory, herding

    torch.manual_seed(0)
    f = torch.randn(200, 8) + torch.tensor([2.0] + [0.0] * 7)
    mean = torch.nn.functional.normalize(f, dim=-1).mean(0)
    order = herding(f, 10)
    assert len(set(order)) == 10 and order[0] == int((torch.nn.functional.normalize(f, dim=-1) - mean).norm(dim=-1).argmin())
    assert herding(f, 10)[:4] == herding(f, 4)  # greedy: a longer ranking extends a shorter one
    err = lambda idx: (torch.nn.functional.normalize(f[idx], dim=-1).mean(0) - mean).norm()  # noqa: E731
    assert all(err(order) < err(torch.randperm(200)[:10].tolist()) for _ in range(20))
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5)
    memory = [3, 1, 4, 8, 6, 7]  # classes 0 and 1, three each, best first
    ranked = {2: [14, 12, 10, 11], 3: [19, 15, 17]}
    out = _update_memory(memory, labels, [0, 1, 2, 3], 8, seed=0, rank=lambda c: ranked[c])
    assert out == [3, 1, 8, 6, 14, 12, 19, 15]
    randomly = _update_memory(memory, labels, [0, 1, 2, 3], 8, seed=0)
    assert len(randomly) == 8 and [int(labels[i]) for i in randomly] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_herding_rank_leaves_unreadable_images_out():
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from vlkit.data.transforms import build_transform
    from vlkit.tasks.continual import ContinualConfig, _herding_rank, herding
    from vlkit.tasks.data import Splits

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            if i in (3, 8, 21):  # unreadable
                return None
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            return {"image": Image.fromarray(pixels), "label": i % 2}

    labels = torch.tensor([i % 2 for i in range(40)])
    model = tiny_dytox()
    model.add_task(2)
    cfg = ContinualConfig(eval_batch_size=7)  # batches of readable and unreadable images mixed
    cfg = replace(cfg, data=replace(cfg.data, transform=replace(cfg.data.transform, image_size=16, crop_pct=1.0)))
    rank = _herding_rank(model, Splits(train=Images(), val=None, test=None, classes=["a", "b"], source="x"),
                         labels, cfg, 6)
    for c in (0, 1):
        ranked = rank(c)
        readable = [i for i in range(40) if i % 2 == c and i not in (3, 8, 21)]
        assert len(ranked) == 6 and set(ranked) <= set(readable)
        data = [Images()[i]["image"] for i in readable]  # the ranking is herding's on the readable ones
        x = torch.stack([build_transform(cfg.data.transform, train=False)(im, None) for im in data])
        with torch.no_grad():
            feats = model.eval()(x)["embeddings"].flatten(1)
        assert ranked == [readable[i] for i in herding(feats, 6)]


def test_saved_model_loads_predicts_and_eval_rebuilds_the_matrix(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    import vlkit
    from vlkit.models.dytox import DyToxConfig, build_dytox

    run = tmp_path / "dytox"
    assert main(["train", "dytox_fmnist", *TINY, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # every task's saved model scored again: the same matrix
    out = capsys.readouterr().out
    again = json.loads((run / "eval-cli.json").read_text())
    assert again["matrix"] == doc["matrix"] and again["eval"] == doc["eval"]
    assert "avg_incremental_acc" in out and "after task 4:" in out
    model = vlkit.load(run)  # the final model: 4 tasks of 2 classes, the last task's weights
    assert model.classes_per_task == [2, 2, 2, 2]
    last = build_dytox(DyToxConfig(model.encoder.cfg, 2, [2, 2, 2, 2]))
    last.load_state_dict(load_file(str(run / "task3" / "state" / "model.safetensors")))
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x)["logits"], last.eval()(x)["logits"], rtol=0, atol=0)
    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "red.png")
    assert main(["predict", str(run), str(tmp_path / "red.png"), "--top-k", "8"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(tmp_path / "red.png")) and line.count(",") == 7  # the world's 8 classes ranked
    assert main(["eval", str(run), "vit.depth=3"]) == 2  # the model is the saved one
    import shutil

    shutil.rmtree(run / "task2")
    assert main(["eval", str(run)]) == 2
    assert "before task 3 of 4 finished" in capsys.readouterr().err


def test_dytox_config_is_checked():
    from vlkit.config import ConfigError, from_dict
    from vlkit.models.dytox import DyToxConfig

    with pytest.raises(ConfigError, match="classes_per_task"):
        from_dict(DyToxConfig, {"classes_per_task": [2, 0]})
    with pytest.raises(ConfigError, match="vit.num_classes"):
        from_dict(DyToxConfig, {"vit": {"num_classes": 10}})
    from vlkit.tasks.continual import ContinualConfig

    with pytest.raises(ConfigError, match="divergence_weight"):
        from_dict(ContinualConfig, {"divergence_weight": -0.1})
    with pytest.raises(ConfigError, match="memory_selection"):
        from_dict(ContinualConfig, {"memory_selection": "nearest"})


def test_bce_and_auto_kd_weighting():
    from vlkit.tasks.continual import ContinualConfig, classification_loss, objective_fn

    logits, labels = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([2])
    manual = -(torch.log(torch.sigmoid(torch.tensor([-2.0, 1.0, 0.5])))).mean()  # 1 - p for the wrong classes
    torch.testing.assert_close(classification_loss(logits, labels, bce=True), manual)
    torch.testing.assert_close(classification_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    model = tiny_dytox()
    model.add_task(3)
    import copy

    old = copy.deepcopy(model).eval()
    model.add_task(1)  # 3 old classes of 4: r = 0.75
    with torch.no_grad():  # the shared encoder moved on since: the old classes' logits differ
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 3, 1, 3])}
    out = objective_fn(old, ContinualConfig(auto_kd=True, bce=True))(model, batch)
    assert "ce" not in out  # logged under the loss's own name
    torch.testing.assert_close(out["loss"], 0.25 * out["bce"] + 0.75 * out["kd"])
    alone = objective_fn(old, ContinualConfig(auto_kd=True, bce=True, distill_weight=0.0))(model, batch)
    torch.testing.assert_close(alone["loss"], out["loss"])  # auto_kd distils whatever distill_weight says
    fixed = objective_fn(old, ContinualConfig(distill_weight=0.5))(model, batch)
    torch.testing.assert_close(fixed["loss"], fixed["ce"] + 0.5 * fixed["kd"])
    assert out["kd"] > 0 and not torch.allclose(out["bce"], fixed["ce"])  # bce vs softmax CE


@pytest.mark.parametrize("tab", [False, True])
def test_balanced_finetuning_trains_tokens_heads_and_optionally_the_tab(tmp_path, tab):
    from vlkit.cli import load_recipe
    from vlkit.models.dytox import DyToxConfig, build_dytox
    from vlkit.tasks.continual import _balanced_finetune, labels_of
    from vlkit.tasks.data import build_splits

    cfg, _ = load_recipe("dytox_fmnist", [*TINY, f"balanced_tab={str(tab).lower()}", "balanced_lr=0.01"])
    splits = build_splits(cfg.data)
    labels = labels_of(splits.train)
    torch.manual_seed(0)
    model = build_dytox(DyToxConfig(cfg.vit, cfg.tab_heads, [2, 2]))
    model.requires_grad_(True)
    model.task_tokens[0].requires_grad_(False)  # as after add_task: flags to be restored
    memory = (labels < 2).nonzero()[:6, 0].tolist()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = _balanced_finetune(model, cfg, splits, labels, [2, 3], memory, tmp_path / "bal", False, seed=0)
    moved = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == ({"tab", "task_tokens", "heads"} if tab else {"task_tokens", "heads"})  # never the encoder
    assert not model.task_tokens[0].requires_grad and model.encoder.patch_embed.proj.weight.requires_grad
    first = json.loads((tmp_path / "bal" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.005 <= first["lr"] <= 0.01  # balanced_lr (cosine over its 2 steps, no warmup), not train.lr 1e-3

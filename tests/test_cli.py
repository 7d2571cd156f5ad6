"""The command line end to end on tiny sizes: train, eval, predict, quickstart, config errors."""
import json

import pytest
import torch
from PIL import Image

from vlkit.cli import load_recipe, main

TINY = ["train.max_steps=4", "train.epochs=0", "train.batch_size=16", "train.warmup_steps=1", "train.progress=false",
        "train.eval_every=2", "train.checkpoint_every=2", "model.vit.depth=1", "model.vit.embed_dim=32",
        "model.vit.num_heads=2", "data.eval_limit=48", "data.world.train_length=96", "data.world.val_length=48",
        "data.world.test_length=48", "data.world.compositional_length=48", "data.world.image_size=32",
        "data.transform.image_size=32", "model.vit.image_size=32"]


def test_train_eval_predict_on_the_world(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "vit_world", *TINY, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| test |" in out and "| compositional |" in out
    doc = json.loads((run / "eval.json").read_text())
    assert set(doc["eval"]) == {"val", "test", "compositional"}
    assert doc["train"]["steps"] == 4 and (run / "model" / "model.safetensors").exists()
    assert main(["eval", str(run), "data.eval_limit=16"]) == 0
    assert "| val |" in capsys.readouterr().out
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    bad.write_bytes(b"not an image at all")
    assert main(["predict", str(run), str(good), str(bad), "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "bad.png: skipped" in out and "1 of 2 images skipped" in out
    preds = json.loads((tmp_path / "p.json").read_text())
    assert len(preds[0]["top"]) == 3 and abs(sum(p for _, p in preds[0]["top"])) <= 1.0001


def test_resume_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "vit_world", *TINY, "--run-dir", str(run)]) == 0
    before = (run / "model" / "model.safetensors").read_bytes()
    assert main(["train", "vit_world", *TINY, "--run-dir", str(run), "--resume"]) == 0
    assert (run / "model" / "model.safetensors").read_bytes() == before


def test_a_run_is_a_function_of_its_seed(tmp_path):
    """Same recipe and seed in two fresh folders: the same weights (initialisation included)."""
    weights = []
    for name in ("a", "b", "c"):
        seed = "train.seed=1" if name == "c" else "train.seed=0"
        assert main(["train", "vit_world", *TINY, "train.eval_every=0", seed, "--run-dir", str(tmp_path / name)]) == 0
        weights.append((tmp_path / name / "model" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1] and weights[0] != weights[2]


@pytest.mark.parametrize("override, field", [
    ("model.vit.patch_size=5", "image_size"),
    ("model.vit.depht=3", "model.vit.depht"),
    ("train.lr=fast", "train.lr"),
    ("data.transform.image_size=30", "image_size"),
])
def test_bad_config_names_the_field(override, field, capsys):
    assert main(["train", "vit_fmnist", override]) == 2
    err = capsys.readouterr().err
    assert f"'{field}" in err or f".{field}'" in err, err


def test_recipes_all_parse_and_inherit():
    from vlkit.cli import CONFIGS_DIR

    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        cfg, _ = load_recipe(path.stem, [])
        assert cfg.name == path.stem
    deit, _ = load_recipe("deit_fmnist", [])
    assert deit.model.vit.num_dist_tokens == 1 and deit.model.vit.embed_dim == 128  # from base vit_fmnist
    with pytest.raises(FileNotFoundError, match="no recipe"):
        load_recipe("no_such_recipe", [])


def test_quickstart_tiny_writes_the_report(tmp_path, capsys):
    assert main(["quickstart", "--tiny", "--out", str(tmp_path / "qs")]) == 0
    assert f"report: {tmp_path / 'qs' / 'report.md'}" in capsys.readouterr().out
    report = (tmp_path / "qs" / "report.md").read_text()
    for needle in ("| test |", "curves.png", "predictions.png", "attention.png", "Teacher", "| compositional |",
                   "clip/retrieval.png", "zero_shot_top1", "vlm/samples.png", "CIDEr", "vqa_accuracy"):
        assert needle in report
    assert f"{torch.backends.cpu.get_cpu_capability()})," in report.splitlines()[2]  # the CPU the times are from
    for name in ("curves.png", "predictions.png", "attention.png"):
        assert (tmp_path / "qs" / "deit" / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("curves.png", "retrieval.png"):
        assert (tmp_path / "qs" / "clip" / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "qs" / "vlm" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "vlm/relevance.png" in report and (tmp_path / "qs" / "vlm" / "relevance.png").read_bytes()[:4] == b"\x89PNG"


def test_quickstart_all_adds_the_dense_stages(tmp_path):
    assert main(["quickstart", "--tiny", "--all", "--out", str(tmp_path / "qs")]) == 0
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "Detection: DETR" in report and "Semantic segmentation: Segmenter" in report
    assert "AP50" in report and "mIoU" in report
    assert "object query looks" in report  # every image shows at least its best box, so its query's attention
    for stage in ("detr", "segmenter"):
        assert (tmp_path / "qs" / stage / "samples.png").read_bytes()[:4] == b"\x89PNG"
    import re

    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):  # every picture the report shows exists
        assert (tmp_path / "qs" / link).is_file(), link


def test_eval_names_a_folder_that_is_no_run_and_an_unknown_task(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("task: painting\n")
    assert main(["eval", str(tmp_path)]) == 2
    assert "unknown task 'painting'" in capsys.readouterr().err

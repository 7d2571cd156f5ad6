"""The synthetic world: determinism, splits, geometry, labels, texts and config errors."""
import re
from collections import Counter

import numpy as np
import pytest
import torch

from vlkit.config import ConfigError, from_dict, to_dict
from vlkit.data.base import collate
from vlkit.data.world import (NUMBER_WORDS, RELATION_MARGIN, SPLITS, Scene, World, WorldConfig,
                              WorldDataset, WorldObject)


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(image_size=32))


@pytest.fixture(scope="module")
def samples(world):
    ds = WorldDataset(world, "train", length=120)
    return [ds[i] for i in range(len(ds))]


# -- determinism and splits ---------------------------------------------------------------


def test_same_seed_and_index_give_identical_samples():
    cfg = WorldConfig(image_size=32, background="noise")
    a, b = WorldDataset(cfg, "val")[7], WorldDataset(World(cfg), "val")[7]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    for key in ("instance_mask", "semantic_mask", "boxes", "box_labels"):
        assert torch.equal(a[key], b[key])
    assert (a["caption"], a["questions"], a["answers"]) == (b["caption"], b["questions"], b["answers"])


def test_different_index_split_or_seed_give_different_images(world):
    def pixels(w, split, i):
        return w.render(w.scene(split, i), masks=False).image.tobytes()

    seen = {}
    for split in SPLITS:
        for i in range(60):
            key = pixels(world, split, i)
            assert key not in seen, f"{split}/{i} repeats {seen.get(key)}"
            seen[key] = (split, i)
    other = World(WorldConfig(image_size=32, seed=1))
    assert sum(pixels(other, "train", i) in seen for i in range(60)) == 0


# -- compositional split ----------------------------------------------------------------------


def test_heldout_pairs_are_balanced_and_leave_every_attribute_seen(world):
    held = world.heldout_pairs
    assert len(held) == len(set(held)) == 8 * 2  # 2 of 8 colours per shape by default
    assert Counter(s for _, s in held) == {s: 2 for s in world.class_names}
    assert set(Counter(c for c, _ in held).values()) == {2}
    assert {s for _, s in world.seen_pairs} == set(world.class_names)
    assert {c for c, _ in world.seen_pairs} == set(world.colour_names)
    assert World(WorldConfig(image_size=32)).heldout_pairs == held  # deterministic
    assert World(WorldConfig(image_size=32, seed=3)).heldout_pairs != held  # but seeded


def test_heldout_pairs_never_in_standard_splits_and_always_main_in_compositional(world):
    held = set(world.heldout_pairs)
    for split in ("train", "val", "test"):
        for i in range(150):
            assert not {(o.colour, o.shape) for o in world.scene(split, i).objects} & held
    labels = Counter()
    for i in range(200):
        scene = world.scene("compositional", i)
        assert (scene.main.colour, scene.main.shape) in held
        assert not {(o.colour, o.shape) for o in scene.objects[1:]} & held
        labels[world.label(scene)] += 1
    assert set(labels) == set(range(len(world.class_names)))


def test_no_compositional_split_without_heldout_pairs():
    world = World(WorldConfig(image_size=32, heldout_fraction=0.0))
    assert world.heldout_pairs == [] and len(world.seen_pairs) == 64
    with pytest.raises(ValueError, match="heldout_fraction"):
        world.scene("compositional", 0)


# -- geometry and masks -------------------------------------------------------------------------


def _mask_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    s = mask.shape[0]
    return [(xs.min() + xs.max() + 1) / 2 / s, (ys.min() + ys.max() + 1) / 2 / s,
            (xs.max() + 1 - xs.min()) / s, (ys.max() + 1 - ys.min()) / s]


def _check_geometry(sample: dict, image_size: int) -> None:
    inst, sem, boxes, box_labels = (sample[k] for k in ("instance_mask", "semantic_mask", "boxes", "box_labels"))
    n = len(sample["objects"])
    assert sample["image"].size == (image_size, image_size) and sample["image"].mode == "RGB"
    assert inst.shape == sem.shape == (image_size, image_size) and inst.dtype == sem.dtype == torch.long
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32 and box_labels.shape == (n,)
    assert set(inst.unique().tolist()) == set(range(n + 1))  # every object visible
    assert (boxes[:, :2] - boxes[:, 2:] / 2 >= 0).all() and (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6).all()
    for k in range(1, n + 1):
        assert boxes[k - 1].tolist() == pytest.approx(_mask_box((inst == k).numpy()), abs=1e-6)
        assert (sem[inst == k] == 1 + box_labels[k - 1]).all()
    assert (sem[inst == 0] == 0).all()
    assert box_labels[0].item() == sample["label"]


def test_boxes_are_tight_to_visible_masks_and_semantic_mask_matches(samples):
    for sample in samples:
        _check_geometry(sample, 32)


@pytest.mark.parametrize("size", [16, 32, 64, 100])
def test_every_image_size_works(size):
    ds = WorldDataset(WorldConfig(image_size=size, max_objects=3), "test", length=8)
    for i in range(len(ds)):
        _check_geometry(ds[i], size)


def test_later_objects_are_painted_on_top(world):
    obj = lambda shape, x: WorldObject(shape, "red", "large", (0, 0, 0, 0), (0, 0), x, 4, 12)  # noqa: E731
    scene = Scene("train", 0, (obj("square", 4), obj("square", 10)))
    image, inst, sem = world.render(scene)
    assert (inst[4:16, 10:16] == 2).all() and (inst[4:16, 4:10] == 1).all()
    assert (sem[inst > 0] == 1 + world.class_names.index("square")).all()
    assert image[10, 12].tolist() == list(world.cfg.colours["red"])


def test_backgrounds_change_pixels_not_labels():
    scenes = {}
    for bg in ("plain", "noise", "texture"):
        world = World(WorldConfig(image_size=32, background=bg))
        scenes[bg] = world.render(world.scene("train", 3))
    assert not np.array_equal(scenes["plain"].image, scenes["noise"].image)
    assert not np.array_equal(scenes["plain"].image, scenes["texture"].image)
    for bg in ("noise", "texture"):
        assert np.array_equal(scenes[bg].instance_mask, scenes["plain"].instance_mask)
        assert np.abs(scenes[bg].image.astype(int) - scenes["plain"].image).mean() < 15  # light


# -- labels and text ------------------------------------------------------------------------------


def test_main_object_is_the_only_large_one_and_labels_are_balanced(world):
    labels = Counter()
    for i in range(800):
        scene = world.scene("train", i)
        assert [o.size for o in scene.objects] == ["large"] + ["small"] * (len(scene.objects) - 1)
        assert 1 <= len(scene.objects) <= world.cfg.max_objects
        labels[world.label(scene)] += 1
    assert set(labels) == set(range(8)) and max(labels.values()) < 140 and min(labels.values()) > 60


def test_caption_names_every_object(world, samples):
    captions = set()
    for s in samples:
        main = s["objects"][0]
        assert f"large {main['colour']} {main['shape']}" in s["caption"]
        for o in s["objects"][1:]:
            assert f"small {o['colour']} {o['shape']}" in s["caption"]
        captions.add(re.sub(r"(small|large) \w+ \w+", "X", s["caption"]))
    assert len(captions) >= 6  # varied templates


def _resolve(objects: list[dict], ref: str) -> dict:
    """The one object a referring expression like 'the small red object' denotes (independent check)."""
    words = [w for w in ref.split() if w not in ("the", "object")]
    found = [o for o in objects if all(w in (o["size"], o["colour"], o["shape"]) for w in words)]
    assert len(found) == 1, f"'{ref}' is ambiguous or empty in {objects}"
    return found[0]


def _clearly(a: dict, b: dict, rel: str) -> bool:
    axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[rel]
    d = sign * (a["centre"][axis] - b["centre"][axis])
    return d >= RELATION_MARGIN


_REL = r"(to the left of|to the right of|above|below)"
_REL_NAME = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def _expected_answer(q: str, objs: list[dict]) -> str:  # noqa: C901  (one branch per template)
    count = lambda pred: NUMBER_WORDS[sum(map(pred, objs))]  # noqa: E731
    if m := re.fullmatch(r"how many (shapes|objects) (are there|are in the image|can you see)\?", q):
        return NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) (shapes|objects) are (there|in the image)\?", q):
        return count(lambda o: o["colour"] == m[1])
    if m := re.fullmatch(r"how many (\w+) are (there|in the image)\?", q):
        return count(lambda o: o["shape"] + ("es" if o["shape"][-1] in "sx" else "s") == m[1])
    if m := re.fullmatch(r"(what colour is|what is the colour of|which colour does) (the [\w ]+?)( have)?\?", q):
        return _resolve(objs, m[2])["colour"]
    if m := re.fullmatch(r"(what shape is|what kind of shape is|which shape is) (the [\w ]+)\?", q):
        return _resolve(objs, m[2])["shape"]
    if m := re.fullmatch(r"(is there a|can you see a) (\w+) (\w+)( in the image)?\?", q):
        return "yes" if any((o["colour"], o["shape"]) == (m[2], m[3]) for o in objs) else "no"
    if m := re.fullmatch(rf"what is {_REL} (the [\w ]+)\?", q):
        ref = _resolve(objs, m[2])
        there = [o for o in objs if o is not ref and _clearly(o, ref, _REL_NAME[m[1]])]
        assert len(there) <= 1
        return there[0]["shape"] if there else "nothing"
    if m := re.fullmatch(rf"is (the [\w ]+?) {_REL} (the [\w ]+)\?", q):
        a, b = _resolve(objs, m[1]), _resolve(objs, m[3])
        assert _clearly(a, b, _REL_NAME[m[2]]) or _clearly(b, a, _REL_NAME[m[2]])  # never too close to call
        return "yes" if _clearly(a, b, _REL_NAME[m[2]]) else "no"
    raise AssertionError(f"unknown question template: {q}")


def test_answers_are_correct_and_in_vocab(world, samples):
    types = Counter()
    for s in samples:
        assert len(s["questions"]) == len(s["answers"]) == len(s["question_types"]) >= 6
        for q, a, t in zip(s["questions"], s["answers"], s["question_types"]):
            assert a in world.answer_vocab
            assert _expected_answer(q, s["objects"]) == a, q
            types[t] += 1
    assert set(types) == {"colour", "shape", "count", "exists", "relation"}


def test_yes_no_answers_are_balanced(world):
    answers = Counter(qa.answer for i in range(500) for qa in world.questions(world.scene("train", i)))
    yes_fraction = answers["yes"] / (answers["yes"] + answers["no"])
    assert answers["yes"] + answers["no"] > 600 and 0.44 < yes_fraction < 0.56


def test_texts_are_deterministic(world):
    scene = world.scene("test", 11)
    assert world.caption(scene) == World(world.cfg).caption(scene)
    assert world.questions(scene) == World(world.cfg).questions(world.scene("test", 11))


# -- dataset API and config -------------------------------------------------------------------


def test_dataset_tasks_select_labels_and_collate(world):
    cls = WorldDataset(world, "val", length=4, task="classification")[0]
    assert set(cls) == {"image", "label", "objects"}
    assert set(WorldDataset(world, "val", length=4, labels=["caption", "boxes"])[0]) == {
        "image", "label", "objects", "caption", "boxes", "box_labels"}
    ds = WorldDataset(world, "val", length=4)
    assert len(WorldDataset(world, "val")) == world.cfg.val_length and ds.classes == world.class_names
    batch = collate([ds[i] for i in range(4)])
    assert batch["instance_mask"].shape == (4, 32, 32) and batch["label"].shape == (4,)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="task"):
        WorldDataset(world, "val", task="jigsaw")
    with pytest.raises(ValueError, match="split"):
        WorldDataset(world, "holdout")


def test_config_round_trip():
    cfg = WorldConfig(image_size=48, colours={"red": (255, 0, 0), "blue": (0, 0, 255)}, shapes=("star", "heart"))
    assert from_dict(WorldConfig, to_dict(cfg)) == cfg
    teal = from_dict(WorldConfig, {"colours": {"red": [255, 0, 0], "teal": [0, 128, 128]}}).colours["teal"]
    assert teal == (0, 128, 128)


@pytest.mark.parametrize("overrides, field", [
    ({"image_size": 4}, "image_size"),
    ({"min_objects": 0}, "min_objects"),
    ({"max_objects": 11}, "max_objects"),
    ({"max_objects": 6, "large_size": 0.7}, "max_objects"),  # does not fit on the canvas
    ({"shapes": ["circle", "blob"]}, "shapes"),
    ({"shapes": ["circle"]}, "shapes"),
    ({"colours": {"red": [300, 0, 0], "blue": [0, 0, 255]}}, "colours.red"),
    ({"colours": {"circle": [1, 2, 3], "blue": [0, 0, 255]}}, "colours"),
    ({"small_size": 0.5}, "large_size"),
    ({"max_overlap": 0.3}, "max_overlap"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ({"shapes": ["circle", "square"], "colours": {"red": [255, 0, 0], "blue": [0, 0, 255], "cyan": [0, 255, 255]},
      "heldout_fraction": 0.67}, "heldout_fraction"),  # a colour held out for both shapes
    ({"background": "stripes"}, "background"),
    ({"background_colour": [1, 2]}, "background_colour"),
    ({"train_length": -1}, "train_length"),
    ({"seed": -1}, "seed"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        from_dict(WorldConfig, overrides)
    assert e.value.field == field

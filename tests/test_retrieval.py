"""Retrieval metrics and zero-shot classification on hand-built embeddings."""
import pytest
import torch
import torch.nn.functional as F

from vlkit.eval.retrieval import retrieval_metrics, zero_shot_classifier, zero_shot_logits


def test_retrieval_metrics_on_a_known_ranking():
    img = torch.eye(4)
    # caption 0 -> image 0 exactly; caption 1 (image 1) closest to image 2 then image 1; 2, 3 exact
    txt = torch.tensor([[1.0, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["t2i_R@1"] == 75.0 and m["t2i_R@2"] == 100.0 and m["t2i_mean_rank"] == pytest.approx(1.25)
    # image 1's best caption is its caption 1 (0.6); image 2's is its caption 2 (1.0 > 0.8)
    assert m["i2t_R@1"] == 100.0 and m["i2t_median_rank"] == 1.0
    assert m["rsum"] == pytest.approx(75 + 100 + 100 + 100)


def test_several_captions_per_image_count_any_hit():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0.3, 0.9], [0, 1, 0], [0, 0.1, 1.0]])
    owner = torch.tensor([0, 1, 1, 2])  # image 1 has captions 1 (bad) and 2 (good)
    m = retrieval_metrics(img, txt, owner, ks=(1,))
    assert m["i2t_R@1"] == 100.0  # image 1 finds caption 2 first
    assert m["t2i_R@1"] == 75.0  # caption 1 retrieves image 2
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(img, txt)


def test_zero_shot_classifier_ensembles_prompts():
    table = {"a cat": [1.0, 0.0], "the cat": [0.8, 0.6], "a dog": [0.0, 1.0], "the dog": [0.6, 0.8]}
    encode = lambda texts: torch.tensor([table[t] for t in texts])  # noqa: E731
    cls = zero_shot_classifier(encode, ["cat", "dog"], ["a {}", "the {}"])
    expected_cat = F.normalize(torch.tensor([0.9, 0.3]), dim=0)
    torch.testing.assert_close(cls[0], expected_cat)
    logits = zero_shot_logits(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), cls)
    assert logits.argmax(1).tolist() == [0, 1]
    with pytest.raises(ValueError):
        zero_shot_classifier(encode, [], ["a {}"])

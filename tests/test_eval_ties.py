"""Ranking for retrieval recall and zero-shot top-k: a tie with a wrong item is a miss, so a collapsed tower
reads chance or worse, never perfect."""

import torch

from pretrain.models.clip_metrics import retrieval, topk_hits

N, D = 10, 16


def _images(n: int = N) -> torch.Tensor:
    # small integers: every dot product is exact whatever order the matmul sums in, so ties are exact ties
    return torch.randint(-4, 5, (n, D), generator=torch.Generator().manual_seed(0)).float()


def test_identical_text_embeddings_give_no_image_to_text_hits():
    images = _images()
    text = torch.ones(N, D)  # a text tower that maps every caption to the same embedding
    r = retrieval(images, text)
    assert r["image_to_text_R@1"] == 0.0 and r["image_to_text_R@5"] == 0.0, "every caption ties: no pair is found"
    assert r["image_to_text_R@10"] == 1.0, "k = n finds everything"
    assert r["text_to_image_R@1"] <= 1 / N + 1e-12, "text->image of one embedding is at most chance"


def test_identical_image_and_text_embeddings_read_zero_not_perfect():
    same = torch.ones(N, D)
    r = retrieval(same, same)
    assert r["image_to_text_R@1"] == r["text_to_image_R@1"] == 0.0


def test_identical_class_embeddings_give_zero_shot_top1_zero():
    classes = torch.ones(N, D)  # every class name gives the same text embedding
    images = _images(40)
    labels = torch.arange(40) % N
    logits = images @ classes.T
    hits = topk_hits(logits, labels, (1, 5))
    assert hits == {1: 0, 5: 0}, "with 10 tied classes the right one is never in the top 5"


def test_distinct_embeddings_still_rank_right():
    eye = torch.eye(N, D)
    r = retrieval(eye, eye)
    assert r["image_to_text_R@1"] == r["text_to_image_R@1"] == 1.0
    # image i matches caption i+1 best, its own caption second: R@1 0, R@5 1
    shifted = torch.roll(eye, 1, dims=0)
    r = retrieval(eye, 0.5 * eye + shifted)
    assert r["image_to_text_R@1"] == 0.0 and r["image_to_text_R@5"] == 1.0
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0], [1.0, 2.0, 3.0]])
    assert topk_hits(logits, torch.tensor([0, 2, 0]), (1, 2, 3)) == {1: 1, 2: 2, 3: 3}


def test_a_tie_below_the_top_costs_one_place_and_nan_is_a_miss():
    logits = torch.tensor([[5.0, 2.0, 2.0, 1.0]])
    assert topk_hits(logits, torch.tensor([1]), (1, 2, 3)) == {1: 0, 2: 0, 3: 1}, "the tied wrong item ranks first"
    nan = torch.tensor([[float("nan"), 1.0, 0.0]])
    assert topk_hits(nan, torch.tensor([0]), (1, 2)) == {1: 0, 2: 0}

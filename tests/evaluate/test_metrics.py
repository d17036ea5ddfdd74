"""The pure metric functions on synthetic data, and the pieces they are built from."""

import numpy as np
import pytest
from PIL import Image

from radio_distill.evaluate.dense import mask_grid, mask_path, probe_miou
from radio_distill.evaluate.metrics import (IGNORE, confusion, cosine_rows, knn_predict, knn_top1, miou,
                                            zero_shot_predict, zero_shot_top1)
from radio_distill.evaluate.pictures import fit_pca3, to_rgb
from radio_distill.evaluate.throughput import timm_equivalent


def clusters(n_per_class: int, classes: int, dim: int = 16, noise: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def test_knn_separates_clustered_features():
    bank, bank_labels = clusters(50, 5, seed=0)
    queries, query_labels = clusters(20, 5, seed=0)  # same centres, other noise draws below
    queries = queries + 0.05 * np.random.default_rng(1).normal(size=queries.shape)
    assert knn_top1(bank, bank_labels, queries, query_labels, k=20, temperature=0.07) >= 0.95


def test_knn_weights_votes_and_caps_k():
    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    # k larger than the bank; the two close class-0 rows outvote three far class-1 rows at T=0.07
    assert knn_predict(bank, labels, np.array([[1.0, 0.05]]), k=50, temperature=0.07).tolist() == [0]
    # at a huge temperature votes are nearly uniform: the majority wins
    assert knn_predict(bank, labels, np.array([[1.0, 0.05]]), k=5, temperature=1e6).tolist() == [1]


def test_zero_shot_picks_the_nearest_text_embedding():
    text = np.eye(4, 8)  # (K, D)
    labels = np.array([0, 1, 2, 3, 2])
    feats = 3.0 * text[labels] + 0.1 * np.random.default_rng(0).normal(size=(5, 8))  # unnormalised on purpose
    assert zero_shot_predict(feats, text).tolist() == labels.tolist()
    assert zero_shot_top1(feats, text, labels) == 1.0
    assert zero_shot_top1(feats, text, (labels + 1) % 4) == 0.0


def test_miou_of_perfect_and_wrong_predictions():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [IGNORE, 0, 0, 0]])
    assert miou(target, target, num_classes=3) == 1.0
    wrong = target.copy()
    wrong[1, 1] = 0
    assert 0 < miou(wrong, target, num_classes=3) < 1
    pred = np.where(target == IGNORE, 1, target)  # predictions on ignored pixels do not count
    assert miou(pred, target, num_classes=3) == 1.0
    assert confusion(wrong, target, num_classes=3).sum() == target.size - 1


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert cosine_rows(a, np.array([[2.0, 0.0], [-1.0, -1.0]])) == pytest.approx([1.0, -1.0])


def test_linear_probe_learns_a_separable_dense_task():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, size=(12, 4, 4))
    feats = np.eye(3)[masks] * 2 + 0.1 * rng.normal(size=(12, 4, 4, 3))  # (M, h, w, C): class one-hot + noise
    assert probe_miou(feats[:8], masks[:8], feats[8:], masks[8:], num_classes=3, steps=100) == 1.0


def test_mask_grid_crops_the_view_box_with_nearest_resampling(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 3  # right half is class 3 - 1
    img = Image.fromarray(mask)
    assert mask_grid(img, (0, 0, 30, 40), (4, 4)).max() == 0  # left half only
    assert (mask_grid(img, (30, 0, 60, 40), (2, 2)) == 3).all()
    half = mask_grid(img.resize((30, 20), Image.Resampling.NEAREST), (30, 0, 60, 40), (2, 2), image_size=(60, 40))
    assert (half == 3).all()  # a mask stored at another size than its image
    assert mask_path(tmp_path, "circle/00001.jpg") == tmp_path / "circle" / "00001.png"


def test_pca_colours_are_shared_between_teacher_and_student():
    maps = np.random.default_rng(0).normal(size=(2, 4, 4, 8))
    pca = fit_pca3(maps)
    rgb = to_rgb(maps, pca)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.allclose(to_rgb(maps.copy(), pca), rgb)  # same features, same colours


def test_teacher_architectures_map_to_timm():
    assert timm_equivalent({"family": "clip", "model": "ViT-L-14"}, 336) == (
        "vit_large_patch14_clip_224", {"img_size": 336, "num_classes": 0})
    assert timm_equivalent({"family": "dinov2", "model": "vit_large_patch14_reg4_dinov2.lvd142m"}, 448)[0] == \
        "vit_large_patch14_reg4_dinov2"
    assert timm_equivalent({"family": "sam", "model": "vit_h"}, 1024)[0] == "samvit_huge_patch16"
    name, kwargs = timm_equivalent({"family": "clip", "model": "radio-tiny-clip"}, 64)  # our tiny config
    assert name == "vit_base_patch16_clip_224" and kwargs["embed_dim"] == 64 and kwargs["patch_size"] == 8
    with pytest.raises(LookupError, match="RN50"):
        timm_equivalent({"family": "clip", "model": "RN50"}, 224)

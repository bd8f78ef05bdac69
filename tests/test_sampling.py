"""Joint-batch construction: slice indexes, the published pair layout, contrastive batches."""

from __future__ import annotations

import pytest
import torch

from utils.sampling import (
    contrastive_batch,
    contrastive_index,
    labels_present,
    pair_layout,
    slices_with_all_classes,
    slices_with_min_labels,
)


def test_pair_layout_b10_is_the_published_one():
    first, second = pair_layout(10)
    names = [f"L{i}" for i in range(5)] + [f"U{i}" for i in range(5)]
    pairs = [(names[a], names[b]) for a, b in zip(first.tolist(), second.tolist())]
    assert pairs == [("L0", "L0"), ("L1", "U1"), ("L2", "L2"), ("L3", "U3"), ("L4", "U4"),
                     ("U0", "U0"), ("U0", "U1"), ("U2", "U2"), ("U2", "U3"), ("U3", "U4")]


@pytest.mark.parametrize("b", [2, 4, 6, 12, 20])
def test_pair_layout_generalises(b):
    first, second = pair_layout(b)
    h = b // 2
    assert first.shape == second.shape == (b,)
    assert first.max() < b and second.max() < b
    assert sorted(second[h:].tolist()) == list(range(h, b))  # every unlabeled slice is used
    assert set(first[:h].tolist()) == set(range(h))  # every labeled slice is used
    assert (first[h:] >= h).all()  # second half pairs unlabeled with unlabeled


def test_pair_layout_rejects_odd():
    with pytest.raises(ValueError, match="--bt_size=7"):
        pair_layout(7)


def test_indexes_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (30, 6, 6), generator=gen)
    labels[::3] = torch.randint(0, 2, (10, 6, 6), generator=gen)  # only classes 0 and 1
    labels[1] = 0
    present = labels_present(labels, 4)
    for i in range(30):
        assert present[i].tolist() == [bool((labels[i] == c).any()) for c in range(4)]
    want_all = [i for i in range(30) if len(labels[i].unique()) == 4]
    want_3 = [i for i in range(30) if len(labels[i].unique()) >= 3]
    assert slices_with_all_classes(labels, 4).tolist() == want_all
    assert slices_with_min_labels(labels, 4, 3).tolist() == want_3
    # the trainers keep label pools as uint8 (utils.dataset.load_slices): same answers
    assert torch.equal(labels_present(labels.to(torch.uint8), 4), present)
    assert slices_with_min_labels(labels.to(torch.uint8), 4, 3).tolist() == want_3


def test_contrastive_batch_shapes_and_ranges():
    gen = torch.Generator().manual_seed(1)
    lab = torch.zeros(8, 32, 32, dtype=torch.long)
    lab[:, 8:24, 8:24] = 1
    lab[:, 12:20, 12:20] = 2
    img = lab[:, None].float() / 2
    idx = slices_with_all_classes(lab, 3)
    x, y = contrastive_batch(img, lab, idx, img + 0.1, lab, idx, 10, 3, gen)
    assert x.shape == (20, 1, 32, 32) and y.shape == (20, 3, 32, 32)
    assert x.min() >= 0 and x.max() <= 1.5
    torch.testing.assert_close(y.sum(1), torch.ones(20, 32, 32))
    with pytest.raises(ValueError, match="pseudo-labeled slice"):
        contrastive_batch(img, lab, idx, img, lab, idx[:0], 10, 3, gen)


def test_contrastive_index_falls_back_to_the_most_complete_slices():
    labels = torch.zeros(5, 4, 4, dtype=torch.long)
    labels[1, 0, 0], labels[1, 0, 1] = 1, 2  # three labels
    labels[3, 0, 0] = 1  # two labels
    idx, complete = contrastive_index(labels, 4)
    assert not complete and idx.tolist() == [1]
    labels[4, 0, :3] = torch.tensor([1, 2, 3])
    idx, complete = contrastive_index(labels, 4)
    assert complete and idx.tolist() == [4]
    idx, complete = contrastive_index(torch.zeros(3, 4, 4, dtype=torch.long), 4)
    assert idx.numel() == 0 and not complete

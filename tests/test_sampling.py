"""Joint-batch construction: slice indexes, the published pair layout, contrastive batches."""

from __future__ import annotations

import pytest
import torch

from utils.augment import DiceAugment, apply_augment, draw_set_intensity, to_onehot
from utils.errors import DataError
from utils.joint_training import (
    JointData,
    JointSettings,
    build_joint_data,
    draw_joint,
    joint_batch,
    joint_batch_from,
)
from utils.sampling import (
    LABELED_DRAW_FACTOR,
    contrastive_index,
    contrastive_sets,
    draw,
    first_eligible,
    labels_present,
    pair_layout,
    pick_joint_slices,
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
    # A tie for the most labels keeps every tied slice, not just the first.
    labels[4, 0, 2] = 0
    labels[2, 1, :2] = torch.tensor([3, 1])
    idx, complete = contrastive_index(labels, 4)
    assert not complete and idx.tolist() == [1, 2, 4]


def test_pair_layout_intra_pairs_each_slice_with_itself():
    for b in (2, 10):
        first, second = pair_layout(b, inter_image=False)
        assert first.tolist() == second.tolist() == list(range(b))


# ------------------------------------------------------------- pools whose origin can be read
H = W = 32
C = 3


def _pool(n: int, base: float, seed: int, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n slices; each label map holds every class at a position that encodes the pool and the
    slice, and
    each image is base + 0.02 * label + a faint texture of its own (values in [base, base +
    0.05], so the contrastive intensity changes never clip)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, H, W, dtype=torch.uint8)
    for i in range(n):
        labels[i, 2 + i: 12 + i, 3:13] = 1
        labels[i, 16 + pool:26 + pool, 2 + 2 * i: 10 + 2 * i] = 2
    texture = 0.01 * torch.rand(n, 1, H, W, generator=gen)
    images = base + 0.02 * labels[:, None].float() + texture
    return images, labels


LAB_BASE, UNL_BASE = 0.40, 0.65


def _data(n_lab: int = 6, n_unl: int = 7) -> JointData:
    lab_img, lab_lbl = _pool(n_lab, LAB_BASE, 1, 0)
    unl_img, unl_lbl = _pool(n_unl, UNL_BASE, 2, 3)
    return JointData(lab_img, lab_lbl, slices_with_min_labels(lab_lbl, C, 2),
                     slices_with_all_classes(lab_lbl, C), unl_img, unl_lbl,
                     slices_with_all_classes(unl_lbl, C))


def _source(image: torch.Tensor, onehot: torch.Tensor, data: JointData) -> tuple[str, int]:
    """Which pool slice an augmented contrastive image came from: its label must equal that
    slice's label exactly, and its image must be that slice's image under one map
    c * (x - mean) + mean + b (no spatial change)."""
    found = []
    for pool, imgs, lbls in (("L", data.lab_img, data.lab_lbl), ("U", data.unl_img,
                                                                 data.unl_lbl)):
        for i in range(imgs.shape[0]):
            if not torch.equal(onehot.argmax(0), lbls[i].long()):
                continue
            x = imgs[i, 0].double() - imgs[i, 0].double().mean()
            y = image[0].double() - image[0].double().mean()
            c = (x * y).sum() / (x * x).sum()
            if torch.allclose(y, c * x, atol=1e-5) and 0.7 - 1e-6 <= c <= 1.3 + 1e-6:
                found.append((pool, i))
    assert len(found) == 1, f"image matches {found}, expected exactly one pool slice"
    return found[0]


def _set_maps(images: torch.Tensor, sources: list[tuple[str, int]], data: JointData):
    """(contrast, brightness) of each image relative to its source slice."""
    maps = []
    for img, (pool, i) in zip(images, sources):
        src = (data.lab_img if pool == "L" else data.unl_img)[i, 0].double()
        out = img[0].double()
        c = ((out - out.mean()) * (src - src.mean())).sum() / ((src - src.mean()) ** 2).sum()
        maps.append((c.item(), (out.mean() - src.mean()).item()))
    return maps


@pytest.mark.parametrize("inter", [True, False])
def test_joint_batch_wiring(inter):
    data, b, n_seg = _data(), 10, 8
    s = JointSettings(num_classes=C, n_seg=n_seg, bt_size=b, inter_image=inter,
                      augment=DiceAugment(rd_en=False, ri_en=False))
    images, y, yc, pos_idx = joint_batch(data, s, torch.Generator().manual_seed(3))
    assert images.shape == (n_seg + 2 * b, 1, H, W) and y.shape == (n_seg, C, H, W)
    assert yc.shape == (2 * b, C, H, W) and pos_idx.shape[:2] == (2 * b, C - 1)
    # the Dice slices come from the labeled pool (its images stay below the pool's base)
    assert images[:n_seg].max() < UNL_BASE - 0.1
    # every contrastive image comes with its own slice's label, from the pool the layout says
    xc = images[n_seg:]
    src = [_source(xc[k], yc[k], data) for k in range(2 * b)]
    first, second = pair_layout(b, inter)
    h = b // 2
    layout = first.tolist() + second.tolist()
    assert [p for p, _ in src] == ["L" if j < h else "U" for j in layout]
    picked = {}
    for k, j in enumerate(layout):  # one picked slice per layout entry, in both sets
        assert picked.setdefault(j, src[k]) == src[k]
    for i in range(b):
        if first[i] == second[i]:  # same-slice pairs: identical labels, pixel-aligned
            assert torch.equal(yc[i], yc[b + i])
    # one contrast and one brightness draw per set, different between the sets
    maps = _set_maps(xc, src, data)
    for part in (maps[:b], maps[b:]):
        assert max(abs(c - part[0][0]) for c, _ in part) < 1e-4
        assert max(abs(v - part[0][1]) for _, v in part) < 1e-5
    assert abs(maps[0][0] - maps[b][0]) > 1e-3
    # positives lie on their class in their own image
    n_img = torch.arange(2 * b).view(-1, 1, 1)
    cls = torch.arange(1, C).view(1, -1, 1)
    on = yc[n_img, cls, pos_idx[..., 0], pos_idx[..., 1]]
    assert bool((on == 1).all())


def test_joint_batch_intra_pairs_are_the_same_image():
    data, b = _data(), 6
    s = JointSettings(num_classes=C, n_seg=4, bt_size=b, inter_image=False)
    images, _, yc, _ = joint_batch(data, s, torch.Generator().manual_seed(5))
    xc = images[4:]
    src = [_source(xc[k], yc[k], data) for k in range(2 * b)]
    assert src[:b] == src[b:]
    assert [p for p, _ in src[:b]] == ["L"] * (b // 2) + ["U"] * (b // 2)


def _wide_pool(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n slices of 32 x 48 (height != width) with both foreground classes, each somewhere
    else, and images base + 0.02 * label + a faint texture."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, 32, 48, dtype=torch.uint8)
    for i in range(n):
        labels[i, 4 + i:16 + i, 6 + 2 * i:30 + 2 * i] = 1
        labels[i, 20:28, 10 + 3 * i:20 + 3 * i] = 2
    return 0.4 + 0.02 * labels[:, None].float() + 0.01 * torch.rand(n, 1, 32, 48,
                                                                     generator=gen), labels


@pytest.mark.parametrize("rd_en, ri_en, en_1hot",
                         [(True, False, True), (False, True, False), (True, True, False)])
def test_dice_batch_follows_the_augmentation_flags(rd_en, ri_en, en_1hot):
    """The Dice slices get the deformation and the intensity change as rd_en and ri_en say,
    each on its own, drawn for their H x W (not W x H); their labels stay soft after the
    deformation unless en_1hot is off, which makes them one-hot of their argmax."""
    img, lbl = _wide_pool(6, seed=0)
    every = torch.arange(6)
    data = JointData(img, lbl, every, every, img.clone(), lbl.clone(), every)
    s = JointSettings(num_classes=C, n_seg=4, bt_size=2,
                      augment=DiceAugment(rd_en=rd_en, ri_en=ri_en, en_1hot=en_1hot))
    draws = draw_joint(data, s, torch.Generator().manual_seed(2))
    assert draws.augment.basis_h.shape == (32, 3) and draws.augment.basis_w.shape == (48, 3)
    images, y, _, _ = joint_batch_from(data, s, draws, pair_layout(2))
    x_expected, y_expected = apply_augment(img[draws.dice], to_onehot(lbl[draws.dice], C),
                                           draws.augment, rd_en=rd_en, ri_en=ri_en)
    if not en_1hot:
        hard = y_expected.argmax(1, keepdim=True) == torch.arange(C).view(1, C, 1, 1)
        y_expected = hard.float()
    assert torch.equal(images[:4], x_expected)
    assert torch.equal(y, y_expected)
    assert bool(((y > 0) & (y < 1)).any()) == (rd_en and en_1hot)


def test_build_joint_data_indexes_each_pool_by_its_own_labels():
    """Dice slices: at least min_labels_dice distinct labels (background counts); contrastive
    slices of each pool: those with every class, read off that pool's own labels; the flag
    says whether the pseudo-labeled pool has such a slice (else the fallback)."""
    lab = torch.zeros(4, H, W, dtype=torch.uint8)
    lab[1:3, 2:6, 2:6] = 1
    lab[2:4, 10:14, 10:14] = 2  # slice 0: background only, 1: {0, 1}, 2: all, 3: {0, 2}
    unl = torch.zeros(3, H, W, dtype=torch.uint8)
    unl[:2, 2:6, 2:6] = 1
    unl[0, 10:14, 10:14] = unl[2, 20:24, 20:24] = 2  # 0: all, 1: {0, 1}, 2: {0, 2}
    gen = torch.Generator().manual_seed(0)
    lab_img, unl_img = torch.rand(4, 1, H, W, generator=gen), torch.rand(3, 1, H, W, generator=gen)
    data, complete = build_joint_data(lab_img, lab, unl_img, unl, C, 2)
    assert data.dice_index.tolist() == [1, 2, 3]
    assert data.lab_index.tolist() == [2]
    assert data.unl_index.tolist() == [0]
    assert complete
    assert data.lab_img is lab_img and data.unl_lbl is unl
    data, complete = build_joint_data(lab_img, lab, unl_img, unl[1:], C, 3)
    assert data.dice_index.tolist() == [2]
    assert data.unl_index.tolist() == [0, 1]  # no slice with every class: the most complete
    assert not complete


def test_dice_and_labeled_contrastive_slices_come_from_one_draw():
    gen = torch.Generator().manual_seed(0)
    everything = torch.arange(40)
    for seed in range(5):
        gen.manual_seed(seed)
        dice, lab, unl = pick_joint_slices(40, everything, everything, torch.tensor([3]), 20,
                                           10, gen)
        assert lab.tolist() == dice[:5].tolist()  # the first slices of the same draw
        assert unl.tolist() == [3] * 5
    subset = torch.tensor([1, 5, 9, 13, 17, 21, 25, 29, 33, 37])
    for seed in range(5):
        gen.manual_seed(seed)
        dice, lab, _ = pick_joint_slices(40, everything, subset, subset, 20, 10, gen)
        in_order = [d for d in dice.tolist() if d in subset.tolist()][:5]
        if len(in_order) == 5:
            assert lab.tolist() == in_order


def test_first_eligible_keeps_order_and_fills_from_the_eligible():
    gen = torch.Generator().manual_seed(0)
    seq = torch.tensor([4, 2, 9, 2, 7, 1])
    assert first_eligible(seq, torch.tensor([2, 7]), 3, gen, "x").tolist() == [2, 2, 7]
    assert first_eligible(seq, torch.tensor([5]), 2, gen, "x").tolist() == [5, 5]
    with pytest.raises(DataError, match="no x"):
        first_eligible(seq, torch.tensor([], dtype=torch.long), 2, gen, "x")
    assert LABELED_DRAW_FACTOR == 15


def test_draw_reaches_every_entry_uniformly():
    # 6000 draws from three slice numbers: each appears, about 2000 times (a uniform count
    # has sd ~37; 1700 is 8 sd away), and nothing else appears.
    index = torch.tensor([10, 20, 30])
    got = draw(index, 6000, torch.Generator().manual_seed(0), "x")
    counts = [int((got == v).sum()) for v in (10, 20, 30)]
    assert sum(counts) == 6000 and min(counts) > 1700


def test_dice_slices_are_the_first_eligible_of_one_draw_of_15_n_seg():
    # 4 of 40 slices eligible: a draw of 15 * 20 = 300 holds ~30 eligible entries, enough for
    # the 20 Dice slices, which must be its first 20 eligible entries in order.
    eligible = torch.tensor([3, 13, 23, 33])
    for seed in range(3):
        want_seq = torch.randint(40, (LABELED_DRAW_FACTOR * 20,),
                                 generator=torch.Generator().manual_seed(seed))
        want = [v for v in want_seq.tolist() if v in eligible.tolist()]
        assert len(want) >= 20
        dice, _, _ = pick_joint_slices(40, eligible, eligible, eligible, 20, 4,
                                       torch.Generator().manual_seed(seed))
        assert dice.tolist() == want[:20]


def test_contrastive_sets_layouts_and_an_empty_pool():
    data = _data()
    data.unl_index = data.unl_index[:0]
    s = JointSettings(num_classes=C, n_seg=4, bt_size=4)
    with pytest.raises(DataError, match="pseudo-labeled slice"):
        joint_batch(data, s, torch.Generator().manual_seed(0))
    draws = torch.stack([draw_set_intensity(torch.Generator().manual_seed(i)) for i in (0, 1)])
    x, y = contrastive_sets(data.lab_img[:4], data.lab_lbl[:4], *pair_layout(4, True), C, draws)
    assert x.shape == (8, 1, H, W) and y.shape == (8, C, H, W)
    assert not torch.equal(y[1], y[5])  # inter-image: pair 1 is (L1, U1)
    # intra-image: both sets hold the four slices in order (every slice's label is its own)
    _, y = contrastive_sets(data.lab_img[:4], data.lab_lbl[:4], *pair_layout(4, False), C, draws)
    assert torch.equal(y[:4], y[4:]) and torch.equal(y[:4].argmax(1), data.lab_lbl[:4].long())


def test_dice_slices_come_from_the_dice_index_and_contrastive_ones_from_theirs():
    # the Dice index (even slices) and the contrastive one (multiples of 5) overlap in 0, 10,
    # 20, 30: each term takes the first entries of the one draw that are in its own index
    dice_index, lab_index = torch.arange(0, 40, 2), torch.arange(0, 40, 5)
    for seed in range(3):
        seq = torch.randint(40, (LABELED_DRAW_FACTOR * 8,),
                            generator=torch.Generator().manual_seed(seed)).tolist()
        dice, lab, _ = pick_joint_slices(40, dice_index, lab_index, lab_index, 8, 6,
                                         torch.Generator().manual_seed(seed))
        assert dice.tolist() == [v for v in seq if v % 2 == 0][:8]
        assert lab.tolist() == [v for v in seq if v % 5 == 0][:3]

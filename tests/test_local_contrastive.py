"""Tests of the local contrastive loss against a literal loop implementation of METHOD §5."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.local_contrastive import local_contrastive_loss, sample_positive_indices
from losses.local_contrastive_loop import loop_local_contrastive_loss


def _random_case(
    b_sz: int, n_cls: int, dim: int, size: int, seed: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings and soft labels; some classes absent, pair 0 has class 1 only in a."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * b_sz
    emb = torch.randn(n, dim, size, size, generator=g, dtype=dtype)
    cls = torch.randint(0, n_cls, (n, size, size), generator=g)
    for img in range(n):
        # Drop a random subset of foreground classes from some images.
        drop = torch.rand(n_cls, generator=g) < 0.3
        drop[0] = False
        for c in range(1, n_cls):
            if drop[c]:
                cls[img][cls[img] == c] = 0
    # Pair 0: class 1 present in a, absent in b.
    cls[0, 0, 0] = 1
    cls[b_sz][cls[b_sz] == 1] = 0
    hard = F.one_hot(cls, n_cls).permute(0, 3, 1, 2).to(dtype)
    noise = torch.rand(hard.shape, generator=g, dtype=dtype)
    # Soft labels with the same argmax: 0.6 on the true class beats at most 0.4 elsewhere.
    labels = 0.6 * hard + 0.4 * noise / noise.sum(dim=1, keepdim=True)
    return emb, labels


CASES = [(1, 2, 0), (1, 4, 1), (2, 3, 2), (2, 2, 3), (5, 4, 4), (5, 3, 5)]


@pytest.mark.parametrize("b_sz,n_cls,seed", CASES)
@pytest.mark.parametrize("inter_image", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "original"])
def test_matches_loop_reference_float64(
    b_sz: int, n_cls: int, seed: int, inter_image: bool, reduction: str
) -> None:
    emb, labels = _random_case(b_sz, n_cls, 16, 12, seed, torch.float64)
    g = torch.Generator().manual_seed(100 + seed)
    pos_idx = sample_positive_indices(labels, 3, generator=g)
    # The special pair (class in a, not in b) really is in the input.
    assert (pos_idx[0, 0] >= 0).all() and (pos_idx[b_sz, 0] == -1).all()
    got = local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image, reduction)
    want = loop_local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image, reduction)
    assert got.dtype == torch.float64
    if n_cls > 2 or (inter_image and b_sz > 1):
        assert float(want) > 0.0
    else:
        # A single foreground class leaves one candidate per set: every term is -log 1.
        assert float(want) == 0.0
    assert abs(float(got) - float(want)) <= 1e-9 * abs(float(want)) + 1e-12


@pytest.mark.parametrize("inter_image", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "original"])
def test_matches_loop_reference_float32(inter_image: bool, reduction: str) -> None:
    emb, labels = _random_case(2, 4, 16, 12, 7, torch.float64)
    pos_idx = sample_positive_indices(labels, 4, generator=torch.Generator().manual_seed(3))
    got = local_contrastive_loss(emb.float(), labels.float(), pos_idx, 0.2, inter_image, reduction)
    want = loop_local_contrastive_loss(emb, labels, pos_idx, 0.2, inter_image, reduction)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want))


@pytest.mark.parametrize("inter_image", [True, False])
def test_non_square_images_match_reference(inter_image: bool) -> None:
    # H = 12 rows, W = 7 columns: a row/column or height/width mix-up in the sampler's
    # flat-index decoding or the loss's gather lands on other pixels.
    emb, labels = _random_case(2, 4, 8, 12, 71, torch.float64)
    emb, labels = emb[..., :7].contiguous(), labels[..., :7].contiguous()
    pos_idx = sample_positive_indices(labels, 5, generator=torch.Generator().manual_seed(8))
    cls = labels.argmax(dim=1)
    for img in range(4):
        for c in range(1, 4):
            rows = pos_idx[img, c - 1]
            if bool((cls[img] == c).any()):
                assert (rows[:, 0] < 12).all() and (rows[:, 1] < 7).all()
                assert (cls[img][rows[:, 0], rows[:, 1]] == c).all()
    got = local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image)
    want = loop_local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image, "mean")
    assert float(want) > 0.0
    assert abs(float(got) - float(want)) <= 1e-9 * float(want)


@pytest.mark.parametrize("inter_image", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "original"])
def test_gradient_matches_loop_reference(inter_image: bool, reduction: str) -> None:
    # The gradient flows through both the anchors and the class means (METHOD §5 detaches
    # nothing); autograd through the literal loop is the independent reference.
    emb, labels = _random_case(2, 3, 6, 8, 81, torch.float64)
    pos_idx = sample_positive_indices(labels, 3, generator=torch.Generator().manual_seed(9))
    emb_a = emb.clone().requires_grad_(True)
    emb_b = emb.clone().requires_grad_(True)
    (g_got,) = torch.autograd.grad(
        local_contrastive_loss(emb_a, labels, pos_idx, 0.1, inter_image, reduction), emb_a
    )
    (g_want,) = torch.autograd.grad(
        loop_local_contrastive_loss(emb_b, labels, pos_idx, 0.1, inter_image, reduction), emb_b
    )
    assert g_want.abs().max() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def _line_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1x3 images; C=2, D=2. a: labels [0,1,1], class-1 pixels (1,0),(0,1); b: [1,0,0]."""
    emb = torch.zeros(2, 2, 1, 3, dtype=torch.float64)
    emb[0, :, 0, 0] = torch.tensor([5.0, -3.0])  # background: never used
    emb[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    emb[0, :, 0, 2] = torch.tensor([0.0, 1.0])
    emb[1, :, 0, 0] = torch.tensor([1.0, 0.0])
    emb[1, :, 0, 1] = torch.tensor([-2.0, 7.0])
    cls = torch.tensor([[[0, 1, 1]], [[1, 0, 0]]])
    labels = F.one_hot(cls, 2).permute(0, 3, 1, 2).double()
    return emb, labels


def test_hand_worked_inter_and_intra() -> None:
    emb, labels = _line_case()
    pos_idx = torch.tensor([[[[0, 1]]], [[[0, 0]]]])  # a: pixel (0,1); b: pixel (0,0)
    # mu(a) ∝ (1,1) (mean of raw embeddings), mu(b) = (1,0); both anchors are (1,0).
    # With tau = 1: sim(x, mu_a) = 1/sqrt2, sim(x, mu_b) = 1, d = 1 - 1/sqrt2.
    # a: intra log(1+e^d), inter log(1+e^-d); b: intra log(1+e^-d), inter log(1+e^d); K = 2.
    d = 1.0 - 1.0 / math.sqrt(2.0)
    want = math.log(1.0 + math.exp(d)) + math.log(1.0 + math.exp(-d))
    got = local_contrastive_loss(emb, labels, pos_idx, temperature=1.0, inter_image=True)
    assert float(got) == pytest.approx(want, rel=1e-12)
    # Intra: each candidate set holds only the positive, so every term is -log 1 = 0.
    got_intra = local_contrastive_loss(emb, labels, pos_idx, temperature=1.0, inter_image=False)
    assert float(got_intra) == pytest.approx(0.0, abs=1e-12)


def test_hand_worked_three_classes_absent_in_b() -> None:
    # a: labels [1,2,0] with embeddings (1,0),(0,1); b: labels [1,0,0], class 2 absent in b.
    emb = torch.zeros(2, 2, 1, 3, dtype=torch.float64)
    emb[0, :, 0, 0] = torch.tensor([3.0, 0.0])
    emb[0, :, 0, 1] = torch.tensor([0.0, 0.5])
    emb[0, :, 0, 2] = torch.tensor([1.0, 1.0])
    emb[1, :, 0, 0] = torch.tensor([2.0, 0.0])
    emb[1, :, 0, 1:] = 1.0
    cls = torch.tensor([[[1, 2, 0]], [[1, 0, 0]]])
    labels = F.one_hot(cls, 3).permute(0, 3, 1, 2).double()
    pos_idx = torch.tensor([[[[0, 0]], [[0, 1]]], [[[0, 0]], [[-1, -1]]]])  # (2, C-1=2, P=1, 2)
    tau = 0.5  # cosine 1 -> sim 2, cosine 0 -> sim 0
    e2 = math.exp(-2.0)
    # Intra: a class 1 and class 2 each log(1+e^-2); b class 1 has D(b)={mu_b1}: 0; K = 2.
    got = local_contrastive_loss(emb, labels, pos_idx, tau, inter_image=False)
    assert float(got) == pytest.approx(2 * math.log(1 + e2) / 2, rel=1e-12)
    # Inter: D(a) = D(b) = {mu_a1, mu_a2, mu_b1}. a class 1: intra and inter log(2+e^-2);
    # a class 2: intra log(1+2e^-2), inter 0 (absent in b); b class 1: 2 x log(2+e^-2); K = 4.
    got = local_contrastive_loss(emb, labels, pos_idx, tau, inter_image=True)
    want = (4 * math.log(2 + e2) + math.log(1 + 2 * e2)) / 4
    assert float(got) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("inter_image", [True, False])
def test_original_vs_mean_relation(inter_image: bool) -> None:
    emb, labels = _random_case(2, 3, 16, 12, 11, torch.float64)
    pos_idx = sample_positive_indices(labels, 3, generator=torch.Generator().manual_seed(1))
    k_norm = 3 * 2 * (2 if inter_image else 1)
    pair_losses = []
    for i in range(2):
        sub = [i, 2 + i]
        args = (emb[sub], labels[sub], pos_idx[sub], 0.1, inter_image)
        # B = 1: the running sum is divided exactly once, so both reductions agree.
        m = local_contrastive_loss(*args, reduction="mean")
        o = local_contrastive_loss(*args, reduction="original")
        assert float(o) == pytest.approx(float(m), rel=1e-12)
        pair_losses.append(float(m))
    l0, l1 = pair_losses
    mean2 = local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image, "mean")
    orig2 = local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image, "original")
    # B = 2: mean = (L0 + L1)/2; original = ((R0/K + R1)/K)/2 = (L0/K + L1)/2.
    assert float(mean2) == pytest.approx((l0 + l1) / 2, rel=1e-12)
    assert float(orig2) == pytest.approx((l0 / k_norm + l1) / 2, rel=1e-12)
    assert float(orig2) < float(mean2)


@pytest.mark.parametrize("inter_image", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "original"])
def test_gradients_finite_with_absent_classes(inter_image: bool, reduction: str) -> None:
    emb, labels = _random_case(3, 4, 8, 10, 21, torch.float32)
    # Image 1 and its partner 4 have no foreground at all: every term of that pair is invalid.
    labels[1] = 0.0
    labels[1, 0] = 1.0
    labels[4] = labels[1]
    pos_idx = sample_positive_indices(labels, 3, generator=torch.Generator().manual_seed(2))
    assert (pos_idx[1] == -1).all() and (pos_idx[4] == -1).all()
    emb.requires_grad_(True)
    loss = local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image, reduction)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert emb.grad.abs().sum() > 0
    # The foreground-free pair influences nothing.
    assert emb.grad[1].abs().max() == 0 and emb.grad[4].abs().max() == 0


def test_all_background_batch_is_zero_with_finite_grad() -> None:
    emb = torch.randn(2, 4, 5, 5, requires_grad=True)
    labels = torch.zeros(2, 3, 5, 5)
    labels[:, 0] = 1.0
    pos_idx = sample_positive_indices(labels, 2)
    loss = local_contrastive_loss(emb, labels, pos_idx)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("inter_image", [True, False])
def test_scale_invariance(inter_image: bool) -> None:
    emb, labels = _random_case(2, 4, 16, 12, 31, torch.float64)
    pos_idx = sample_positive_indices(labels, 3, generator=torch.Generator().manual_seed(4))
    base = float(local_contrastive_loss(emb, labels, pos_idx, 0.1, inter_image))
    g = torch.Generator().manual_seed(5)
    # Global positive scale.
    scaled = float(local_contrastive_loss(7.3 * emb, labels, pos_idx, 0.1, inter_image))
    assert scaled == pytest.approx(base, rel=1e-12)
    # Per-pixel positive scale, constant within each (image, class) region: anchors and means
    # are both rescaled and the cosine removes the factor.
    cls = labels.argmax(dim=1)
    region_scale = torch.rand(4, 4, generator=g, dtype=torch.float64) * 5 + 0.1  # (N, C)
    pix_scale = torch.gather(region_scale, 1, cls.flatten(1)).view(4, 1, 12, 12)
    scaled = float(local_contrastive_loss(emb * pix_scale, labels, pos_idx, 0.1, inter_image))
    assert scaled == pytest.approx(base, rel=1e-12)
    # Arbitrary per-pixel scale on background pixels: background is never used.
    bg_scale = torch.where(cls == 0, torch.rand(4, 12, 12, generator=g, dtype=torch.float64), 1)
    scaled = float(
        local_contrastive_loss(emb * bg_scale.unsqueeze(1), labels, pos_idx, 0.1, inter_image)
    )
    assert scaled == pytest.approx(base, rel=1e-12)
    # A non-constant scale inside foreground regions changes mu (a mean of *raw* embeddings),
    # so the loss must change: this pins the raw-mean definition of METHOD §5.
    fg_scale = torch.where(
        cls > 0, torch.rand(4, 12, 12, generator=g, dtype=torch.float64) * 5 + 0.1, 1
    )
    scaled = float(
        local_contrastive_loss(emb * fg_scale.unsqueeze(1), labels, pos_idx, 0.1, inter_image)
    )
    assert abs(scaled - base) > 1e-6 * base


def test_sampler_classes_and_absent() -> None:
    _, labels = _random_case(3, 4, 1, 9, 41, torch.float32)
    pos_idx = sample_positive_indices(labels, 50, generator=torch.Generator().manual_seed(0))
    assert pos_idx.shape == (6, 3, 50, 2) and pos_idx.dtype == torch.long
    cls = labels.argmax(dim=1)
    n_absent = 0
    for img in range(6):
        for c in range(1, 4):
            rows = pos_idx[img, c - 1]
            if not bool((cls[img] == c).any()):
                n_absent += 1
                assert (rows == -1).all()
                continue
            assert (rows >= 0).all() and (rows < 9).all()
            assert (cls[img][rows[:, 0], rows[:, 1]] == c).all()
    assert n_absent > 0  # the case exercises absent classes


def test_sampler_uniform() -> None:
    labels = torch.zeros(2, 3, 4, 4)
    labels[:, 0] = 1.0
    pixels = [(0, 1), (1, 3), (2, 0), (3, 3), (3, 1)]
    for r, c in pixels:
        labels[0, :, r, c] = torch.tensor([0.0, 1.0, 0.0])
    labels[1, :, 2, 2] = torch.tensor([0.1, 0.2, 0.7])  # single class-2 pixel, soft label
    n_draw = 20000
    pos_idx = sample_positive_indices(labels, n_draw, generator=torch.Generator().manual_seed(9))
    draws = pos_idx[0, 0]
    counts = torch.tensor([((draws[:, 0] == r) & (draws[:, 1] == c)).sum() for r, c in pixels])
    assert int(counts.sum()) == n_draw  # every draw lands on a class-1 pixel
    expected = n_draw / len(pixels)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0  # 4 dof; p < 1e-4 for a correct sampler
    assert (pos_idx[1, 1] == torch.tensor([2, 2])).all()
    assert (pos_idx[0, 1] == -1).all() and (pos_idx[1, 0] == -1).all()


@pytest.mark.parametrize("inter_image", [True, False])
def test_bfloat16_autocast(inter_image: bool) -> None:
    emb, labels = _random_case(2, 4, 8, 12, 51, torch.float32)
    pos_idx = sample_positive_indices(labels, 3, generator=torch.Generator().manual_seed(6))
    conv = torch.nn.Conv2d(8, 16, 1)
    with torch.no_grad():
        conv.weight.copy_(
            torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(7))
        )
        conv.bias.zero_()
    with torch.no_grad():
        want = local_contrastive_loss(conv(emb), labels, pos_idx, 0.1, inter_image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feat = conv(emb)
            assert feat.dtype == torch.bfloat16
            got = local_contrastive_loss(feat, labels, pos_idx, 0.1, inter_image)
        exact = local_contrastive_loss(feat.float(), labels, pos_idx, 0.1, inter_image)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # bf16 features: loose agreement with the float32 network.
    assert float(got) == pytest.approx(float(want), rel=5e-2)
    # The loss itself must not run in bf16 under autocast.
    assert float(got) == pytest.approx(float(exact), rel=1e-6)


def test_bad_arguments() -> None:
    emb, labels = _random_case(1, 3, 4, 6, 61, torch.float32)
    pos_idx = sample_positive_indices(labels, 2)
    with pytest.raises(ValueError):
        local_contrastive_loss(emb, labels, pos_idx, reduction="sum")
    with pytest.raises(ValueError):
        local_contrastive_loss(emb[:1], labels[:1], pos_idx[:1])

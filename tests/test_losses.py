"""Tests for losses/dice.py and losses/cross_entropy.py, and the layering of losses/."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from losses.cross_entropy import class_weights, weighted_cross_entropy_loss
from losses.dice import soft_dice_loss

# ---------------------------------------------------------------- soft Dice


def _soft_dice_loop(logits: torch.Tensor, y: torch.Tensor, include_bg: bool) -> float:
    p = torch.softmax(logits.double(), dim=1)
    n, c = logits.shape[:2]
    vals = []
    for i in range(n):
        for k in range(0 if include_bg else 1, c):
            inter = float((p[i, k] * y[i, k]).sum())
            den = float(p[i, k].sum()) + float(y[i, k].sum()) + 1e-10
            vals.append(2 * inter / den)
    return 1.0 - sum(vals) / len(vals)


def test_soft_dice_hand_worked() -> None:
    # 1 image, 2 classes, 2 pixels; p(class 1) = sigmoid(l1 - l0), so log(3) gives 0.75.
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])  # (1,2,1,2)
    y = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    # pixel 0: p = (0.5, 0.5); pixel 1: p = (0.25, 0.75)
    d0 = 2 * 0.5 / (0.75 + 1)
    d1 = 2 * 0.75 / (1.25 + 1)
    expected = 1 - (d0 + d1) / 2
    assert soft_dice_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert soft_dice_loss(logits, y, include_background=False).item() == pytest.approx(
        1 - d1, rel=1e-6
    )


@pytest.mark.parametrize("include_bg", [True, False])
def test_soft_dice_matches_loop(include_bg: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16, 16) * 2
    y = torch.softmax(torch.randn(3, 4, 16, 16) * 3, dim=1)  # soft labels
    y[1, 2] = 0.0  # a class absent in one image
    got = soft_dice_loss(logits, y, include_background=include_bg).item()
    assert got == pytest.approx(_soft_dice_loop(logits, y, include_bg), rel=1e-5)


def test_soft_dice_perfect_and_gradient() -> None:
    label = torch.randint(0, 3, (2, 8, 8))
    y = F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    # Only classes present in every image can reach Dice 1; ensure all present.
    y[:, :, 0, 0] = 0
    y[:, 0, 0, 0] = 1
    y[:, :, 0, 1] = 0
    y[:, 1, 0, 1] = 1
    y[:, :, 0, 2] = 0
    y[:, 2, 0, 2] = 1
    logits = (y * 40.0).requires_grad_(True)
    loss = soft_dice_loss(logits, y)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    bad = soft_dice_loss(-y * 40.0, y)
    assert bad.item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_soft_dice_class_absent_everywhere_scores_zero() -> None:
    # METHOD §5 puts eps in the denominator only: a class absent from the labels and (to
    # float32 precision) from the prediction has Dice 0/(0+0+eps) = 0, not 1.
    logits = torch.zeros(1, 2, 3, 3)
    logits[:, 1] = -200.0  # softmax gives class 1 exactly 0 in float32
    y = torch.zeros(1, 2, 3, 3)
    y[:, 0] = 1.0
    assert soft_dice_loss(logits, y).item() == pytest.approx(0.5, abs=1e-6)  # 1 - (1 + 0)/2
    assert soft_dice_loss(logits, y, include_background=False).item() == pytest.approx(1.0)


def test_soft_dice_float32_under_autocast() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    y = F.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    ref = soft_dice_loss(logits, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_dice_loss(logits.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), abs=2e-2)


def test_soft_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        soft_dice_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- weighted cross-entropy


def test_class_weights_values() -> None:
    torch.testing.assert_close(class_weights(2), torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(class_weights(3), torch.tensor([0.1, 0.45, 0.45]))
    torch.testing.assert_close(class_weights(4), torch.tensor([0.1, 0.3, 0.3, 0.3]))
    torch.testing.assert_close(class_weights(8), torch.tensor([0.09] + [0.13] * 7))
    torch.testing.assert_close(class_weights(6), torch.tensor([0.1] + [0.18] * 5))
    with pytest.raises(ValueError):
        class_weights(1)


def test_weighted_ce_hand_worked() -> None:
    # (N, C, H, W) = (1, 2, 1, 2); weights 0.1, 0.9.
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    y = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    # pixel 0: true class 0, log softmax_0 = 2 - log(e^2 + 1)
    # pixel 1: true class 1, log softmax_1 = 1 - log(1 + e)
    l0 = -0.1 * (2.0 - math.log(math.exp(2.0) + 1.0))
    l1 = -0.9 * (1.0 - math.log(1.0 + math.e))
    expected = (l0 + l1) / 2
    assert weighted_cross_entropy_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    # Soft label on pixel 1: 0.25 background, 0.75 foreground. As in the original, the pixel
    # weight is 0.1 * 0.25 + 0.9 * 0.75 = 0.7, times the unweighted cross-entropy
    # -(0.25 log p_0 + 0.75 log p_1); not -(0.1 * 0.25 log p_0 + 0.9 * 0.75 log p_1).
    y_soft = torch.tensor([[[[1.0, 0.25]], [[0.0, 0.75]]]])
    log_p0, log_p1 = 0.0 - math.log(1.0 + math.e), 1.0 - math.log(1.0 + math.e)
    l1_soft = -0.7 * (0.25 * log_p0 + 0.75 * log_p1)
    assert weighted_cross_entropy_loss(logits, y_soft).item() == pytest.approx(
        (l0 + l1_soft) / 2, rel=1e-6
    )
    per_class_form = -0.1 * 0.25 * log_p0 - 0.9 * 0.75 * log_p1
    assert abs(l1_soft - per_class_form) > 0.1  # the two forms really differ here


def test_weighted_ce_soft_labels_match_loop() -> None:
    # Deformed labels are soft: per pixel, weight sum_c w_c y_c times -sum_c y_c log p_c.
    gen = torch.Generator().manual_seed(1)
    n, c, h, w = 2, 3, 4, 5
    logits = torch.randn(n, c, h, w, generator=gen) * 2
    y = torch.softmax(torch.randn(n, c, h, w, generator=gen) * 3, dim=1)
    wts = torch.tensor([0.1, 0.45, 0.45])
    total = 0.0
    for i in range(n):
        for a in range(h):
            for b in range(w):
                z = logits[i, :, a, b].double().tolist()
                lse = math.log(sum(math.exp(v) for v in z))
                yy = y[i, :, a, b].double().tolist()
                weight = sum(float(wts[k]) * yy[k] for k in range(c))
                ce = -sum(yy[k] * (z[k] - lse) for k in range(c))
                total += weight * ce
    assert weighted_cross_entropy_loss(logits, y, wts).item() == pytest.approx(
        total / (n * h * w), rel=1e-5
    )


def test_weighted_ce_matches_loop_and_not_torch_normalised() -> None:
    torch.manual_seed(0)
    n, c, h, w = 2, 4, 5, 6
    logits = torch.randn(n, c, h, w) * 3
    label = torch.randint(0, c, (n, h, w))
    y = F.one_hot(label, c).permute(0, 3, 1, 2).float()
    wts = torch.tensor([0.2, 0.5, 1.0, 2.0])
    total = 0.0
    for i in range(n):
        for a in range(h):
            for b in range(w):
                z = logits[i, :, a, b].double()
                lse = math.log(sum(math.exp(v) for v in z.tolist()))
                k = int(label[i, a, b])
                total += -float(wts[k]) * (float(z[k]) - lse)
    expected = total / (n * h * w)
    got = weighted_cross_entropy_loss(logits, y, wts).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # PyTorch's weighted mean divides by sum of weights instead; make sure we did not use it.
    torch_norm = F.cross_entropy(logits, label, weight=wts).item()
    assert abs(got - torch_norm) > 1e-3
    # Default weights are class_weights(C).
    assert weighted_cross_entropy_loss(logits, y).item() == pytest.approx(
        weighted_cross_entropy_loss(logits, y, class_weights(c)).item(), rel=1e-7
    )


def test_weighted_ce_bad_weights() -> None:
    with pytest.raises(ValueError):
        weighted_cross_entropy_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.ones(2))


# ---------------------------------------------------------------- layering


def test_losses_import_nothing_from_utils() -> None:
    """losses/ holds functions of tensors below utils/ (which imports them), never above it."""
    files = sorted((Path(__file__).resolve().parents[1] / "losses").glob("*.py"))
    assert len(files) >= 3
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] == "utils"], (path.name, names)

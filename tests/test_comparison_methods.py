"""The comparison methods' pieces against hand-worked numbers (EMA, consistency ramp and loss,
copy-paste box, mixing, BCP's masked loss, largest components) and their steps' wiring with
stand-in networks whose outputs say where each input came from (which network is the teacher,
which labels land on which region, that the teacher gets no gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from losses.consistency import consistency_weight, sigmoid_rampup, softmax_mse_loss
from losses.copy_paste import masked_cross_entropy, masked_dice_loss, mix_loss
from models.ema import ema_update, freeze
from models.unet import UNet
from utils import bcp_training, mean_teacher
from utils.augment import DiceAugment, to_onehot
from utils.baseline_training import BaselineSettings
from utils.bcp_training import BCPSettings, bcp_losses, draw_bcp, pretrain_losses
from utils.captured_step import NonFiniteGuard
from utils.copy_paste import box_mask, draw_box, largest_component_per_class, mix
from utils.mean_teacher import MeanTeacherSettings, draw_mean_teacher, mean_teacher_losses
from utils.mixed_precision import MixedPrecision

C = 4
PRECISION = MixedPrecision("cpu", None)


# --- EMA -----------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self, w: list[float], mean: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.bn = nn.BatchNorm1d(2)
        self.bn.running_mean.copy_(torch.tensor(mean))


def test_ema_update_by_hand():
    teacher, student = Tiny([1.0, 2.0], [0.0, 0.0]), Tiny([3.0, 6.0], [1.0, 2.0])
    student.bn.num_batches_tracked.fill_(7)
    assert ema_update(teacher, student, 0.99) == 0.99  # BCP: fixed decay
    assert torch.allclose(teacher.w, torch.tensor([1.02, 2.04]))  # 0.99 * 1 + 0.01 * 3, ...
    assert torch.equal(teacher.bn.running_mean, torch.zeros(2))  # buffers its own
    ema_update(teacher, student, 0.99, buffers=True)
    assert torch.allclose(teacher.w, torch.tensor([0.99 * 1.02 + 0.03, 0.99 * 2.04 + 0.06]))
    assert torch.allclose(teacher.bn.running_mean, torch.tensor([0.01, 0.02]))
    assert int(teacher.bn.num_batches_tracked) == 7  # an integer buffer is copied

    # SSL4MIS's warm-up: a = min(1 - 1 / (step + 1), decay)
    teacher, student = Tiny([1.0, 2.0], [0.0, 0.0]), Tiny([3.0, 6.0], [1.0, 2.0])
    assert ema_update(teacher, student, 0.99, step=0) == 0.0
    assert torch.equal(teacher.w.data, student.w.data)  # step 0 copies the student
    teacher.w.data = torch.tensor([1.0, 2.0])
    assert ema_update(teacher, student, 0.99, step=1) == 0.5
    assert torch.allclose(teacher.w, torch.tensor([2.0, 4.0]))
    assert ema_update(teacher, student, 0.99, step=500) == 0.99


def test_ema_update_carries_no_gradient_and_freeze_stops_them():
    teacher, student = freeze(Tiny([1.0, 2.0], [0, 0])), Tiny([3.0, 6.0], [0, 0])
    ema_update(teacher, student, 0.5)
    assert not teacher.w.requires_grad and teacher.w.grad_fn is None


# --- consistency ---------------------------------------------------------------------------

def test_consistency_ramp_at_start_middle_end():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))  # 0.0067
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))  # 0.2865
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    assert consistency_weight(19, 0.1, 100, start=20) == 0.0  # SSL4MIS: none at first
    assert consistency_weight(20, 0.1, 100, start=20) == pytest.approx(0.1 * math.exp(-5 * 0.64))
    assert consistency_weight(50, 0.1, 100) == pytest.approx(0.1 * math.exp(-1.25))
    assert consistency_weight(100, 0.1, 100) == pytest.approx(0.1)


def test_softmax_mse_by_hand_and_no_gradient_to_the_teacher():
    student = torch.zeros(1, 2, 1, 1, requires_grad=True)  # softmax (0.5, 0.5)
    teacher = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1).requires_grad_()  # (.75, .25)
    loss = softmax_mse_loss(student, teacher)
    assert loss.item() == pytest.approx(0.0625)  # ((.25)^2 + (.25)^2) / 2
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# --- copy-paste ----------------------------------------------------------------------------

def test_box_size_and_position_range():
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([draw_box(64, 48, 2 / 3, g) for _ in range(3000)])
    assert (boxes[:, 2] == 42).all() and (boxes[:, 3] == 32).all()  # int(2/3 side)
    # corners uniform on [0, side - box), numpy's exclusive randint as BCP's
    assert (boxes[:, 0].min(), boxes[:, 0].max()) == (0, 64 - 42 - 1)
    assert (boxes[:, 1].min(), boxes[:, 1].max()) == (0, 48 - 32 - 1)


def test_box_mask_is_zero_exactly_on_the_box():
    mask = box_mask(torch.tensor([3, 5, 4, 2]), 10, 9)
    expected = torch.ones(10, 9)
    for r in range(3, 7):
        for c in range(5, 7):
            expected[r, c] = 0.0
    assert torch.equal(mask, expected)


def _sourced(value: float, cls: int, n: int = 2, h: int = 8, w: int = 8):
    """n images of constant ``value`` with labels all ``cls`` (one-hot)."""
    return torch.full((n, 1, h, w), value), to_onehot(torch.full((n, h, w), cls), C)


def test_mix_puts_a_outside_and_b_inside_the_box_labels_alike():
    (img_a, lab_a), (img_b, lab_b) = _sourced(1.0, 1), _sourced(2.0, 2)
    mask = box_mask(torch.tensor([2, 3, 4, 4]), 8, 8)
    x, y = mix(img_a, img_b, mask), mix(lab_a, lab_b, mask)
    inside = mask == 0
    assert (x[:, 0][:, inside] == 2.0).all() and (x[:, 0][:, ~inside] == 1.0).all()
    assert (y.argmax(1)[:, inside] == 2).all() and (y.argmax(1)[:, ~inside] == 1).all()
    assert torch.equal(y.sum(1), torch.ones(2, 8, 8))  # still one-hot


def test_masked_dice_and_cross_entropy_by_hand():
    # 1 image, 2 classes, 2 pixels; the region is pixel 0 only.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).T.reshape(1, 2, 1, 2)
    # pixel 0: softmax (0.5, 0.5); pixel 1: (0.25, 0.75)... per class c over pixels
    y = to_onehot(torch.tensor([[[1, 0]]]), 2)
    mask = torch.tensor([[1.0, 0.0]])
    # class 0: p=.5, y=0 -> 1 - 0 / .25 = 1; class 1: p=.5, y=1 -> 1 - 1 / 1.25 = 0.2
    assert masked_dice_loss(logits, y, mask).item() == pytest.approx((1.0 + 0.2) / 2)
    assert masked_cross_entropy(logits, y, mask).item() == pytest.approx(math.log(2.0))
    dice, ce = mix_loss(logits, y, y, mask, 1.0, 0.5)
    # pixel 1 (inside): p = (.75, .25) (logit log 3 on class 0), y class 0
    d_in = (1 - 2 * 0.75 / (0.75 ** 2 + 1)) / 2 + 1.0 / 2  # class 1: 1 - 0 / .0625
    assert dice.item() == pytest.approx(0.6 + 0.5 * d_in)
    assert ce.item() == pytest.approx(math.log(2.0) + 0.5 * -math.log(0.75))


def test_largest_component_per_class():
    seg = torch.zeros(1, 6, 6, dtype=torch.long)
    seg[0, 0, 0:2] = 1  # component of 2
    seg[0, 4:6, 4:6] = 1  # component of 4: kept
    seg[0, 2, 2] = 2  # diagonal neighbours: one 8-connected component of 2
    seg[0, 3, 3] = 2
    seg[0, 0, 5] = 2  # a single pixel: dropped
    out = largest_component_per_class(seg, C)
    expected = torch.zeros_like(seg)
    expected[0, 4:6, 4:6] = 1
    expected[0, 2, 2] = expected[0, 3, 3] = 2
    assert torch.equal(out, expected)


# --- wiring, with stand-in networks ---------------------------------------------------------

class Oracle(nn.Module):
    """Logits that say the class round(pixel value) (values 0..C-1), and records its inputs;
    ``fixed`` says that class whatever the input."""

    def __init__(self, fixed: int | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.fixed = fixed
        self.inputs: list[torch.Tensor] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        v = torch.full_like(x, float(self.fixed)) if self.fixed is not None else x
        k = torch.arange(C, dtype=x.dtype).view(1, C, 1, 1)
        return -20.0 * self.scale * (v - k) ** 2


def _settings(n: int) -> BaselineSettings:
    return BaselineSettings(num_classes=C, batch_size=n,
                            augment=DiceAugment(rd_en=False, ri_en=False))


def _pools(h: int = 32):
    """Labeled slices of value 1 (label 1) and 2 (label 2); pool slices of value 3."""
    lab_img = torch.cat([torch.full((3, 1, h, h), 1.0), torch.full((3, 1, h, h), 2.0)])
    lab_lbl = torch.cat([torch.full((3, h, h), 1), torch.full((3, h, h), 2)]).to(torch.uint8)
    unl = torch.full((6, 1, h, h), 3.0), torch.zeros(6, h, h, dtype=torch.uint8)
    return (lab_img, lab_lbl), unl


def _exact(x: torch.Tensor) -> torch.Tensor:
    """Pixels whose value is a class number (not an interpolated edge of an affine warp)."""
    return (x - x.round()).abs() < 1e-4


def test_bcp_labels_follow_the_mixed_images_and_the_teacher_labels_the_unlabeled(monkeypatch):
    lab, unl = _pools()
    s = BCPSettings(_settings(4), _settings(4), u_weight=0.5)
    calls = []
    real = bcp_training.mix_loss

    def recording(logits, outside, inside, mask, w_out, w_in):
        calls.append((outside, inside, mask, w_out, w_in))
        return real(logits, outside, inside, mask, w_out, w_in)

    monkeypatch.setattr(bcp_training, "mix_loss", recording)
    student, teacher = Oracle(fixed=0), Oracle()  # the student would label everything 0
    g = torch.Generator().manual_seed(1)
    draws = draw_bcp(torch.arange(6), torch.arange(6), s, 32, 32, g)
    bcp_losses(student, teacher, lab, unl, s, draws, PRECISION)
    assert len(student.inputs) == 2 and len(calls) == 2
    assert teacher.grad_enabled == [False, False]  # the unlabeled halves a and b
    for x, (outside, inside, mask, w_out, w_in) in zip(student.inputs, calls, strict=True):
        value = x[:, 0]
        ok = _exact(value) & (value > 0)  # inside the warped slice, off its edges
        labels = torch.where(mask.bool(), outside.argmax(1), inside.argmax(1))
        assert ok.float().mean() > 0.5
        assert torch.equal(labels[ok], value[ok].round().long())  # each pixel its source's
        # the unlabeled (value 3) region weighs u_weight, the labeled one 1
        out_value = value[:, mask.bool()][ok[:, mask.bool()]].round()
        in_value = value[:, ~mask.bool()][ok[:, ~mask.bool()]].round()
        assert {w_out, w_in} == {1.0, 0.5}
        assert (w_out == 0.5) == bool((out_value == 3).all())
        assert (w_in == 0.5) == bool((in_value == 3).all())
    # the first mix is a labeled slice around an unlabeled box, the second the reverse
    first, second = (x[:, 0] for x in student.inputs)
    box = calls[0][2] == 0
    for x, region in ((first, box), (second, ~box)):
        v = x[:, region]
        assert (v[_exact(v) & (v > 0)].round() == 3).all()


def test_bcp_stage1_mixes_two_labeled_slices_with_their_labels():
    lab, _ = _pools()
    s = BCPSettings(_settings(6), _settings(6))
    student = Oracle()
    draws = draw_bcp(torch.arange(6), None, s, 32, 32, torch.Generator().manual_seed(2))
    loss, dice, ce = pretrain_losses(student, lab, s, draws, PRECISION)
    assert student.inputs[0].shape == (3, 1, 32, 32)  # labeled_bs / 2 mixed slices
    # the oracle predicts each pixel's source: the cross-entropy is near 0 only if the labels
    # follow the images (off the warps' interpolated edges, a small share of the pixels)
    assert ce.item() < 0.5 and loss.item() == pytest.approx((dice.item() + ce.item()) / 2)


def test_mean_teacher_consistency_uses_the_teacher_on_the_noisy_pool_half():
    lab, unl = _pools()
    s = MeanTeacherSettings(_settings(4), _settings(3), noise=0.1)
    student, teacher = Oracle(fixed=0), Oracle()
    draws = draw_mean_teacher(torch.arange(6), torch.arange(6), s, 32, 32,
                              torch.Generator().manual_seed(3), 0)
    late = draw_mean_teacher(torch.arange(6), torch.arange(6), s, 32, 32, torch.Generator(), 1500)
    assert late.weight.item() == pytest.approx(s.weight(1500))  # the schedule at its iteration
    assert s.weight(999) == 0 < s.weight(1500) < s.weight(30000) == pytest.approx(0.1)
    draws = draws._replace(weight=torch.tensor(0.5))
    assert draws.noise.abs().max() <= 0.2 + 1e-7 and draws.noise.std() > 0.05
    loss, loss_seg, loss_cons = mean_teacher_losses(student, teacher, lab, unl, s, draws,
                                                    lambda lo, y: lo.mean() * 0, PRECISION)
    x_all, x_t = student.inputs[0], teacher.inputs[0]
    assert x_all.shape[0] == 7 and x_t.shape[0] == 3
    assert torch.allclose(x_t - x_all[4:], draws.noise, atol=1e-5)  # the pool half + noise
    expected = softmax_mse_loss(Oracle(fixed=0)(x_all[4:]), Oracle()(x_t))
    assert loss_cons.item() == pytest.approx(expected.item()) and loss_cons.item() > 0.01
    assert loss.item() == pytest.approx(0.5 * expected.item())
    loss.backward()
    assert teacher.scale.grad is None and student.scale.grad is not None
    assert teacher.grad_enabled == [False] and student.grad_enabled == [True]


def test_mean_teacher_loop_keeps_the_teacher_the_ema_of_the_students_weights():
    """The trainer's loop (student step, then ema_update at the step's number) on a real
    U-Net: after each iteration the teacher is the hand-computed EMA of the student's weights
    and has no gradient."""
    torch.manual_seed(0)
    lab = torch.rand(4, 1, 32, 32), torch.randint(0, C, (4, 32, 32)).to(torch.uint8)
    unl = torch.rand(4, 1, 32, 32), torch.zeros(4, 32, 32, dtype=torch.uint8)
    model, teacher = UNet(C), freeze(UNet(C))
    teacher.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    s = MeanTeacherSettings(_settings(2), _settings(2), consistency=1.0, rampup=0, start=0)
    from losses.segmentation_loss import segmentation_loss

    step = mean_teacher.mean_teacher_stepper(model, teacher, optimizer, lab, unl, s,
                                             segmentation_loss(2, C), torch.Generator(),
                                             NonFiniteGuard(3), PRECISION)
    expected = [p.detach().clone() for p in teacher.parameters()]
    for it in range(3):
        step(it)
        ema_update(teacher, model, 0.9, step=it)
        a = min(1 - 1 / (it + 1), 0.9)
        expected = [a * e + (1 - a) * p.detach() for e, p in zip(expected, model.parameters())]
        for e, t in zip(expected, teacher.parameters(), strict=True):
            assert torch.allclose(e, t, atol=1e-6)
            assert t.grad is None
    assert any(not torch.equal(t, p) for t, p in zip(teacher.parameters(), model.parameters()))


def test_self_training_batch_is_labeled_then_pseudo_labeled_each_with_its_labels():
    from utils.pseudo_label_training import draw_pseudo_label_batch, pseudo_label_losses

    lab, unl = _pools()
    pseudo = unl[0], torch.full_like(unl[1], 3)  # pseudo-labels: class 3 everywhere
    s = _settings(4)
    seen = {}

    def loss_fn(logits, y):
        seen["y"] = y
        return logits.mean()

    model = Oracle()
    draws = draw_pseudo_label_batch(torch.arange(6), torch.arange(6), s, 32, 32,
                                    torch.Generator().manual_seed(4))
    pseudo_label_losses(model, lab, pseudo, s, draws, loss_fn, PRECISION)
    x, y = model.inputs[0][:, 0], seen["y"].argmax(1)
    assert x.shape[0] == 8
    ok = _exact(x) & (x > 0)
    assert torch.equal(y[ok], x[ok].round().long())  # each slice with its own labels
    assert set(x[:4][ok[:4]].round().tolist()) <= {1.0, 2.0}  # labeled first
    assert set(x[4:][ok[4:]].round().tolist()) == {3.0}  # then the pseudo-labeled


def test_pseudo_dice_index_falls_back_to_the_slices_with_most_labels():
    from utils.sampling import pseudo_dice_index

    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[1, 0, 0] = 1
    labels[2, 0, 0], labels[2, 1, 1] = 1, 2
    index, met = pseudo_dice_index(labels, C, 3)
    assert index.tolist() == [2] and met
    index, met = pseudo_dice_index(labels, C, 4)
    assert index.tolist() == [2] and not met  # none has 4 labels: the most (3)
    index, met = pseudo_dice_index(torch.zeros(2, 4, 4, dtype=torch.long), C, 3)
    assert index.numel() == 0 and not met  # background only: nothing to learn from

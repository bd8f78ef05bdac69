"""utils.baseline_training.baseline_stepper: which slices it draws, what it hands the
augmentation's draws and their application, which labels go with which image, the re-hardening
flag and the skipped step. Images encode their slice index (constant value i); labels encode
it too (class i mod C)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import utils.augment as augment
import utils.baseline_training as bt
from utils.augment import DiceAugment, draw_augment
from utils.mixed_precision import MixedPrecision

C, N, HW = 3, 9, 32


class Probe(nn.Module):
    """Logits = the image times a learnable scale per class: a step changes ``scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, C, 1, 1)


def _run(monkeypatch, en_1hot: bool, ok: bool):
    seen: dict = {}

    def drawing(*args, **kw):  # the real draws, with the flags recorded
        seen["draw_kw"] = kw
        return draw_augment(*args, **kw)

    def soft_identity(x, y, draws, **kw):  # stands in for the augmentation
        seen["kw"] = kw
        return x, y * 0.6 + 0.4 / C  # soft labels, as after a deformation

    monkeypatch.setattr(augment, "draw_augment", drawing)
    monkeypatch.setattr(augment, "apply_augment", soft_identity)
    images = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 1, HW, HW).clone()
    labels = (torch.arange(N) % C).view(N, 1, 1).expand(N, HW, HW).to(torch.uint8).clone()
    slices = torch.tensor([2, 5, 7])
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(logits, y):
        seen["logits"], seen["y"] = logits.detach(), y
        return (logits * y).mean()

    s = bt.BaselineSettings(num_classes=C, batch_size=16, augment=DiceAugment(
        rd_en=False, sigma=2.5, ri_en=True, en_1hot=en_1hot))
    judge = SimpleNamespace(ok=lambda *_: ok)  # stands in for the run's NonFiniteGuard
    loss = bt.baseline_stepper(model, opt, images, labels, slices, s, loss_fn,
                               torch.Generator().manual_seed(0), judge,
                               MixedPrecision("cpu", None))(3)
    return seen, model, loss


@pytest.mark.parametrize("en_1hot", [True, False])
def test_draws_its_slices_and_pairs_each_image_with_its_labels(monkeypatch, en_1hot):
    seen, _, loss = _run(monkeypatch, en_1hot, ok=True)
    assert seen["draw_kw"] == {"rd_en": False, "sigma": 2.5, "ri_en": True,
                               "coupled_intensity": True}
    assert seen["kw"] == {"rd_en": False, "ri_en": True}
    drawn = seen["logits"][:, 0, 0, 0].round().long()  # the image value = its slice index
    assert drawn.numel() == 16 and set(drawn.tolist()) <= {2, 5, 7}
    assert len(set(drawn.tolist())) > 1  # drawn, not one slice repeated
    y = seen["y"]
    assert torch.equal(y.argmax(1)[:, 0, 0], drawn % C)  # each image with its own labels
    if en_1hot:
        assert y.max() == pytest.approx(0.6 + 0.4 / C)  # soft labels kept
    else:
        assert set(y.unique().tolist()) == {0.0, 1.0}  # re-hardened
    assert not loss.requires_grad


def test_a_refused_step_leaves_the_weights(monkeypatch):
    _, model, _ = _run(monkeypatch, True, ok=False)
    assert torch.equal(model.scale.detach(), torch.ones(C))
    _, model, _ = _run(monkeypatch, True, ok=True)
    assert not torch.equal(model.scale.detach(), torch.ones(C))

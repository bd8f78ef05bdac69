"""One iteration of the supervised baseline (METHOD §6), as the trainer and the benchmark run it.

Batch: ``batch_size`` labeled slices drawn uniformly with replacement, augmented (affine,
random deformation, intensity); one optimizer step on the segmentation loss unless the loss is
not finite.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.augment import augment_batch, to_onehot
from utils.mixed_precision import MixedPrecision
from utils.sampling import draw


@dataclass(frozen=True)
class BaselineSettings:
    """The flags one iteration needs (names as on the command line)."""

    num_classes: int
    batch_size: int = 20
    rd_en: bool = True
    sigma: float = 5.0
    ri_en: bool = True
    en_1hot: bool = True

    @classmethod
    def from_flags(cls, args: argparse.Namespace, num_classes: int,
                   batch_size: int) -> BaselineSettings:
        """The settings of the baseline trainer's parsed flags (`utils.flags.parse_flags`)."""
        return cls(num_classes=num_classes, batch_size=batch_size, rd_en=bool(args.rd_en),
                   sigma=args.sigma, ri_en=bool(args.ri_en), en_1hot=bool(args.en_1hot))


def baseline_iteration(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    slices: torch.Tensor,
    s: BaselineSettings,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    step_ok: Callable[[torch.Tensor, int], bool],
    iteration: int,
    precision: MixedPrecision,
) -> torch.Tensor:
    """Draw ``s.batch_size`` of ``slices`` (indexes into images (N, 1, H, W) and labels
    (N, H, W), on the training device), augment, and step unless ``step_ok(loss, iteration)``
    is False. The network runs under ``precision``'s autocast, the loss in float32. Returns the
    loss, detached."""
    idx = draw(slices, s.batch_size, generator, "labeled slice")
    x, y = augment_batch(images[idx], to_onehot(labels[idx], s.num_classes), generator,
                         rd_en=s.rd_en, sigma=s.sigma, ri_en=s.ri_en)
    if not s.en_1hot:
        y = F.one_hot(y.argmax(1), s.num_classes).permute(0, 3, 1, 2).float()
    model.train()
    with precision.autocast():
        logits = model(x.contiguous(memory_format=torch.channels_last))
    loss = loss_fn(logits.float(), y)
    if step_ok(loss, iteration):
        precision.step(loss, optimizer)
    return loss.detach()

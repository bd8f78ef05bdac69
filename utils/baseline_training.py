"""One iteration of the supervised baseline (METHOD §6), as the trainer and the benchmark run it.

Batch: ``batch_size`` labeled slices drawn uniformly with replacement, augmented (affine,
random deformation, intensity); one optimizer step on the segmentation loss unless the loss is
not finite.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from utils.augment import AugmentDraws, DiceAugment, to_onehot
from utils.captured_step import NonFiniteGuard, stepper
from utils.device import host_to_device
from utils.mixed_precision import MixedPrecision
from utils.sampling import draw


@dataclass(frozen=True)
class BaselineSettings:
    """The flags one iteration needs (names as on the command line)."""

    num_classes: int
    batch_size: int = 20
    augment: DiceAugment = DiceAugment()

    @classmethod
    def from_flags(cls, args: argparse.Namespace, num_classes: int,
                   batch_size: int) -> BaselineSettings:
        """The settings of the baseline trainer's parsed flags (`utils.flags.parse_flags`)."""
        return cls(num_classes=num_classes, batch_size=batch_size,
                   augment=DiceAugment.from_flags(args))


class BaselineDraws(NamedTuple):
    """Every random choice of one baseline iteration (CPU tensors, or their device copies):
    the ``slices`` (batch,) drawn and their ``augment`` draws."""

    slices: torch.Tensor
    augment: AugmentDraws


def draw_baseline(slices: torch.Tensor, s: BaselineSettings, height: int, width: int,
                  generator: torch.Generator) -> BaselineDraws:
    """The random half of an iteration: ``s.batch_size`` of ``slices`` (CPU indexes into the
    pool) and their augmentation for H x W slices, on the host."""
    picked = draw(slices, s.batch_size, generator, "labeled slice")
    return BaselineDraws(picked, s.augment.draw(s.batch_size, height, width, generator))


def baseline_batch(images: torch.Tensor, labels: torch.Tensor, s: BaselineSettings,
                   draws: BaselineDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented batch of ``draws`` from images (N, 1, H, W) and labels (N, H, W): images
    (batch, 1, H, W) and one-hot labels (batch, C, H, W), soft after deformation unless
    ``s.augment.en_1hot`` is off."""
    idx = host_to_device(draws.slices, images.device)
    return s.augment.apply(images[idx], to_onehot(labels[idx], s.num_classes), draws.augment)


def baseline_losses(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    s: BaselineSettings,
    draws: BaselineDraws,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: MixedPrecision,
) -> tuple[torch.Tensor]:
    """(segmentation loss,) of the batch of ``draws`` from images (N, 1, H, W) and labels
    (N, H, W): the network under ``precision``'s autocast, the loss in float32."""
    x, y = baseline_batch(images, labels, s, draws)
    with precision.autocast():
        logits = model(x.contiguous(memory_format=torch.channels_last))
    return (loss_fn(logits.float(), y),)


def baseline_stepper(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    slices: torch.Tensor,
    s: BaselineSettings,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    guard: NonFiniteGuard,
    precision: MixedPrecision,
    cuda_graph: bool = False,
    compile_network: bool = False,
) -> Callable[[int], torch.Tensor]:
    """The trainer's iteration ``step(it) -> loss`` (``utils.captured_step.stepper``): draw
    ``s.batch_size`` of ``slices`` (CPU indexes into images (N, 1, H, W) and labels (N, H, W),
    which are on the training device), augment, one step unless the loss is not finite.
    ``cuda_graph`` and ``compile_network`` as in ``utils.joint_training.joint_stepper``."""
    network = torch.compile(model) if compile_network else model
    step = stepper(
        lambda g, it: draw_baseline(slices, s, *images.shape[-2:], g),
        lambda draws: baseline_losses(network, images, labels, s, draws, loss_fn, precision),
        model, optimizer, generator, guard, precision, cuda_graph)
    return lambda it: step(it)[0]

"""One iteration of joint training (METHOD §7.3–7.4), as the trainer and the benchmark run it.

Batch: 20 augmented labeled slices for the Dice term, then 2B contrastive slices (labeled and
pseudo-labeled, pair layout of `utils.sampling.pair_layout`, intensity changes only); all pass
the shared encoder-decoder together; loss = Dice + λ · local contrastive loss; one Adam step
unless the loss is not finite.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from losses.local_contrastive import (
    draw_positive_uniforms,
    local_contrastive_loss,
    positive_indices,
)
from utils.augment import (
    AugmentDraws,
    DiceAugment,
    draw_set_intensity,
    to_onehot,
)
from utils.captured_step import stepper
from utils.device import host_to_device
from utils.mixed_precision import MixedPrecision
from utils.sampling import (
    contrastive_index,
    contrastive_sets,
    pair_layout,
    pick_joint_slices,
    slices_with_min_labels,
)
from utils.training import NonFiniteGuard


@dataclass
class JointData:
    """Slice pools of one self-training round.

    lab_img (N, 1, H, W), lab_lbl (N, H, W): labeled slices, on the training device;
    dice_index: those with enough labels for the Dice batch; lab_index: those for the
    contrastive term (CPU: batches are drawn on the host). unl_img, unl_lbl, unl_index: the
    same for the pseudo-labeled pool.
    """

    lab_img: torch.Tensor
    lab_lbl: torch.Tensor
    dice_index: torch.Tensor
    lab_index: torch.Tensor
    unl_img: torch.Tensor
    unl_lbl: torch.Tensor
    unl_index: torch.Tensor


def build_joint_data(
    lab_img: torch.Tensor,
    lab_lbl: torch.Tensor,
    unl_img: torch.Tensor,
    unl_lbl: torch.Tensor,
    num_classes: int,
    min_labels_dice: int,
) -> tuple[JointData, bool]:
    """The pools of one round with their slice indexes (``utils.sampling``); the flag says
    whether the pseudo-labeled index holds slices with every class (else the fallback of
    ``contrastive_index``). Images (N, 1, H, W), labels (N, H, W), on the training device."""
    unl_index, complete = contrastive_index(unl_lbl, num_classes)
    data = JointData(lab_img, lab_lbl,
                     slices_with_min_labels(lab_lbl, num_classes, min_labels_dice).cpu(),
                     contrastive_index(lab_lbl, num_classes)[0].cpu(), unl_img, unl_lbl,
                     unl_index.cpu())
    return data, complete


@dataclass(frozen=True)
class JointSettings:
    """The flags one iteration needs: a field named as a flag takes its value (`from_flags`),
    so a new hyperparameter is its flag in ``utils.flags`` and its field here."""

    num_classes: int
    n_seg: int = 20  # mtask_bs
    bt_size: int = 10
    no_of_pos_eles: int = 3
    temp_fac: float = 0.1
    lamda_local: float = 0.1
    inter_image: bool = True  # --local_loss_exp_no 1
    loss_reduction: str = "original"
    augment: DiceAugment = DiceAugment()  # the Dice slices' (and the sets' coupled draws)

    @classmethod
    def from_flags(cls, args: argparse.Namespace, num_classes: int, n_seg: int) -> JointSettings:
        """The settings of the joint trainer's parsed flags (`utils.flags.parse_flags`): each
        field named as a flag takes its value; the others come from the dataset, from a flag
        of another name (``inter_image``: ``--local_loss_exp_no 1``) or are a type of their
        own (``augment``)."""
        derived = {"num_classes": num_classes, "n_seg": n_seg,
                   "inter_image": args.local_loss_exp_no == 1,
                   "augment": DiceAugment.from_flags(args)}
        named = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in derived}
        return cls(**named, **derived)


class JointDraws(NamedTuple):
    """Every input of one joint iteration that changes between iterations, random choices in
    the order they are drawn (CPU tensors, or their copies on the device): the slice numbers
    ``dice`` (n_seg,), ``lab`` (B/2,) and ``unl`` (B/2,) of ``pick_joint_slices``; the Dice
    slices' ``augment`` draws; ``sets`` (2, 2), the intensity draws of contrastive set 1 and
    set 2; ``positive`` (2B, C-1, P) float64, the uniforms of the positive pixels;
    ``weights`` (2,) float32, the iteration's λ and τ (`loss_weights`)."""

    dice: torch.Tensor
    lab: torch.Tensor
    unl: torch.Tensor
    augment: AugmentDraws
    sets: torch.Tensor
    positive: torch.Tensor
    weights: torch.Tensor


def loss_weights(s: JointSettings, iteration: int) -> torch.Tensor:
    """(2,) float32: iteration ``iteration``'s weight λ of the local loss and its temperature
    τ, constant in the paper (``--lamda_local``, ``--temp_fac``). A schedule is a change here,
    e.g. ``s.lamda_local * min(1.0, iteration / 1000)``; the values reach a captured step
    (``--cuda_graph 1``) as inputs, so the graph need not be captured again."""
    return torch.tensor([s.lamda_local, s.temp_fac], dtype=torch.float32)


def draw_joint(data: JointData, s: JointSettings, generator: torch.Generator,
               iteration: int = 0) -> JointDraws:
    """The per-iteration half of :func:`joint_batch` for iteration ``iteration``, on the
    host."""
    dice_i, lab_i, unl_i = pick_joint_slices(
        data.lab_img.shape[0], data.dice_index, data.lab_index, data.unl_index, s.n_seg,
        s.bt_size, generator)
    h, w = data.lab_img.shape[-2:]
    augment = s.augment.draw(s.n_seg, h, w, generator)
    coupled = s.augment.coupled_intensity
    sets = torch.stack([draw_set_intensity(generator, coupled),
                        draw_set_intensity(generator, coupled)])
    positive = draw_positive_uniforms(2 * s.bt_size, s.num_classes - 1, s.no_of_pos_eles,
                                      generator)
    return JointDraws(dice_i, lab_i, unl_i, augment, sets, positive, loss_weights(s, iteration))


def joint_batch_from(
    data: JointData, s: JointSettings, draws: JointDraws, layout: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensor half of :func:`joint_batch`: its batch for the given ``draws`` and pair
    ``layout`` (``utils.sampling.pair_layout``); shapes do not depend on the draws."""
    dev = data.lab_img.device
    dice_i, lab_i, unl_i = (host_to_device(t, dev) for t in (draws.dice, draws.lab, draws.unl))
    # The original augments the Dice slices whatever --data_aug says (it only names the output).
    x, y = s.augment.apply(data.lab_img[dice_i], to_onehot(data.lab_lbl[dice_i], s.num_classes),
                           draws.augment)
    xc, yc = contrastive_sets(torch.cat([data.lab_img[lab_i], data.unl_img[unl_i]]),
                              torch.cat([data.lab_lbl[lab_i], data.unl_lbl[unl_i]]),
                              *layout, s.num_classes, draws.sets)
    pos_idx = positive_indices(yc, draws.positive)
    images = torch.cat([x, xc]).contiguous(memory_format=torch.channels_last)
    return images, y, yc, pos_idx


def joint_batch(
    data: JointData, s: JointSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One joint batch (METHOD §7.3), built as the original builds it.

    Returns images (20 + 2B, 1, H, W): the augmented Dice slices, then the contrastive sets
    (``utils.sampling.contrastive_sets``; pair i is images 20 + i and 20 + B + i); Dice labels
    (20, C, H, W), soft after deformation; contrastive one-hot labels (2B, C, H, W); and
    positive-pixel indices (2B, C-1, P, 2).
    """
    return joint_batch_from(data, s, draw_joint(data, s, generator),
                            pair_layout(s.bt_size, s.inter_image))


def joint_losses(
    model: torch.nn.Module,
    data: JointData,
    s: JointSettings,
    draws: JointDraws,
    layout: tuple[torch.Tensor, torch.Tensor],
    dice_loss,
    precision: MixedPrecision,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Dice + λ·local loss, Dice loss, local contrastive loss) of the batch of ``draws``,
    with their λ and τ: the network under ``precision``'s autocast, both losses in float32."""
    images, y, yc, pos_idx = joint_batch_from(data, s, draws, layout)
    with precision.autocast():
        logits, emb = model(images, s.n_seg)
    lamda, tau = host_to_device(draws.weights, images.device)
    loss_seg = dice_loss(logits.float(), y)
    loss_lcl = local_contrastive_loss(emb.float(), yc, pos_idx, temperature=tau,
                                      inter_image=s.inter_image, reduction=s.loss_reduction)
    return loss_seg + lamda * loss_lcl, loss_seg, loss_lcl


def joint_stepper(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: JointData,
    s: JointSettings,
    dice_loss,
    generator: torch.Generator,
    guard: NonFiniteGuard,
    precision: MixedPrecision,
    cuda_graph: bool = False,
    compile_network: bool = False,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The trainer's iteration ``step(it) -> (loss, dice loss, local loss)`` over one round's
    ``data`` (``utils.captured_step.stepper``): a batch from ``generator``, Dice + λ·local
    loss, one Adam step unless the loss is not finite. ``cuda_graph``: replayed from a CUDA
    graph; ``compile_network``: the training forward ``torch.compile``'d (validation keeps
    the plain ``model``, whose input sizes vary)."""
    # Shares the parameters; compiled once, at the first step of the first round.
    network = torch.compile(model) if compile_network else model
    layout = tuple(t.to(data.lab_img.device) for t in pair_layout(s.bt_size, s.inter_image))
    return stepper(
        lambda g, it: draw_joint(data, s, g, it),
        lambda draws: joint_losses(network, data, s, draws, layout, dice_loss, precision),
        model, optimizer, generator, guard, precision, cuda_graph)

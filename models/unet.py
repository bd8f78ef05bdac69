"""The 2D U-Net of METHOD §4, written as the paper's figure: conv, batch norm, ReLU, 2x2
max-pool, nearest x2 upsampling + 2x2 conv, concatenation with the skip, heads.

``UNet`` is the supervised baseline (encoder, decoder, segmentation head); ``JointUNet`` adds
the projection head for joint segmentation + local contrastive training. Both run on any
device as written; ``models.cpu_training.install`` gives them a forward that computes the same
function with less memory and time when training on CPU, on the same modules and state_dict.

Shapes follow PyTorch convention: images are (N, C, H, W); H and W must be divisible by 32
because the encoder max-pools five times by 2.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

ENCODER_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 128, 128)
FEATURE_CHANNELS = 16
# Batch-norm settings of the original TF graph: decay 0.99 (PyTorch momentum = 1 - decay).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
_DOWNSAMPLE_FACTOR = 2 ** (len(ENCODER_CHANNELS) - 1)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def reset_batch_statistics(bn: nn.BatchNorm2d) -> None:
    """Running mean and variance 0, no batches tracked: where the original's running averages
    start (TF's ExponentialMovingAverage of a tensor starts at zero and, not zero-debiased,
    leans towards it for its first few hundred updates). PyTorch's variance starts at 1."""
    bn.reset_running_stats()
    bn.running_var.zero_()


def torch_batch_statistics(model: nn.Module) -> None:
    """Every batch norm of ``model`` back to PyTorch's start: running mean 0, variance 1."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()


def repeat_running_updates(modules: Iterable[nn.Module], times: int) -> None:
    """Make every batch norm in ``modules`` move its running averages per training forward
    as ``times`` updates with the same batch statistics would (momentum
    1 - (1 - BN_MOMENTUM) ** times): the released joint loop ran the training graph twice per
    iteration, once for its checks and once for the step, and each run updated the averages
    of the layers that graph passed through."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0 - (1.0 - BN_MOMENTUM) ** times


def init_weights(module: nn.Module) -> None:
    """He-normal (std = sqrt(2 / fan_in)) conv weights, zero biases, identity batch norm with
    zero running statistics (`reset_batch_statistics`).

    Applied recursively with ``module.apply(init_weights)``.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        reset_batch_statistics(module)


def one_stream_kernels(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Redraw every conv kernel of ``model`` as the released code drew them: each kernel,
    laid out as TF's (kh, kw, in, out), is the first kh*kw*in*out values of ONE standard
    normal stream, times sqrt(2 / fan_in). (Its TF ops all had seed 1 and no graph seed, so
    each started the same sequence.) Kernels of one shape thus start equal, the others share
    their leading values. Biases and batch norms are left as they are."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    stream = torch.randn(max(c.weight.numel() for c in convs), generator=generator)
    with torch.no_grad():
        for conv in convs:
            out, inp, kh, kw = conv.weight.shape
            kernel = stream[: conv.weight.numel()].reshape(kh, kw, inp, out).permute(3, 2, 0, 1)
            conv.weight.copy_(kernel * math.sqrt(2.0 / (inp * kh * kw)))


def check_input_size(x: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is (N, C, H, W) with H and W divisible by 32."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % _DOWNSAMPLE_FACTOR or w % _DOWNSAMPLE_FACTOR:
        raise ValueError(
            f"input spatial size must be divisible by {_DOWNSAMPLE_FACTOR}, "
            f"got shape {tuple(x.shape)}"
        )


class ConvBNReLU(nn.Sequential):
    """kxk conv (with bias, 'same' padding, stride 1) + BatchNorm2d + ReLU.

    (N, in_channels, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding="same", bias=True),
            _bn(out_channels),
            nn.ReLU(inplace=True),
        )


class UpConvBNReLU(nn.Sequential):
    """Nearest x2 upsampling, then a 2x2 conv (bias) with TF-style 'same' padding + BN + ReLU.

    TF pads an even kernel asymmetrically (the extra row and column go right and bottom);
    PyTorch's ``padding='same'`` would put them on the other side, so the pad is explicit.
    (N, in_channels, H, W) -> (N, out_channels, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(
            upsample=nn.Upsample(scale_factor=2.0, mode="nearest"),
            pad=nn.ZeroPad2d((0, 1, 0, 1)),  # (left, right, top, bottom)
            conv=nn.Conv2d(in_channels, out_channels, kernel_size=2, padding=0, bias=True),
            bn=_bn(out_channels),
            relu=nn.ReLU(inplace=True),
        ))


class Encoder(nn.Module):
    """Six levels of two 3x3 ConvBNReLU (16, 32, 64, 128, 128, 128 ch), 2x2 max-pool between.

    forward: x (N, in_channels, H, W) -> list of 6 tensors; level i has shape
    (N, ENCODER_CHANNELS[i], H / 2**i, W / 2**i). The last one is the bottleneck.
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        levels = []
        prev = in_channels
        for ch in ENCODER_CHANNELS:
            levels.append(nn.Sequential(ConvBNReLU(prev, ch), ConvBNReLU(ch, ch)))
            prev = ch
        self.levels = nn.ModuleList(levels)
        self.pool = nn.MaxPool2d(2)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input_size(x)
        skips: list[torch.Tensor] = []
        for i, level in enumerate(self.levels):
            x = level(self.pool(x) if i > 0 else x)
            skips.append(x)
        return skips


class DecoderStep(nn.Module):
    """One upward step: up-conv to the skip's width, concat [up, skip], then 3x3 ConvBNReLUs.

    (N, in_channels, h, w), skip (N, skip_channels, 2h, 2w) -> (N, out_channels, 2h, 2w).
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, n_convs: int
    ) -> None:
        super().__init__()
        self.up = UpConvBNReLU(in_channels, skip_channels)
        convs = [ConvBNReLU(2 * skip_channels, out_channels)]
        convs += [ConvBNReLU(out_channels, out_channels) for _ in range(n_convs - 1)]
        self.convs = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class Decoder(nn.Module):
    """Five upward steps from the bottleneck back to full resolution; two 3x3 convs per step,
    one (16 ch) in the last, full-resolution step.

    forward: skips (list of 6 encoder outputs, see ``Encoder``) -> f (N, 16, H, W), the shared
    feature map used by both the segmentation head and the projection head.
    """

    def __init__(self) -> None:
        super().__init__()
        steps = []
        prev = ENCODER_CHANNELS[-1]
        # Walk the skips from the second-deepest level up to full resolution.
        for level in range(len(ENCODER_CHANNELS) - 2, -1, -1):
            skip_ch = ENCODER_CHANNELS[level]
            last = level == 0
            out_ch = FEATURE_CHANNELS if last else skip_ch
            steps.append(DecoderStep(prev, skip_ch, out_ch, n_convs=1 if last else 2))
            prev = out_ch
        self.steps = nn.ModuleList(steps)
        self.apply(init_weights)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for step, skip in zip(self.steps, reversed(skips[:-1]), strict=True):
            x = step(x, skip)
        return x


class SegHead(nn.Module):
    """Segmentation head g: two 3x3 ConvBNReLU (16 ch), then a bias-free 3x3 conv to logits.

    forward: f (N, 16, H, W), n_logits -> logits (n_logits, num_classes, H, W), unnormalised
    (pre-softmax). The two ConvBNReLU run on all N images, so in training their batch-norm
    statistics cover the whole batch, as in the original's joint graph; only the first
    ``n_logits`` images (all N with None) go through the last conv.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBNReLU(FEATURE_CHANNELS, FEATURE_CHANNELS),
            ConvBNReLU(FEATURE_CHANNELS, FEATURE_CHANNELS),
        )
        self.out = nn.Conv2d(FEATURE_CHANNELS, num_classes, 3, padding="same", bias=False)
        self.apply(init_weights)

    def forward(self, f: torch.Tensor, n_logits: int | None = None) -> torch.Tensor:
        h = self.convs(f)
        return self.out(h if n_logits is None else h[:n_logits])


class ProjectionHead(nn.Module):
    """Projection head h: 1x1 conv (no bias) + BN + ReLU, then 1x1 conv (no bias), 16 ch.

    forward: f (N, 16, H, W) -> pixel embeddings z (N, 16, H, W), not normalised (the
    contrastive loss uses cosine similarity).
    """

    def __init__(self) -> None:
        super().__init__()
        c = FEATURE_CHANNELS
        self.net = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            _bn(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
        )
        self.apply(init_weights)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class UNet(nn.Module):
    """Supervised baseline: encoder + decoder + segmentation head.

    forward: x (N, in_channels, H, W), H and W divisible by 32 -> logits (N, num_classes, H, W).
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels)
        self.decoder = Decoder()
        self.seg_head = SegHead(num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, H, W) -> decoder feature map f (N, 16, H, W)."""
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg_head(self.features(x))

    def load_encoder_decoder(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Start from a baseline as the original does: copy the trainable ``encoder.`` and
        ``decoder.`` parameters (conv weights and biases, batch-norm weight and bias) of a
        (UNet) state_dict. The encoder/decoder batch-norm running statistics start fresh
        (`reset_batch_statistics`), and the heads are left as they are.

        Raises:
            KeyError: if any encoder/decoder parameter of this model is missing from
                ``state_dict``.
        """
        own = {k: p for k, p in self.named_parameters() if k.startswith(("encoder.", "decoder."))}
        missing = sorted(set(own) - set(state_dict))
        if missing:
            raise KeyError(
                f"state_dict lacks {len(missing)} encoder/decoder parameters, e.g. {missing[:5]}"
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state_dict[k])
        for m in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.BatchNorm2d):
                reset_batch_statistics(m)


class JointUNet(UNet):
    """U-Net with both heads for joint segmentation + local contrastive training.

    The encoder, decoder and segmentation head are ``UNet``'s (same state_dict keys), so a
    baseline checkpoint's ``encoder.``/``decoder.`` entries load directly.
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__(num_classes, in_channels)
        self.proj_head = ProjectionHead()

    def forward(
        self, x: torch.Tensor, n_seg: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """All images through encoder + decoder as one batch, then to the heads.

        As in the original, the segmentation head's two ConvBNReLU see all N images (batch
        statistics over the whole batch) and only its last conv is limited to the first
        ``n_seg``; the projection head sees f of the last N - n_seg images.

        With ``n_seg`` None the model acts as a plain segmentation network and returns only the
        logits of all images (what evaluation and pseudo-labelling call).

        Args:
            x: (N, in_channels, H, W) images; the first ``n_seg`` are for segmentation, the
                rest for the contrastive loss.
            n_seg: number of leading images whose logits are returned, 0 <= n_seg <= N.

        Returns:
            logits (n_seg, num_classes, H, W) and embeddings (N - n_seg, 16, H, W).
        """
        if n_seg is None:
            return super().forward(x)
        if not 0 <= n_seg <= x.shape[0]:
            raise ValueError(f"n_seg={n_seg} out of range for batch of {x.shape[0]}")
        f = self.features(x)
        return self.seg_head(f, n_seg), self.proj_head(f[n_seg:])


def count_parameters(module: nn.Module) -> int:
    """Number of trainable (requires_grad) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

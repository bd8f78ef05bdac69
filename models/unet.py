"""2D U-Net of METHOD §4, split into reusable modules.

The encoder, decoder and heads are separate ``nn.Module`` objects so that the joint
(segmentation + local contrastive) model can share the encoder/decoder with the supervised
baseline and load its weights by key prefix (``encoder.``, ``decoder.``).

Shapes follow PyTorch convention: images are (N, C, H, W); H and W must be divisible by 32
because the encoder max-pools five times by 2.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 128, 128)
FEATURE_CHANNELS = 16
# Batch-norm settings of the original TF graph: decay 0.99 (PyTorch momentum = 1 - decay).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
_DOWNSAMPLE_FACTOR = 2 ** (len(ENCODER_CHANNELS) - 1)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def init_weights(module: nn.Module) -> None:
    """He-normal (std = sqrt(2 / fan_in)) conv weights, zero biases, identity batch norm.

    Applied recursively with ``module.apply(init_weights)``.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


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


class _BNReLUConv(torch.autograd.Function):
    """conv2d(relu(bn(y))) in training mode that keeps only ``y`` for backward (see
    ``bn_relu_conv``)."""

    @staticmethod
    def forward(ctx, y, gamma, beta, running_mean, running_var, weight, bias, momentum, eps,
                padding, pad_right_bottom):
        z, mean, invstd = torch.ops.aten.native_batch_norm(
            y, gamma, beta, running_mean, running_var, True, momentum, eps)
        z = _conv_input(z.relu_(), pad_right_bottom)
        out = F.conv2d(z, weight, bias, padding=padding)
        ctx.save_for_backward(y, gamma, beta, weight, mean, invstd)
        ctx.conf = (eps, padding, pad_right_bottom, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, gamma, beta, weight, mean, invstd = ctx.saved_tensors
        eps, padding, pad_right_bottom, has_bias = ctx.conf
        # Recompute the activation; scale and shift as the CPU batch-norm kernel forms them.
        scale = gamma * invstd
        shift = beta - mean * scale
        z = torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1)).relu_()
        grad_z, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, _conv_input(z, pad_right_bottom), weight,
            [weight.shape[0]] if has_bias else None, [1, 1], [padding, padding], [1, 1],
            False, [0, 0], 1, [True, True, has_bias])
        if pad_right_bottom:
            grad_z = grad_z[:, :, :-1, :-1]
        grad_pre = torch.ops.aten.threshold_backward(grad_z, z, 0)
        del z, grad_z
        grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_pre, y, gamma, None, None, mean, invstd, True, eps, [True, True, True])
        return (grad_y, grad_gamma, grad_beta, None, None, grad_w, grad_b,
                None, None, None, None)


def _conv_input(z: torch.Tensor, pad_right_bottom: bool) -> torch.Tensor:
    return F.pad(z, (0, 1, 0, 1)) if pad_right_bottom else z


def bn_relu_conv(
    y: torch.Tensor,
    bn: nn.BatchNorm2d | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    pad_right_bottom: bool = False,
) -> torch.Tensor:
    """conv2d(pad(relu(bn(y))), weight, bias, padding): a conv layer fed by the previous
    layer's batch norm + ReLU; ``bn`` None means ``y`` is already the activation.

    y (N, C_in, H, W) -> (N, C_out, H', W'); stride 1; ``padding`` pixels on every side, plus
    one extra column and row of zeros right and bottom with ``pad_right_bottom`` (TF's 'same'
    for an even kernel).

    Training on CPU keeps for backward only ``y`` (and the per-channel batch statistics), not
    the activation relu(bn(y)) that autograd would keep for the conv: the backward pass
    recomputes it (two elementwise passes). This alone makes a joint step at 40 x 1 x 192 x 192
    save 1.28 GiB of activations instead of 1.99 GiB, for ~3 % more time per step; it is what
    brings the joint trainer's peak resident memory under 4 GB (README, Performance).
    Batch-norm statistics and running averages are those of ``bn(y)``. Elsewhere (eval, no
    grad, autocast, GPU, where memory is ample and extra kernels cost launch time) the layers
    run as written.
    """
    if bn is None:
        return F.conv2d(_conv_input(y, pad_right_bottom), weight, bias, padding=padding)
    if (bn.training and torch.is_grad_enabled() and y.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")):
        bn.num_batches_tracked.add_(1)
        # nn.BatchNorm2d's factor: momentum None means a cumulative average.
        momentum = (bn.momentum if bn.momentum is not None
                    else 1.0 / float(bn.num_batches_tracked))
        return _BNReLUConv.apply(y, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                 weight, bias, momentum, bn.eps, padding, pad_right_bottom)
    z = _conv_input(F.relu(bn(y), inplace=True), pad_right_bottom)
    return F.conv2d(z, weight, bias, padding=padding)


class _MaxPool2x2(torch.autograd.Function):
    """2x2 max-pool, stride 2, that keeps only its input for backward (see ``max_pool2x2``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *args)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *args, indices)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2: (N, C, H, W) -> (N, C, H/2, W/2).

    Training on CPU keeps no argmax indices for backward (int64, twice the output's bytes in
    float32: ~90 MB over the encoder at 40 x 1 x 192 x 192); the backward pass finds them again
    from the input, which the decoder keeps anyway as its skip connection (one extra pooling
    pass). The gradient is the native one, ties included. Elsewhere it is F.max_pool2d.
    """
    if torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu":
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2)


class ConvBNReLU(nn.Sequential):
    """kxk conv (with bias, 'same' padding, stride 1) + BatchNorm2d + ReLU.

    (N, in_channels, H, W) -> (N, out_channels, H, W). The blocks below run its conv, bn and
    relu themselves where a following conv takes the activation (``bn_relu_conv``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding="same", bias=True),
            _bn(out_channels),
            nn.ReLU(inplace=True),
        )


def _same(conv: nn.Conv2d) -> int:
    """The symmetric padding of ``padding='same'`` for an odd, square kernel."""
    return conv.kernel_size[0] // 2


def _subpixel_taps() -> torch.Tensor:
    """0/1 tensor T[a, b, u, v, p, q]: tap (u, v) of the 2x2 kernel on the x2 nearest-upsampled
    (right/bottom padded) input reads the low-resolution pixel (i + p, j + q) for output phase
    (a, b), i.e. output pixel (2i + a, 2j + b). It holds where (a + u) // 2 == p and
    (b + v) // 2 == q, because up[2i + a + u] = x[i + (a + u) // 2]."""
    t = torch.zeros(2, 2, 2, 2, 2, 2)
    for a in range(2):
        for b in range(2):
            for u in range(2):
                for v in range(2):
                    t[a, b, u, v, (a + u) // 2, (b + v) // 2] = 1.0
    return t


class UpConvBNReLU(nn.Module):
    """Nearest x2 upsampling, then 2x2 conv (bias) + BN + ReLU with TF-style 'same' padding.

    TF pads an even kernel asymmetrically (the extra row/column goes right/bottom); PyTorch's
    ``padding='same'`` would put it on the other side, so the pad is explicit.
    (N, in_channels, H, W) -> (N, out_channels, 2H, 2W).

    Computed without materialising the upsampled input: every output pixel (2i + a, 2j + b)
    depends only on the 2x2 low-resolution neighbourhood at (i, j), so one 2x2 conv on the
    (right/bottom padded) low-resolution input with 4 x out_channels phase kernels, followed by
    ``pixel_shuffle``, gives the same result. The phase kernels are sums of the taps of
    ``self.conv.weight`` (the parameter the original's 2x2 conv holds), so the parameters and
    the state_dict are those of the plain formulation; on CPU this is ~1.5x faster in training.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Holds the parameters (and He init) of the 2x2 conv; its forward is not called.
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=2, padding=0, bias=True)
        self.bn = _bn(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.register_buffer("taps", _subpixel_taps(), persistent=False)

    def pre_activation(self, x: torch.Tensor, x_bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """The up-convolution before ``self.bn``: (N, in_channels, H, W) -> (N, out_channels,
        2H, 2W). Its input is ``x``, or relu(x_bn(x)) when the previous layer's batch norm is
        given (see ``bn_relu_conv``)."""
        w, b = self.conv.weight, self.conv.bias
        c_out, c_in = w.shape[:2]
        # Channel order (o, a, b) is the one pixel_shuffle expects.
        k = torch.einsum("abuvpq,oiuv->oabipq", self.taps.to(w.dtype), w)
        k = k.reshape(4 * c_out, c_in, 2, 2)
        y = bn_relu_conv(x, x_bn, k, b.repeat_interleave(4), padding=0, pad_right_bottom=True)
        return F.pixel_shuffle(y, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.pre_activation(x)))


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
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input_size(x)
        skips: list[torch.Tensor] = []
        for i, (first, second) in enumerate(self.levels):
            if i > 0:
                x = max_pool2x2(x)
            y = bn_relu_conv(first[0](x), first[1], second[0].weight, second[0].bias,
                             _same(second[0]))
            # Kept as an activation: the max-pool and the decoder both read it.
            x = second[2](second[1](y))
            skips.append(x)
        return skips


class DecoderStep(nn.Module):
    """One upward step: up-conv to the skip's width, concat [up, skip], then 3x3 convs.

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

    @property
    def out_bn(self) -> nn.BatchNorm2d:
        """The batch norm that ``pre_activation``'s output goes through next (then ReLU)."""
        return self.convs[-1][1]

    def pre_activation(
        self, x: torch.Tensor, x_bn: nn.BatchNorm2d | None, skip: torch.Tensor
    ) -> torch.Tensor:
        """The last conv's output before ``out_bn``: (N, out_channels, 2h, 2w). The input is
        ``x``, or relu(x_bn(x)) when the previous layer's batch norm is given."""
        up = self.up.pre_activation(x, x_bn)
        conv = self.convs[0][0]
        c = up.shape[1]
        # conv(cat([up, skip])) computed as the sum of two convs over the halves of its weight:
        # the same result without materialising the concatenation, which saves ~330 MB of
        # saved activations at 40 x 192 x 192 and is faster on CPU at full resolution.
        # In place: no third full-size tensor (no autograd node keeps either conv output).
        y = bn_relu_conv(up, self.up.bn, conv.weight[:, :c], conv.bias, _same(conv))
        y.add_(F.conv2d(skip, conv.weight[:, c:], None, padding=_same(conv)))
        for prev, block in zip(self.convs, self.convs[1:]):
            y = bn_relu_conv(y, prev[1], block[0].weight, block[0].bias, _same(block[0]))
        return y

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """relu(out_bn(y)): the step's output from ``pre_activation``'s."""
        return self.convs[-1][2](self.out_bn(y))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(x, None, skip))


class Decoder(nn.Module):
    """Five upward steps from the bottleneck back to full resolution.

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
        if len(skips) != len(ENCODER_CHANNELS):
            raise ValueError(f"expected {len(ENCODER_CHANNELS)} skips, got {len(skips)}")
        # Each step hands the next its output before batch norm + ReLU, so that the next
        # up-convolution can take it through ``bn_relu_conv``.
        x, bn = skips[-1], None
        for step, skip in zip(self.steps, reversed(skips[:-1]), strict=True):
            x, bn = step.pre_activation(x, bn, skip), step.out_bn
        return self.steps[-1].activate(x)


class SegHead(nn.Module):
    """Segmentation head g: two 3x3 ConvBNReLU (16 ch), then a bias-free 3x3 conv to logits.

    forward: f (N, 16, H, W) -> logits (N, num_classes, H, W) (unnormalised, pre-softmax).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBNReLU(FEATURE_CHANNELS, FEATURE_CHANNELS),
            ConvBNReLU(FEATURE_CHANNELS, FEATURE_CHANNELS),
        )
        self.out = nn.Conv2d(FEATURE_CHANNELS, num_classes, 3, padding="same", bias=False)
        self.apply(init_weights)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        (conv1, bn1, _), (conv2, bn2, _) = self.convs
        y = bn_relu_conv(conv1(f), bn1, conv2.weight, conv2.bias, _same(conv2))
        return bn_relu_conv(y, bn2, self.out.weight, None, _same(self.out))


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
        conv1, bn, _, conv2 = self.net
        return bn_relu_conv(conv1(f), bn, conv2.weight, None, padding=0)


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


class JointUNet(nn.Module):
    """U-Net with both heads for joint segmentation + local contrastive training.

    Attribute names match ``UNet`` so a baseline state_dict's ``encoder.``/``decoder.`` keys
    load directly.
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels)
        self.decoder = Decoder()
        self.seg_head = SegHead(num_classes)
        self.proj_head = ProjectionHead()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, H, W) -> decoder feature map f (N, 16, H, W)."""
        return self.decoder(self.encoder(x))

    def forward(
        self, x: torch.Tensor, n_seg: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run all images through encoder+decoder as one batch, then split between heads.

        With ``n_seg`` None the model acts as a plain segmentation network and returns only the
        logits of all images (what evaluation and pseudo-labelling call).

        Args:
            x: (N, in_channels, H, W) images; the first ``n_seg`` are for segmentation, the
                rest for the contrastive loss.
            n_seg: number of leading images fed to the segmentation head, 0 <= n_seg <= N.

        Returns:
            logits (n_seg, num_classes, H, W) and embeddings (N - n_seg, 16, H, W).
        """
        if n_seg is None:
            return self.seg_head(self.features(x))
        if not 0 <= n_seg <= x.shape[0]:
            raise ValueError(f"n_seg={n_seg} out of range for batch of {x.shape[0]}")
        # One batch through the trunk so batch-norm statistics are shared, as in the original.
        f_seg, f_con = self.features(x).split([n_seg, x.shape[0] - n_seg])
        # split, not two slices: its backward concatenates the two gradients, where slicing
        # would fill and add two full-batch zero tensors (~10% of a CPU step at 192 x 192).
        return self.seg_head(f_seg), self.proj_head(f_con)

    def load_encoder_decoder(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy only the ``encoder.`` and ``decoder.`` entries of a (UNet) state_dict.

        Raises:
            KeyError: if any encoder/decoder key of this model is missing from ``state_dict``.
        """
        prefixes = ("encoder.", "decoder.")
        own = {k for k in self.state_dict() if k.startswith(prefixes)}
        missing = sorted(own - set(state_dict))
        if missing:
            raise KeyError(
                f"state_dict lacks {len(missing)} encoder/decoder keys, e.g. {missing[:5]}"
            )
        subset = {k: state_dict[k] for k in own}
        self.load_state_dict(subset, strict=False)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable (requires_grad) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

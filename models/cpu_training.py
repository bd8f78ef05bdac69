"""CPU forwards for the plain U-Net of ``models.unet``: the same function, on the same modules,
parameters and state_dict, with less memory and time per training step on CPU.

``install(model)`` gives every ``Encoder``, ``Decoder``, ``SegHead`` and ``ProjectionHead``
inside ``model`` a forward (an instance attribute; ``uninstall`` removes it) that runs the
plain modules' layers through four rewrites:

- ``bn_relu_conv``: a layer's batch norm + ReLU is run by the conv that reads it, keeping for
  backward only the batch norm's input, not the activation (recomputed in backward);
- ``max_pool2x2``: the 2x2 max-pool keeps no argmax indices for backward;
- sub-pixel up-convolution: nearest x2 upsampling + right/bottom pad + 2x2 conv computed as one
  2x2 conv with 4 x out_channels phase kernels on the low-resolution input + pixel_shuffle,
  without materialising the upsampled tensor;
- the decoder's conv of cat([up, skip]) as the sum of two convs over the halves of its weight,
  without materialising the concatenation.

Each rewrite applies only where the layers are exactly those it assumes (``nn.Conv2d`` with
stride 1 and symmetric zero padding, ``nn.BatchNorm2d`` + ``nn.ReLU``, ``nn.MaxPool2d(2)``,
``nn.Upsample`` nearest x2 + ``nn.ZeroPad2d((0, 1, 0, 1))``), checked on every call; any other
layer (a GroupNorm, a LeakyReLU, a strided conv, ...) runs as its module, unchanged. A module
whose children are not the ones its CPU forward reads runs its own forward. What no check can
see is a changed ``forward`` body of the plain modules: tests/test_cpu_training.py compares
the two forwards of the whole networks.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import Decoder, DecoderStep, Encoder, ProjectionHead, SegHead, check_input_size


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
    recomputes it (two elementwise passes). Batch-norm statistics and running averages are
    those of ``bn(y)``. Elsewhere (eval, no grad, autocast, GPU) the layers run as written.
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
    float32); the backward pass finds them again from the input, which the decoder keeps
    anyway as its skip connection (one extra pooling pass). The gradient is the native one,
    ties included. Elsewhere it is F.max_pool2d.
    """
    if torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu":
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2)


class _Pending(NamedTuple):
    """A tensor not yet computed: ``layers`` (unary modules) still to be applied to ``pre``.

    The next conv runs them itself through ``bn_relu_conv`` when they are a batch norm + ReLU.
    """

    pre: torch.Tensor
    layers: tuple[nn.Module, ...] = ()


def _value(p: _Pending) -> torch.Tensor:
    x = p.pre
    for layer in p.layers:
        x = layer(x)
    return x


def _padding(conv: nn.Module) -> int | None:
    """The zero padding on every side of a plain stride-1 square-kernel nn.Conv2d; None where
    ``conv`` is anything else (then it runs as its module)."""
    if (type(conv) is not nn.Conv2d or conv.stride != (1, 1) or conv.dilation != (1, 1)
            or conv.groups != 1 or conv.padding_mode != "zeros"
            or conv.kernel_size[0] != conv.kernel_size[1]):
        return None
    if conv.padding == "same":
        return conv.kernel_size[0] // 2 if conv.kernel_size[0] % 2 else None
    if conv.padding == "valid":
        return 0
    return conv.padding[0] if conv.padding[0] == conv.padding[1] else None


def _conv(p: _Pending, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
          pad_right_bottom: bool = False) -> torch.Tensor:
    """conv2d of ``p``'s value, through ``bn_relu_conv`` when its pending layers are exactly
    a batch norm (affine, with running statistics) and a ReLU."""
    if not p.layers:
        return bn_relu_conv(p.pre, None, weight, bias, padding, pad_right_bottom)
    if len(p.layers) == 2:
        bn, relu = p.layers
        if (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
                and type(relu) is nn.ReLU):
            return bn_relu_conv(p.pre, bn, weight, bias, padding, pad_right_bottom)
    return bn_relu_conv(_value(p), None, weight, bias, padding, pad_right_bottom)


# _PHASE[a, p, u] = 1 where tap u of the 2x2 kernel, run on the x2 nearest-upsampled (and
# right/bottom padded) input at output row 2i + a, reads low-resolution row i + p:
# up[2i + a + u] = x[i + (a + u) // 2]. The same holds for columns.
_PHASE = torch.tensor([[[float((a + u) // 2 == p) for u in range(2)] for p in range(2)]
                       for a in range(2)])


def _subpixel_upconv(p: _Pending, conv: nn.Conv2d) -> torch.Tensor:
    """conv(pad_right_bottom(upsample_nearest_x2(value of p))) for a 2x2 ``conv``:
    (N, C_in, h, w) -> (N, C_out, 2h, 2w).

    Every output pixel (2i + a, 2j + b) depends only on the low-resolution pixels
    (i + p, j + q), p, q in {0, 1}: one 2x2 conv on the right/bottom padded low-resolution
    input with 4 x C_out phase kernels (sums of the taps of ``conv.weight``), then
    pixel_shuffle, gives the same result.
    """
    w, b = conv.weight, conv.bias
    phase = _PHASE.to(w)
    # Channel order (o, a, b) is the one pixel_shuffle expects.
    k = torch.einsum("apu,bqv,oiuv->oabipq", phase, phase, w)
    k = k.reshape(4 * w.shape[0], w.shape[1], 2, 2)
    y = _conv(p, k, None if b is None else b.repeat_interleave(4), 0, pad_right_bottom=True)
    return F.pixel_shuffle(y, 2)


def _is_upconv(layers: Sequence[nn.Module]) -> bool:
    """Whether ``layers`` start with nearest x2 upsampling, a right/bottom zero pad of one
    pixel and a 2x2 conv without padding."""
    if len(layers) < 3:
        return False
    up, pad, conv = layers[:3]
    scale = getattr(up, "scale_factor", None)
    scales = scale if isinstance(scale, tuple) else (scale, scale)
    return (type(up) is nn.Upsample and up.mode == "nearest" and up.size is None
            and all(s is not None and float(s) == 2.0 for s in scales)
            and type(pad) is nn.ZeroPad2d and tuple(pad.padding) == (0, 1, 0, 1)
            and _padding(conv) == 0 and conv.kernel_size == (2, 2))


def _is_max_pool2x2(pool: nn.Module) -> bool:
    def pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, tuple) else (v, v)

    return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (2, 2)
            and pair(pool.stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and pair(pool.dilation) == (1, 1) and not pool.ceil_mode
            and not pool.return_indices)


def _layers(module: nn.Module) -> list[nn.Module]:
    """The unary layers ``module`` applies in order: the children of a plain nn.Sequential
    (recursively), else the module itself."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return [layer for child in module for layer in _layers(child)]
    return [module]


def _run(layers: Sequence[nn.Module], p: _Pending) -> _Pending:
    """Apply ``layers`` in order to ``p``, leaving the last conv's non-conv layers pending."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        if _is_upconv(layers[i:]):
            p = _Pending(_subpixel_upconv(p, layers[i + 2]))
            i += 3
            continue
        padding = _padding(layer)
        if padding is not None:
            p = _Pending(_conv(p, layer.weight, layer.bias, padding))
        elif _is_max_pool2x2(layer):
            p = _Pending(max_pool2x2(_value(p)))
        else:
            p = _Pending(p.pre, (*p.layers, layer))
        i += 1
    return p


def _children(module: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, _ in module.named_children())


def _encoder_forward(self: Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    if _children(self) != ("levels", "pool"):
        return type(self).forward(self, x)
    check_input_size(x)
    skips: list[torch.Tensor] = []
    for i, level in enumerate(self.levels):
        # The level's output stays a computed activation: the pool and the decoder read it.
        x = _value(_run(_layers(self.pool) + _layers(level) if i > 0 else _layers(level),
                        _Pending(x)))
        skips.append(x)
    return skips


def _decoder_step(step: nn.Module, p: _Pending, skip: torch.Tensor) -> _Pending:
    """DecoderStep.forward on a pending input, its output left pending."""
    if type(step) is not DecoderStep or _children(step) != ("up", "convs"):
        return _Pending(step(_value(p), skip))
    up = _run(_layers(step.up), p)
    first, *rest = _layers(step.convs)
    padding = _padding(first)
    if padding is None:
        return _run([first, *rest], _Pending(torch.cat([_value(up), skip], dim=1)))
    c = first.in_channels - skip.shape[1]
    y = _conv(up, first.weight[:, :c], first.bias, padding)
    # In place: no third full-size tensor (no autograd node keeps either conv output).
    y.add_(F.conv2d(skip, first.weight[:, c:], None, padding=padding))
    return _run(rest, _Pending(y))


def _decoder_forward(self: Decoder, skips: list[torch.Tensor]) -> torch.Tensor:
    if _children(self) != ("steps",):
        return type(self).forward(self, skips)
    # Each step hands the next its last conv's output with batch norm + ReLU pending, so that
    # the next up-convolution runs them through ``bn_relu_conv``.
    p = _Pending(skips[-1])
    for step, skip in zip(self.steps, reversed(skips[:-1]), strict=True):
        p = _decoder_step(step, p, skip)
    return _value(p)


def _seg_head_forward(self: SegHead, f: torch.Tensor,
                      n_logits: int | None = None) -> torch.Tensor:
    if _children(self) != ("convs", "out"):
        return type(self).forward(self, f, n_logits)
    # The last conv runs on all N images and the logits are cut after it: the batch norm it
    # takes pending needs all of them, and the conv costs little next to its saved activation.
    logits = _value(_run(_layers(self.convs) + _layers(self.out), _Pending(f)))
    return logits if n_logits is None else logits[:n_logits]


def _projection_forward(self: ProjectionHead, f: torch.Tensor) -> torch.Tensor:
    if _children(self) != ("net",):
        return type(self).forward(self, f)
    return _value(_run(_layers(self.net), _Pending(f)))


_CPU_FORWARDS: dict[type, Callable[..., object]] = {
    Encoder: _encoder_forward,
    Decoder: _decoder_forward,
    SegHead: _seg_head_forward,
    ProjectionHead: _projection_forward,
}


def install(model: nn.Module) -> nn.Module:
    """Give the U-Net parts inside ``model`` their CPU forwards (see the module docstring);
    returns ``model``. Parameters, buffers and state_dict are untouched."""
    for module in model.modules():
        forward = _CPU_FORWARDS.get(type(module))
        if forward is not None:
            module.forward = types.MethodType(forward, module)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Give the U-Net parts inside ``model`` back their plain forwards; returns ``model``."""
    for module in model.modules():
        if type(module) in _CPU_FORWARDS and "forward" in vars(module):
            del module.forward
    return model

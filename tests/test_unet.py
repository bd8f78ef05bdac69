"""Tests for models/unet.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.dice import soft_dice_loss
from models.unet import (
    ConvBNReLU,
    Decoder,
    DecoderStep,
    Encoder,
    JointUNet,
    ProjectionHead,
    SegHead,
    UNet,
    UpConvBNReLU,
    bn_relu_conv,
    count_parameters,
    max_pool2x2,
)


def _conv_bn_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout + 2 * cout  # weight + bias + BN gamma/beta


def _expected_unet_params(num_classes: int) -> int:
    """Independent count from the architecture description of METHOD §4."""
    chans = [16, 32, 64, 128, 128, 128]
    total = 0
    prev = 1
    for c in chans:
        total += _conv_bn_params(prev, c, 3) + _conv_bn_params(c, c, 3)
        prev = c
    for level in [4, 3, 2, 1, 0]:
        skip = chans[level]
        total += _conv_bn_params(prev, skip, 2)
        if level == 0:
            total += _conv_bn_params(2 * skip, 16, 3)
            prev = 16
        else:
            total += _conv_bn_params(2 * skip, skip, 3) + _conv_bn_params(skip, skip, 3)
            prev = skip
    total += 2 * _conv_bn_params(16, 16, 3) + 16 * num_classes * 9
    return total


def test_parameter_counts() -> None:
    unet = UNet(num_classes=4)
    n_unet = count_parameters(unet)
    n_proj = count_parameters(ProjectionHead())
    print(f"UNet(4): {n_unet}  ProjectionHead: {n_proj}")
    assert n_unet == 2_095_760
    assert n_unet == _expected_unet_params(4)
    assert n_proj == 544
    joint = JointUNet(num_classes=4)
    assert count_parameters(joint) == n_unet + n_proj


def test_count_parameters_ignores_frozen() -> None:
    head = ProjectionHead()
    head.net[0].weight.requires_grad_(False)
    assert count_parameters(head) == 544 - 256


def test_bias_presence() -> None:
    unet = UNet(3)
    assert unet.seg_head.out.bias is None
    assert all(m.bias is not None for m in unet.encoder.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in unet.decoder.modules() if isinstance(m, nn.Conv2d))
    proj = ProjectionHead()
    assert all(m.bias is None for m in proj.modules() if isinstance(m, nn.Conv2d))
    bn = unet.encoder.levels[0][0][1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)


def test_shapes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 96)
    skips = Encoder()(x)
    assert [tuple(s.shape) for s in skips] == [
        (2, 16, 32, 96),
        (2, 32, 16, 48),
        (2, 64, 8, 24),
        (2, 128, 4, 12),
        (2, 128, 2, 6),
        (2, 128, 1, 3),
    ]
    f = Decoder()(skips)
    assert f.shape == (2, 16, 32, 96)
    assert SegHead(5)(f).shape == (2, 5, 32, 96)
    assert ProjectionHead()(f).shape == (2, 16, 32, 96)
    assert UNet(4)(x).shape == (2, 4, 32, 96)
    logits, emb = JointUNet(4)(torch.randn(5, 1, 32, 32), n_seg=2)
    assert logits.shape == (2, 4, 32, 32)
    assert emb.shape == (3, 16, 32, 32)


@pytest.mark.parametrize("shape", [(1, 1, 48, 64), (1, 1, 64, 40), (1, 1, 31, 32)])
def test_bad_size_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(1, 1, "):
        UNet(2)(torch.zeros(shape))


def test_he_init_statistics() -> None:
    torch.manual_seed(0)
    enc = Encoder()
    conv = enc.levels[3][1][0]  # 128 -> 128 3x3, fan_in 1152, ~147k weights
    fan_in = 128 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert torch.all(conv.bias == 0)
    bn = enc.levels[3][1][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_upconv_tf_same_padding() -> None:
    """2x2 'same' conv must pad right/bottom, as TF does; check against a manual loop."""
    torch.manual_seed(0)
    up = UpConvBNReLU(1, 1).eval()
    with torch.no_grad():
        up.conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
        up.conv.bias.zero_()
    x = torch.arange(4.0).view(1, 1, 2, 2)
    xu = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[0, 0]  # (4, 4)
    k = up.conv.weight[0, 0]
    expected = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            s = 0.0
            for a in range(2):
                for b in range(2):
                    if i + a < 4 and j + b < 4:
                        s += k[a, b].item() * xu[i + a, j + b].item()
            expected[i, j] = s
    # eval-mode BN with fresh stats is (x - 0) / sqrt(1 + eps)
    expected = F.relu(expected / math.sqrt(1 + 1e-3))
    with torch.no_grad():
        out = up(x)[0, 0]
    torch.testing.assert_close(out, expected)


def test_upconv_matches_plain_upsample_then_conv() -> None:
    """The sub-pixel formulation equals nearest x2 upsampling + right/bottom pad + 2x2 conv,
    in value and in the gradients of input, weight and bias (float64, several channels)."""
    torch.manual_seed(1)
    up = UpConvBNReLU(5, 3).double()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        up.conv.bias.normal_()
    out = up.conv(F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (0, 1, 0, 1)))
    expected = up.relu(up.bn(out))
    g = torch.randn_like(expected)
    grads_plain = torch.autograd.grad(expected, (x, up.conv.weight, up.conv.bias), g)
    got = up(x)
    assert got.shape == (2, 3, 12, 14)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got, (x, up.conv.weight, up.conv.bias), g)
    for a, b in zip(grads, grads_plain, strict=True):
        torch.testing.assert_close(a, b)


def test_decoder_step_matches_concatenation() -> None:
    """DecoderStep's two half-weight convs equal the conv of the concatenated [up, skip], in
    value and in every gradient (float64)."""
    torch.manual_seed(3)
    step = DecoderStep(8, 4, 4, n_convs=2).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 4, 10, 12, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        step.convs[0][0].bias.normal_()
    inputs = (x, skip, *step.parameters())
    expected = step.convs(torch.cat([step.up(x), skip], dim=1))
    g = torch.randn_like(expected)
    grads_ref = torch.autograd.grad(expected, inputs, g)
    got = step(x, skip)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, inputs, g), grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_joint_split_gradients_match_slicing() -> None:
    """Splitting the feature map between the heads gives the gradients of plain slicing."""
    torch.manual_seed(2)
    model = JointUNet(4).double()
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    logits, emb = model(x, 3)
    loss = logits.square().mean() + emb.abs().mean()
    g_split = torch.autograd.grad(loss, list(model.parameters()))
    f = model.features(x)
    loss_ref = model.seg_head(f[:3]).square().mean() + model.proj_head(f[3:]).abs().mean()
    g_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    for a, b in zip(g_split, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def _saved_sizes(fn) -> tuple[torch.Tensor, list[int]]:
    """``fn()``'s result and the numel of every tensor autograd saved while it ran (one entry
    per storage, sorted)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sorted(seen.values())


@pytest.mark.parametrize("kernel, padding, pad_rb", [(3, 1, False), (1, 0, False), (2, 0, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_relu_conv_matches_layers(kernel, padding, pad_rb, channels_last) -> None:
    """Training mode: bn_relu_conv gives the value, every gradient and the batch-norm running
    statistics of BatchNorm2d + ReLU + pad + conv2d (float64), while keeping only its input,
    not the activation, for backward."""
    torch.manual_seed(5)
    layers = [nn.BatchNorm2d(6, eps=1e-3, momentum=0.01).double() for _ in range(2)]
    with torch.no_grad():
        layers[0].weight.normal_()
        layers[0].bias.normal_()
        layers[0].running_mean.normal_()
    layers[1].load_state_dict(layers[0].state_dict())
    w = torch.randn(4, 6, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 6, 9, 11, dtype=torch.float64) + 0.5
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)

    def plain():
        z = F.relu(layers[1](y))
        return F.conv2d(F.pad(z, (0, 1, 0, 1)) if pad_rb else z, w, b, padding=padding)

    expected, saved_plain = _saved_sizes(plain)
    got, saved = _saved_sizes(lambda: bn_relu_conv(y, layers[0], w, b, padding, pad_rb))
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(expected)
    inputs = (y, w, b, layers[0].weight, layers[0].bias)
    inputs_ref = (y, w, b, layers[1].weight, layers[1].bias)
    for a, ref in zip(torch.autograd.grad(got, inputs, g),
                      torch.autograd.grad(expected, inputs_ref, g), strict=True):
        torch.testing.assert_close(a, ref)
    for key, ref in layers[1].state_dict().items():
        torch.testing.assert_close(layers[0].state_dict()[key], ref, msg=key)
    big = [n for n in saved if n >= y.numel()]
    assert big == [y.numel()]  # the input only
    assert len([n for n in saved_plain if n >= y.numel()]) >= 2  # autograd keeps the activation


def test_bn_relu_conv_runs_layers_outside_training() -> None:
    """In eval mode it is the plain composition with the running statistics; in training mode
    without grad it still updates them, as nn.BatchNorm2d does."""
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
    w = torch.randn(2, 3, 3, 3)
    y = torch.randn(2, 3, 8, 8)
    stats = bn.running_mean.clone()
    torch.testing.assert_close(bn_relu_conv(y, bn, w, None, 1),
                               F.conv2d(F.relu(bn(y)), w, None, padding=1))
    bn.train()
    with torch.no_grad():
        out = bn_relu_conv(y, bn, w, None, 1)
    assert out.shape == (2, 2, 8, 8)
    assert not torch.equal(bn.running_mean, stats)  # no-grad training still updates, as nn does


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2x2_matches_native_gradient_with_ties(channels_last) -> None:
    """max_pool2x2 gives F.max_pool2d's value and gradient, also where a window holds its
    maximum twice (the gradient goes to one of them), and saves no index tensor."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64).clamp_min(0)  # ReLU-like: tied zeros
    x[:, :, 2, 2] = x[:, :, 3, 3] = 5.0  # a positive tie inside one window
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    expected, saved_ref = _saved_sizes(lambda: F.max_pool2d(x, 2))
    got, saved = _saved_sizes(lambda: max_pool2x2(x))
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(got, x, g)
    (grad_ref,) = torch.autograd.grad(expected, x, g)
    assert torch.equal(grad, grad_ref)
    assert (grad[:, :, 2:4, 2:4] != 0).sum() == 2 * 3  # one entry per window, not both ties
    assert saved == [x.numel()] and len(saved_ref) == 2


def test_convbnrelu_nonnegative_and_same_size() -> None:
    out = ConvBNReLU(3, 8)(torch.randn(2, 3, 10, 12))
    assert out.shape == (2, 8, 10, 12)
    assert (out >= 0).all()


def test_joint_loads_unet_weights_and_matches_features() -> None:
    torch.manual_seed(0)
    unet = UNet(4)
    # Perturb BN running stats so that a failed copy of buffers would be visible in eval mode.
    for m in unet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    joint = JointUNet(4)
    joint.load_encoder_decoder(unet.state_dict())
    for k, v in unet.state_dict().items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(joint.state_dict()[k], v), k
    # The seg head is not copied.
    assert not torch.equal(joint.seg_head.out.weight, unet.seg_head.out.weight)
    unet.eval()
    joint.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(joint.features(x), unet.features(x), rtol=0, atol=0)
        # Copying the seg head too makes the full logits identical.
        joint.seg_head.load_state_dict(unet.seg_head.state_dict())
        logits, emb = joint(x, n_seg=2)
        torch.testing.assert_close(logits, unet(x[:2]), rtol=0, atol=0)
        torch.testing.assert_close(emb, joint.proj_head(unet.features(x)[2:]))


def test_load_encoder_decoder_missing_key() -> None:
    sd = UNet(4).state_dict()
    del sd["decoder.steps.0.up.conv.bias"]
    with pytest.raises(KeyError, match="decoder.steps.0.up.conv.bias"):
        JointUNet(4).load_encoder_decoder(sd)


def test_joint_shares_batch_norm_statistics() -> None:
    """In training mode the trunk must normalise all images together, not per head."""
    torch.manual_seed(0)
    joint = JointUNet(3).train()
    x = torch.randn(4, 1, 32, 32)
    x[2:] += 3.0  # different statistics in the contrastive half
    with torch.no_grad():
        f_all = joint.features(x)
        logits, _ = joint(x, n_seg=2)
        f_alone = joint.features(x[:2])
    torch.testing.assert_close(logits, joint.seg_head(f_all[:2]))
    assert not torch.allclose(f_all[:2], f_alone, atol=1e-3)


def test_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    model = UNet(3).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = model(x)
    assert out_bf.dtype == torch.bfloat16
    assert (out_bf.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_unet_overfits_single_image() -> None:
    # 32x64 rather than 32x32: a single 32x32 image leaves one value per channel at the
    # bottleneck, which training-mode batch norm rejects.
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 64) * 0.1
    label = torch.zeros(1, 32, 64, dtype=torch.long)
    label[:, 8:20, 20:44] = 1
    x[:, :, 8:20, 20:44] += 1.0
    y = F.one_hot(label, 2).permute(0, 3, 1, 2).float()
    model = UNet(2).train()
    # A large learning rate keeps the step count (and CPU time) small.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = soft_dice_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"Dice loss step 1: {losses[0]:.4f}, step 10: {losses[-1]:.4f}")
    assert losses[-1] < 0.25 * losses[0]
    assert losses[-1] < 0.1


def test_unet_matches_plain_reference_unet() -> None:
    """End to end, UNet (sub-pixel up-convolutions, split decoder convs) computes the function
    of the benchmark's PlainUNet (upsample + pad + 2x2 conv, torch.cat) with the same weights:
    logits and every parameter gradient (float64, training mode)."""
    from scripts.benchmark import PlainUNet

    torch.manual_seed(4)
    ours, plain = UNet(3).double(), PlainUNet(3).double()
    ours_sd, plain_sd = ours.state_dict(), plain.state_dict()
    assert [v.shape for v in ours_sd.values()] == [v.shape for v in plain_sd.values()]
    with torch.no_grad():  # non-zero biases, so a misplaced bias would show
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # state_dict tensors share the parameters' storage: ours_sd holds the perturbed values
    plain.load_state_dict(dict(zip(plain_sd, ours_sd.values(), strict=True)))
    x = torch.randn(2, 1, 64, 96, dtype=torch.float64)
    out, ref = ours(x), plain(x)
    torch.testing.assert_close(out, ref)
    for (key, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)  # batch-norm running statistics
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(ours.parameters()), g)
    grads_ref = torch.autograd.grad(ref, list(plain.parameters()), g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)

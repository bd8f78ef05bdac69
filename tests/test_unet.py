"""Tests for models/unet.py (the CPU forwards: tests/test_cpu_training.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.dice import soft_dice_loss
from models.unet import (
    ConvBNReLU,
    Decoder,
    Encoder,
    JointUNet,
    ProjectionHead,
    SegHead,
    UNet,
    UpConvBNReLU,
    count_parameters,
    one_stream_kernels,
    repeat_running_updates,
    torch_batch_statistics,
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


def _expected_keys() -> list[str]:
    """The state_dict keys of the checkpoints written so far, in order."""
    conv, bn = ["weight", "bias"], ["weight", "bias", "running_mean", "running_var",
                                    "num_batches_tracked"]

    def cbr(prefix: str, c: str = "0", b: str = "1") -> list[str]:
        return [f"{prefix}{c}.{k}" for k in conv] + [f"{prefix}{b}.{k}" for k in bn]

    keys = [k for level in range(6) for j in range(2) for k in cbr(f"encoder.levels.{level}.{j}.")]
    for step in range(5):
        keys += cbr(f"decoder.steps.{step}.up.", "conv", "bn")
        for j in range(2 if step < 4 else 1):
            keys += cbr(f"decoder.steps.{step}.convs.{j}.")
    keys += cbr("seg_head.convs.0.") + cbr("seg_head.convs.1.") + ["seg_head.out.weight"]
    return keys


def test_state_dict_keys_unchanged() -> None:
    """Old checkpoints load: the same keys, in the same order."""
    assert list(UNet(4).state_dict()) == _expected_keys()
    proj = ["proj_head.net.0.weight"] + [
        f"proj_head.net.1.{k}"
        for k in ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    ] + ["proj_head.net.3.weight"]
    assert list(JointUNet(4).state_dict()) == _expected_keys() + proj


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


def test_he_init_uses_the_fan_in() -> None:
    """std sqrt(2 / fan_in), not fan_out, on a conv where the two differ (32 -> 64 channels:
    fan-in 288, fan-out 576; ~18k weights, so the estimate is within about 1 %)."""
    torch.manual_seed(0)
    conv = Encoder().levels[2][0][0]
    assert conv.weight.shape == (64, 32, 3, 3)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.03)


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


def test_convbnrelu_nonnegative_and_same_size() -> None:
    out = ConvBNReLU(3, 8)(torch.randn(2, 3, 10, 12))
    assert out.shape == (2, 8, 10, 12)
    assert (out >= 0).all()


def test_joint_starts_from_baseline_trainable_parameters_only() -> None:
    """As the original's assign loop over the baseline's trainable variables (not 'seg_',
    not 'cont_'): encoder/decoder conv weights, biases and batch-norm gamma/beta are the
    baseline's; batch-norm running statistics and batch counts start fresh; the heads keep
    what they had."""
    torch.manual_seed(0)
    unet = UNet(4)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))  # gamma and beta off their initial 1 and 0
        for m in unet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    torch.manual_seed(1)
    joint = JointUNet(4)
    for m in joint.modules():  # statistics the joint network had before are not kept either
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.num_batches_tracked.fill_(2)
    before = {k: v.clone() for k, v in joint.state_dict().items()}
    joint.load_encoder_decoder(unet.state_dict())
    baseline = unet.state_dict()
    for k, v in joint.state_dict().items():
        if k.startswith(("seg_head.", "proj_head.")):
            expected = before[k]
        elif k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            expected = torch.zeros_like(v)  # where TF's moving averages start
        else:
            expected = baseline[k]
        assert torch.equal(v, expected), k
    # Training mode normalises with batch statistics: the shared features are the baseline's.
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(joint.train().features(x), unet.train().features(x),
                                   rtol=0, atol=0)


def test_load_encoder_decoder_missing_key() -> None:
    sd = UNet(4).state_dict()
    del sd["decoder.steps.0.up.conv.bias"]
    with pytest.raises(KeyError, match="decoder.steps.0.up.conv.bias"):
        JointUNet(4).load_encoder_decoder(sd)


def test_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    model = UNet(3)
    x = torch.randn(2, 1, 32, 32)
    for m in model.modules():  # unit running variances: a well-scaled eval forward
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    model.eval()
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


def _cbr(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, conv: str = "0",
         bn: str = "1") -> torch.Tensor:
    """relu(batch_norm(conv(x))) from state_dict entries, batch norm on batch statistics
    (training mode); a 2x2 conv gets nearest x2 upsampling and a right/bottom pad first."""
    w = sd[f"{prefix}{conv}.weight"]
    if w.shape[-1] == 2:
        x = F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (0, 1, 0, 1))
    x = F.conv2d(x, w, sd.get(f"{prefix}{conv}.bias"), padding=w.shape[-1] // 2 if
                 w.shape[-1] == 3 else 0)
    x = F.batch_norm(x, None, None, sd[f"{prefix}{bn}.weight"], sd[f"{prefix}{bn}.bias"],
                     training=True, eps=1e-3)
    return F.relu(x)


def _reference_features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """METHOD §4's encoder + decoder written with torch.nn.functional: 2x2 max-pools, up-conv
    to the skip's width, concat [up, skip]. (N, 1, H, W) -> f (N, 16, H, W)."""
    skips = []
    for level in range(6):
        if level:
            x = F.max_pool2d(x, 2)
        x = _cbr(sd, f"encoder.levels.{level}.1.", _cbr(sd, f"encoder.levels.{level}.0.", x))
        skips.append(x)
    x = skips.pop()
    for step in range(5):
        up = _cbr(sd, f"decoder.steps.{step}.up.", x, conv="conv", bn="bn")
        x = _cbr(sd, f"decoder.steps.{step}.convs.0.", torch.cat([up, skips.pop()], dim=1))
        if step < 4:
            x = _cbr(sd, f"decoder.steps.{step}.convs.1.", x)
    return x


def _reference_head_activation(sd: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """The segmentation head's two conv + BN + ReLU on all of f."""
    return _cbr(sd, "seg_head.convs.1.", _cbr(sd, "seg_head.convs.0.", f))


def _perturbed_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Move every parameter off its initial value (non-zero biases and BN shifts, so that a
    misplaced one would show); returns a copy of the state_dict before any forward."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_unet_matches_functional_reference() -> None:
    """Training mode, float64, parameters read by their state_dict keys: the logits of an
    independent functional U-Net."""
    torch.manual_seed(4)
    model = UNet(3).double().train()
    sd = _perturbed_params(model)
    x = torch.randn(2, 1, 64, 96, dtype=torch.float64)
    expected = F.conv2d(_reference_head_activation(sd, _reference_features(sd, x)),
                        sd["seg_head.out.weight"], padding=1)
    torch.testing.assert_close(model(x), expected)


def test_joint_heads_see_the_batch_as_the_original() -> None:
    """Training mode, float64: the segmentation head's conv + BN + ReLU layers run on all N
    images (batch statistics and running averages over the whole batch), its last conv on
    the first n_seg; the projection head on f of the last N - n_seg. The contrastive images
    differ in statistics, so normalising the seg head over the first n_seg alone would show."""
    torch.manual_seed(5)
    joint = JointUNet(3).double().train()
    sd = _perturbed_params(joint)
    x = torch.randn(5, 1, 32, 64, dtype=torch.float64)
    x[2:] = 2.0 * x[2:] + 3.0
    logits, emb = joint(x, n_seg=2)
    f = _reference_features(sd, x)
    h = _reference_head_activation(sd, f)
    torch.testing.assert_close(logits, F.conv2d(h[:2], sd["seg_head.out.weight"], padding=1))
    z = F.conv2d(f[2:], sd["proj_head.net.0.weight"])
    z = F.relu(F.batch_norm(z, None, None, sd["proj_head.net.1.weight"],
                            sd["proj_head.net.1.bias"], training=True, eps=1e-3))
    torch.testing.assert_close(emb, F.conv2d(z, sd["proj_head.net.3.weight"]))
    # Running mean after one step from 0: momentum 0.01 times the batch mean of all 5 images.
    y = F.conv2d(f, sd["seg_head.convs.0.0.weight"], sd["seg_head.convs.0.0.bias"], padding=1)
    torch.testing.assert_close(joint.seg_head.convs[0][1].running_mean,
                               0.01 * y.mean(dim=(0, 2, 3)))



def _tf_moving_average(batches: list[torch.Tensor], updates_per_batch: int) -> torch.Tensor:
    """TF 1.x ExponentialMovingAverage(decay=0.99).apply on a tensor, not zero-debiased: the
    shadow starts at 0 and takes ``updates_per_batch`` updates with each batch's value."""
    shadow = torch.zeros_like(batches[0])
    for value in batches:
        for _ in range(updates_per_batch):
            shadow = 0.99 * shadow + 0.01 * value
    return shadow


@pytest.mark.parametrize("times", [1, 2])
def test_running_statistics_follow_the_original_moving_averages(times: int) -> None:
    """Zero start (not PyTorch's variance 1) and, for the released joint loop's two graph runs
    per iteration, two updates with the same batch statistics per training forward."""
    torch.manual_seed(0)
    net = UNet(3)
    bn = net.encoder.levels[0][0][1]
    assert torch.count_nonzero(bn.running_mean) == torch.count_nonzero(bn.running_var) == 0
    repeat_running_updates([net.encoder], times)
    assert net.seg_head.convs[0][1].momentum == pytest.approx(0.01)  # not in the modules given
    conv = net.encoder.levels[0][0][0]
    means, variances = [], []
    net.train()
    for _ in range(4):
        x = torch.randn(3, 1, 32, 32) * 2 + 1
        with torch.no_grad():
            y = conv(x)
            means.append(y.mean((0, 2, 3)))
            n = y[:, 0].numel()
            variances.append(y.var((0, 2, 3), unbiased=False) * n / (n - 1))  # as PyTorch keeps
            net(x)
    torch.testing.assert_close(bn.running_mean, _tf_moving_average(means, times))
    torch.testing.assert_close(bn.running_var, _tf_moving_average(variances, times))


def test_one_stream_kernels_as_the_released_code() -> None:
    """Every kernel, read in TF's (kh, kw, in, out) order, is the prefix of one normal stream
    times sqrt(2 / fan_in); so kernels of one shape start equal. Nothing else changes."""
    model = JointUNet(4)
    kernels = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rest = {k: v.clone() for k, v in model.state_dict().items() if k not in kernels}
    one_stream_kernels(model, torch.Generator().manual_seed(5))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    stream = torch.randn(max(c.weight.numel() for c in convs),
                         generator=torch.Generator().manual_seed(5))
    for conv in convs:
        out, inp, kh, kw = conv.weight.shape
        tf_order = conv.weight.permute(2, 3, 1, 0).reshape(-1)
        torch.testing.assert_close(tf_order / math.sqrt(2 / (inp * kh * kw)),
                                   stream[: conv.weight.numel()])
    assert torch.equal(model.encoder.levels[4][1][0].weight, model.encoder.levels[5][0][0].weight)
    assert torch.equal(model.proj_head.net[0].weight, model.proj_head.net[3].weight)
    for k, v in model.state_dict().items():
        if k not in kernels:
            assert torch.equal(v, rest[k]), k


def test_torch_batch_statistics_restart_at_pytorch_defaults() -> None:
    """Every batch norm's running mean 0, variance 1 (not the zero start of init_weights) and
    no batches tracked; gamma, beta and the convs unchanged."""
    model = JointUNet(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.5)
                m.bias.fill_(0.2)
                m.running_mean.fill_(0.3)
                m.running_var.fill_(0.4)
                m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch_batch_statistics(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 * 2 + 5 + 4 * 2 + 1 + 2 + 1  # encoder, up-convs, decoder convs, heads
    for m in bns:
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
        assert m.num_batches_tracked.item() == 0
    for k, v in model.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("n_seg", [0, 4])
def test_joint_split_at_either_end(n_seg: int) -> None:
    """n_seg 0 (contrastive images only) and N (segmentation only) are valid splits: empty
    logits or empty embeddings, the other output for every image (eval mode: no statistics
    over an empty batch)."""
    torch.manual_seed(0)
    joint = JointUNet(3).eval()
    for m in joint.modules():  # unit running variances: a well-scaled eval forward
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        logits, emb = joint(x, n_seg)
        full = joint.seg_head(joint.features(x))
    assert logits.shape == (n_seg, 3, 32, 32) and emb.shape == (4 - n_seg, 16, 32, 32)
    torch.testing.assert_close(logits, full[:n_seg])


@pytest.mark.parametrize("n_seg", [-1, 5])
def test_joint_split_out_of_range_raises(n_seg: int) -> None:
    with pytest.raises(ValueError, match=f"n_seg={n_seg} out of range for batch of 4"):
        JointUNet(3)(torch.randn(4, 1, 32, 32), n_seg)

"""Tests for models/cpu_training.py: the CPU forwards compute the plain U-Net's function."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_training
from models.cpu_training import bn_relu_conv, max_pool2x2
from models.unet import JointUNet, SegHead, UNet


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in float64 with every parameter and running statistic moved off its
    initial value, so that a misplaced bias, gamma or statistic would show."""
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(plain copy, copy with the CPU forwards installed) of ``model``."""
    return copy.deepcopy(model), cpu_training.install(copy.deepcopy(model))


def _run(model: nn.Module, x: torch.Tensor, n_seg: int | None):
    """Outputs, the gradients of a loss w.r.t. the input and every parameter, and the
    state_dict after one forward/backward."""
    x = x.clone().requires_grad_(True)
    out = model(x) if n_seg is None else model(x, n_seg)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(99)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True)
    return outs, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_run(plain: nn.Module, fused: nn.Module, x: torch.Tensor,
                     n_seg: int | None) -> None:
    outs, grads, sd = _run(plain, x, n_seg)
    outs_f, grads_f, sd_f = _run(fused, x, n_seg)
    for a, b in zip(outs_f, outs, strict=True):
        torch.testing.assert_close(a, b)
    names = ["input", *(k for k, _ in plain.named_parameters())]
    for name, a, b in zip(names, grads_f, grads, strict=True):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, msg=name)
    assert list(sd_f) == list(sd)
    for k, v in sd.items():
        torch.testing.assert_close(sd_f[k], v, msg=k)  # running statistics, batch counts


@pytest.mark.parametrize("joint, channels_last", [(True, False), (False, True)])
def test_cpu_forward_matches_plain_network_in_training(joint, channels_last) -> None:
    """Training mode, float64: outputs, input and parameter gradients, batch-norm running
    statistics and batch counts of the whole network equal the plain forward's."""
    model = _perturbed(JointUNet(4) if joint else UNet(4), seed=1)
    x = torch.randn(5, 1, 32, 64, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    plain, fused = _pair(model.train())
    _assert_same_run(plain, fused, x, 3 if joint else None)
    if joint:
        _assert_same_run(plain, fused, x, None)  # the evaluation call: logits only


def test_cpu_forward_matches_plain_network_in_eval() -> None:
    """Eval mode (running statistics) with and without grad."""
    plain, fused = _pair(_perturbed(JointUNet(3), seed=2).eval())
    x = torch.randn(2, 1, 32, 64, dtype=torch.float64)
    _assert_same_run(plain, fused, x, 1)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))


def _saved_sizes(fn) -> tuple[torch.Tensor, list[tuple[int, torch.dtype]]]:
    """``fn()``'s result and (numel, dtype) of every tensor autograd saved while it ran, one
    entry per storage."""
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = (t.numel(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def test_cpu_forward_saves_less_for_backward() -> None:
    """The CPU forward keeps no pooling indices and no activation of a batch norm + ReLU that
    a conv reads: well under the plain forward's saved bytes."""
    plain, fused = _pair(JointUNet(4).train())
    x = torch.randn(4, 1, 64, 64)
    _, saved_plain = _saved_sizes(lambda: plain(x, 2))
    _, saved = _saved_sizes(lambda: fused(x, 2))
    assert any(dtype == torch.int64 for _, dtype in saved_plain)  # max-pool indices
    assert not any(dtype == torch.int64 for _, dtype in saved)
    total, total_plain = sum(n for n, _ in saved), sum(n for n, _ in saved_plain)
    print(f"saved elements: plain {total_plain}, cpu forward {total}")
    assert total < 0.7 * total_plain


def _group_norm(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(4, child.num_features).double())


def _leaky_relu(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.LeakyReLU(0.2))


def _bilinear_upsampling(model: nn.Module) -> None:
    for step in model.decoder.steps:
        step.up.upsample = nn.Upsample(scale_factor=2.0, mode="bilinear")


def _avg_pool(model: nn.Module) -> None:
    model.encoder.pool = nn.AvgPool2d(2)


def _reflect_padding(model: nn.Module) -> None:
    for step in model.decoder.steps:
        step.convs[0][0].padding_mode = "reflect"  # the conv of the concatenation
    model.seg_head.out.padding_mode = "reflect"


def _untracked_batch_norm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


@pytest.mark.parametrize("change", [_group_norm, _leaky_relu, _bilinear_upsampling, _avg_pool,
                                    _reflect_padding, _untracked_batch_norm])
def test_cpu_forward_falls_back_where_layers_differ(change) -> None:
    """A plain network whose layers are not those the rewrites assume (GroupNorm, LeakyReLU,
    bilinear upsampling, average pooling, reflect padding, batch norm without running
    statistics) still gets its own function from the CPU forward, in training mode."""
    model = _perturbed(JointUNet(4), seed=3).train()
    original = copy.deepcopy(model)
    change(model)
    plain, fused = _pair(model)
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    _assert_same_run(plain, fused, x, 2)
    # The change matters: the network computes something else than before it (in eval mode,
    # where batch norm without running statistics differs).
    plain.eval(), original.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x, 2)[0], original(x, 2)[0])


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1)])
def test_encoder_falls_back_for_another_max_pool(pool) -> None:
    """A max-pool other than 2x2 with stride 2 and no padding (which the decoder could not
    follow, but an encoder alone can) runs as its module: the same skips in training."""
    model = _perturbed(UNet(3), seed=4).train()
    model.encoder.pool = pool
    plain, fused = _pair(model.encoder)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    expected = plain(x)
    assert expected[1].shape[-1] != 16  # not a 2x2, stride-2 pool
    for a, b in zip(fused(x), expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_head_falls_back_for_an_even_same_conv() -> None:
    """A conv with 'same' padding and an even kernel (PyTorch pads one more right and bottom
    than left and top, so no symmetric padding) runs as its module, in training."""
    head = _perturbed(SegHead(4), seed=5).train()
    head.out = nn.Conv2d(16, 4, 2, padding="same", bias=False).double()
    plain, fused = _pair(head)
    _assert_same_run(plain, fused, torch.randn(3, 16, 16, 16, dtype=torch.float64), 2)


def test_module_with_other_children_runs_its_own_forward(monkeypatch) -> None:
    """A module whose children are not the ones its CPU forward reads runs the plain forward
    of its class."""
    model = cpu_training.install(UNet(3))
    calls = []
    plain_forward = SegHead.forward

    def spy(self, f, n_logits=None):
        calls.append(n_logits)
        return plain_forward(self, f, n_logits)

    monkeypatch.setattr(SegHead, "forward", spy)
    x = torch.randn(2, 1, 32, 32)
    model.eval()(x)
    assert calls == []  # the CPU forward, not the class's
    model.seg_head.extra = nn.Identity()
    model(x)
    assert calls == [None]


def test_install_keeps_modules_and_state_dict() -> None:
    """Same parameters (the same tensors), buffers and state_dict keys; uninstall and a deep
    copy behave."""
    model = JointUNet(4)
    params = list(model.parameters())
    keys = list(model.state_dict())
    cpu_training.install(model)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    replaced = [m for m in model.modules() if "forward" in vars(m)]
    assert {type(m).__name__ for m in replaced} == {"Encoder", "Decoder", "SegHead",
                                                     "ProjectionHead"}
    clone = copy.deepcopy(model)
    assert all(m.forward.__self__ is m for m in clone.modules() if "forward" in vars(m))
    cpu_training.uninstall(model)
    assert not any("forward" in vars(m) for m in model.modules())


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
    big = [n for n, _ in saved if n >= y.numel()]
    assert big == [y.numel()]  # the input only
    assert len([n for n, _ in saved_plain if n >= y.numel()]) >= 2  # and the activation


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


@pytest.mark.parametrize("momentum", [0.3, None])
def test_bn_relu_conv_moves_running_statistics_with_the_modules_momentum(momentum) -> None:
    """Over three training calls the running averages are nn.BatchNorm2d's for a momentum
    other than the default (repeat_running_updates sets one) and for None (a cumulative
    average, 1 / batches tracked)."""
    torch.manual_seed(8)
    bns = [nn.BatchNorm2d(3, eps=1e-3, momentum=momentum).double() for _ in range(2)]
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    for k in range(3):
        y = (torch.randn(2, 3, 6, 6, dtype=torch.float64) * (k + 1) + k).requires_grad_(True)
        bn_relu_conv(y, bns[0], w, None, 1)
        bns[1](y)
    assert bns[1].num_batches_tracked.item() == 3
    for key, ref in bns[1].state_dict().items():
        torch.testing.assert_close(bns[0].state_dict()[key], ref, msg=key)


def test_bn_relu_conv_under_autocast_runs_the_layers() -> None:
    """Training under CPU autocast (--amp bf16) runs batch norm, ReLU and conv as the plain
    layers do: the same bf16 output and the same gradients."""
    torch.manual_seed(9)
    bns = [nn.BatchNorm2d(4, eps=1e-3, momentum=0.01) for _ in range(2)]
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bn_relu_conv(y, bns[0], w, b, 1)
        expected = F.conv2d(F.relu(bns[1](y)), w, b, padding=1)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    g = torch.randn_like(expected)
    for a, ref in zip(torch.autograd.grad(got, (y, w, b, bns[0].weight), g),
                      torch.autograd.grad(expected, (y, w, b, bns[1].weight), g), strict=True):
        assert torch.equal(a, ref)


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
    assert saved == [(x.numel(), x.dtype)] and len(saved_ref) == 2

"""The joint iteration replayed from a CUDA graph (``--cuda_graph 1``, utils/captured_step.py).

On the CPU the captured step runs eagerly from its input buffers, which checks everything but
the capture itself: the draws reach the buffers in the order the batch reads them, the update
is the trainer's Adam step, a non-finite loss skips it without touching the weights or the Adam
state, and an optimizer loaded from an ordinary run is switched over. The last test runs the
real graph on a CUDA GPU against the eager trainer's steps (skipped without one).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import nested_squares

import utils.baseline_training as bt
import utils.joint_training as jt
from losses.dice import soft_dice_loss
from losses.local_contrastive import draw_positive_uniforms
from models.unet import JointUNet, UNet
from utils.augment import apply_set_intensity, draw_augment, draw_set_intensity
from utils.captured_step import NonFiniteGuard, check_step_flags, make_capturable, tensors
from utils.errors import ConfigError
from utils.mixed_precision import MixedPrecision
from utils.sampling import pair_layout, pick_joint_slices

SETTINGS = jt.JointSettings(num_classes=3, n_seg=4, bt_size=4, no_of_pos_eles=2)


def _data(device: torch.device) -> jt.JointData:
    # Distinct pools: the labeled slices are darker, so a swapped pool changes every loss.
    (li, ll), (ui, ul) = nested_squares(8, 32, seed=0), nested_squares(8, 32, seed=1)
    data, _ = jt.build_joint_data(li.to(device) * 0.5, ll.to(device, torch.uint8),
                                  ui.to(device), ul.to(device, torch.uint8),
                                  SETTINGS.num_classes, 2)
    return data


def _model(device: torch.device) -> JointUNet:
    torch.manual_seed(0)
    return JointUNet(SETTINGS.num_classes).to(device, memory_format=torch.channels_last)


def _steps(model, optimizer, data, cuda_graph: bool, n: int, guard=None) -> list[list[float]]:
    guard = guard or NonFiniteGuard(max_consecutive=5)
    step = jt.joint_stepper(model, optimizer, data, SETTINGS, soft_dice_loss,
                            torch.Generator().manual_seed(7), guard,
                            MixedPrecision(data.lab_img.device.type, None), cuda_graph)
    return [[float(t) for t in step(it)] for it in range(n)]


def _assert_same_updates(a: torch.nn.Module, b: torch.nn.Module, start: dict) -> None:
    """The weights' changes since ``start``, all tensors together, agree within 5 % (fused
    and for-each Adam round differently, and Adam turns a gradient of rounding noise into a
    step of about lr: biases before batch norm, single small entries; so no entry-wise
    check)."""
    diff = total = 0.0
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if x.is_floating_point() and not name.endswith("bias"):
            dx, dy = x - start[name], y - start[name]
            diff, total = diff + (dx - dy).square().sum(), total + dy.square().sum()
    assert total > 0 and diff <= 0.05**2 * total, (diff / total) ** 0.5


def test_captured_steps_follow_the_trainers_steps_after_an_ordinary_start():
    data = _data(torch.device("cpu"))
    eager, captured = _model(data.lab_img.device), _model(data.lab_img.device)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(captured.parameters(), lr=1e-3)
    # Both start ordinarily (as a run resumed with --cuda_graph 1 after one without it).
    _steps(eager, opt_e, data, False, 1)
    _steps(captured, opt_c, data, False, 1)
    start = copy.deepcopy(captured.state_dict())
    losses_e = _steps(eager, opt_e, data, False, 3)
    losses_c = _steps(captured, opt_c, data, True, 3)
    assert opt_c.param_groups[0]["fused"] and opt_c.param_groups[0]["capturable"]
    assert losses_c[0] == losses_e[0]  # the same weights and the same batch: the same losses
    # Afterwards fused and for-each Adam round differently (up to about 5e-4 of a loss after
    # two steps, depending on the thread count; a different batch would differ by percents).
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-3,
                               atol=1e-6)
    assert len({round(x[0], 6) for x in losses_c}) == 3  # a new batch each step
    _assert_same_updates(captured, eager, start)
    moved = max((captured.state_dict()[k].float() - v.float()).abs().max().item()
                for k, v in start.items())
    assert moved > 1e-4  # the updates were not skipped
    for p_c, p_e in zip(captured.parameters(), eager.parameters(), strict=True):
        assert opt_c.state[p_c]["step"].item() == opt_e.state[p_e]["step"].item() == 4


def test_captured_baseline_steps_follow_the_baseline_trainers_steps():
    data = _data(torch.device("cpu"))
    s = bt.BaselineSettings(num_classes=3, batch_size=6)
    runs = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = UNet(3).to(memory_format=torch.channels_last)
        start = copy.deepcopy(model.state_dict())
        # fused in both: the captured step's Adam (make_capturable), so both round alike
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        step = bt.baseline_stepper(model, optimizer, data.lab_img, data.lab_lbl,
                                   torch.arange(8), s, soft_dice_loss,
                                   torch.Generator().manual_seed(3),
                                   NonFiniteGuard(max_consecutive=5),
                                   MixedPrecision("cpu", None), cuda_graph)
        runs.append(([float(step(it)) for it in range(3)], model))
    (losses_e, eager), (losses_c, captured) = runs
    assert losses_c[0] == losses_e[0] and len(set(losses_c)) == 3
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-4,
                               atol=1e-6)
    _assert_same_updates(captured, eager, start)


def test_a_non_finite_loss_skips_the_update_and_the_adam_state():
    data = _data(torch.device("cpu"))
    model = _model(data.lab_img.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = NonFiniteGuard(max_consecutive=5)
    _steps(model, optimizer, data, True, 1, guard)
    weights = copy.deepcopy(model.state_dict())
    adam = copy.deepcopy(optimizer.state_dict()["state"])
    finite = data.unl_img.clone()
    data.unl_img.fill_(float("nan"))  # in place: the step reads the round's pools
    losses = _steps(model, optimizer, data, True, 2, guard)
    assert all(not torch.isfinite(torch.tensor(x[0])) for x in losses)
    assert guard.total == 1  # the last step's loss is read at the next step or when settled
    guard.settle()
    assert guard.total == 2 and guard.consecutive == 2
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # BN statistics move on
            assert torch.equal(value, weights[name]), name
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, adam[i][key]), (i, key)
    data.unl_img.copy_(finite)
    _steps(model, optimizer, data, True, 1, guard)
    guard.settle()
    assert guard.consecutive == 0
    assert next(iter(optimizer.state.values()))["step"].item() == 2
    assert not torch.equal(next(model.parameters()), next(iter(weights.values())))


def test_the_joint_draws_are_taken_in_order_and_the_batch_is_theirs():
    data = _data(torch.device("cpu"))
    draws = jt.draw_joint(data, SETTINGS, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same sequence, drawn part by part
    picked = pick_joint_slices(8, data.dice_index, data.lab_index, data.unl_index,
                               SETTINGS.n_seg, SETTINGS.bt_size, g)
    augment = draw_augment(SETTINGS.n_seg, 32, 32, g)
    sets = [draw_set_intensity(g), draw_set_intensity(g)]
    positive = draw_positive_uniforms(2 * SETTINGS.bt_size, 2, SETTINGS.no_of_pos_eles, g)
    weights = torch.tensor([SETTINGS.lamda_local, SETTINGS.temp_fac])  # this iteration's λ, τ
    for a, b in zip(tensors(draws), tensors((*picked, augment, torch.stack(sets), positive,
                                             weights)), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(sets[0], sets[1])
    # The batch of the draws: set 2's first image is the second slice of pair 0 with set 2's
    # brightness and contrast (labeled slice lab[0], pair layout (L0, L0)).
    images = jt.joint_batch_from(data, SETTINGS, draws, pair_layout(4))[0]
    expect = apply_set_intensity(data.lab_img[draws.lab[:1]], sets[1])
    assert torch.equal(images[SETTINGS.n_seg + SETTINGS.bt_size], expect[0])


def test_make_capturable_refuses_another_optimizer():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Adam"):
        make_capturable(torch.optim.SGD(model.parameters(), lr=0.1))


def test_cuda_graph_and_compile_are_refused_off_a_gpu_and_a_graph_with_fp16():
    with pytest.raises(ConfigError, match="--cuda_graph 1 needs a CUDA GPU"):
        check_step_flags(torch.device("cpu"), "off")
    with pytest.raises(ConfigError, match="--compile 1 needs a CUDA GPU.*leave --compile 0"):
        check_step_flags(torch.device("cpu"), "off", cuda_graph=False, compile_network=True)
    with pytest.raises(ConfigError, match="--amp fp16"):
        check_step_flags(torch.device("cuda"), "fp16")
    check_step_flags(torch.device("cuda"), "fp16", cuda_graph=False, compile_network=True)
    check_step_flags(torch.device("cuda"), "bf16", compile_network=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
def test_graph_replays_follow_the_eager_steps_on_a_gpu(monkeypatch):
    # Full float32 products, so that only the Adam implementations and cuDNN's summation
    # order tell the two apart.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    data = _data(torch.device("cuda"))
    eager, captured = _model(data.lab_img.device), _model(data.lab_img.device)
    start = copy.deepcopy(captured.state_dict())
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(captured.parameters(), lr=1e-3)
    guard = NonFiniteGuard(max_consecutive=5)
    step = jt.joint_stepper(captured, opt_c, data, SETTINGS, soft_dice_loss,
                            torch.Generator().manual_seed(7), guard,
                            MixedPrecision("cuda", None), cuda_graph=True)
    # The capture's warm-up runs changed nothing: weights, batch-norm statistics, Adam steps.
    for name, value in captured.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert all(state["step"].item() == 0 for state in opt_c.state.values())
    losses_c = [[float(t) for t in step(it)] for it in range(4)]
    losses_e = _steps(eager, opt_e, data, False, 4)
    torch.testing.assert_close(torch.tensor(losses_c[0]), torch.tensor(losses_e[0]), rtol=1e-4,
                               atol=1e-6)
    # Later steps: cuDNN's backward sums in a varying order, and Adam's first steps turn
    # gradients near zero into steps of about lr, so the runs drift apart a little.
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=2e-2,
                               atol=1e-4)
    assert all(state["step"].item() == 4 for state in opt_c.state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
def test_baseline_graph_replays_follow_the_eager_steps_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    data = _data(torch.device("cuda"))
    s = bt.BaselineSettings(num_classes=3, batch_size=6)
    runs = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = UNet(3).cuda().to(memory_format=torch.channels_last)
        start = copy.deepcopy(model.state_dict())
        step = bt.baseline_stepper(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                                   data.lab_img, data.lab_lbl, torch.arange(8), s,
                                   soft_dice_loss, torch.Generator().manual_seed(3),
                                   NonFiniteGuard(max_consecutive=5),
                                   MixedPrecision("cuda", None), cuda_graph)
        for name, value in model.state_dict().items():  # the warm-up changed nothing
            assert torch.equal(value, start[name]), name
        runs.append([float(step(it)) for it in range(3)])
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4)
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=2e-2,
                               atol=1e-4)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_schedule_of_lambda_reaches_each_iteration_also_in_a_captured_step(monkeypatch,
                                                                              cuda_graph):
    """``loss_weights`` sees the iteration number, and its λ reaches the loss through the
    step's inputs: a captured step (here its eager form) uses each iteration's value."""
    seen = []

    def ramp(s, iteration):
        seen.append(iteration)
        return torch.tensor([0.5 * iteration, s.temp_fac])

    monkeypatch.setattr(jt, "loss_weights", ramp)
    data = _data(torch.device("cpu"))
    model = _model(data.lab_img.device)
    losses = _steps(model, torch.optim.Adam(model.parameters(), lr=1e-3), data, cuda_graph, 4)
    assert seen[-4:] == [0, 1, 2, 3]
    for it, (total, seg, local) in enumerate(losses):
        assert local > 0.01 and total == pytest.approx(seg + 0.5 * it * local, rel=1e-6)


# ------------------------------------------- what a step runs and replays, on the CPU path
class _Guard:
    """A guard that records its calls and refuses the losses of the iterations in ``refuse``."""

    def __init__(self, refuse=()):
        self.refuse, self.ok_calls, self.later_calls = set(refuse), [], []

    def ok(self, loss, iteration):
        self.ok_calls.append((float(loss.detach()), iteration))
        return iteration not in self.refuse

    def later(self, loss, iteration):
        self.later_calls.append((float(loss.detach()), iteration))


def _tiny(cuda_graph: bool, guard, seen: list):
    """A stepper over a conv + batch-norm network whose draws are images from the run's
    generator (recorded in ``seen``)."""
    from utils.captured_step import stepper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def draw(g, it):
        images = torch.rand(2, 1, 6, 6, generator=g)
        seen.append(images)
        return (images,)

    def losses_fn(draws):
        out = model(draws[0])
        return out.square().mean(), out.mean()

    step = stepper(draw, losses_fn, model, optimizer, torch.Generator().manual_seed(5), guard,
                   MixedPrecision("cpu", None), cuda_graph)
    return step, model, optimizer


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_step_after_evaluation_trains_with_batch_statistics(cuda_graph):
    step, model, _ = _tiny(cuda_graph, _Guard(), [])
    model.eval()  # as validation leaves it
    step(0)
    assert model.training
    assert not torch.equal(model[1].running_mean, torch.zeros(2))  # batch statistics moved


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_each_step_draws_from_the_run_and_reports_its_loss_once(cuda_graph):
    """The run's generator gives the same draws either way (the captured step's example comes
    from a generator of its own); a step's losses come back detached, the first judged for
    its own iteration: before the update (eager, a refused one skips it) or after (captured)."""
    guard, seen = _Guard(refuse={1}), []
    step, model, optimizer = _tiny(cuda_graph, guard, seen)
    if cuda_graph:
        seen.clear()  # the example's draw
    weights = []
    losses = []
    for it in range(3):
        losses.append(step(it))
        weights.append(model[0].weight.detach().clone())
    g = torch.Generator().manual_seed(5)
    assert all(torch.equal(a, torch.rand(2, 1, 6, 6, generator=g)) for a in seen)
    assert len(seen) == 3
    assert all(len(x) == 2 and not any(t.requires_grad for t in x) for x in losses)
    calls = guard.later_calls if cuda_graph else guard.ok_calls
    assert calls == [(float(x[0]), it) for it, x in enumerate(losses)]
    assert (guard.ok_calls if cuda_graph else guard.later_calls) == []
    assert torch.equal(weights[0], weights[1]) == (not cuda_graph)  # refused: not updated
    assert not torch.equal(weights[1], weights[2])
    assert not hasattr(optimizer, "found_inf")  # a later plain step must not read it
    group = optimizer.param_groups[0]
    assert (group["fused"], group["capturable"]) == ((True, True) if cuda_graph else (None, False))


def test_make_capturable_moves_an_older_checkpoints_step_counts_to_tensors():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    for state in optimizer.state.values():
        state["step"] = 3  # a plain number, as older checkpoints hold it
    make_capturable(optimizer)
    for state in optimizer.state.values():
        assert isinstance(state["step"], torch.Tensor) and state["step"].dtype == torch.float32
        assert state["step"].item() == 3


def test_a_graph_with_fp16_is_refused_with_compile_too():
    with pytest.raises(ConfigError, match="--amp fp16"):
        check_step_flags(torch.device("cuda"), "fp16", cuda_graph=True, compile_network=True)

"""A training step replayed from one CUDA graph (``--cuda_graph 1``).

The step's random choices are drawn on the host (the ``draw_*`` halves of ``utils.augment``,
``utils.sampling`` and ``losses.local_contrastive``) and copied into fixed input buffers; the
batch building, the forward, the losses, the backward and the Adam update form one graph,
replayed each iteration with a single launch, so the step no longer waits on the host's
launches of several hundred small kernels. A non-finite loss skips the update inside the
graph (fused Adam's ``found_inf``), so no decision needs the host. Without a graph (on the
CPU, and in the tests) the same step runs eagerly from the same buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from utils.errors import ConfigError
from utils.mixed_precision import MixedPrecision


def check_step_flags(device: torch.device, amp: str, cuda_graph: bool = True,
                     compile_network: bool = False) -> None:
    """Refuse ``--cuda_graph 1`` or ``--compile 1`` where they cannot run: off a CUDA GPU, or
    a graph with fp16's scaler."""
    for flag, used in (("--cuda_graph 1", cuda_graph), ("--compile 1", compile_network)):
        if used and device.type != "cuda":
            raise ConfigError(f"{flag} needs a CUDA GPU (--device cuda), not {device}; "
                              f"leave {flag[:-2]} 0 on the CPU")
    if cuda_graph and amp == "fp16":
        raise ConfigError("--cuda_graph 1 cannot capture the gradient scaler of --amp fp16; "
                          "use --amp bf16 or --amp off with it")


def tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors of a tensor or of nested tuples (NamedTuples) of them, in order."""
    if isinstance(tree, torch.Tensor):
        yield tree
    else:
        for item in tree:
            yield from tensors(item)


def _on(tree: Any, device: torch.device) -> Any:
    """A copy of ``tree`` with every tensor a new tensor on ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, copy=True)
    items = [_on(item, device) for item in tree]
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Switch an Adam optimizer, state included, to the fused, capturable implementation
    (the same update in one kernel, its step counts on the parameters' device)."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"a captured step needs torch.optim.Adam, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        # Loading a state_dict brings back the flags it was saved with, so set them each time.
        group.update(fused=True, capturable=True, foreach=None)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32,
                                                device=p.device)


class CapturedStep:
    """``losses = step(draws)``: one iteration of ``losses_fn`` and an Adam update.

    Args:
        losses_fn: ``losses_fn(draws) -> (loss, *parts)``, the forward of one iteration from
            its draws (scalar tensors; ``loss`` is differentiated).
        model: the network (its buffers, e.g. batch-norm statistics, are restored after the
            capture's warm-up runs).
        optimizer: a torch.optim.Adam over the model's parameters (`make_capturable`).
        example: draws of the shape every call will have (any values; not used for training).
        graph: capture a CUDA graph (the model on a CUDA device); False runs eagerly.

    Each call copies ``draws`` into the input buffers, runs (replays) the step and returns
    detached copies of the losses. The update is skipped, with the Adam state untouched,
    when ``loss`` is not finite; the caller counts such steps as before.
    """

    def __init__(self, losses_fn: Callable[[Any], tuple[torch.Tensor, ...]],
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, example: Any,
                 graph: bool, warmup: int = 2) -> None:
        make_capturable(optimizer)
        self.losses_fn, self.model, self.optimizer = losses_fn, model, optimizer
        device = next(model.parameters()).device
        self.inputs = _on(example, device)
        self.found_inf = torch.zeros((), device=device)
        # 1 while warming up and capturing: those runs must not change the weights.
        self.skip = torch.ones((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            if device.type != "cuda":
                raise ValueError(f"a CUDA graph needs the model on a CUDA device, not {device}")
            saved = [b.clone() for b in model.buffers()]
            model.train()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # as torch.cuda.graph's documentation warms up
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._run()
            with torch.no_grad():
                for b, s in zip(model.buffers(), saved, strict=True):
                    b.copy_(s)
        self.skip.zero_()

    def _run(self) -> tuple[torch.Tensor, ...]:
        losses = self.losses_fn(self.inputs)
        self.found_inf.copy_(torch.logical_or(~torch.isfinite(losses[0]), self.skip))
        self.optimizer.zero_grad(set_to_none=True)
        losses[0].backward()
        self.optimizer.found_inf = self.found_inf  # read by the fused Adam step
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        return tuple(t.detach() for t in losses)

    def __call__(self, draws: Any) -> tuple[torch.Tensor, ...]:
        for dst, src in zip(tensors(self.inputs), tensors(draws), strict=True):
            if src.device.type == "cpu" and dst.device.type == "cuda":
                src = src.pin_memory()  # an asynchronous copy: no wait for the queued step
            dst.copy_(src, non_blocking=True)
        self.model.train()
        if self.graph is None:
            return tuple(t.clone() for t in self._run())
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


class Guard(Protocol):
    """What judges each step's loss (``utils.training.NonFiniteGuard``): ``ok`` before an
    eager step's update, ``later`` for a step that skipped itself on the device."""

    def ok(self, loss: torch.Tensor, iteration: int) -> bool: ...

    def later(self, loss: torch.Tensor, iteration: int) -> None: ...


def stepper(
    draw: Callable[[torch.Generator, int], Any],
    losses_fn: Callable[[Any], tuple[torch.Tensor, ...]],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    guard: Guard,
    precision: MixedPrecision,
    cuda_graph: bool = False,
) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """A trainer's iteration ``step(it) -> losses`` (detached): ``draw(generator, it)`` on the
    host (the iteration's random choices and any scheduled values), then ``losses_fn(draws)``,
    whose first loss is differentiated.

    Without ``cuda_graph``, the original's eager step: the update (``precision.step``) unless
    ``guard.ok`` refuses the loss. With it, a `CapturedStep` (a CUDA graph on a GPU, the same
    step eagerly elsewhere) with the same draws, which skips a non-finite step on the device;
    ``guard.later`` counts it once the GPU has finished.
    """
    if not cuda_graph:
        def eager(it: int) -> tuple[torch.Tensor, ...]:
            draws = draw(generator, it)
            model.train()
            losses = losses_fn(draws)
            if guard.ok(losses[0], it):
                precision.step(losses[0], optimizer)
            return tuple(t.detach() for t in losses)

        return eager
    example = draw(torch.Generator().manual_seed(0), 0)  # only its shapes matter
    device = next(model.parameters()).device
    captured = CapturedStep(losses_fn, model, optimizer, example, graph=device.type == "cuda")

    def step(it: int) -> tuple[torch.Tensor, ...]:
        losses = captured(draw(generator, it))
        guard.later(losses[0], it)  # no wait for this step: the host draws the next meanwhile
        return losses

    return step

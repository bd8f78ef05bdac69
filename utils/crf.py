"""Fully connected (dense) CRF refinement of softmax predictions, used for pseudo-labels.

Step 2 of the method (METHOD.md §7 item 2) predicts a softmax per slice of every unlabeled
volume, refines each slice with a fully connected CRF (Krähenbühl & Koltun 2011, via the
``pydensecrf2`` package, import name ``pydensecrf``) and takes the argmax as pseudo-label.

The CRF energy of a labelling ``x`` of one slice is

    E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) [ g_w2 * k_g(i, j) + a_w1 * k_a(i, j) ]

with

* unary ``U_i(l) = -log p_i(l)`` (softmax clipped to >= 1e-5, as pydensecrf's
  ``unary_from_softmax`` in the original, so the log stays finite),
* Gaussian (smoothness) kernel ``k_g = exp(-|s_i - s_j|^2 / (2 g_sxy^2))``,
* bilateral (appearance) kernel
  ``k_a = exp(-|s_i - s_j|^2 / (2 a_sxy^2) - |I_i - I_j|^2 / (2 a_srgb^2))``,
* Potts compatibility ``mu(l, l') = [l != l']``.

Positions ``s`` are in pixels; intensities ``I`` are in the (normalised) units of the input
image. The approximate posterior is obtained with ``n_iter`` mean-field iterations.

Note on the bilateral term with the published ``a_sxy = 0.01``: the kernel is zero between any
two distinct pixels, but pydensecrf's message passing includes the pixel itself (k(i, i) = 1
after the symmetric normalisation). The term is therefore not inactive: it adds
``a_w1 * Q_i(l)`` to the score of the current belief at every pixel, i.e. it sharpens each
pixel towards its own current label and makes confident (even isolated) predictions harder
to overturn. The original implementation used the same library and parameters, so this
behaviour is kept; ``crf_refine_slice`` just computes it without building the lattice.

The parameters of each dataset live in ``experiment_init/init_<dataset>.py`` (``crf_params``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

# Clip floor for probabilities before -log (a maximal unary of ~11.5 nats): the default of
# pydensecrf's unary_from_softmax, which the original code used.
PROB_FLOOR: float = 1e-5

# Largest bilateral spatial std (pixels) for which the bilateral kernel is treated as the
# identity (see ``_bilateral_is_self_term``).
BILATERAL_SELF_TERM_MAX_SXY: float = 0.1


@dataclass(frozen=True)
class CRFParams:
    """Parameters of the dense CRF, in the order used by the original code.

    Attributes:
        a_sxy: spatial standard deviation of the bilateral kernel, in pixels.
        a_srgb: intensity standard deviation of the bilateral kernel, in image intensity units.
        a_w1: Potts weight of the bilateral kernel (dimensionless, energy units).
        g_sxy: spatial standard deviation of the Gaussian smoothness kernel, in pixels.
        g_w2: Potts weight of the Gaussian kernel (dimensionless, energy units).
        n_iter: number of mean-field iterations.
    """

    a_sxy: float
    a_srgb: float
    a_w1: float
    g_sxy: float
    g_w2: float
    n_iter: int

    def __post_init__(self) -> None:
        # Standard deviations divide the features, so they must be strictly positive; a
        # negative weight would turn the Potts model into an anti-smoothing term.
        for name in ("a_sxy", "a_srgb", "g_sxy"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRFParams.{name} must be > 0, got {getattr(self, name)}")
        for name in ("a_w1", "g_w2"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"CRFParams.{name} must be >= 0, got {getattr(self, name)}")
        if int(self.n_iter) != self.n_iter or self.n_iter < 0:
            raise ValueError(f"CRFParams.n_iter must be a non-negative int, got {self.n_iter}")


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a numpy array or a torch tensor (any device, with or without grad) to numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        # Duck-typed so that this module does not import torch just for isinstance.
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_finite(name: str, x: np.ndarray) -> None:
    """Reject NaN/inf inputs: they would silently propagate through mean field."""
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf values")


def _bilateral_is_self_term(params: CRFParams) -> bool:
    """Whether the bilateral kernel reduces exactly to the identity (a pure self term).

    The bilateral features are ``(y / a_sxy, x / a_sxy, I / a_srgb)``; two distinct pixels
    are at least ``1 / a_sxy`` apart in feature space. For ``a_sxy <= 0.1`` px that is >= 10
    standard deviations, so the permutohedral lattice never links two pixels and, after the
    symmetric normalisation, the kernel applied to Q returns Q itself: the term adds
    ``a_w1 * Q_i(l)`` to the score of label ``l`` at pixel ``i`` (checked numerically to
    agree with the library path to ~1e-4 up to a_sxy = 0.3; 0.1 leaves a margin).
    """
    return params.a_sxy <= BILATERAL_SELF_TERM_MAX_SXY


def crf_refine_slice(
    image: Any,
    probs: Any,
    params: CRFParams,
    *,
    prob_floor: float = PROB_FLOOR,
    exact_bilateral: bool = False,
) -> np.ndarray:
    """Refine the class probabilities of one 2D slice with a fully connected CRF.

    Args:
        image: single-channel image, shape (H, W), float (normalised intensities; the units of
            ``params.a_srgb``). A numpy array or a torch tensor.
        probs: softmax probabilities, shape (C, H, W), float, summing to 1 over C. They are
            clipped to >= ``prob_floor`` before ``-log``. A numpy array or a torch tensor.
        params: CRF parameters, e.g. ``CRFParams(**cfg.crf_params)`` of a dataset's config.
        prob_floor: lower clip of the probabilities (the original code used pydensecrf's
            ``unary_from_softmax`` default of 1e-5, i.e. a unary capped at ~11.5 nats).
        exact_bilateral: if True, always build the bilateral term with pydensecrf's
            permutohedral lattice. If False (default) and ``a_sxy <= 0.1`` px, the bilateral
            term, which is then exactly a self term (see ``_bilateral_is_self_term``), is
            applied as ``-a_w1 * Q`` added to the unary before each mean-field step: the same
            result to ~1e-4 (tested), without building the lattice over one vertex per pixel.

    Returns:
        Refined (approximate posterior) probabilities, shape (C, H, W), float32, summing to 1
        over C.

    Raises:
        ValueError: if the shapes do not match or the inputs are not finite.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral

    img = _to_numpy(image)
    prob = _to_numpy(probs)
    if img.ndim != 2:
        raise ValueError(f"image must have shape (H, W), got shape {img.shape}")
    if prob.ndim != 3:
        raise ValueError(f"probs must have shape (C, H, W), got shape {prob.shape}")
    if prob.shape[1:] != img.shape:
        raise ValueError(
            f"probs shape {prob.shape} (C, H, W) does not match image shape {img.shape} (H, W)"
        )
    if prob.shape[0] < 1:
        raise ValueError(f"probs must have at least one class, got shape {prob.shape}")
    if not prob_floor > 0:
        raise ValueError(f"prob_floor must be > 0, got {prob_floor}")
    _check_finite("image", img)
    _check_finite("probs", prob)

    n_classes, height, width = prob.shape
    # pydensecrf reads raw buffers: every array handed to it must be C-contiguous float32,
    # with pixel index y * W + x (row-major flattening of (H, W)).
    unary = -np.log(np.clip(prob.astype(np.float32), prob_floor, None))
    unary = np.ascontiguousarray(unary.reshape(n_classes, height * width), dtype=np.float32)

    crf = dcrf.DenseCRF2D(width, height, n_classes)  # note: width first
    crf.setUnaryEnergy(unary)
    # Smoothness term: Gaussian on pixel positions only, Potts compatibility with weight g_w2
    # (same as the original's addPairwiseEnergy(create_pairwise_gaussian(...), compat=g_w2)).
    crf.addPairwiseGaussian(
        sxy=(float(params.g_sxy), float(params.g_sxy)),
        compat=float(params.g_w2),
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_SYMMETRIC,
    )

    if exact_bilateral or not _bilateral_is_self_term(params):
        # Appearance term: bilateral kernel on (y/a_sxy, x/a_sxy, I/a_srgb). chdim=-1 means
        # the image has no channel axis, i.e. a single intensity channel.
        feats = create_pairwise_bilateral(
            sdims=(float(params.a_sxy), float(params.a_sxy)),
            schan=(float(params.a_srgb),),
            img=np.ascontiguousarray(img, dtype=np.float32),
            chdim=-1,
        )
        crf.addPairwiseEnergy(
            np.ascontiguousarray(feats, dtype=np.float32),
            compat=float(params.a_w1),
            kernel=dcrf.DIAG_KERNEL,
            normalization=dcrf.NORMALIZE_SYMMETRIC,
        )
        q = crf.inference(int(params.n_iter))
    else:
        # Mean field: Q <- softmax(-U + g_w2 * K_g Q + a_w1 * Q). The library computes
        # softmax(-U' + g_w2 * K_g Q) per step, so the self term is folded into U' = U - a_w1 Q
        # using the Q of the previous step, exactly as a parallel mean-field update would.
        q, tmp1, tmp2 = crf.startInference()  # q = softmax(-U)
        for _ in range(int(params.n_iter)):
            if params.a_w1 != 0:
                q_prev = np.asarray(q, dtype=np.float32)
                crf.setUnaryEnergy(
                    np.ascontiguousarray(unary - float(params.a_w1) * q_prev, dtype=np.float32)
                )
            crf.stepInference(q, tmp1, tmp2)
    return np.array(q, dtype=np.float32).reshape(n_classes, height, width)


def _check_volume(imgs: np.ndarray, prob: np.ndarray) -> None:
    """Shape checks of a volume: images (N, H, W), probs (N, C, H, W)."""
    if imgs.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got shape {imgs.shape}")
    if prob.ndim != 4:
        raise ValueError(f"probs must have shape (N, C, H, W), got shape {prob.shape}")
    if prob.shape[0] != imgs.shape[0] or prob.shape[2:] != imgs.shape[1:]:
        raise ValueError(
            f"probs shape {prob.shape} (N, C, H, W) does not match images shape "
            f"{imgs.shape} (N, H, W)"
        )


def _slice_labels(
    image: np.ndarray, probs: np.ndarray, params: CRFParams, prob_floor: float,
    exact_bilateral: bool,
) -> np.ndarray:
    """Labels (H, W) int64 of one slice: the argmax over classes of `crf_refine_slice`. The
    unit of work of both the serial loop and the pool's processes."""
    return crf_refine_slice(
        image, probs, params, prob_floor=prob_floor, exact_bilateral=exact_bilateral
    ).argmax(axis=0)


def crf_refine_volume(
    images: Any,
    probs: Any,
    params: CRFParams,
    *,
    prob_floor: float = PROB_FLOOR,
    exact_bilateral: bool = False,
) -> np.ndarray:
    """Refine a volume slice by slice with the dense CRF and return hard labels.

    The CRF is 2D (as in the original method): each slice is refined independently.

    Args:
        images: single-channel slices, shape (N, H, W), float. Numpy array or torch tensor.
        probs: softmax probabilities, shape (N, C, H, W), float. Numpy array or torch tensor.
        params: CRF parameters, e.g. ``CRFParams(**cfg.crf_params)`` of a dataset's config.
        prob_floor: see :func:`crf_refine_slice`.
        exact_bilateral: see :func:`crf_refine_slice`.

    Returns:
        Labels, shape (N, H, W), int64: the argmax over classes of the refined probabilities.

    Raises:
        ValueError: if the shapes do not match or the inputs are not finite.
    """
    imgs = _to_numpy(images)
    prob = _to_numpy(probs)
    _check_volume(imgs, prob)
    labels = np.empty(imgs.shape, dtype=np.int64)
    # A Python loop is fine: the per-slice work is C++ inside pydensecrf.
    for i in range(imgs.shape[0]):
        labels[i] = _slice_labels(imgs[i], prob[i], params, prob_floor, exact_bilateral)
    return labels


# Thread-count variables of the OpenMP, MKL and OpenBLAS runtimes, for libraries a worker loads.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _start_worker() -> None:
    """Run by each pool process before its first slice: one thread per library, since the
    workers already fill the cores; and the stop signals ignored, so that the parent alone
    acts on them (a trainer finishes the labelling and stops at its next iteration boundary,
    utils/preemption.py) and ends the workers by shutting the pool down."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"
    torch = sys.modules.get("torch")  # imported with the parent's main module
    if torch is not None:
        torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class PendingLabels:
    """The labels of one volume given to `CRFPool.refine`; ``result()`` waits for them."""

    def __init__(self, pool: CRFPool, images: np.ndarray, probs: np.ndarray) -> None:
        self._pool = pool
        self.n_slices = images.shape[0]
        self._shape = images.shape
        self._inputs: tuple[np.ndarray, np.ndarray] | None = (images, probs)
        self._futures: list[Future] = []
        self.labels: np.ndarray | None = None  # once taken by result()

    def submit(self, executor: ProcessPoolExecutor) -> None:
        """Hand each slice to the processes as its own task, in slice order."""
        assert self._inputs is not None
        images, probs = self._inputs
        pool = self._pool
        self._futures = [
            executor.submit(_slice_labels, images[i], probs[i], pool.params, pool.prob_floor,
                            pool.exact_bilateral)
            for i in range(self.n_slices)
        ]
        self._inputs = None  # the tasks hold their slices

    def result(self) -> np.ndarray:
        """Labels (N, H, W) int64, as `crf_refine_volume` gives them."""
        if self.labels is None:
            if self._inputs is not None:
                self._pool.submit_queued()
            labels = np.empty(self._shape, dtype=np.int64)
            for i, future in enumerate(self._futures):
                labels[i] = future.result()
            self.labels, self._futures = labels, []
        return self.labels


# Third-party packages a trainer's main module imports (most of a worker's start), imported
# once by the fork server when the parent has them, so that each worker, forked from it,
# re-runs the main module with them cached; and the CRF library the workers use. Our own
# modules are left out: CPython 3.11's fork server ignores the parent's sys.path.
_SERVER_PRELOAD = ("torch", "numpy", "scipy.ndimage", "skimage.transform", "nibabel")
_WORKER_MODULES = ("pydensecrf.densecrf", "pydensecrf.utils")


def _worker_context() -> multiprocessing.context.BaseContext:
    """How `CRFPool` starts its processes: 'forkserver' where the platform has it (forks
    of a single-threaded server that outlives the pool), else 'spawn'."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [m for m in _SERVER_PRELOAD if m in sys.modules] + list(_WORKER_MODULES))
    return context


class CRFPool:
    """`crf_refine_volume` of many volumes over ``workers`` processes, each slice a task.

    ``workers == 1`` is the serial path: `refine` runs `crf_refine_volume` at once in this
    process, and no process is started. Otherwise the processes are forked from a fork server
    (`_worker_context`), never from this process: a forked child of a process whose OpenMP
    or CUDA runtime has started threads inherits their locks but not the threads, and may
    deadlock. They receive numpy arrays and run single-threaded (`_start_worker`). Each
    process runs the parent's main module again (as spawn does), once per pool: create one
    pool per labelling pass, not per volume.

    ``eager``: submit a volume's slices as soon as it is given, for a caller that has other
    work meanwhile (a GPU predicting the next volume); `refine` then waits for the oldest
    volumes only while more than ``backlog`` slices are in flight, which bounds the memory
    held by the pool. Otherwise (a caller whose own work would compete with the workers for
    the cores, e.g. a network on the CPU) volumes are gathered until ``backlog`` slices wait,
    then refined together while `refine` waits; the remainder is refined at the first
    ``result()`` of one of them. ``backlog`` defaults to 2 x ``workers`` slices: enough
    tasks that no worker waits while the slowest finishes.

    Use as a context manager: leaving it ends the processes (unfinished tasks are dropped).
    """

    def __init__(
        self,
        params: CRFParams,
        workers: int,
        *,
        eager: bool = False,
        backlog: int | None = None,
        prob_floor: float = PROB_FLOOR,
        exact_bilateral: bool = False,
    ) -> None:
        if int(workers) != workers or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers}")
        self.params, self.workers, self.eager = params, int(workers), eager
        self.backlog = 2 * self.workers if backlog is None else backlog
        self.prob_floor, self.exact_bilateral = prob_floor, exact_bilateral
        self._executor = None if self.workers == 1 else ProcessPoolExecutor(
            self.workers, mp_context=_worker_context(),
            initializer=_start_worker)
        self._queued: list[PendingLabels] = []  # given, not submitted yet
        self._in_flight: deque[PendingLabels] = deque()  # submitted, result() not taken yet

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End the processes; tasks not started are dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def refine(self, images: Any, probs: Any) -> PendingLabels:
        """Start refining one volume: images (N, H, W), probs (N, C, H, W), numpy arrays or
        tensors (as `crf_refine_volume`). Returns its `PendingLabels`, in the order given."""
        imgs, prob = _to_numpy(images), _to_numpy(probs)
        _check_volume(imgs, prob)
        pending = PendingLabels(self, imgs, prob)
        if self.workers == 1:
            pending.labels = crf_refine_volume(imgs, prob, self.params,
                                               prob_floor=self.prob_floor,
                                               exact_bilateral=self.exact_bilateral)
            return pending
        self._queued.append(pending)
        if self.eager:
            self.submit_queued()
            while self._slices_in_flight() > self.backlog:
                self._in_flight.popleft().result()
        elif sum(p.n_slices for p in self._queued) >= self.backlog:
            self.submit_queued()
            while self._in_flight:
                self._in_flight.popleft().result()
        return pending

    def _slices_in_flight(self) -> int:
        """Slices submitted whose volume's result() has not been taken, dropping the taken."""
        self._in_flight = deque(p for p in self._in_flight if p.labels is None)
        return sum(p.n_slices for p in self._in_flight)

    def submit_queued(self) -> None:
        """Hand every gathered volume to the processes."""
        if self._executor is None:
            raise RuntimeError("the CRF pool is closed")
        for pending in self._queued:
            pending.submit(self._executor)
            self._in_flight.append(pending)
        self._queued.clear()

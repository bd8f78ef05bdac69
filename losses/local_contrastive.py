r"""Local (pixel-level) contrastive loss of Chaitanya et al. 2023, vectorised.

The batch holds ``2B`` images arranged as ``B`` pairs: image ``i`` and image ``B + i``.
For an image ``a`` and a foreground class ``c`` (background, class 0, is never an anchor and
never a candidate)

.. math::

    \mu(a, c) = \frac{1}{|\Omega_{a,c}|} \sum_{u \in \Omega_{a,c}} z_a[u],
    \qquad
    \mathrm{sim}(u, v) = \frac{u^\top v}{\lVert u \rVert \, \lVert v \rVert \, \tau},

where :math:`\Omega_{a,c}` are the pixels of class ``c`` in ``a`` (argmax of the labels) and the
mean is taken over the *raw* embeddings (the cosine normalises afterwards). The candidate set
of ``a`` is :math:`D(a) = \{\mu(a, c') : c' \text{ present in } a\}`; the inter-image variant
adds :math:`\{\mu(b, c') : c' \text{ present in } b\}` for the partner ``b``. With

.. math::

    \ell(x, \mu, D) = -\log \frac{\exp \mathrm{sim}(x, \mu)}
                                 {\sum_{m \in D} \exp \mathrm{sim}(x, m)}

and ``P`` positive pixels ``p_1..p_P`` of class ``c`` sampled in ``a`` (``q_1..q_P`` in ``b``),
the un-normalised loss of pair ``(a, b)`` is

.. math::

    R_{ab} = \sum_{c=1}^{C-1} \sum_{j=1}^{P}
        \ell(z_a[p_j], \mu(a,c), D(a)) + \ell(z_b[q_j], \mu(b,c), D(b))
        \;[\, + \ell(z_a[p_j], \mu(b,c), D(a)) + \ell(z_b[q_j], \mu(a,c), D(b)) \,]_{\text{inter}}

and the pair loss is :math:`L_{ab} = R_{ab} / K` with :math:`K = P (C-1) k`, ``k = 2`` for the
inter-image variant and ``k = 1`` for the intra-image one. A term whose class is absent from an
image it needs contributes 0 while ``K`` stays fixed.

Reductions over the ``B`` pairs (``R_i`` is the raw sum of pair ``i``):

* ``"mean"`` — the paper's formula: :math:`\frac{1}{B} \sum_i R_i / K`.
* ``"original"`` — the released TF code divides the running sum by ``K`` *inside* the loop over
  pairs (``s = 0; for i: s = (s + R_i) / K; return s / B``), whose closed form is
  :math:`\frac{1}{B} \sum_{i=0}^{B-1} R_i \, K^{-(B-i)}`. The last pair gets the same weight as
  in ``"mean"``; every earlier pair is damped by a further factor ``K`` per later pair, so in
  practice only the last pair contributes and the loss is about ``B`` times weaker. The
  published numbers were produced with this arithmetic.

The value returned excludes the weight :math:`\lambda` of the total loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["draw_positive_uniforms", "local_contrastive_loss", "positive_indices",
           "sample_positive_indices"]

_REDUCTIONS = ("mean", "original")
# Guards F.normalize against zero vectors (absent-class means are exactly zero).
_NORM_EPS = 1e-12


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are promoted so that cosine / tau (up to 1/tau = 10) and the
    # log-sum-exp keep float32 accuracy; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _foreground_masks(labels_onehot: torch.Tensor) -> torch.Tensor:
    """Hard foreground masks from (possibly soft) labels.

    Args:
        labels_onehot: (N, C, H, W) class scores / one-hot labels.

    Returns:
        (N, C-1, H*W) bool, True where the argmax over C is class c+1.
    """
    n, c = labels_onehot.shape[:2]
    cls = labels_onehot.argmax(dim=1).reshape(n, 1, -1)
    fg = torch.arange(1, c, device=labels_onehot.device).view(1, c - 1, 1)
    return cls == fg


def draw_positive_uniforms(n: int, n_fg: int, n_pos: int,
                           generator: torch.Generator | None = None,
                           device: torch.device | None = None) -> torch.Tensor:
    """The random half of :func:`sample_positive_indices`: (N, F, P) float64 U(0, 1) draws on
    the generator's device (without one, from ``device``'s default generator)."""
    if n_pos < 1:
        raise ValueError(f"n_pos must be >= 1, got {n_pos}")
    if generator is not None:
        device = generator.device
    return torch.rand((n, n_fg, n_pos), generator=generator, dtype=torch.float64, device=device)


def positive_indices(labels_onehot: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The tensor half of :func:`sample_positive_indices`: pixel ``floor(u * count)`` of its
    class, in raster order, for the draws ``u`` (N, C-1, P) of :func:`draw_positive_uniforms`.
    Returns (N, C-1, P, 2) long (row, column), -1 where the class is absent."""
    device = labels_onehot.device
    width = labels_onehot.shape[-1]
    masks = _foreground_masks(labels_onehot)  # (N, F, HW)
    # cumsum[k] = number of class pixels at flat positions <= k; the j-th (0-based) pixel of the
    # class is the first position whose cumsum exceeds j, which searchsorted finds in one call.
    cumsum = masks.to(torch.int64).cumsum(dim=-1).contiguous()
    counts = cumsum[..., -1:]  # (N, F, 1)
    rank = torch.floor(u.to(device) * counts).to(torch.int64)
    # u * count can round up to count itself; keep the rank inside [0, count-1].
    rank = torch.minimum(rank, (counts - 1).clamp(min=0))
    flat = torch.searchsorted(cumsum, rank.contiguous(), right=True)  # (N, F, P)
    pos = torch.stack((flat // width, flat % width), dim=-1)
    present = (counts > 0).unsqueeze(-1)  # (N, F, 1, 1)
    return torch.where(present, pos, torch.full_like(pos, -1))


def sample_positive_indices(
    labels_onehot: torch.Tensor,
    n_pos: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample pixel positions of every foreground class, uniformly with replacement.

    Args:
        labels_onehot: (2B, C, H, W) one-hot or soft labels; a pixel belongs to its argmax class.
        n_pos: number P of pixels drawn per (image, foreground class).
        generator: optional torch random generator (its device is used for the draw).

    Returns:
        (2B, C-1, P, 2) long tensor of (row, column) positions; entry [n, c-1] refers to class
        c in image n. Both coordinates are -1 where class c has no pixel in image n.
    """
    if labels_onehot.dim() != 4:
        raise ValueError(f"labels_onehot must be (N, C, H, W), got {tuple(labels_onehot.shape)}")
    if labels_onehot.shape[1] < 2:
        raise ValueError("need at least one foreground class (C >= 2)")
    n, c = labels_onehot.shape[:2]
    u = draw_positive_uniforms(n, c - 1, n_pos, generator, labels_onehot.device)
    return positive_indices(labels_onehot, u)


class _ClassSumsAndPixels(torch.autograd.Function):
    """Per-class sums and selected pixels of the embeddings, as one autograd node.

    forward: z (N, D, HW), mask (N, C, HW) float one-hot, idx (N, D, K) long
    -> sums (N, D, C) = z @ mask^T and pixels (N, D, K) = z gathered at idx.
    Backward writes dz once (grad_sums @ mask) and adds the K pixel gradients into it in place;
    autograd would build a dense zero gradient for the gather and add two dense gradients.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, mask: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(mask, idx)
        return torch.bmm(z, mask.transpose(1, 2)), torch.gather(z, 2, idx)

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor,
                 grad_pixels: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        mask, idx = ctx.saved_tensors
        grad_z = torch.bmm(grad_sums, mask)
        return grad_z.scatter_add_(2, idx, grad_pixels), None, None


def local_contrastive_loss(
    emb: torch.Tensor,
    labels_onehot: torch.Tensor,
    pos_idx: torch.Tensor,
    temperature: float | torch.Tensor = 0.1,
    inter_image: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Local contrastive loss over B image pairs (see the module docstring for the formula).

    Args:
        emb: (2B, D, H, W) pixel embeddings (any float dtype; computed in at least float32).
        labels_onehot: (2B, C, H, W) one-hot or soft labels; pixels belong to their argmax
            class and a class is present in an image if it owns at least one pixel.
        pos_idx: (2B, C-1, P, 2) integer (row, column) positions of the sampled positive
            pixels of class c+1 in each image, -1 where the class is absent.
        temperature: tau of the cosine similarity (dimensionless), a float or a 0-dim tensor.
        inter_image: True for the inter-image variant (k = 2), False for intra-image (k = 1).
        reduction: "mean" (paper) or "original" (released code's arithmetic).

    Returns:
        Scalar loss (float32, or float64 for float64 embeddings), without lambda.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if emb.dim() != 4 or labels_onehot.dim() != 4 or pos_idx.dim() != 4:
        raise ValueError("emb, labels_onehot must be (N, *, H, W) and pos_idx (N, C-1, P, 2)")
    n, _, height, width = emb.shape
    n_cls = labels_onehot.shape[1]
    n_fg = n_cls - 1
    n_pos = pos_idx.shape[2]
    if n % 2 != 0 or n == 0:
        raise ValueError(f"emb must hold 2B > 0 images, got {n}")
    if labels_onehot.shape[0] != n or labels_onehot.shape[2:] != emb.shape[2:]:
        raise ValueError("labels_onehot must match emb in batch and spatial size")
    if n_fg < 1 or tuple(pos_idx.shape) != (n, n_fg, n_pos, 2) or n_pos < 1:
        raise ValueError(f"pos_idx must be ({n}, {n_fg}, P>=1, 2), got {tuple(pos_idx.shape)}")
    n_pairs = n // 2
    dtype = _compute_dtype(emb.dtype)

    # Autocast would run the matmuls below in half precision again; the loss is cheap, so keep
    # it entirely in float32 for stability of cosine/tau and log-sum-exp.
    with torch.autocast(device_type=emb.device.type, enabled=False):
        z = emb.to(dtype).reshape(n, emb.shape[1], height * width)  # (N, D, HW)
        cls = labels_onehot.argmax(dim=1).reshape(n, 1, height * width).to(emb.device)
        # Hard one-hot laid out (N, C, HW): z @ onehot^T is the fastest layout of this skinny
        # product on CPU, forward and backward.
        onehot = (cls == torch.arange(n_cls, device=emb.device).view(1, n_cls, 1)).to(dtype)
        counts = onehot.sum(dim=2)[:, 1:]  # (N, F) foreground pixel counts
        present = counts > 0

        # Anchors: the sampled pixels; invalid (-1) rows read pixel 0 and are masked.
        pos_idx = pos_idx.to(device=emb.device, dtype=torch.int64)
        valid = (pos_idx[..., 0] >= 0) & (pos_idx[..., 1] >= 0) & present.unsqueeze(-1)
        flat = torch.where(valid, pos_idx[..., 0] * width + pos_idx[..., 1], 0)  # (N, F, P)
        gather_idx = flat.reshape(n, 1, n_fg * n_pos).expand(-1, z.shape[1], -1)
        sums, anchors = _ClassSumsAndPixels.apply(z, onehot, gather_idx)

        # Class means of the raw embeddings; absent classes give the zero vector, which is
        # masked out of every term below.
        mu = sums.transpose(1, 2)[:, 1:] / counts.clamp(min=1).unsqueeze(-1)  # (N, F, D)
        mu = F.normalize(mu, dim=-1, eps=_NORM_EPS)
        anchors = anchors.reshape(n, z.shape[1], n_fg, n_pos)
        anchors = F.normalize(anchors.permute(0, 2, 3, 1), dim=-1, eps=_NORM_EPS)  # (N,F,P,D)

        # Partner of image a: B + a for the first half, a - B for the second.
        partner = torch.arange(n, device=emb.device).add(n_pairs).remainder(n)
        if inter_image:
            cand = torch.cat((mu, mu[partner]), dim=1)  # (N, 2F, D)
            cand_ok = torch.cat((present, present[partner]), dim=1)
        else:
            cand, cand_ok = mu, present
        logits = torch.einsum("nfpd,nmd->nfpm", anchors, cand) / temperature

        # An image (and partner) without any foreground would give an all -inf row and an
        # lse of -inf; its terms are masked, but exp(-inf - -inf) in the backward is NaN unless
        # the backend special-cases it, so such rows keep their finite logits instead.
        cand_ok = cand_ok | ~cand_ok.any(dim=1, keepdim=True)
        masked = torch.where(cand_ok[:, None, None, :], logits, float("-inf"))
        lse = torch.logsumexp(masked, dim=-1)  # (N, F, P)

        # Positive of anchor class f is candidate f (own image) or F + f (partner image).
        pos_own = torch.diagonal(logits[..., :n_fg], dim1=1, dim2=3).transpose(1, 2)
        terms = torch.where(valid, lse - pos_own, 0.0)
        k = 1
        if inter_image:
            pos_other = torch.diagonal(logits[..., n_fg:], dim1=1, dim2=3).transpose(1, 2)
            valid_other = valid & present[partner].unsqueeze(-1)
            terms = terms + torch.where(valid_other, lse - pos_other, 0.0)
            k = 2

        per_image = terms.sum(dim=(1, 2))  # (N,)
        raw = per_image[:n_pairs] + per_image[n_pairs:]  # (B,) un-normalised pair sums
        norm = float(n_pos * n_fg * k)
        if reduction == "mean":
            return raw.sum() / (norm * n_pairs)
        # Closed form of s = (s + R_i) / K repeated over i = 0..B-1: weight K^-(B-i).
        expo = torch.arange(n_pairs, 0, -1, device=emb.device, dtype=dtype)
        weights = torch.pow(norm, -expo)  # a Python base: no host-to-device copy
        return (raw * weights).sum() / n_pairs

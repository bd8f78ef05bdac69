"""The local contrastive loss of METHOD §5 written as a literal loop, one vector at a time: the
independent reference the tests check ``losses.local_contrastive`` against and the benchmark
times it against."""

from __future__ import annotations

import torch


def loop_local_contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, pos_idx: torch.Tensor,
                                temperature: float = 0.1, inter_image: bool = True,
                                reduction: str = "mean") -> torch.Tensor:
    """Loops over pairs, classes and positive samples; the same arguments and value as
    ``losses.local_contrastive.local_contrastive_loss``.

    Args:
        emb: (2B, D, H, W) embeddings; image i and B + i are the two sets of pair i.
        labels: (2B, C, H, W) one-hot or soft labels (their argmax decides each pixel's class).
        pos_idx: (2B, C - 1, P, 2) long (row, column) of each foreground class's positives,
            negative where the class is absent.
        temperature: tau of the cosine similarities.
        inter_image: the other image's class means count as positives and negatives too.
        reduction: "mean" over pairs, or "original", the released code's division inside the
            loop over pairs.

    Returns:
        The scalar loss.
    """
    n_cls, n_pos, b_sz = labels.shape[1], pos_idx.shape[2], emb.shape[0] // 2
    cls_map = labels.argmax(dim=1)

    def sim(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.dot(u, v) / (u.norm() * v.norm()) / temperature

    raws = []
    for i in range(b_sz):
        pair = (i, b_sz + i)
        means = {(img, c): emb[img][:, cls_map[img] == c].mean(dim=1)
                 for img in pair for c in range(1, n_cls) if bool((cls_map[img] == c).any())}
        raw = emb.new_zeros(())
        for img, other in (pair, pair[::-1]):
            cands = [m for (j, _), m in means.items() if j == img or (inter_image and j == other)]
            for c in range(1, n_cls):
                if (img, c) not in means:
                    continue
                for k in range(n_pos):
                    r, col = pos_idx[img, c - 1, k].tolist()
                    if r < 0:
                        continue
                    x = emb[img, :, r, col]
                    lse = torch.logsumexp(torch.stack([sim(x, m) for m in cands]), 0)
                    for target in ((img, c), (other, c)) if inter_image else ((img, c),):
                        if target in means:  # -log(exp(sim to the positive) / sum over cands)
                            raw = raw + lse - sim(x, means[target])
        raws.append(raw)
    norm = n_pos * (n_cls - 1) * (2 if inter_image else 1)
    if reduction == "mean":
        return sum(r / norm for r in raws) / b_sz
    total = emb.new_zeros(())
    for raw in raws:  # the released code's arithmetic, literally
        total = (total + raw) / norm
    return total / b_sz

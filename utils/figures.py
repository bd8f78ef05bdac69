"""Pictures of segmentations: test-subject montages, pseudo-label rounds, run comparisons.

Every picture is a grid of panels (one slice each, label maps drawn as one-pixel outlines in
one colour per structure) composed as a numpy array at display resolution, then framed by
matplotlib (title, row and column names, legend) in a single axes: one imshow per figure keeps
a figure well under a second on a CPU, and the outlines never vanish in a downsampling.

Slices are (X, Y) arrays as the volumes store them; panels show X to the right and Y upward.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from utils.io import atomic_path

# One colour per structure (RGB, 0..1): saturated and distinct on a grey image; class c uses
# entry c - 1 (cycling past the eighth).
PALETTE = np.array([
    (0.90, 0.10, 0.29), (0.24, 0.80, 0.29), (0.26, 0.55, 1.00), (1.00, 0.88, 0.10),
    (0.94, 0.20, 0.90), (0.26, 0.83, 0.96), (0.96, 0.51, 0.19), (0.57, 0.12, 0.71),
])
PANEL_PX = 160  # longest side of a panel on screen
GAP_PX = 4  # white space between panels
DPI = 100
N_SLICES = 4  # slices of a test subject's montage


def structure_colour(cls: int) -> np.ndarray:
    """RGB (3,) of foreground class ``cls`` >= 1."""
    return PALETTE[(cls - 1) % len(PALETTE)]


def even_picks(candidates: Sequence[int], n: int) -> list[int]:
    """``n`` evenly spaced items of ``candidates``: the centre of each of ``n`` equal parts
    (all of them when there are at most ``n``)."""
    m = len(candidates)
    if m <= n:
        return list(candidates)
    return [candidates[int((k + 0.5) * m / n)] for k in range(n)]


def slices_to_show(label_maps: Sequence[np.ndarray | None], n: int) -> list[int]:
    """``n`` evenly spaced slice indices (last axis) between the first and the last slice
    holding foreground in the first of ``label_maps`` (each (X, Y, Z) or None) that has any;
    over all slices when none has."""
    for labels in label_maps:
        if labels is None:
            continue
        z = np.flatnonzero((labels > 0).any(axis=(0, 1)))
        if z.size:
            return even_picks(range(int(z[0]), int(z[-1]) + 1), n)
    depth = next(m for m in label_maps if m is not None).shape[2]
    return even_picks(range(depth), n)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary of a 2D boolean mask: its pixels with a 4-neighbour outside it (the image
    border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def crop_box(label_maps: Sequence[np.ndarray | None], margin: float = 0.3,
             min_side: int = 8) -> tuple[slice, slice]:
    """(X, Y) slices of the box around the foreground of every label map (each (X, Y, ...),
    or None), widened by ``margin`` of its size on each side and to at least ``min_side``
    pixels, within the maps; the whole plane when none has foreground."""
    shape = next(m for m in label_maps if m is not None).shape[:2]
    fg = np.zeros(shape, bool)
    for labels in label_maps:
        if labels is not None:
            fg |= (labels > 0).reshape(*shape, -1).any(axis=2)
    if not fg.any():
        return slice(0, shape[0]), slice(0, shape[1])
    box = []
    for axis, n in enumerate(shape):
        idx = np.flatnonzero(fg.any(axis=1 - axis))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        pad = max(int(round(margin * (hi - lo))), (min_side - (hi - lo) + 1) // 2, 0)
        box.append(slice(max(lo - pad, 0), min(hi + pad, n)))
    return box[0], box[1]


def panel_shape(shape_xy: tuple[int, int], spacing_xy: tuple[float, float],
                size: int = PANEL_PX) -> tuple[int, int]:
    """(rows, columns) on screen of an (X, Y) slice of pixel size ``spacing_xy`` (mm): its
    physical aspect, longest side ``size``."""
    width, height = shape_xy[0] * spacing_xy[0], shape_xy[1] * spacing_xy[1]
    scale = size / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_screen(slice_xy: np.ndarray, rows_cols: tuple[int, int]) -> np.ndarray:
    """An (X, Y) slice resampled (nearest) to (rows, columns) on screen, Y upward."""
    nx, ny = slice_xy.shape
    rows, cols = rows_cols
    ix = np.minimum(((np.arange(cols) + 0.5) * nx / cols).astype(int), nx - 1)
    iy = np.minimum(((np.arange(rows) + 0.5) * ny / rows).astype(int), ny - 1)
    return slice_xy[ix[None, :], iy[::-1, None]]


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """Display range of an image or volume: its 1st and 99th percentiles."""
    lo, hi = np.percentile(image, [1, 99])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def panel(image_xy: np.ndarray, labels_xy: np.ndarray | None, window: tuple[float, float],
          rows_cols: tuple[int, int], num_classes: int) -> np.ndarray:
    """One slice on screen: (rows, columns, 3) RGB in [0, 1], the grey image windowed to
    ``window`` with the outline of each foreground class of ``labels_xy`` in its colour."""
    grey = np.clip((to_screen(image_xy, rows_cols) - window[0]) / (window[1] - window[0]), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if labels_xy is not None:
        labels = to_screen(labels_xy, rows_cols)
        for c in range(1, num_classes):
            rgb[outline(labels == c)] = structure_colour(c)
    return rgb


def tile(panels: list[list[np.ndarray]], gap: int = GAP_PX) -> tuple[np.ndarray, list[int],
                                                                     list[int]]:
    """Panels (row-major, each (h, w, 3)) on a white canvas, each centred in its cell.

    Returns the canvas (H, W, 3) and the centres of the rows and columns in canvas pixels.
    """
    heights = [max(p.shape[0] for p in row) for row in panels]
    widths = [max(panels[r][c].shape[1] for r in range(len(panels)))
              for c in range(len(panels[0]))]
    canvas = np.ones((sum(heights) + gap * (len(heights) - 1),
                      sum(widths) + gap * (len(widths) - 1), 3))
    tops = np.cumsum([0, *[h + gap for h in heights[:-1]]])
    lefts = np.cumsum([0, *[w + gap for w in widths[:-1]]])
    for r, row in enumerate(panels):
        for c, p in enumerate(row):
            y = tops[r] + (heights[r] - p.shape[0]) // 2
            x = lefts[c] + (widths[c] - p.shape[1]) // 2
            canvas[y:y + p.shape[0], x:x + p.shape[1]] = p
    return (canvas, [int(t + h / 2) for t, h in zip(tops, heights)],
            [int(left + w / 2) for left, w in zip(lefts, widths)])


def margins(title: str) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixels around the canvas in `render_png`: row names on the
    left, the title and column names above, the legend below."""
    return 96, 8, 22 + 15 * (title.count("\n") + 1), 30


def render_png(canvas: np.ndarray, title: str, row_names: Sequence[str],
               col_names: Sequence[str], row_centres: Sequence[int],
               col_centres: Sequence[int], struct_names: Sequence[str]) -> bytes:
    """PNG bytes of ``canvas`` ((H, W, 3) in [0, 1]) pixel for pixel, with the title above,
    each column's name above it, each row's name left of it and a legend of the structures'
    colours below (centres in canvas pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    left, right, top, bottom = margins(title)
    h, w = canvas.shape[:2]
    fig_w, fig_h = w + left + right, h + top + bottom
    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    try:
        # figimage puts the canvas's pixels on the figure's unresampled: outlines of
        # neighbouring structures never blend into a third colour.
        fig.figimage(canvas, xo=left, yo=bottom, origin="upper")
        for name, x in zip(col_names, col_centres):
            fig.text((left + x) / fig_w, (bottom + h + 3) / fig_h, name, ha="center",
                     va="bottom", fontsize=8)
        for name, y in zip(row_names, row_centres):
            fig.text((left - 6) / fig_w, (bottom + h - y) / fig_h, name, ha="right",
                     va="center", fontsize=8)
        fig.text(0.5, 1 - 3 / fig_h, title, ha="center", va="top", fontsize=9)
        handles = [Patch(color=structure_colour(c), label=n)
                   for c, n in enumerate(struct_names, start=1)]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False, handlelength=1.2, borderaxespad=0.2)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    finally:
        plt.close(fig)
    return indexed_png(rgb)


def indexed_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 picture of greys and structure colours, in a palette of
    the structure colours (exact) and 64 greys: noisy MR images compress far better than in
    RGB, and the outlines keep their colours."""
    from PIL import Image

    greys = np.linspace(0, 255, 64).round()
    colours = np.concatenate([np.round(PALETTE * 255), np.repeat(greys[:, None], 3, 1)])
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours.astype(np.uint8).ravel().tolist())
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).quantize(
        palette=palette, dither=Image.Dither.NONE).save(buf, format="png", optimize=True)
    return buf.getvalue()


def write_png(path: str | os.PathLike, png: bytes) -> None:
    """Write PNG bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def montage_canvas(image: np.ndarray, rows: Sequence[tuple[str, np.ndarray | None]],
                   spacing_xy: tuple[float, float], slices: Sequence[int],
                   num_classes: int) -> tuple[np.ndarray, list[int], list[int]]:
    """The panels of `volume_montage` tiled (`tile`): canvas (H, W, 3) and the centres of its
    rows and columns."""
    bx, by = crop_box([labels for _, labels in rows])
    window = intensity_window(image[bx, by][..., list(slices)])
    shape = panel_shape((bx.stop - bx.start, by.stop - by.start), spacing_xy)
    return tile([[panel(image[bx, by, z], None if labels is None else labels[bx, by, z], window,
                        shape, num_classes) for z in slices] for _, labels in rows])


def volume_montage(image: np.ndarray, rows: Sequence[tuple[str, np.ndarray | None]],
                   spacing_xy: tuple[float, float], struct_names: Sequence[str], title: str,
                   slices: Sequence[int], col_names: Sequence[str] | None = None) -> bytes:
    """PNG of the ``slices`` (last axis) of one (X, Y, Z) image: one column per slice, one row
    per ``(name, labels (X, Y, Z) or None)`` of ``rows`` (None: the image alone), all cropped
    to the labels' foreground (`crop_box`). Columns are named ``col_names`` (default
    ``slice <z>``)."""
    canvas, row_c, col_c = montage_canvas(image, rows, spacing_xy, slices,
                                          len(struct_names) + 1)
    return render_png(canvas, title, [name for name, _ in rows],
                      col_names or [f"slice {z}" for z in slices], row_c, col_c, struct_names)


def dice_title(head: str, dice: Sequence[float], struct_names: Sequence[str]) -> str:
    """``head: mean Dice 0.842`` and a second line with each structure's Dice."""
    parts = "   ".join(f"{n} {d:.3f}" for n, d in zip(struct_names, dice))
    return f"{head}: mean Dice {float(np.mean(dice)):.3f}\n{parts}"


def write_subject_figure(path: str | os.PathLike, subject_id: str, image: np.ndarray,
                         gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                         dice: Sequence[float], struct_names: Sequence[str]) -> None:
    """``path``: a test subject's montage, rows image / ground truth / prediction.

    image, gt, pred: (X, Y, Z) in the native grid; spacing: (sx, sy, ...) mm; dice: per
    foreground structure, in ``struct_names`` order."""
    rows = [("image", None), ("ground truth", gt), ("prediction", pred)]
    png = volume_montage(image, rows, (spacing[0], spacing[1]), struct_names,
                         dice_title(f"test subject {subject_id}", dice, struct_names),
                         slices_to_show([gt, pred], N_SLICES))
    write_png(path, png)


def write_pseudo_label_figure(path: str | os.PathLike, title: str, images: np.ndarray,
                              before_crf: np.ndarray, after_crf: np.ndarray,
                              gt: np.ndarray | None, struct_names: Sequence[str],
                              slice_names: Sequence[str], n_slices: int = N_SLICES) -> None:
    """``path``: a few pool slices, rows image / pseudo-labels before the CRF / after it /
    ground truth (when there is one).

    images: (N, X, Y) cropped pool slices; before_crf, after_crf, gt: (N, X, Y) labels;
    slice_names: (N,) column titles. The slices are evenly spaced among those holding
    foreground in ``gt`` (else ``after_crf``)."""
    reference = gt if gt is not None and gt.any() else after_crf
    candidates = np.flatnonzero((reference > 0).any(axis=(1, 2)))
    picks = even_picks(candidates.tolist() or list(range(len(images))), n_slices)
    rows = [("image", None), ("before CRF", before_crf), ("after CRF", after_crf)]
    if gt is not None:
        rows.append(("ground truth", gt))
    # (N, X, Y) -> (X, Y, N) views: the pool's slices as one volume.
    as_volume = [(name, None if labels is None else np.moveaxis(labels, 0, -1))
                 for name, labels in rows]
    write_png(path, volume_montage(np.moveaxis(images, 0, -1), as_volume, (1.0, 1.0),
                                   struct_names, title, picks, [slice_names[i] for i in picks]))


def difference_plot(subject_ids: Sequence[str], differences: Sequence[float],
                    ylabel: str) -> bytes:
    """PNG bytes of a bar chart of one value per subject (e.g. joint minus baseline mean Dice),
    subjects in the given order, gains green and losses red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(subject_ids) + 1.2), 2.8), dpi=DPI)
    try:
        ax.bar(range(len(differences)), differences,
               color=["#2ca02c" if d >= 0 else "#d62728" for d in differences])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(subject_ids)), subject_ids, rotation=90, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"mean {float(np.mean(differences)):+.4f} over {len(differences)} subjects",
                     fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return buf.getvalue()

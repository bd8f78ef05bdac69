"""Deterministic synthetic cardiac short-axis cine MRI in the ACDC raw layout (demo data).

Each patient is a stack of 6-12 short-axis slices (x, y, slices) at the ED and ES phases with
labels 0 background, 1 RV cavity, 2 LV myocardium, 3 LV blood pool (ACDC convention). The
heart is a truncated bullet-shaped LV (blood pool inside a myocardial ring) with an RV crescent
wrapped around the septal side; everything shrinks from the base (slice 0) towards the apex
(last slice). Around it: a body outline with subcutaneous fat, lungs, liver, spine, a bright
descending aorta, epicardial fat streaks and, in basal slices, bright atria / outflow tracts,
none of them labeled. The image also carries what makes real cine MRI hard to segment:
trabeculations and papillary muscles inside the cavities (labeled as cavity, as in ACDC),
through-plane partial volume (three planes averaged per slice), blur, flow inhomogeneity,
motion ghosts, a smooth bias field (up to +-30 %) and Rician noise (blood SNR 5-25).

Per patient the spacing (1.1-1.8 mm in-plane, 8-10 mm slices), matrix size (128-176), heart
size / shape / orientation / position, tissue contrasts (blood/myocardium 1.6-3.5), bias field
and noise level vary, so two labeled patients do not cover the distribution: in a quick check
a small U-Net at 2.25 mm trained on two patients reached about 0.82-0.85 mean foreground Dice
(native resolution) on others, and about 0.92 with eight. Every labeled pixel lies within
68 mm of the image centre, so centre crops of 144 mm or more contain the whole heart.

Files written by `make_demo_dataset`::

    <out_dir>/patientNNN/patientNNN_frameXX.nii.gz      image, int16, (x, y, slices)
    <out_dir>/patientNNN/patientNNN_frameXX_gt.nii.gz   labels, uint8
    <out_dir>/patientNNN/Info.cfg                       ED / ES / Group / Height / NbFrame / Weight
    <out_dir>/.complete                                 JSON marker, written last

for XX in the ED and ES frames. About one patient in six has ED != 1, so readers must use
Info.cfg. Every array is a pure function of (seed, patient_number).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from utils.io import atomic_path, write_text_atomic

# Bump when the generator's output changes, so that stale datasets on disk are regenerated.
GENERATOR_VERSION = 1
COMPLETE_MARKER = ".complete"
N_FRAMES = 30

# Farthest labeled point allowed from the image centre (mm): small demo crops (e.g. 64 px at
# 2.25 mm = 144 mm) then still contain the whole heart.
_MAX_HEART_EXTENT_MM = 68.0


# ----------------------------------------------------------------------------------------------
# Shape helpers
# ----------------------------------------------------------------------------------------------


def _fourier_coeffs(
    rng: np.random.Generator, amplitude: float, orders: tuple[int, ...] = (2, 3, 4, 5)
) -> np.ndarray:
    """Random Fourier harmonics for an irregular closed boundary.

    Returns (K, 3) rows of (order, relative amplitude, phase in rad); amplitudes fall off as
    1/order so that the boundary stays smooth.
    """
    amps = amplitude * rng.uniform(0.3, 1.0, len(orders)) / np.asarray(orders, float) * 2.0
    phases = rng.uniform(0.0, 2 * np.pi, len(orders))
    return np.stack([np.asarray(orders, float), amps, phases], axis=1)


def _modulation(alpha: np.ndarray, coeffs: np.ndarray, phase_shift: float = 0.0) -> np.ndarray:
    """Relative radius factor 1 + sum_k a_k cos(k alpha + p_k + k * phase_shift).

    alpha: any shape, angle in rad. phase_shift (rad) lets the boundary twist slowly from slice
    to slice. Returns an array of alpha's shape (dimensionless, ~0.8-1.2).
    """
    out = np.ones_like(alpha)
    for order, amp, phase in coeffs:
        out += amp * np.cos(order * alpha + phase + order * phase_shift)
    return out


def _ellipse_radius(alpha: np.ndarray, a: float, b: float, psi: float) -> np.ndarray:
    """Radius (same unit as a, b) of an ellipse with semi-axes a, b, major axis at angle psi."""
    c = np.cos(alpha - psi)
    s = np.sin(alpha - psi)
    return a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)


def _profile(z: float, z_eq: float, length: float, power: float) -> float:
    """Long-axis taper of a bullet shape: 1 at the equator, 0 at the apex.

    z: distance below the basal slice (mm); the equator lies z_eq mm above the basal slice and
    the apex `length` mm below it. power 2 gives an ellipsoid, larger powers a blunter bullet.
    """
    zeta = (z + z_eq) / (length + z_eq)
    if zeta >= 1.0:
        return 0.0
    return float((1.0 - max(zeta, 0.0) ** power) ** (1.0 / power))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell_px: int) -> np.ndarray:
    """Zero-mean, unit-std low-frequency random field of a 2D shape (pixels).

    White noise on a grid with one node per cell_px pixels, spread out with separable Gaussian
    weights (two small matrix products: much cheaper than blurring full-resolution noise).
    """
    weights = []
    for n in shape:
        nodes = np.arange(-1, n // cell_px + 2) * cell_px
        w = np.exp(-(((np.arange(n)[:, None] - nodes[None, :]) / cell_px) ** 2))
        weights.append(np.where(w > 1e-6, w, 0.0))  # no denormals in the products
    coarse = rng.standard_normal((weights[0].shape[1], weights[1].shape[1]))
    # einsum, not BLAS matmul: multithreaded BLAS on such small products stalls badly when the
    # cores are busy (tens of ms instead of ~1 ms).
    field = np.einsum("ij,jk->ik", weights[0], coarse)
    field = np.einsum("ik,lk->il", field, weights[1])
    field = field - field.mean()
    return field / (field.std() + 1e-12)


# ----------------------------------------------------------------------------------------------
# Per-patient parameters
# ----------------------------------------------------------------------------------------------


def _heart_extent(p: dict[str, Any]) -> float:
    """Largest distance (mm) of the ED heart outline (LV, myocardium, RV and its wall) from the
    basal heart centre, plus the base-to-apex drift of that centre."""
    angles = np.linspace(0.0, 2 * np.pi, 720, endpoint=False)
    endo = _ellipse_radius(angles, p["lv_radius"], p["lv_radius"] * p["lv_ecc"], p["lv_psi"])
    epi = endo * _modulation(angles, p["lv_harm"]) + p["wall"] * _modulation(
        angles, p["wall_harm"]
    )
    rel = np.angle(np.exp(1j * (angles - p["rv_angle"]))) / p["rv_halfwidth"]
    taper = np.clip(1.0 - rel**2, 0.0, None) ** 0.6 * (1.0 + p["rv_skew"] * rel)
    h = p["rv_depth"] * taper * _modulation(angles, p["rv_harm"])
    outline = epi + np.where(h > 0.5, h + p["rv_wall"], 0.0)
    return float(outline.max() + np.hypot(*p["drift"]))


def _draw_parameters(patient_number: int, seed: int, rng: np.random.Generator) -> dict[str, Any]:
    """All random choices of one patient (geometry in mm, angles in rad, intensities a.u.)."""
    p: dict[str, Any] = {}
    # --- acquisition geometry
    s = float(np.round(rng.uniform(1.1, 1.8), 4))
    p["spacing"] = (s, s, float(np.round(rng.uniform(8.0, 10.0), 2)))
    fov = rng.uniform(190.0, 270.0)
    nx = int(np.clip(round(fov / s), 128, 176))
    ny = int(np.clip(round(nx * rng.uniform(0.85, 1.15)), 128, 176))
    p["shape"] = (nx, ny, int(rng.integers(6, 13)))
    p["origin"] = rng.uniform(-200.0, 200.0, 3)

    # --- cine frames: ED is frame 1 for most patients, a later frame for one patient in six
    # (consecutive ids always include one) so that readers have to honour Info.cfg.
    alt_ed = (patient_number + seed) % 6 == 3
    later_frame = int(rng.integers(2, 5))  # drawn always: later draws do not depend on alt_ed
    ed = later_frame if alt_ed else 1
    p["ed_frame"] = ed
    p["es_frame"] = ed + int(rng.integers(8, 15))
    p["height_cm"] = float(np.round(rng.uniform(150.0, 195.0), 0))
    p["weight_kg"] = float(np.round(rng.uniform(50.0, 110.0), 0))

    # --- heart shape (ED, at the equator), all in a heart frame rotated by heart_angle
    p["heart_angle"] = np.pi + rng.uniform(-np.radians(60), np.radians(60))
    p["lv_radius"] = rng.uniform(16.0, 32.0)  # endocardial semi-major axis (mm)
    p["lv_ecc"] = rng.uniform(0.7, 1.0)  # minor / major
    p["lv_psi"] = rng.uniform(0.0, np.pi)
    p["lv_harm"] = _fourier_coeffs(rng, rng.uniform(0.02, 0.07))
    p["wall"] = rng.uniform(6.0, 10.0)  # myocardial thickness at ED (mm)
    p["wall_harm"] = _fourier_coeffs(rng, rng.uniform(0.03, 0.08), orders=(1, 2, 3))
    p["rv_angle"] = rng.uniform(-np.radians(25), np.radians(25))  # RV centre in heart frame
    p["rv_halfwidth"] = rng.uniform(np.radians(60), np.radians(120))  # angular half-extent
    p["rv_depth"] = rng.uniform(10.0, 26.0)  # RV cavity thickness at its centre (mm)
    p["rv_skew"] = rng.uniform(-0.4, 0.4)  # crescent thicker towards one tip
    p["rv_harm"] = _fourier_coeffs(rng, rng.uniform(0.05, 0.15), orders=(2, 3, 4))
    p["rv_wall"] = rng.uniform(1.5, 3.0)  # unlabeled RV free wall (mm)
    p["twist"] = rng.uniform(-0.15, 0.15)  # boundary phase twist per slice (rad)

    # --- long axis: base = slice 0; the last slice lies 82-100 % of the way to the LV apex
    nz, sz = p["shape"][2], p["spacing"][2]
    z_last = (nz - 1) * sz
    p["lv_length"] = z_last / rng.uniform(0.82, 1.0)
    p["apex_wall"] = rng.uniform(0.6, 1.0) * p["wall"]
    p["z_eq"] = rng.uniform(0.0, 15.0)
    p["taper_power"] = rng.uniform(2.0, 3.2)
    p["rv_length"] = p["lv_length"] * rng.uniform(0.72, 0.92)
    p["drift"] = rng.uniform(-4.0, 4.0, 2)  # heart centre moves this much base -> apex (mm)

    # --- ES: blood pool shrinks, myocardial area is preserved so the wall thickens
    p["es_lv_factor"] = rng.uniform(0.6, 0.8)
    p["es_myo_factor"] = rng.uniform(0.95, 1.08)
    p["es_rv_factor"] = rng.uniform(0.5, 0.75)

    # --- papillary muscles (labeled LV blood pool, as in ACDC, but myocardium-dark)
    p["pap_angles"] = rng.uniform(-0.5, 0.5, 2) + np.array([np.pi * 0.7, np.pi * 1.3])
    p["pap_radius"] = rng.uniform(2.0, 5.0, 2)
    # Trabeculations: dark fingers reaching into the blood pools from the free walls. ACDC
    # contours run outside them (they count as cavity), so the image boundary is ragged while
    # the label boundary is smooth.
    p["trab_harm"] = _fourier_coeffs(rng, 1.0, orders=tuple(range(7, 16)))
    p["trab_depth"] = rng.uniform(0.5, 4.0)  # mm
    p["rv_trab_harm"] = _fourier_coeffs(rng, 1.0, orders=tuple(range(6, 13)))
    p["rv_trab_depth"] = rng.uniform(0.5, 4.0)

    # Basal slices: unlabeled bright blood of the atria / outflow tracts next to the ventricles
    # (the classic confusion of basal slices): (angle in the heart frame rad, radius mm,
    # deepest level mm below the basal slice where it is still seen).
    p["atria"] = [
        (np.pi + rng.uniform(-0.7, 0.7), rng.uniform(12.0, 22.0), rng.uniform(-2.0, 14.0)),
        (rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 1.6), rng.uniform(10.0, 18.0),
         rng.uniform(-2.0, 12.0)),
    ]

    # --- heart position: offset from the image centre by up to 20 mm, limited (and very large
    # hearts shrunk) so that every labeled pixel stays within _MAX_HEART_EXTENT_MM of the centre.
    extent = _heart_extent(p)
    if extent > _MAX_HEART_EXTENT_MM - 2.0:
        scale = (_MAX_HEART_EXTENT_MM - 2.0) / extent
        for key in ("lv_radius", "wall", "rv_depth"):
            p[key] *= scale
        extent = _heart_extent(p)
    max_offset = float(np.clip(_MAX_HEART_EXTENT_MM - extent, 0.0, 20.0))
    direction = rng.uniform(0.0, 2 * np.pi)
    offset = max_offset * np.sqrt(rng.uniform(0.0, 1.0))
    p["heart_centre"] = offset * np.array([np.cos(direction), np.sin(direction)])

    # --- surroundings (image frame, mm from the image centre)
    p["body_centre"] = p["heart_centre"] * rng.uniform(-0.3, 0.3) + rng.uniform(-10, 10, 2)
    p["body_axes"] = (rng.uniform(130.0, 175.0), rng.uniform(90.0, 125.0))
    p["body_tilt"] = rng.uniform(-np.radians(20), np.radians(20))
    p["body_harm"] = _fourier_coeffs(rng, 0.04)
    p["fat_thickness"] = rng.uniform(4.0, 25.0)
    p["muscle_thickness"] = rng.uniform(6.0, 14.0)
    p["lung_gaps"] = [rng.uniform(0.0, 25.0), rng.uniform(0.0, 25.0)]  # to the heart (mm)
    p["lung_axes"] = rng.uniform(28.0, 42.0, 2), rng.uniform(40.0, 65.0, 2)
    p["lung_harm"] = [_fourier_coeffs(rng, 0.08), _fourier_coeffs(rng, 0.08)]
    p["liver_angle"] = p["heart_angle"] + np.pi + rng.uniform(-0.8, 0.8)
    p["liver_radius"] = rng.uniform(45.0, 70.0)
    p["liver_gap"] = rng.uniform(0.7, 1.0)
    p["liver_harm"] = _fourier_coeffs(rng, 0.08)
    p["aorta_angle"] = p["heart_angle"] + np.pi * rng.uniform(0.55, 0.9) * rng.choice([-1, 1])
    p["aorta_gap"] = rng.uniform(6.0, 18.0)
    p["aorta_radius"] = rng.uniform(8.0, 13.0)
    p["spine_radius"] = rng.uniform(11.0, 16.0)
    # Epicardial fat: one streak over an RV insertion point (interventricular groove), others
    # anywhere; (centre angle in the heart frame rad, half-span rad, gap mm, width mm).
    insertion = p["rv_angle"] + rng.choice([-1.0, 1.0]) * p["rv_halfwidth"]
    centres = [insertion] + list(rng.uniform(0, 2 * np.pi, int(rng.integers(0, 3))))
    p["streaks"] = [
        (c, rng.uniform(0.3, 0.9), rng.uniform(0.0, 1.5), rng.uniform(1.5, 4.5)) for c in centres
    ]

    # --- intensities (a.u.): blood/myocardium contrast 1.6-3.5, other tissues relative to them
    blood = rng.uniform(350.0, 800.0)
    myo = blood / rng.uniform(1.6, 3.5)
    p["intensity"] = {
        "lv_blood": blood,
        "rv_blood": blood * rng.uniform(0.75, 1.05),
        "myo": myo,
        "muscle": myo * rng.uniform(0.8, 1.3),
        "interior": myo * rng.uniform(0.75, 1.25),  # low epicardial contrast at times
        "fat": blood * rng.uniform(0.6, 1.5),
        "lung": myo * rng.uniform(0.08, 0.3),
        "liver": myo * rng.uniform(0.9, 1.5),
        "spine": myo * rng.uniform(0.9, 1.5),  # fatty marrow; the cortical rim is dark
        "aorta": blood * rng.uniform(0.9, 1.2),
    }
    p["blood_texture"] = rng.uniform(0.03, 0.1)  # relative std of slow flow inhomogeneity
    p["flow_void"] = rng.uniform(0.0, 0.5)  # depth of dark turbulent-flow patches in blood
    p["tissue_texture"] = rng.uniform(0.05, 0.15)
    p["psf_sigma_px"] = rng.uniform(0.6, 1.6)
    # Motion ghosts: faint copies of the heart shifted along the phase-encoding axis.
    p["ghost"] = (rng.uniform(0.0, 0.15), int(rng.integers(0, 2)), rng.uniform(0.2, 0.5))
    p["bias_amplitude"] = rng.uniform(0.1, 0.3)
    p["bias_coeffs"] = rng.standard_normal(8)
    p["noise_sigma"] = blood / rng.uniform(5.0, 25.0)  # SNR of the blood pool 5-25
    return p


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _bias_field(p: dict[str, Any], nx: int, ny: int, nz: int) -> np.ndarray:
    """Smooth multiplicative field (x, y, slices), 1 +- bias_amplitude, quadratic in-plane."""
    u = np.linspace(-1.0, 1.0, nx)[:, None, None]
    v = np.linspace(-1.0, 1.0, ny)[None, :, None]
    w = np.linspace(-1.0, 1.0, nz)[None, None, :]
    c = p["bias_coeffs"]
    poly = c[0] * u + c[1] * v + c[2] * u * v + c[3] * u**2 + c[4] * v**2
    poly = poly + 0.3 * (c[5] * w + c[6] * u * w + c[7] * v * w)
    poly = poly - poly.mean()
    return 1.0 + p["bias_amplitude"] * poly / (np.abs(poly).max() + 1e-12)


# Angular resolution of the look-up tables for boundary functions of the polar angle.
_N_ANGLES = 2048


def _angle_index(alpha: np.ndarray) -> np.ndarray:
    """Index into a table of _N_ANGLES samples over [0, 2 pi) for angles alpha (rad)."""
    return (np.mod(alpha, 2 * np.pi) * (_N_ANGLES / (2 * np.pi))).astype(np.intp) % _N_ANGLES


def _static_scene(p: dict[str, Any], X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    """Masks and distance maps of the unlabeled surroundings, shared by all slices and phases.

    X, Y: (x, y) pixel-centre coordinates in mm from the image centre. Maps named *_ratio are
    distance / boundary radius (< 1 inside), so a per-slice size factor is just a threshold.
    """
    scene: dict[str, np.ndarray] = {}
    bx, by = X - p["body_centre"][0], Y - p["body_centre"][1]
    b_alpha = np.arctan2(by, bx) - p["body_tilt"]
    body_r = _ellipse_radius(b_alpha, *p["body_axes"], 0.0) * _modulation(b_alpha, p["body_harm"])
    depth = body_r - np.hypot(bx, by)  # mm inside the skin
    body = depth > 0
    scene["body"] = body
    scene["fat_layer"] = body & (depth < p["fat_thickness"])
    scene["muscle_layer"] = (
        body & ~scene["fat_layer"] & (depth < p["fat_thickness"] + p["muscle_thickness"])
    )
    # Lungs either side of the heart along the body's long axis, hugging it.
    axis = np.array([np.cos(p["body_tilt"]), np.sin(p["body_tilt"])])
    heart_r = p["lv_radius"] + p["wall"] + 0.5 * p["rv_depth"]
    lung_ratio = np.full(X.shape, np.inf)
    for side, sign in enumerate((-1.0, 1.0)):
        offset = heart_r + p["lung_gaps"][side] + p["lung_axes"][0][side]
        lc = p["heart_centre"] + sign * offset * axis
        lx, ly = X - lc[0], Y - lc[1]
        la = np.arctan2(ly, lx) - p["body_tilt"]
        lr = _ellipse_radius(la, p["lung_axes"][0][side], p["lung_axes"][1][side], np.pi / 2)
        lr = lr * _modulation(la, p["lung_harm"][side])
        lung_ratio = np.minimum(lung_ratio, np.hypot(lx, ly) / lr)
    lung_ratio[depth <= p["fat_thickness"] + 6.0] = np.inf  # lungs stay inside the chest wall
    scene["lung_ratio"] = lung_ratio
    # Liver on the far side of the heart from the RV.
    hc = p["heart_centre"] + 0.5 * p["drift"]
    # Close enough to abut the inferior wall in apical slices (liver and myocardium have
    # similar signal, a real source of epicardial errors).
    dist = p["lv_radius"] + p["wall"] + p["liver_radius"] * p["liver_gap"]
    lc = hc + dist * np.array([np.cos(p["liver_angle"]), np.sin(p["liver_angle"])])
    lx, ly = X - lc[0], Y - lc[1]
    liver_ratio = np.hypot(lx, ly) / (
        p["liver_radius"] * _modulation(np.arctan2(ly, lx), p["liver_harm"])
    )
    liver_ratio[depth <= p["fat_thickness"]] = np.inf
    scene["liver_ratio"] = liver_ratio
    # Descending aorta beside the heart with a vertebra behind it.
    ca = p["aorta_angle"]
    unit = np.array([np.cos(ca), np.sin(ca)])
    gap = p["lv_radius"] + p["wall"] + p["aorta_gap"] + p["aorta_radius"]
    ac = p["heart_centre"] + gap * unit
    sc = ac + (p["aorta_radius"] + p["spine_radius"] + 4.0) * unit
    spine = np.hypot(X - sc[0], Y - sc[1])
    scene["spine_rim"] = spine < p["spine_radius"] + 2.0
    scene["spine"] = spine < p["spine_radius"]
    scene["aorta"] = np.hypot(X - ac[0], Y - ac[1]) < p["aorta_radius"]
    return scene


def _pixel_grid(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel-centre coordinates X, Y in mm relative to the image centre, axes (x, y)."""
    nx, ny, _ = p["shape"]
    sx, sy, _ = p["spacing"]
    xs = (np.arange(nx) - (nx - 1) / 2.0) * sx
    ys = (np.arange(ny) - (ny - 1) / 2.0) * sy
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    return X, Y


def _phase_tables(p: dict[str, Any], es: bool) -> dict[str, Any]:
    """Phase-dependent heart sizes (mm) and look-up tables over the heart-frame angle.

    ED -> ES: the endocardium shrinks, the myocardial cross-section area is kept (times a
    factor) so the wall thickens, and the RV empties more than the LV.
    """
    f: dict[str, Any] = {"es": es}
    angles = np.arange(_N_ANGLES) * (2 * np.pi / _N_ANGLES)  # table abscissae (rad)
    f["angles"] = angles
    f["r_lv"] = p["lv_radius"] * (p["es_lv_factor"] if es else 1.0)
    if es:
        myo_area = ((p["lv_radius"] + p["wall"]) ** 2 - p["lv_radius"] ** 2) * p["es_myo_factor"]
        f["wall"] = float(np.sqrt(f["r_lv"] ** 2 + myo_area) - f["r_lv"])
    else:
        f["wall"] = p["wall"]
    f["rv_depth"] = p["rv_depth"] * (p["es_rv_factor"] if es else 1.0)
    f["rv_rel"] = np.angle(np.exp(1j * (angles - p["rv_angle"])))  # wrapped to (-pi, pi]
    f["streak_ang"] = [
        np.abs(np.angle(np.exp(1j * (angles - s_ang)))) < s_half
        for s_ang, s_half, _, _ in p["streaks"]
    ]
    # Trabeculation depth over the angle (mm): positive lobes of a high-order harmonic sum;
    # denser at ES when the wall contracts around them. LV: not on the septum (RV side).
    trab = _modulation(angles, p["trab_harm"]) - 1.0
    trab = (1.4 if es else 1.0) * p["trab_depth"] * np.clip(trab / np.abs(trab).max(), 0, None)
    trab[np.abs(f["rv_rel"]) < 0.8 * p["rv_halfwidth"]] = 0.0
    f["trab_tab"] = trab
    rv_trab = _modulation(angles, p["rv_trab_harm"]) - 1.0
    f["rv_trab_tab"] = p["rv_trab_depth"] * np.clip(rv_trab / np.abs(rv_trab).max(), 0, None)
    return f


def _heart_at(
    p: dict[str, Any],
    f: dict[str, Any],
    z: float,
    rho: np.ndarray,
    idx: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    centre: np.ndarray,
) -> dict[str, Any]:
    """Heart masks (x, y) of one plane z mm below the basal slice.

    rho: (x, y) distance (mm) to the heart centre; idx: (x, y) angle-table index in the heart
    frame; X, Y: pixel coordinates (mm); centre: heart centre (mm) in this slice.
    Returns boolean masks lv, myo, rv (labeled), rv_wall, trab, papillary (image only), the
    boundary radii r_epi and rv_outer (mm, (x, y)), has_rv and the profile factors.
    """
    angles = f["angles"]
    twist = p["twist"] * z / p["spacing"][2]
    # --- LV endocardium and epicardium (bullet-shaped along the long axis)
    s_endo = _profile(z, p["z_eq"], p["lv_length"], p["taper_power"])
    s_epi = _profile(z, p["z_eq"], p["lv_length"] + p["apex_wall"], p["taper_power"])
    endo_tab = _ellipse_radius(angles, f["r_lv"], f["r_lv"] * p["lv_ecc"], p["lv_psi"])
    endo_tab = endo_tab * _modulation(angles, p["lv_harm"], twist)
    epi_tab = endo_tab + f["wall"] * _modulation(angles, p["wall_harm"], twist)
    r_endo = s_endo * endo_tab[idx]
    r_epi = s_epi * epi_tab[idx]
    lv = rho < r_endo
    myo = ~lv & (rho < r_epi)

    # --- RV crescent on the septal side: radially from the epicardium outwards, thickest at
    # its centre angle and tapering to zero at +-halfwidth.
    s_rv = _profile(z, p["z_eq"], p["rv_length"], p["taper_power"])
    rel = f["rv_rel"] / (p["rv_halfwidth"] * (0.6 + 0.4 * s_rv))
    taper = np.clip(1.0 - rel**2, 0.0, None) ** 0.6 * (1.0 + p["rv_skew"] * rel)
    h = (s_rv * f["rv_depth"] * taper * _modulation(angles, p["rv_harm"], twist))[idx]
    has_rv = h > 0.5
    rv_outer = r_epi + h
    rv = ~lv & ~myo & has_rv & (rho < rv_outer)
    rv_wall = ~lv & ~myo & ~rv & has_rv & (rho < rv_outer + p["rv_wall"])

    # --- trabeculations (image only): myocardial signal inside the cavity borders
    trab = lv & (rho > r_endo - s_endo * f["trab_tab"][idx])
    trab |= rv & (rho > rv_outer - s_rv * f["rv_trab_tab"][idx])

    # --- papillary muscles: dark dots inside the blood pool near the wall (mid-ventricle)
    papillary = np.zeros_like(lv)
    if 0.1 < z / p["lv_length"] < 0.75 and s_endo > 0.4:
        for ang, rad in zip(p["pap_angles"], p["pap_radius"], strict=True):
            ca = ang + p["heart_angle"]
            dist = 0.62 * s_endo * f["r_lv"]
            px = centre[0] + dist * np.cos(ca)
            py = centre[1] + dist * np.sin(ca)
            papillary |= np.hypot(X - px, Y - py) < rad * (1.2 if f["es"] else 1.0)
        papillary &= lv
    return {
        "lv": lv, "myo": myo, "rv": rv, "rv_wall": rv_wall, "trab": trab,
        "papillary": papillary, "r_epi": r_epi, "rv_outer": rv_outer, "has_rv": has_rv,
        "s_epi": s_epi, "s_rv": s_rv,
    }


def _render_volume(
    p: dict[str, Any],
    phase: str,
    scene: dict[str, np.ndarray],
    bias: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, rounded a.u.) and label (uint8) volumes (x, y, slices) of one phase.

    scene: output of `_static_scene`; bias: (x, y, slices) multiplicative field.
    """
    nx, ny, nz = p["shape"]
    sz = p["spacing"][2]
    f = _phase_tables(p, phase == "es")
    X, Y = _pixel_grid(p)
    inten = p["intensity"]

    image = np.zeros((nx, ny, nz), np.float32)
    label = np.zeros((nx, ny, nz), np.uint8)
    for k in range(nz):
        z = k * sz  # mm below the basal slice
        t = z / max((nz - 1) * sz, 1e-6)  # 0 at base, 1 at the last (apical) slice
        centre = p["heart_centre"] + t * p["drift"]
        dx, dy = X - centre[0], Y - centre[1]
        rho = np.hypot(dx, dy)
        # Heart frame: the RV centre lies near angle 0; boundaries are tables over the angle.
        idx = _angle_index(np.arctan2(dy, dx) - p["heart_angle"])
        mid = _heart_at(p, f, z, rho, idx, X, Y, centre)

        # --- surroundings, painted back to front
        img = np.zeros((nx, ny))
        img[scene["body"]] = inten["interior"]
        img[scene["muscle_layer"]] = inten["muscle"]
        img[scene["fat_layer"]] = inten["fat"]
        img[scene["lung_ratio"] < 1.0 - 0.25 * t] = inten["lung"]  # lungs shrink to the apex
        liver_scale = np.clip(1.6 * t - 0.2, 0.0, 1.0)  # the liver appears towards the apex
        img[scene["liver_ratio"] < liver_scale] = inten["liver"]
        img[scene["spine_rim"]] = inten["lung"] * 1.5  # cortical bone: little signal
        img[scene["spine"]] = inten["spine"]
        img[scene["aorta"]] = inten["aorta"]
        for a_ang, a_rad, a_depth in p["atria"]:  # basal atria / outflow tracts, unlabeled
            if z <= a_depth:
                ca = a_ang + p["heart_angle"]
                dist = (p["lv_radius"] + f["wall"]) * mid["s_epi"] + 0.6 * a_rad
                if abs(np.angle(np.exp(1j * (a_ang - p["rv_angle"])))) < p["rv_halfwidth"]:
                    dist += 0.7 * f["rv_depth"] * mid["s_rv"]  # beside the RV, outside it
                ax_, ay_ = centre + dist * np.array([np.cos(ca), np.sin(ca)])
                inside = np.hypot(X - ax_, Y - ay_) < a_rad * (1.0 - 0.3 * z / max(a_depth, 1.0))
                img[inside] = inten["rv_blood"]
        if mid["s_epi"] > 0:  # epicardial fat streaks hugging the heart
            outside = np.where(mid["has_rv"], mid["rv_outer"] + p["rv_wall"], mid["r_epi"])
            for in_span, (_, _, s_gap, s_width) in zip(f["streak_ang"], p["streaks"], strict=True):
                gap = rho - outside - s_gap
                img[in_span[idx] & (gap > 0) & (gap < s_width)] = inten["fat"]

        # --- the heart on top, averaged over three planes across the slice thickness:
        # through-plane partial volume blurs the tapering apex and base as in real cine stacks.
        heart_sum = np.zeros((nx, ny))
        cover = np.zeros((nx, ny))
        for dz in (-sz / 3.0, 0.0, sz / 3.0):
            m = mid if dz == 0.0 else _heart_at(p, f, z + dz, rho, idx, X, Y, centre)
            vals = np.zeros((nx, ny))
            vals[m["rv_wall"]] = inten["myo"]
            vals[m["rv"]] = inten["rv_blood"]
            vals[m["myo"]] = inten["myo"]
            vals[m["lv"]] = inten["lv_blood"]
            vals[m["papillary"] | m["trab"]] = inten["myo"]
            heart_sum += vals
            cover += m["rv_wall"] | m["rv"] | m["myo"] | m["lv"]
        img = img * (1.0 - cover / 3.0) + heart_sum / 3.0

        # Slow inhomogeneity: flow-related in blood (with occasional dark flow voids), texture
        # elsewhere.
        blood = (mid["lv"] | mid["rv"]) & ~(mid["papillary"] | mid["trab"])
        tex = _smooth_field(rng, (nx, ny), 8)
        img *= 1.0 + np.where(blood, p["blood_texture"], p["tissue_texture"]) * tex
        img[blood] *= 1.0 - p["flow_void"] * np.clip(tex[blood] - 1.0, 0.0, 1.0)
        # Point-spread blur, motion ghosts along the phase-encoding axis, coil bias field.
        img = ndimage.gaussian_filter(img, p["psf_sigma_px"])
        gain, axis, shift = p["ghost"]
        heart = np.where(cover > 0, img, 0.0)
        img += gain * np.roll(heart, int(shift * img.shape[axis]), axis=axis)
        image[:, :, k] = img * bias[:, :, k]

        lab = np.zeros((nx, ny), np.uint8)
        lab[mid["rv"]] = 1
        lab[mid["myo"]] = 2
        lab[mid["lv"]] = 3  # papillary muscles and trabeculae belong to the cavity in ACDC
        label[:, :, k] = lab

    # Rician noise (magnitude of a complex signal with Gaussian noise in both channels).
    sigma = p["noise_sigma"]
    real = image + sigma * rng.standard_normal(image.shape)
    imag = sigma * rng.standard_normal(image.shape)
    image = np.rint(np.hypot(real, imag)).astype(np.float32)
    return image, label


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def make_demo_patient(patient_number: int, seed: int) -> dict[str, Any]:
    """Generate one synthetic patient, deterministically from (seed, patient_number).

    Returns a dict with
      image_ed, image_es: (x, y, slices) float32, integer-valued intensities (~0..1500 a.u.);
      label_ed, label_es: (x, y, slices) uint8 in {0 bg, 1 RV, 2 myocardium, 3 LV};
      spacing: (sx, sy, slice thickness) in mm; origin: (3,) mm, world position of voxel 0;
      ed_frame, es_frame: 1-based cine frame numbers; height_cm, weight_kg: for Info.cfg.
    Slice 0 is the base, the last slice the apex.
    """
    rng = np.random.default_rng([seed, patient_number])
    p = _draw_parameters(patient_number, seed, rng)
    scene = _static_scene(p, *_pixel_grid(p))
    bias = _bias_field(p, *p["shape"])
    image_ed, label_ed = _render_volume(p, "ed", scene, bias, rng)
    image_es, label_es = _render_volume(p, "es", scene, bias, rng)
    return {
        "image_ed": image_ed,
        "label_ed": label_ed,
        "image_es": image_es,
        "label_es": label_es,
        "spacing": p["spacing"],
        "origin": np.asarray(p["origin"], float),
        "ed_frame": p["ed_frame"],
        "es_frame": p["es_frame"],
        "height_cm": p["height_cm"],
        "weight_kg": p["weight_kg"],
    }


def _affine(spacing: tuple[float, float, float], origin: np.ndarray) -> np.ndarray:
    """4x4 voxel-to-world matrix: diag(spacing) with the origin (mm) as translation."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _info_cfg(pat: dict[str, Any]) -> str:
    return (
        f"ED: {pat['ed_frame']}\nES: {pat['es_frame']}\nGroup: NOR\n"
        f"Height: {pat['height_cm']:.1f}\nNbFrame: {N_FRAMES}\nWeight: {pat['weight_kg']:.1f}\n"
    )


def _patient_files(out_dir: Path, pid: str) -> list[Path]:
    """Files a complete patient folder must hold (frame numbers read back from Info.cfg)."""
    pdir = out_dir / f"patient{pid}"
    cfg = pdir / "Info.cfg"
    if not cfg.is_file():
        return [cfg]
    frames = {}
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition(":")
        frames[key.strip()] = value.strip()
    files = [cfg]
    for key in ("ED", "ES"):
        if not frames.get(key, "").isdigit():
            return [pdir / "Info.cfg.invalid"]
        stem = f"patient{pid}_frame{int(frames[key]):02d}"
        files += [pdir / f"{stem}.nii.gz", pdir / f"{stem}_gt.nii.gz"]
    return files


def demo_dataset_complete(
    out_dir: str | os.PathLike, seed: int | None = None, patient_ids: list[str] | None = None
) -> bool:
    """True if `out_dir` holds a finished demo dataset.

    Finished means: the `.complete` marker exists, was written by this generator version, and
    every patient it lists has its Info.cfg and ED/ES image and label files. With `seed` and/or
    `patient_ids` given, the marker must also record that seed and include those ids.
    """
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("generator_version") != GENERATOR_VERSION:
        return False
    ids = meta.get("patient_ids", [])
    if seed is not None and meta.get("seed") != seed:
        return False
    if patient_ids is not None and not set(patient_ids) <= set(ids):
        return False
    return all(f.is_file() for pid in ids for f in _patient_files(out_dir, pid))


def make_demo_dataset(
    out_dir: str | os.PathLike, patient_ids: list[str], seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the demo patients `patient_ids` ("001", ...) to `out_dir` in the ACDC raw layout.

    If the dataset is already complete for this seed and these ids (and overwrite is False)
    nothing is written. Otherwise the marker is removed first, every file is written to a
    temporary name and renamed into place, and the `.complete` marker comes last, so an
    interrupted run is detected (no marker) and redone. Other folders in `out_dir` are left
    alone. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    ids = [str(pid) for pid in patient_ids]
    for pid in ids:
        if not (len(pid) == 3 and pid.isdigit()):
            raise ValueError(f"patient id {pid!r}: expected three digits such as '001'")
    if not overwrite and demo_dataset_complete(out_dir, seed=seed, patient_ids=ids):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / COMPLETE_MARKER
    marker.unlink(missing_ok=True)

    for pid in ids:
        pat = make_demo_patient(int(pid), seed)
        pdir = out_dir / f"patient{pid}"
        pdir.mkdir(exist_ok=True)
        affine = _affine(pat["spacing"], pat["origin"])
        for phase, frame in (("ed", pat["ed_frame"]), ("es", pat["es_frame"])):
            stem = f"patient{pid}_frame{frame:02d}"
            _save_nifti(pdir / f"{stem}.nii.gz", pat[f"image_{phase}"], affine, np.int16)
            _save_nifti(pdir / f"{stem}_gt.nii.gz", pat[f"label_{phase}"], affine, np.uint8)
        write_text_atomic(pdir / "Info.cfg", _info_cfg(pat))

    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "patient_ids": ids}
    write_text_atomic(marker, json.dumps(meta, indent=1) + "\n")
    return out_dir

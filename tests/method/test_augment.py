"""Checks of the batched augmentation against its per-image definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from method import augment
from method.augment import (
    apply_crops,
    channel_stats,
    sample_crop_boxes,
    sample_flips,
    test_transform,
    train_augment,
)

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=_gen(seed))


def _reference_crop(img: torch.Tensor, top, left, h, w, flip, pad, out_size) -> torch.Tensor:
    """The per-image definition: zero-pad, crop, resize (no antialias), flip."""
    padded = F.pad(img[None], (pad, pad, pad, pad), value=0.0)
    crop = padded[:, :, top:top + h, left:left + w]
    out = F.interpolate(crop, size=(out_size, out_size), mode="bilinear",
                        align_corners=False, antialias=False)[0]
    return out.flip(-1) if flip else out


def test_shape_and_dtype():
    x = _images(5)
    y = train_augment(x, _gen(), MEAN, STD)
    assert y.shape == (5, 3, 32, 32)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_out_size_and_non_square_input():
    x = torch.randint(0, 256, (4, 3, 24, 40), dtype=torch.uint8, generator=_gen(1))
    y = train_augment(x, _gen(), MEAN, STD, out_size=16)
    assert y.shape == (4, 3, 16, 16)


def test_seeded_generator_repeats_exactly():
    x = _images(16)
    a = train_augment(x, _gen(123), MEAN, STD)
    b = train_augment(x, _gen(123), MEAN, STD)
    c = train_augment(x, _gen(124), MEAN, STD)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_augment_is_sampler_then_apply():
    """Pins the draw order so callers can reproduce a batch from its parameters."""
    x = _images(6)
    g = _gen(7)
    top, left, h, w = sample_crop_boxes(6, 40, 40, g)
    flip = sample_flips(6, g)
    expected = (apply_crops(x.float(), top, left, h, w, flip, 4, 32) / 255.0)
    mean_t, std_t = channel_stats(MEAN, STD)
    expected = (expected - mean_t) / std_t
    torch.testing.assert_close(train_augment(x, _gen(7), MEAN, STD), expected,
                               atol=1e-5, rtol=0)


def test_params_differ_within_batch():
    x = _images(1).expand(64, -1, -1, -1).contiguous()
    y = train_augment(x, _gen(3), MEAN, STD)
    distinct = {tuple(t.flatten()[:64].tolist()) for t in y}
    assert len(distinct) > 32
    flip = sample_flips(64, _gen(3))
    assert 0 < int(flip.sum()) < 64


def test_augmentation_changes_pixels():
    x = _images(32)
    ref = test_transform(x, MEAN, STD)
    y = train_augment(x, _gen(5), MEAN, STD)
    per_image_diff = (y - ref).abs().flatten(1).amax(1)
    assert (per_image_diff > 0.1).all()


def test_flip_alone_mirrors_width():
    x = _images(3).float()
    n = x.shape[0]
    full = torch.full((n,), 4, dtype=torch.int64)
    size = torch.full((n,), 32, dtype=torch.int64)
    flip = torch.tensor([True, False, True])
    y = apply_crops(x, full, full, size, size, flip, 4, 32)
    torch.testing.assert_close(y[0], x[0].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(y[1], x[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(y[2], x[2].flip(-1), atol=1e-4, rtol=0)


def test_identity_box_reproduces_test_transform():
    x = _images(4)
    n = x.shape[0]
    top = torch.full((n,), 4, dtype=torch.int64)
    size = torch.full((n,), 32, dtype=torch.int64)
    flip = torch.zeros(n, dtype=torch.bool)
    raw = apply_crops(x.float(), top, top, size, size, flip, 4, 32)
    mean_t, std_t = channel_stats(MEAN, STD)
    y = (raw / 255.0 - mean_t) / std_t
    torch.testing.assert_close(y, test_transform(x, MEAN, STD), atol=1e-5, rtol=0)


def test_hand_case_crop_of_small_image():
    img = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    one = torch.ones(1, dtype=torch.int64)
    two = 2 * one
    no_flip = torch.zeros(1, dtype=torch.bool)
    y = apply_crops(img, one, 2 * one, two, two, no_flip, 0, 2)
    # Rows 1-2, columns 2-3 of [[0..3], [4..7], [8..11], [12..15]].
    torch.testing.assert_close(y[0, 0], torch.tensor([[6.0, 7.0], [10.0, 11.0]]),
                               atol=1e-5, rtol=0)
    y_flip = apply_crops(img, one, 2 * one, two, two, ~no_flip, 0, 2)
    torch.testing.assert_close(y_flip[0, 0], torch.tensor([[7.0, 6.0], [11.0, 10.0]]),
                               atol=1e-5, rtol=0)


def test_box_inside_pad_area_is_zero():
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8).float()
    top = torch.tensor([0, 36])
    left = torch.tensor([0, 10])
    size = torch.tensor([4, 4])
    flip = torch.tensor([False, True])
    y = apply_crops(x, top, left, size, size, flip, 4, 32)
    assert torch.equal(y, torch.zeros_like(y))


def test_matches_pad_crop_resize_reference():
    """Random boxes, some reaching into the pad, against the explicit per-image pipeline."""
    x = _images(24, seed=11).float()
    g = _gen(11)
    top, left, h, w = sample_crop_boxes(24, 40, 40, g)
    flip = sample_flips(24, g)
    # Add boxes smaller and larger than the output, and ones hugging the pad.
    top = torch.cat([top, torch.tensor([0, 0, 30, 4])])
    left = torch.cat([left, torch.tensor([0, 20, 31, 4])])
    h = torch.cat([h, torch.tensor([40, 9, 10, 32])])
    w = torch.cat([w, torch.tensor([40, 12, 9, 32])])
    flip = torch.cat([flip, torch.tensor([False, True, False, True])])
    x = torch.cat([x, x[:4]])
    y = apply_crops(x, top, left, h, w, flip, 4, 32)
    for i in range(x.shape[0]):
        ref = _reference_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]),
                              bool(flip[i]), 4, 32)
        torch.testing.assert_close(y[i], ref, atol=2e-3, rtol=0)


def _expected_area_fraction(height: int, width: int, scale, ratio, grid: int = 1500) -> float:
    """Quadrature over (scale, log-ratio) of the rounded, accepted box's area fraction."""
    f64 = torch.float64
    s = scale[0] + (scale[1] - scale[0]) * (torch.arange(grid, dtype=f64) + 0.5) / grid
    lr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * (
        (torch.arange(grid, dtype=f64) + 0.5) / grid)
    target = height * width * s[:, None]
    r = torch.exp(lr)[None, :]
    w = torch.round(torch.sqrt(target * r))
    h = torch.round(torch.sqrt(target / r))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    p_valid = valid.double().mean().item()
    mean_valid = (w * h)[valid].mean().item() / (height * width)
    p_fallback = (1 - p_valid) ** augment.MAX_TRIES
    # A square frame's fallback is the whole frame.
    return (1 - p_fallback) * mean_valid + p_fallback * 1.0


def test_crop_box_distribution():
    n, height, width = 20000, 40, 40
    scale, ratio = augment.DEFAULT_SCALE, augment.DEFAULT_RATIO
    top, left, h, w = sample_crop_boxes(n, height, width, _gen(42), scale, ratio)
    for t in (top, left, h, w):
        assert t.shape == (n,) and t.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all()

    area = height * width
    hf, wf = h.double(), w.double()
    # Each side is within 0.5 of an unrounded side pair that meets the limits exactly.
    assert ((wf + 0.5) * (hf + 0.5) / area >= scale[0]).all()
    assert ((wf - 0.5) * (hf - 0.5) / area <= scale[1]).all()
    assert ((wf + 0.5) / (hf - 0.5) >= ratio[0]).all()
    assert ((wf - 0.5) / (hf + 0.5) <= ratio[1]).all()

    frac = (hf * wf / area).mean().item()
    expected = _expected_area_fraction(height, width, scale, ratio)
    assert abs(frac - expected) < 0.01, (frac, expected)

    # Position uniform over the allowed range: its relative place averages 1/2.
    slack_h = (height - h).double()
    rel = (top.double()[slack_h > 0] / slack_h[slack_h > 0]).mean().item()
    assert abs(rel - 0.5) < 0.02


def test_crop_boxes_agree_with_torchvision_sampler():
    transforms = pytest.importorskip("torchvision.transforms")
    n = 3000
    frame = torch.zeros(3, 40, 40)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tv = torch.tensor([transforms.RandomResizedCrop.get_params(
            frame, list(augment.DEFAULT_SCALE), list(augment.DEFAULT_RATIO)) for _ in range(n)],
            dtype=torch.float64)
    top, left, h, w = (t.double() for t in sample_crop_boxes(n, 40, 40, _gen(9)))
    ours = torch.stack([top, left, h, w], dim=1)
    # Means of each coordinate agree within a few standard errors.
    se = torch.sqrt(tv.var(0) / n + ours.var(0) / n)
    assert ((tv.mean(0) - ours.mean(0)).abs() < 5 * se).all(), (tv.mean(0), ours.mean(0))
    frac_tv = (tv[:, 2] * tv[:, 3]).mean() / 1600
    frac_ours = (h * w).mean() / 1600
    assert abs(frac_tv - frac_ours) < 0.02


@pytest.mark.parametrize("height,width", [(10, 40), (40, 10), (30, 30)])
def test_fallback_matches_torchvision(height, width):
    """Scales above 1 never fit, so every image takes torchvision's central fallback."""
    transforms = pytest.importorskip("torchvision.transforms")
    scale, ratio = (1.5, 2.0), augment.DEFAULT_RATIO
    expected = transforms.RandomResizedCrop.get_params(
        torch.zeros(1, height, width), list(scale), list(ratio))
    top, left, h, w = sample_crop_boxes(5, height, width, _gen(), scale, ratio)
    for got, want in zip((top, left, h, w), expected):
        assert (got == want).all(), (got, want)


def test_flip_rate():
    flip = sample_flips(20000, _gen(8))
    assert flip.dtype == torch.bool
    assert abs(flip.double().mean().item() - 0.5) < 0.02


def test_test_transform_deterministic_and_exact():
    x = _images(6)
    a = test_transform(x, MEAN, STD)
    b = test_transform(x, MEAN, STD)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(a, (x.float() / 255 - mean) / std, atol=1e-6, rtol=0)
    assert x.dtype == torch.uint8  # the input is left alone


def test_channel_stats_shape():
    m, s = channel_stats(MEAN, STD, "cpu")
    assert m.shape == s.shape == (1, 3, 1, 1)
    assert m.dtype == torch.float32


def test_empty_batch():
    x = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    assert train_augment(x, _gen(), MEAN, STD).shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_cuda_without_host_sync(gen_device):
    x_cpu = _images(64)
    x = x_cpu.cuda()
    g = torch.Generator(device=gen_device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = train_augment(x, g, MEAN, STD)
        ref = test_transform(x, MEAN, STD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.device == x.device and y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    torch.testing.assert_close(ref.cpu(), test_transform(x_cpu, MEAN, STD), atol=1e-5, rtol=0)
    if gen_device == "cpu":
        # Same CPU draws give the same result as on the CPU, up to float rounding.
        y_cpu = train_augment(x_cpu, torch.Generator().manual_seed(0), MEAN, STD)
        torch.testing.assert_close(y.cpu(), y_cpu, atol=1e-4, rtol=0)

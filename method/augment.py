"""Batched CIFAR training augmentation on the images' own device.

A per-image torchvision pipeline (Pad(4) -> RandomResizedCrop(32) -> RandomHorizontalFlip ->
ToTensor -> Normalize) costs a Python call per image and keeps the data on the CPU. Here the
crop boxes and flips are drawn for the whole batch at once, and crop, resize and flip are one
`grid_sample` call. Sampling the unpadded image with zero padding stands in for padding it
first, so the padded copy is never built.

Each output equals zero-padding the image, cropping the box and resizing it with
`F.interpolate(mode="bilinear", align_corners=False, antialias=False)`, then flipping. The one
difference from torchvision's PIL path is antialiasing: PIL widens its filter when it shrinks
a crop (boxes larger than the output, at most 40 -> 32 px on CIFAR); this code does not.

Nothing here reads a value back to the host, so on CUDA no call waits for the GPU.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SCALE",
    "DEFAULT_RATIO",
    "MAX_TRIES",
    "channel_stats",
    "sample_crop_boxes",
    "sample_flips",
    "apply_crops",
    "train_augment",
    "test_transform",
]

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# torchvision's RandomResizedCrop gives up after this many tries and takes a central crop.
MAX_TRIES = 10

Stats = Union[Sequence[float], torch.Tensor]


def channel_stats(
    mean: Stats, std: Stats, device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, C, 1, 1) tensors on `device`.

    Built on the CPU and copied without blocking: `torch.tensor(..., device="cuda")` would
    wait for the copy, which is a host synchronisation.
    """
    out = []
    for values in (mean, std):
        t = torch.as_tensor(values, dtype=dtype).reshape(1, -1, 1, 1)
        out.append(t.to(device, non_blocking=True) if device is not None else t)
    return out[0], out[1]


def sample_crop_boxes(
    n: int, height: int, width: int, generator: torch.Generator,
    scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's box sampler for `n` images of one size, all at once.

    The sequential tries become MAX_TRIES candidates per image; taking the first valid one
    gives the same distribution as torchvision's loop. Returns int64 (top, left, h, w) on the
    generator's device; `height`/`width` are those of the (padded) frame the box lies in.
    """
    device = generator.device
    f64 = torch.float64
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])

    u_scale = torch.rand(n, MAX_TRIES, generator=generator, device=device, dtype=f64)
    u_ratio = torch.rand(n, MAX_TRIES, generator=generator, device=device, dtype=f64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w_all = torch.round(torch.sqrt(target_area * aspect))
    h_all = torch.round(torch.sqrt(target_area / aspect))
    valid = (w_all > 0) & (w_all <= width) & (h_all > 0) & (h_all <= height)

    # argmax returns the first maximal index, i.e. the first valid try.
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    any_valid = valid.any(dim=1)
    w = w_all.gather(1, first).squeeze(1).to(torch.int64)
    h = h_all.gather(1, first).squeeze(1).to(torch.int64)

    # No valid try: torchvision's central crop, with the frame's ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    w = torch.where(any_valid, w, fb_w)
    h = torch.where(any_valid, h, fb_h)

    # Position uniform over the integers that keep the box inside the frame; the central
    # fallback is fixed. Float64 uniforms times at most a few thousand never round up to the
    # bound, and the clamp makes sure of it.
    span_h = height - h + 1
    span_w = width - w + 1
    u_top = torch.rand(n, generator=generator, device=device, dtype=f64)
    u_left = torch.rand(n, generator=generator, device=device, dtype=f64)
    top = torch.minimum(torch.floor(u_top * span_h).to(torch.int64), span_h - 1)
    left = torch.minimum(torch.floor(u_left * span_w).to(torch.int64), span_w - 1)
    top = torch.where(any_valid, top, (height - fb_h) // 2)
    left = torch.where(any_valid, left, (width - fb_w) // 2)
    return top, left, h, w


def sample_flips(n: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Per-image horizontal-flip decisions (bool, on the generator's device)."""
    return torch.rand(n, generator=generator, device=generator.device) < p


def apply_crops(
    images_float: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
    w: torch.Tensor, flip: torch.Tensor, pad: int, out_size: int,
) -> torch.Tensor:
    """Crop each image's box from its zero-padded frame, resize to out_size, flip if asked.

    Boxes are in the padded frame's pixel coordinates; the padding is never materialised.
    Pixel values are sampled as given (no normalisation). Parameters may sit on another
    device than the images: they are packed into one small tensor and copied once.
    """
    b, _, height, width = images_float.shape
    f64 = torch.float64
    # Box in the unpadded image's pixel coordinates.
    y0 = top.to(f64) - pad
    x0 = left.to(f64) - pad
    hf, wf = h.to(f64), w.to(f64)
    # grid_sample (align_corners=False) reads normalised x as pixel ((x + 1) * W - 1) / 2, so
    # output column j of the box lands on pixel x0 + (j + 0.5) * w / out - 0.5 when the
    # x-scale is w / W and the x-offset puts the box centre x0 + w / 2 at the grid centre.
    sx = torch.where(flip.to(top.device), -wf / width, wf / width)
    sy = hf / height
    bx = (2 * x0 + wf) / width - 1
    by = (2 * y0 + hf) / height - 1
    # F.interpolate clamps source positions to the box's first and last pixel centres;
    # clamping the grid the same way keeps neighbours outside the box out of the edge pixels.
    x_lo = (2 * x0 + 1) / width - 1
    x_hi = (2 * x0 + 2 * wf - 1) / width - 1
    y_lo = (2 * y0 + 1) / height - 1
    y_hi = (2 * y0 + 2 * hf - 1) / height - 1
    packed = torch.stack([sx, bx, x_lo, x_hi, sy, by, y_lo, y_hi], dim=1)
    p = packed.to(images_float.dtype).to(images_float.device, non_blocking=True).view(b, 2, 4)

    # The affine map has no rotation or shear, so the grid is separable: what affine_grid
    # would give, built from per-row and per-column coordinates, without its batched matmul,
    # and the clamp touches B * out * 2 values instead of the whole grid.
    centres = torch.arange(out_size, device=images_float.device, dtype=images_float.dtype)
    centres = (2 * centres + 1) / out_size - 1  # output pixel centres, normalised
    coords = p[:, :, 1:2] + p[:, :, 0:1] * centres  # (b, 2, out): x then y
    coords = torch.maximum(torch.minimum(coords, p[:, :, 3:4]), p[:, :, 2:3])
    xs = coords[:, 0].unsqueeze(1).expand(b, out_size, out_size)
    ys = coords[:, 1].unsqueeze(2).expand(b, out_size, out_size)
    grid = torch.stack([xs, ys], dim=-1)
    return F.grid_sample(
        images_float, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def _normalise_(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """In place on a 0..255 float batch; one shared helper so both transforms agree."""
    mean_t, std_t = channel_stats(mean, std, x.device, x.dtype)
    # Two passes instead of three: (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std.
    return x.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)


def train_augment(
    images: torch.Tensor, generator: torch.Generator, mean: Stats, std: Stats,
    pad: int = 4, out_size: int | None = None,
    scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO,
    flip_p: float = 0.5,
) -> torch.Tensor:
    """Random pad-crop-resize-flip and normalisation for a uint8 (B, C, H, W) batch.

    Draws come from `generator` (CPU, or the images' device); same seed, same output.
    Returns float32 (B, C, out_size, out_size) on the images' device.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, _, height, width = images.shape
    out = height if out_size is None else out_size
    top, left, h, w = sample_crop_boxes(
        b, height + 2 * pad, width + 2 * pad, generator, scale=scale, ratio=ratio
    )
    flip = sample_flips(b, generator, flip_p)
    x = apply_crops(images.to(torch.float32), top, left, h, w, flip, pad, out)
    return _normalise_(x, mean, std)


def test_transform(images: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Evaluation-time conversion: uint8 -> float32 in [0, 1], normalised; no randomness."""
    # copy=True: a float32 input must not be normalised in place under the caller.
    return _normalise_(images.to(torch.float32, copy=True), mean, std)


# Keep pytest from collecting `test_transform` when a test module imports it by name.
test_transform.__test__ = False  # type: ignore[attr-defined]

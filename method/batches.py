"""Batches for training and evaluation, from in-memory tensors or lazily decoded files.

32x32 datasets: the split's uint8 images sit on the training device once; a batch is an index
gather plus the batched augmentation of `augment.py`. File-list datasets: a DataLoader decodes
images with PIL transforms in worker processes.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from method.augment import channel_stats, test_transform, train_augment
from method.data import Benchmark, Split

Batch = tuple[torch.Tensor, torch.Tensor]


class ImageSource(Protocol):
    def train_batches(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]: ...

    def eval_batches(self, indices: torch.Tensor, batch_size: int) -> Iterator[Batch]: ...

    def ordered_batches(self, order: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]: ...


class TensorImages:
    """A split held as one uint8 tensor on the device, augmented per batch with tensor ops."""

    def __init__(self, split: Split, benchmark: Benchmark, device: torch.device, channels_last: bool = False) -> None:
        self.images = split.images.to(device)
        self.labels = torch.as_tensor(split.labels, dtype=torch.long).to(device)
        self.mean, self.std = channel_stats(benchmark.mean, benchmark.std, device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def train_batches(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        # Reshuffled every epoch; the last, shorter batch is kept (method.md §2).
        return self.ordered_batches(indices[torch.randperm(len(indices), generator=generator)], batch_size, generator)

    def ordered_batches(self, order: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Augmented training batches of `order`, in that order (a sampler's draws)."""
        order = order.to(self.device, non_blocking=True)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = train_augment(self.images[batch], generator, self.mean, self.std)
            yield x.contiguous(memory_format=self.memory_format), self.labels[batch]

    def eval_batches(self, indices: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        indices = indices.to(self.device, non_blocking=True)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            x = test_transform(self.images[batch], self.mean, self.std)
            yield x.contiguous(memory_format=self.memory_format), self.labels[batch]


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, indices: torch.Tensor, transform) -> None:
        self.paths = split.paths
        self.labels = split.labels
        self.indices = indices.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from PIL import Image

        index = self.indices[i]
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[index])


class FileImages:
    """A file-list split (ImageNet-Subset, Food-101), decoded lazily by DataLoader workers."""

    def __init__(self, split: Split, benchmark: Benchmark, device: torch.device, num_workers: int = 4) -> None:
        from torchvision import transforms as T

        size = benchmark.image_size
        resize = [T.Resize(benchmark.resize)] if benchmark.resize else []
        normalise = [T.ToTensor(), T.Normalize(benchmark.mean, benchmark.std)]
        self.train_transform = T.Compose(resize + [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + normalise)
        # ImageNet-Subset's test transform is a centre crop of the raw image (method.md §1).
        self.eval_transform = T.Compose(resize + [T.CenterCrop(size)] + normalise)
        self.split, self.device, self.num_workers = split, device, num_workers

    def _loader(self, indices: torch.Tensor, batch_size: int, transform, generator=None, shuffle=None) -> Iterator[Batch]:
        dataset = _FileDataset(self.split, indices, transform)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=generator is not None if shuffle is None else shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        return self._loader(indices, batch_size, self.train_transform, generator)

    def ordered_batches(self, order: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        return self._loader(order, batch_size, self.train_transform, generator, shuffle=False)

    def eval_batches(self, indices: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        return self._loader(indices, batch_size, self.eval_transform)


def image_source(split: Split, benchmark: Benchmark, device: torch.device, num_workers: int = 4, channels_last: bool = False) -> ImageSource:
    if split.images is not None:
        return TensorImages(split, benchmark, device, channels_last)
    return FileImages(split, benchmark, device, num_workers)

"""What vdsh knows about a dataset before reading any of it: one `DatasetInfo` per dataset module."""

from __future__ import annotations

from dataclasses import dataclass

# Named input augmentations (their recipes live in vdsh.training.augment, which reads these names).
AUGMENTATIONS = {
    "digits": "random shifts of up to 2 px, no flips (a mirrored digit is another shape)",
    "photos": "random shifts of up to 4 px and left-right flips",
}


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's facts: image shape (None where it varies: folders, NUS-WIDE, decoded at a chosen size),
    class names (None where they are read from the files), the augmentation that suits its images (None:
    none unless asked), the input features MLPs and shallow hashers get by default (a kind of
    `vdsh.training.features`), and the fixed per-channel pixel mean and std where the literature uses one
    (None: the training images' own statistics)."""

    name: str
    channels: int | None
    size: int | None
    class_names: tuple[str, ...] | None
    augmentation: str | None
    description: str
    features: str = "pixels"
    pixel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        if self.augmentation is not None and self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {sorted(AUGMENTATIONS)} or None, got {self.augmentation!r}")

    def check_shape(self, channels: int | None, size: int | None, asked_by: str = "--channels/--image-size") -> None:
        """Refuse, before anything is decoded, a shape this dataset's images do not have, naming the fix."""
        if self.channels is None:
            return
        if (channels is not None and channels != self.channels) or (size is not None and size != self.size):
            raise ValueError(
                f"{self.name} images are {self.channels} x {self.size} x {self.size} but {asked_by} asks for "
                f"{channels or self.channels} x {size or self.size} x {size or self.size}: drop {asked_by}, or use "
                f"a model trained on {self.name}")

"""The Vision Transformer (Dosovitskiy et al., ICLR 2021) as an `Encoder`: images are cut into
non-overlapping patches, each patch is projected to one token, and the encoder's blocks, pooling
and classifier do the rest.

    model(images)    # float32 [batch, height, width, channels] -> logits [batch, num_classes]

Patch p (row-major over the grid, `grid_shape` = (height // patch_size, width // patch_size)) is
token p; the default position scheme is 2-D RoPE (`lexjax.positions.RoPE2D`), which reads p as
the cell (p // grid_width, p % grid_width), so attention depends on the 2-D offset between
patches. No class token: the classifier reads the mean over patches.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.layers import dense
from lexjax.models.encoder import Encoder
from lexjax.positions import PositionScheme, RoPE2D


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
    """`[batch, H, W, C]` -> `[batch, (H / p) * (W / p), p * p * C]`: non-overlapping p x p
    patches in row-major grid order, each flattened as (row, column, channel)."""
    b, h, w, c = images.shape
    p = patch_size
    grid = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, (h // p) * (w // p), p * p * c)


@gin.register(module="lexjax.models")
class ViT(Encoder, kw_only=True):
    """An image classifier: float32 images `[batch, height, width, channels]` (values in [0, 1])
    -> float32 class logits `[batch, num_classes]`.

    Attributes:
      image_size: (height, width) of the images, multiples of `patch_size`.
      channels: image channels (1 grey, 3 RGB).
      patch_size: the side of the square patches (PATCH_SIZE); each is one token.
      num_classes: the classes (NUM_CLASSES); required (a ViT has no masked-LM head).
      vocab_size: unused (a ViT reads pixels, not tokens).
      position: default `RoPE2D()`; its `grid_width` is set from `grid_shape`. Absolute schemes
        (learned, sinusoidal) embed the flattened patch index.
      Other fields: see `Encoder` (blocks, heads, mask) and `AttentionLanguageModel`.

    A subclass with another block (`layer_class`) hands it the grid as YosoEncoder hands its
    hashing fields: `dict(super().decoder_layer_fields(...), grid_height=self.grid_shape[0],
    grid_width=self.grid_shape[1])`.
    """

    image_size: tuple[int, int] = (8, 8)
    channels: int = 1
    patch_size: int = 2
    vocab_size: int = 1
    position: Optional[PositionScheme] = RoPE2D()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(grid_height, grid_width): patches per column and per row."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image (the run's TRAIN_LENGTH)."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def patch_features(self) -> int:
        """Values per patch, p * p * channels."""
        return self.patch_size * self.patch_size * self.channels

    @nn.nowrap
    def input_spec(self, batch_size: int) -> jax.ShapeDtypeStruct:
        """The images of a batch, as `model.init` and the train step read them."""
        return jax.ShapeDtypeStruct((batch_size, *self.image_size, self.channels), jnp.float32)

    @nn.nowrap
    def check(self) -> None:
        super().check()
        name = type(self).__name__
        if self.num_classes is None:
            raise ValueError(f"{name} is a classifier: set NUM_CLASSES ({name}.num_classes)")
        if self.pooling != "mean":
            raise ValueError(f"{name} has no class token: leave {name}.pooling 'mean'")
        for field in ("channels", "patch_size"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        size = tuple(self.image_size)
        if len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in size):
            raise ValueError(f"{name}.image_size must be (height, width), got "
                             f"{self.image_size!r}")
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"{name}.image_size {size} does not split into patches of "
                             f"{self.patch_size} (PATCH_SIZE): pick a patch size dividing both")

    @property
    def position_template(self) -> Optional[PositionScheme]:
        template = super().position_template
        if template is not None and hasattr(template, "grid_width"):
            template = template.clone(grid_width=self.grid_shape[1])
        return template

    @nn.nowrap
    def check_images(self, images: jnp.ndarray, segment_ids: Optional[jnp.ndarray],
                     decode: bool) -> None:
        """Clear errors for inputs a ViT cannot read."""
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} reads float32 images [batch, "
                             f"{', '.join(map(str, expected))}], got shape {images.shape}")
        if segment_ids is not None or decode:
            raise ValueError(f"{type(self).__name__} reads whole images: call it without "
                             "segment_ids or decode")

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, segment_ids: Optional[jnp.ndarray] = None,
                 deterministic: bool = True, decode: bool = False) -> jnp.ndarray:
        """float32 `images [batch, height, width, channels]` -> float32 logits
        `[batch, num_classes]`."""
        self.check_images(images, segment_ids, decode)
        patches = patchify(images.astype(self.compute_dtype), self.patch_size)
        positions = np.arange(self.num_patches, dtype=np.int32)
        projection = dense(self.embed_dim, (None, "embed"), dtype=self.compute_dtype,
                           use_bias=True, name="patch_embedding")
        # The base's embedding path (absolute positions, embedding norm, dropout) with the
        # patch projection in place of the token table.
        x = self.embed(projection, patches, positions, None, deterministic)
        x = self.backbone(x, positions, segment_ids=None, deterministic=deterministic,
                          decode=False)
        return self.head(None, x, segment_ids=None, deterministic=deterministic)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per patch (2 per multiply-add): the patch projection, then the
        encoder's blocks over `length` patches."""
        return super().flops_per_token(length) + 2.0 * self.patch_features * self.embed_dim

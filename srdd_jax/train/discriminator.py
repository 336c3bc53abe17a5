"""A patch-GAN discriminator (pix2pix's N-layer design) for the tokenizer's optional adversarial loss.

It scores overlapping patches rather than whole images, which judges texture and sharpness, the
part of a reconstruction that L1/L2 blur. Batch norm is replaced by GroupNorm: it needs no mutable
batch statistics (the whole trainer stays a pure function of the state) and does not mix the examples
of real and fake batches.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from srdd_jax.tokenizer import layers


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  ch: int = 64  # Channels of the first layer; doubled at each further layer, up to 8x.
  num_layers: int = 3  # Stride-2 layers; the receptive field is 70 px for 3 layers.

  def output_side(self, image_size: int) -> int:
    """Side of the logit map for square images of `image_size` px (4x4 convs, padding 1)."""
    side = image_size
    for i in range(self.num_layers + 2):
      stride = 2 if i < self.num_layers else 1
      side = (side + 2 - 4) // stride + 1
    return side


class PatchDiscriminator(nn.Module):
  """Images (B, H, W, 3) in [-1, 1] -> real/fake logits per patch (B, H', W', 1)."""
  config: DiscriminatorConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = x.astype(jnp.float32)
    h = nn.leaky_relu(layers.Conv(c.ch, 4, stride=2, name='conv_0')(h), 0.2)
    for i in range(1, c.num_layers + 1):
      ch = c.ch * min(2 ** i, 8)
      # The last hidden layer keeps the resolution (stride 1), as in pix2pix.
      stride = 2 if i < c.num_layers else 1
      h = layers.Conv(ch, 4, stride=stride, name=f'conv_{i}')(h)
      h = layers.GroupNorm(num_groups=math.gcd(32, ch), name=f'norm_{i}')(h)
      h = nn.leaky_relu(h, 0.2)
    return layers.Conv(1, 4, name='logits')(h)

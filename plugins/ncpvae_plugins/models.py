"""Built-in latent models: ``mlp`` and ``conv`` encoder/decoder pairs.

``conv`` is the encoder/decoder of Burgess et al. (2018), used across the disentanglement
literature at 64x64: 4x4 stride-2 convolutions with 32 channels down to 4x4, then two dense
layers of 256. For other sizes it uses as many stride-2 stages as halve the image evenly
(64: 4, 32: 3, 28: 2 -> 7x7, 8: 1), and the decoder mirrors them with transposed convolutions.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import BuildContext, ComponentConfig, ConfigError, LatentModel, hookimpl

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}


class LikelihoodFields(ComponentConfig):
    likelihood: Literal["bernoulli", "gaussian", "discretized_logistic"] = Field(
        "bernoulli", description="pixel likelihood: bernoulli logits (binary or grey images), "
        "gaussian means, or discretized_logistic means (8-bit images, colour included)")
    gaussian_scale: float = Field(
        0.1, gt=0, description="scale of the gaussian / discretized_logistic likelihood "
        "(its initial value when learned)")
    learn_scale: bool = Field(
        False, description="learn the likelihood's scale (set it for discretized_logistic)")
    scale_per_pixel: bool = Field(
        False, description="one (learned) scale per pixel and channel instead of one scalar")

    def likelihood_kwargs(self, image_shape: tuple[int, int, int]) -> dict:
        """Keyword arguments of :class:`ncpvae.LatentModel` for these fields."""
        return {"likelihood": self.likelihood, "gaussian_scale": self.gaussian_scale,
                "learn_scale": self.learn_scale,
                "scale_shape": tuple(image_shape) if self.scale_per_pixel else ()}


def _require_image_shape(ctx: BuildContext, who: str) -> tuple[int, int, int]:
    if ctx.image_shape is None:
        raise ConfigError(f"{who} needs the image shape; pass image_shape=(C, H, W) to create()")
    return ctx.image_shape


class _EncoderDecoderVAE(LatentModel):
    """Shared by the built-in models: built from the image shape, the latent size, the config
    fields named in ``arch_fields`` and the likelihood fields; ``encoder`` maps images
    ``(B, C, H, W)`` to ``(B, 2D)``, the means and log-variances side by side."""

    #: the config fields passed on to ``__init__`` as keyword arguments
    arch_fields: ClassVar[tuple[str, ...]]
    encoder: nn.Module

    @classmethod
    def from_config(cls, config: LikelihoodFields, ctx: BuildContext) -> _EncoderDecoderVAE:
        shape = _require_image_shape(ctx, f"the {cls.name} model")
        return cls(shape, ctx.require_latent_dim(cls.name),
                   **{field: getattr(config, field) for field in cls.arch_fields},
                   **config.likelihood_kwargs(shape))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar


class MLPVAE(_EncoderDecoderVAE):
    """Dense encoder ``prod(C,H,W) -> hidden... -> 2D`` and mirrored decoder.

    The default ``hidden = [512, 256]`` was chosen by measurement: the original notebook's deep,
    narrow ``[512, 256, 128, 64]`` trains to a worse test ELBO with fewer active units (posterior
    collapse) on real digits (sklearn's 8x8 digits: -25.6 vs -24.2 nats, 1 vs 4 of 10 units;
    the same digits upsampled to 28x28: -330 vs -294 nats; 4,000 MNIST digits: -157 vs -117
    nats, 3 vs 10 units). See ``beta_elbo``'s ``warmup_steps`` / ``free_bits`` for the remedies.
    """

    name = "mlp"
    arch_fields = ("hidden", "activation")

    class Config(LikelihoodFields):
        name: Literal["mlp"] = "mlp"
        hidden: list[int] = Field([512, 256], min_length=1,
                                  description="encoder hidden sizes (decoder mirrors them)")
        activation: Literal["relu", "silu", "elu", "tanh"] = "relu"

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int,
                 hidden: list[int] = (512, 256), activation: str = "relu", **likelihood):
        super().__init__(latent_dim, **likelihood)
        if any(h < 1 for h in hidden):
            raise ConfigError(f"model.hidden sizes must be >= 1, got {list(hidden)}")
        self.image_shape = tuple(image_shape)
        act = ACTIVATIONS[activation]
        n_pixels = int(torch.tensor(image_shape).prod())
        sizes = [n_pixels, *hidden]
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            enc += [nn.Linear(a, b), act()]
        enc.append(nn.Linear(sizes[-1], 2 * latent_dim))
        self.encoder = nn.Sequential(*enc)
        dec_sizes = [latent_dim, *reversed(hidden)]
        dec: list[nn.Module] = []
        for a, b in zip(dec_sizes[:-1], dec_sizes[1:]):
            dec += [nn.Linear(a, b), act()]
        dec.append(nn.Linear(dec_sizes[-1], n_pixels))
        self.decoder = nn.Sequential(*dec)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z).view(*z.shape[:-1], *self.image_shape)


def num_halvings(size: int, max_halvings: int = 4, min_size: int = 4) -> int:
    """How many stride-2 stages halve ``size`` exactly while staying >= ``min_size``."""
    count = 0
    while count < max_halvings and size % 2 == 0 and size // 2 >= min_size:
        size //= 2
        count += 1
    return count


class ConvVAE(_EncoderDecoderVAE):
    """The Burgess et al. (2018) convolutional encoder/decoder; for colour data (CIFAR-10, SVHN
    at 3x32x32, CelebA at 3x64x64) give ``channels`` per stage, e.g. ``[64, 128, 256]``."""

    name = "conv"
    arch_fields = ("channels", "hidden")

    class Config(LikelihoodFields):
        name: Literal["conv"] = "conv"
        channels: int | list[int] = Field(
            32, description="channels of every conv stage, or one number per stage (encoder "
            "order, as many as the image has stride-2 stages: 32x32 -> 3, 64x64 -> 4; the "
            "decoder mirrors them)")
        hidden: int = Field(256, ge=1, description="width of the two dense layers")

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int,
                 channels: int | list[int] = 32, hidden: int = 256, **likelihood):
        super().__init__(latent_dim, **likelihood)
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        stages = min(num_halvings(h), num_halvings(w))
        if stages == 0:
            raise ConfigError(f"the conv model needs an even image size >= 8, got {h}x{w}")
        widths = [int(channels)] * stages if isinstance(channels, int) else list(channels)
        if len(widths) != stages or any(ch < 1 for ch in widths):
            raise ConfigError(
                f"model.channels must be one number >= 1 or {stages} of them (one per stride-2 "
                f"stage of a {h}x{w} image), got {channels}")
        self.feature_shape = (widths[-1], h >> stages, w >> stages)
        flat = widths[-1] * (h >> stages) * (w >> stages)
        enc: list[nn.Module] = []
        in_ch = c
        for width in widths:
            enc += [nn.Conv2d(in_ch, width, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = width
        enc += [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                nn.ReLU(), nn.Linear(hidden, 2 * latent_dim)]
        self.encoder = nn.Sequential(*enc)
        self.decoder_dense = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, flat), nn.ReLU())
        dec: list[nn.Module] = []
        mirrored = [*reversed(widths), c]
        for i in range(stages):
            dec.append(nn.ConvTranspose2d(mirrored[i], mirrored[i + 1], 4, stride=2, padding=1))
            if i < stages - 1:
                dec.append(nn.ReLU())
        self.decoder_conv = nn.Sequential(*dec)

    def decode(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        features = self.decoder_dense(z.reshape(-1, z.shape[-1])).view(-1, *self.feature_shape)
        return self.decoder_conv(features).view(*lead, *self.image_shape)


@hookimpl
def ncpvae_register_models() -> list[type]:
    return [MLPVAE, ConvVAE]

"""vae.py -- a convolutional variational autoencoder (VAE) on 16x16 pixel-art sprites.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014,
https://arxiv.org/abs/1312.6114

An encoder maps a sprite x to a Gaussian q(z|x) = N(mu, diag(sigma^2)) over a
32-number latent code z; a decoder maps z back to a distribution p(x|z) over
sprites. Both are trained together by maximising the evidence lower bound

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)),   p(z) = N(0, I)

and new sprites are drawn by decoding z ~ N(0, I). The interesting choice here
is p(x|z), the decoder's likelihood (--recon-loss):

    mse  a Gaussian with a fixed variance over RGB values. The decoder outputs
         the mean, so where it is unsure whether a pixel is red or green it
         outputs their average, a brownish blend: blurry, off-palette sprites.
    bce  an independent Bernoulli per RGB channel (the usual choice for
         black-and-white data such as MNIST or monochrome sprites): sharper
         than mse, but a colour is still three independent channel guesses.
    ce   a categorical over the 8 palette colours for every pixel: the decoder
         outputs 8 logits per pixel and is trained with cross-entropy against
         the pixel's palette index. Uncertainty becomes "40% red, 60% green"
         instead of a blend, and a decoded pixel is always an exact palette
         colour (argmax, or a draw at --temperature).

Default: ce, chosen by measurement: one 200-epoch run per loss on the real
data; the results table and what it means are in docs/learn/02-vae.md.

Run (from the repository root; the dataset is prepared by download.py):

    python vae.py --epochs 200 --out runs/vae-ce        # ce, the default
    python vae.py --epochs 200 --recon-loss mse --out runs/vae-mse
    python vae.py --epochs 200 --recon-loss bce --out runs/vae-bce
    python vae.py --resume runs/vae-ce/checkpoints/last.pt --epochs 300   # continue a run
    python vae.py sample --checkpoint runs/vae-ce/checkpoints/last.pt --n 64 --out grid.png
    python vae.py sample --checkpoint runs/vae-ce/checkpoints/last.pt --temperature 1 --out grid.png

Metrics (the Trainer prefixes train/ and val/; each is averaged over the
sprites of the split):

    recon     reconstruction term per pixel, with z drawn from q(z|x): squared
              error summed over the pixel's 3 channels ([-1, 1] scale) for
              mse; Bernoulli cross-entropy summed over the 3 channels (nats)
              for bce; categorical cross-entropy of the palette index (nats)
              for ce. The three are on different scales: compare runs of one
              mode only.
    kl        KL(q(z|x) || N(0, I)) in nats per image, closed form.
    loss      the training objective, recon + w * kl, with w the KL weight of
              the epoch (--kl-weight after the warm-up).
    nelbo     (val only) the negative ELBO in nats per image with KL weight 1,
              i.e. the true bound -log p(x) <= nelbo, from one z per image:
                ce   sum over the 256 pixels of -log p(index | z) + kl: a bound
                     on the discrete likelihood of the palette-index image.
                mse  a Gaussian decoder N(x_mean, sigma^2 I) on the 768 RGB
                     values in [-1, 1] with sigma^2 = 128 * --kl-weight (0.064,
                     sigma 0.25, for the default 5e-4): the variance for which
                     the training loss is proportional to the negative ELBO,
                     up to a constant (see `negative_elbo`). It bounds a continuous
                     density, so it can be negative and is not comparable with
                     ce's figure. Not reported when --kl-weight is 0.
                bce  sum of the Bernoulli cross-entropies + kl. Our channel
                     values (e.g. 207/255) are not 0 or 1, so this is NOT a
                     bound on a normalised likelihood; compare bce runs only.
    bpd       (val, ce only) bits per dimension: nelbo / (256 ln 2), counting
              one dimension per pixel, since each pixel is one categorical
              variable (8 colours: a uniform guess scores 3 bits).
    pixel_acc (val only) fraction of pixels whose reconstruction, decoded from
              z = mu and snapped to the palette, has the right palette colour.
              Unlike recon and nelbo, comparable across the three modes.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field

if __name__ == "__main__":  # Ctrl-C while torch loads: exit at once (130), nothing to save yet, no traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

Tensor = torch.Tensor
RECON_LOSSES = ("mse", "bce", "ce")
PIXELS = 16 * 16  # one sprite: the "per pixel" in recon and the dimension count of bpd


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------


@dataclass
class Config(common.TrainConfig):
    epochs: int = 200
    # passes over the training sprites (200: about 4 minutes on an idle 2-core CPU
    # at 113 GFLOP/s fp32; README, Results)
    latent_dim: int = 32
    # size of the latent code z
    channels: int = 20
    # width of the 16x16 convolutions; the 8x8 and 4x4 stages use twice as many
    # (20 gives about 140K parameters)
    recon_loss: str = field(default="ce", metadata={"choices": RECON_LOSSES})
    # decoder likelihood p(x|z): mse (Gaussian on RGB), bce (Bernoulli per RGB
    # channel) or ce (categorical over the palette colours of each pixel)
    kl_weight: float = 5e-4
    # weight w of the KL term in recon + w * kl (recon is per pixel and kl per
    # image, so w = 1/256 weighs them as the ELBO does)
    kl_warmup_epochs: int = 10
    # raise the KL weight linearly from w/N to w over the first N epochs (0 = no warm-up)
    temperature: float = 0.0
    # ce only: 0 decodes each pixel as its most likely colour (argmax); T > 0
    # draws each pixel from softmax(logits / T)

    sample_flags = ("temperature",)  # what `vae.py sample` may override; the rest is training-only
    run_name_flags = ("recon_loss",)  # named in every MLflow run name (common.run_name)

    def __post_init__(self):
        super().__post_init__()  # also refuses a --recon-loss not in RECON_LOSSES (the field's choices)
        if self.latent_dim < 1 or self.channels < 1:
            raise ValueError("--latent-dim and --channels must be at least 1")
        if self.kl_weight < 0 or self.kl_warmup_epochs < 0 or self.temperature < 0:
            raise ValueError("--kl-weight, --kl-warmup-epochs and --temperature cannot be negative")
        if self.temperature > 0 and self.recon_loss != "ce":
            raise ValueError(f"--temperature applies to --recon-loss ce only (this is {self.recon_loss}); drop it")


# What compare.py (its registry holds one line per model: the Strategy) and the
# tests know of this model, declared next to its Config; the keys are explained
# at compare.py's registry. TINY trains in a few seconds on 2 cores (the tests).
COMPARE = dict(panels=[("VAE", {})], budgets={"vae": ("epochs", "VAE epochs")}, quick=dict(epochs=10))
TINY = dict(channels=8, latent_dim=8, batch_size=32, lr=3e-3, kl_warmup_epochs=0)


# -----------------------------------------------------------------------------
# The two terms of the ELBO
# -----------------------------------------------------------------------------


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in nats, one value per row:
    (B, D) -> (B,). Closed form for two Gaussians, Kingma & Welling 2014,
    Appendix B:  -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    # KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """A draw from q(z|x) written as a differentiable function of (mu, logvar)
    plus noise that does not depend on them (Section 2.4), so gradients flow
    back into the encoder. The noise comes from torch's global RNG, which the
    Trainer seeds and checkpoints."""
    eps = torch.randn_like(mu)
    # z = mu + sigma * eps,  sigma = exp(logvar / 2),  eps ~ N(0, I)   (Eq. 10's z^(i,l))
    return mu + torch.exp(0.5 * logvar) * eps


# -----------------------------------------------------------------------------
# Model: a small convolutional encoder and decoder around a 4x4 bottleneck
# -----------------------------------------------------------------------------
# Departure from the paper: the paper's encoder and decoder are one-hidden-layer
# MLPs; sprites are images, so both are small convnets (16x16 -> 8x8 -> 4x4,
# then a linear layer to mu and logvar; the decoder mirrors it).


class Encoder(nn.Module):
    """x (B, 3, 16, 16) in [-1, 1] -> mu, logvar (B, latent_dim) of q(z|x)."""

    def __init__(self, channels: int, latent_dim: int):
        super().__init__()
        c = channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.SiLU(),                  # (B, c, 16, 16)
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),    # (B, 2c, 8, 8)
            nn.Conv2d(2 * c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),  # (B, 2c, 4, 4)
        )
        # One linear layer emits both parameters of q(z|x); logvar (not sigma)
        # keeps the variance positive without a constraint.
        self.to_params = nn.Linear(2 * c * 4 * 4, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.convs(x).flatten(1)          # (B, 2c, 4, 4) -> (B, 2c * 16)
        mu, logvar = self.to_params(h).chunk(2, dim=1)  # (B, 2 * latent) -> 2 x (B, latent)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent_dim) -> the parameters of p(x|z), (B, out_channels, 16, 16):
    RGB means in [-1, 1] (mse), RGB logits (bce) or palette logits (ce)."""

    def __init__(self, channels: int, latent_dim: int, out_channels: int):
        super().__init__()
        c = channels
        self.c = c
        self.from_z = nn.Sequential(nn.Linear(latent_dim, 2 * c * 4 * 4), nn.SiLU())
        self.convs = nn.Sequential(
            nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),  # (B, 2c, 8, 8)
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.SiLU(),      # (B, c, 16, 16)
            nn.Conv2d(c, out_channels, 3, padding=1),                             # (B, out, 16, 16)
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.from_z(z).view(-1, 2 * self.c, 4, 4)  # (B, 2c * 16) -> (B, 2c, 4, 4)
        return self.convs(h)


class VAE(nn.Module):
    def __init__(self, channels: int, latent_dim: int, out_channels: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(channels, latent_dim)
        self.decoder = Decoder(channels, latent_dim, out_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, 3, 16, 16) in [-1, 1] -> decoder output for one z ~ q(z|x), mu, logvar."""
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar


# -----------------------------------------------------------------------------
# Strategy: the loss, sampling and metrics the Trainer calls
# -----------------------------------------------------------------------------


class VAEStrategy(common.Strategy):
    """A VAE trained on recon + w * kl (a beta-VAE, Higgins et al. 2017, with a
    small beta; see `train_step`), sampled by decoding z ~ N(0, I).

    Extra pictures (every --sample-every epochs and at the end):
      reconstructions  rows of real validation sprites, each row followed by a
                       row of their reconstructions (decoded from z = mu)
      interpolation    each row: sprite A, 8 decodings of (1 - t) mu_A + t mu_B
                       for t = 0 .. 1, sprite B
    """

    name = "vae"

    def __init__(self, config: Config, palette: Tensor):
        self.config = config
        self.palette = palette  # (K, 3) in [0, 1]: the ce decoder's K classes
        self.mode = config.recon_loss
        self.kl_weight = self.kl_weight_at(1)  # updated by on_epoch_start

    def build_model(self, config: Config) -> nn.Module:
        out_channels = self.palette.shape[0] if self.mode == "ce" else 3
        return VAE(config.channels, config.latent_dim, out_channels)

    def describe(self, model: nn.Module) -> str:
        count = lambda m: sum(p.numel() for p in m.parameters())
        return (f"vae: encoder {count(model.encoder):,} + decoder {count(model.decoder):,} parameters "
                f"(--recon-loss {self.mode}: decoder emits {model.decoder.convs[-1].out_channels} numbers per pixel)")

    # -- the KL weight and its warm-up ----------------------------------------

    def kl_weight_at(self, epoch: int) -> float:
        """Linear warm-up: w * epoch / N for the first N epochs, then w. Early
        on, the encoder can learn informative codes before the KL term pulls
        q(z|x) towards the prior. Departure from the paper (which weighs KL
        by 1 throughout): "KL cost annealing", Bowman et al. 2016."""
        n = self.config.kl_warmup_epochs
        return self.config.kl_weight * (min(1.0, epoch / n) if n > 0 else 1.0)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        # Recomputed from the epoch number, so a resumed run gets the same value.
        self.kl_weight = self.kl_weight_at(epoch)

    # -- the reconstruction term ------------------------------------------------

    def recon_sum(self, out: Tensor, x: Tensor) -> Tensor:
        """The reconstruction term summed over each sprite, (B,) (divided by PIXELS:
        the `recon` metric, as vqvae.py's recon_mean): decoder output `out`
        (B, C, 16, 16), sprites x (B, 3, 16, 16) in [0, 1]."""
        out = out.float()  # losses in float32, also under bf16 autocast
        if self.mode == "mse":
            # sum_d (x_d - x_mean_d)^2 over the 768 RGB values in [-1, 1]
            return (out - common.to_model_range(x)).pow(2).sum(dim=(1, 2, 3))
        if self.mode == "bce":
            # -log p(x|z) = -sum_d [x_d log p_d + (1 - x_d) log(1 - p_d)],  p_d = sigmoid(logit_d)
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(dim=(1, 2, 3))
        # Departure from the paper: its decoders are Bernoulli (MNIST) or Gaussian
        # (Frey Face); here each pixel is one categorical variable over the palette.
        # ce: -log p(x|z) = -sum_pixels log softmax(logits)[palette index of the pixel]
        target = common.palette_index(x, self.palette)  # (B, 16, 16) integers in [0, K)
        return F.cross_entropy(out, target, reduction="none").sum(dim=(1, 2))

    def negative_elbo(self, out: Tensor, x: Tensor, kl: Tensor) -> Tensor:
        """-ELBO in nats per image with KL weight 1, (B,) (see the docstring
        at the top for what it bounds in each mode)."""
        rec = self.recon_sum(out, x)
        if self.mode != "mse":
            # -ELBO = -log p(x|z) + KL       (bce: not a normalised likelihood)
            return rec + kl
        # Gaussian decoder N(x_mean, sigma^2 I) over D = 768 values:
        #   -log p(x|z) = sum_d (x_d - x_mean_d)^2 / (2 sigma^2) + D/2 log(2 pi sigma^2)
        # The training loss, rec / 256 + w * kl, equals (2 sigma^2 / 256) * (rec / (2 sigma^2) + kl)
        # when 2 sigma^2 = 256 w: minimising it maximises this ELBO with sigma^2 = 128 w.
        sigma2 = 0.5 * PIXELS * self.config.kl_weight
        d = x[0].numel()
        return rec / (2 * sigma2) + 0.5 * d * math.log(2 * math.pi * sigma2) + kl

    # -- training and validation ------------------------------------------------

    def train_step(self, model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
        out, mu, logvar = model(common.to_model_range(batch))
        recon = self.recon_sum(out, batch).mean() / PIXELS  # per pixel, averaged over the batch
        kl = kl_divergence(mu.float(), logvar.float()).mean()  # nats per image
        # Departure from the paper: the ELBO weighs the summed recon term and the
        # KL term equally; here recon is per pixel, i.e. the KL term is weighted by
        # 256 w = 0.128 (default w) per image. A small weight keeps reconstructions
        # sharp at the cost of a latent space that fits the prior less well.
        # loss = recon + w * KL   (Eq. 10 with the KL term reweighted and negated)
        loss = recon + self.kl_weight * kl
        return {"loss": loss, "recon": recon, "kl": kl}

    @torch.no_grad()
    def get_metrics(self, model: nn.Module, batch: Tensor) -> dict[str, float]:
        out, mu, logvar = model(common.to_model_range(batch))  # one z per image (the Trainer seeds it)
        kl = kl_divergence(mu.float(), logvar.float())  # (B,)
        recon = self.recon_sum(out, batch) / PIXELS      # (B,)
        metrics = {"recon": recon.mean().item(), "kl": kl.mean().item(),
                   "loss": (recon + self.kl_weight * kl).mean().item()}
        if not (self.mode == "mse" and self.config.kl_weight == 0):  # sigma = 0: no Gaussian to speak of
            nelbo = self.negative_elbo(out, batch, kl)
            metrics["nelbo"] = nelbo.mean().item()
            if self.mode == "ce":
                # bits per dimension = nelbo / (256 pixels * ln 2)
                metrics["bpd"] = (nelbo / (PIXELS * math.log(2))).mean().item()
        reconstruction = self.decode(model, mu)
        same = common.palette_index(reconstruction, self.palette) == common.palette_index(batch, self.palette)
        metrics["pixel_acc"] = same.float().mean().item()
        return metrics

    # -- decoding and sampling --------------------------------------------------

    def decode(self, model: nn.Module, z: Tensor, generator: torch.Generator | None = None,
               temperature: float = 0.0) -> Tensor:
        """Latent codes (B, latent_dim) -> sprites (B, 3, 16, 16) in [0, 1]: the
        decoder's mean (mse, bce) or, for ce, each pixel's most likely palette
        colour (temperature 0) or a draw from softmax(logits / temperature)."""
        out = model.decoder(z).float()
        if self.mode == "mse":
            return common.from_model_range(out)
        if self.mode == "bce":
            return torch.sigmoid(out)  # E[x_d] = p_d
        b, k = out.shape[0], out.shape[1]
        if temperature == 0:
            index = out.argmax(dim=1)  # (B, 16, 16)
        else:
            probs = F.softmax(out / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, k)  # (B*256, K)
            index = torch.multinomial(probs, 1, generator=generator).view(b, 16, 16)  # (B*256, 1) -> (B, 16, 16)
        return self.palette[index].permute(0, 3, 1, 2)  # (B, 16, 16, 3) -> (B, 3, 16, 16)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        # Ancestral sampling: z ~ p(z) = N(0, I), then x ~ p(x|z) (ce) or x = E[x|z] (mse, bce).
        z = torch.randn(n, model.latent_dim, generator=generator, device=generator.device)
        return self.decode(model, z, generator, self.config.temperature)

    @torch.no_grad()
    def images(self, model: nn.Module, val: Tensor, generator: torch.Generator) -> dict:
        order = torch.randperm(val.shape[0], generator=generator, device=generator.device).to(val.device)
        # Reconstructions from z = mu: each row of real sprites, then the same sprites decoded.
        reconstructions = common.reconstruction_strip(
            val, order, lambda real: self.decode(model, model.encoder(common.to_model_range(real))[0]))

        # Interpolation: z_t = (1 - t) mu_A + t mu_B, straight lines in latent space.
        assert val.shape[0] >= 2, "the interpolation picture needs at least 2 validation sprites"
        n_pairs = min(4, val.shape[0] // 2)
        a, b = val[order[:n_pairs]], val[order[n_pairs:2 * n_pairs]]
        mu_a, _ = model.encoder(common.to_model_range(a))
        mu_b, _ = model.encoder(common.to_model_range(b))
        t = torch.linspace(0, 1, 8, device=val.device)[None, :, None]  # (1, 8, 1)
        z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]                # (pairs, 8, latent)
        middle = self.decode(model, z.reshape(-1, model.latent_dim))   # (pairs * 8, 3, 16, 16)
        middle = middle.view(n_pairs, 8, 3, 16, 16)                    # (pairs, 8, 3, 16, 16)
        strip = torch.cat([a[:, None], middle, b[:, None]], dim=1)     # (pairs, 10, 3, 16, 16)
        return {"reconstructions": reconstructions,
                "interpolation": (strip.reshape(-1, 3, 16, 16), 10)}   # (pairs * 10, 3, 16, 16)


# -----------------------------------------------------------------------------
# Latent-space diagnostics (tutorial 02): posterior collapse and the prior hole
# -----------------------------------------------------------------------------

ACTIVE_KL = 0.01  # nats: a latent dimension whose mean KL is below this carries (almost) no information


def latent_stats(mu: Tensor, logvar: Tensor) -> dict[str, float]:
    """How an encoder uses its latent space, from q(z|x) = N(mu, diag exp(logvar)) of N sprites,
    mu and logvar (N, D):

      active_units   dims whose KL(q(z_j|x) || N(0, 1)), averaged over the sprites, exceeds
                     ACTIVE_KL nats. An inactive dim has q(z_j|x) = N(0, 1) for every x: the
                     decoder cannot learn anything from it ("posterior collapse" when all are).
      kl_dim_max, kl_dim_median   that mean KL per dim, in nats
      agg_mean_norm  ||m||, m the mean of the aggregate posterior q(z) = 1/N sum_x q(z|x)
      agg_var_min, agg_var_max    smallest and largest eigenvalue of q(z)'s covariance
                     S = Cov_x(mu) + mean_x diag(sigma^2) (law of total variance)
      agg_kl         KL(N(m, S) || N(0, I)) = 1/2 (tr S + m.m - D - log det S): 0 when q(z) has
                     the prior's first two moments. Samples come from the prior, so this
                     measures how far the codes the decoder learned from sit from where
                     samples are drawn."""
    mu, logvar = mu.double(), logvar.double()
    kl_dim = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).mean(0)  # (D,) closed-form KL per dim, mean over x
    m = mu.mean(0)  # (D,)
    S = torch.cov(mu.T, correction=0) + torch.diag(logvar.exp().mean(0))  # (D, D)
    eig = torch.linalg.eigvalsh(S)  # (D,) ascending
    d = mu.shape[1]
    agg_kl = 0.5 * (S.trace() + m @ m - d - torch.linalg.slogdet(S)[1])
    return {"active_units": int((kl_dim > ACTIVE_KL).sum()), "latent_dim": d,
            "kl_dim_max": float(kl_dim.max()), "kl_dim_median": float(kl_dim.median()),
            "agg_mean_norm": float(m.norm()), "agg_var_min": float(eig[0]), "agg_var_max": float(eig[-1]),
            "agg_kl": float(agg_kl)}


@torch.no_grad()
def latent_report(checkpoint: str, n: int = 256, seed: int = 0) -> dict:
    """latent_stats on the training sprites of a trained VAE, plus the sprite metrics of n
    samples decoded from the prior, z ~ N(0, I), and from the aggregate posterior, z ~ q(z|x)
    for random training sprites x: if the second set is much better, the prior draws codes
    the decoder was never trained on. Prints the figures on one line and returns them.
    A one-off command (tutorial 02 shows its output):
        python -c "import vae; vae.latent_report('runs/vae-ce/checkpoints/last.pt')"
    """
    device = torch.device("cpu")
    strategy, model, palette, config, _ = common.load_for_sampling(checkpoint, device, VAEStrategy, Config)
    data = common.load_sprites(config.data, device, config.palette_size, config.seed)
    mu, logvar = model.encoder(common.to_model_range(data.train))  # (N, D) each
    report = latent_stats(mu, logvar)
    gen = torch.Generator(device).manual_seed(seed)
    z_prior = torch.randn(n, model.latent_dim, generator=gen)  # (n, D) from p(z)
    pick = torch.randint(0, mu.shape[0], (n,), generator=gen)  # (n,) random training sprites
    z_agg = mu[pick] + (0.5 * logvar[pick]).exp() * torch.randn(n, model.latent_dim, generator=gen)  # from q(z)
    for name, z in (("prior", z_prior), ("aggregate", z_agg)):
        x = strategy.decode(model, z, gen, config.temperature)
        for k, v in common.sprite_metrics(x, data.train, palette).items():
            report[f"{name}/{k}"] = v
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
    return report


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    common.main(VAEStrategy, Config, argv)


if __name__ == "__main__":
    main()

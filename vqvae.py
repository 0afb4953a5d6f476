"""vqvae.py -- a VQ-VAE with a learned autoregressive prior, on 16x16 pixel-art sprites.

van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation
Learning", NeurIPS 2017, https://arxiv.org/abs/1711.00937

Two stages, trained one after the other by one command:

  stage 1, the VQ-VAE. An encoder maps a sprite x to a 4x4 grid of vectors
      z_e(x) (each of size D = 64). Each vector is replaced by its nearest
      entry of a codebook of K = 128 learned vectors e_1..e_K (Eq. 1-2), and a
      decoder maps that grid z_q(x) back to a sprite. A sprite becomes 16
      integers in [0, 128): a discrete code. Loss (Eq. 3):

          L = recon(x, decoder(z_q)) + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2

      sg = stop-gradient; the second term moves the codebook towards the
      encoder outputs, the third (the "commitment" term, beta = 0.25) keeps the
      encoder close to the codebook. The argmin has no gradient, so the
      decoder's gradient is copied straight through to the encoder.

  stage 2, the prior. A VQ-VAE has no useful prior of its own: p(z) is
      uniform over the 128^16 code grids, and 16 independent uniform codes
      decode to noise. So a small causal transformer (GPT-style) learns
      p(z) = prod_t p(z_t | z_<t) over the 16 codes in raster order, trained
      on the codes of the training sprites; sampling draws 16 codes from it
      one at a time and decodes them. `--sampler random` skips the prior
      (uniform codes) to show why it is needed.

Departure from the paper: the paper's prior is a PixelCNN; here it is a small
transformer (as in VQGAN, Esser et al. 2021), which is simpler to write
correctly for a sequence of only 16 codes.

Run (from the repository root; the dataset is prepared by download.py):

    python vqvae.py --epochs 500 --prior-epochs 300              # both stages
    python vqvae.py sample --checkpoint runs/vqvae/<run>/checkpoints/last.pt --n 64 --out grid.png
    python vqvae.py sample --checkpoint ... --sampler random --out noise.png
    python vqvae.py sample --checkpoint ... --temperature 0.8 --top-k 20 --out grid.png
    python vqvae.py --epochs 500 --prior-epochs 0 --no-restart-dead   # stage 1 only, no restarts
    python vqvae.py --resume runs/vqvae/<run>/checkpoints/last.pt   # continue a run, in either stage

One Trainer runs both stages: epochs 1..--epochs train the VQ-VAE, the next --prior-epochs the
prior, on the codes the frozen stage-1 model gives the (randomly flipped) training sprites. The
stage follows from the checkpoint's epoch, so --resume and Ctrl-C work in either; once the prior
has started, --epochs is fixed (the prior would no longer match its codes), --prior-epochs can grow.

Metrics (the Trainer prefixes train/ and val/; averaged over the split):

    loss          the objective of the current stage: recon + codebook +
                  beta * commitment in stage 1 (recon + beta * commitment with
                  --codebook-ema), the prior's nll in stage 2
    recon         reconstruction term per pixel: squared error summed over the
                  3 RGB values in [-1, 1] (mse), or cross-entropy in nats of the
                  pixel's palette index (ce); not comparable across the two
    codebook      ||sg[z_e] - e||^2, mean over the grid and the D dimensions
    commitment    ||z_e - sg[e]||^2, the same number in the forward pass (the
                  two terms differ in where their gradients go, not in value)
    pixel_acc     (val) fraction of pixels whose reconstruction, snapped to the
                  palette, has the right colour: comparable across --recon-loss
    codebook_usage (val) fraction of the K entries used by the validation
                  sprites' codes; logged every epoch, the codebook's health curve
    perplexity    (val) exp(entropy) of the code frequencies on the validation
                  split: the number of equally used entries it is worth (max K)
    dead_codes    (val/, stage 1) entries no training sprite used in the epoch
    restarted     (val/, stage 1) of those, how many were re-initialised
    nll           (stage 2) the prior's negative log-likelihood, nats per code
    bits_per_code (stage 2) nll / ln 2; uniform guessing scores log2(128) = 7
    sample_random/... (or sample_prior/... when --sampler random) the shared
                  sprite-quality metrics for the other sampler, on the same
                  --n-eval samples as the Trainer's sample/... metrics
    sample_prior/class_accuracy  (--condition runs, end of run) fraction of --n-eval prior
                  samples, classes balanced, whose class is the one asked for, at --guidance

Pictures (run folder and MLflow; every --sample-every epochs and at the end):
samples/ (the --sampler, prior by default), samples_random/ (the other
sampler), reconstructions/ (rows of real validation sprites, each above its
reconstruction) and codebook/ (the 32 most used codes on the validation split,
in order of use, each shown as the 4x4 pixels it draws in the first
validation sprite that uses it, enlarged 4x).

Results on the real data (default run, stage-1 choices, both samplers, the prior's overfitting): docs/learn/03-vqvae.md.
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
RECON_LOSSES = ("mse", "ce")
SAMPLERS = ("prior", "random")
GRID = 4                  # the encoder's output grid is GRID x GRID (16x16 sprites, two stride-2 convolutions)
N_CODES = GRID * GRID     # codes per sprite: the prior's sequence length


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------


@dataclass
class Config(common.TrainConfig):
    epochs: int = 500
    # stage 1: passes over the training sprites for the VQ-VAE (the prior then
    # trains for --prior-epochs more)
    sample_every: int = 50
    # write sample grids every this many epochs, counted over both stages (0 = only at the end)
    hidden: int = 64
    # channels of the encoder and decoder at 4x4 (half at 8x8); 64 gives about 140K
    # parameters with the codebook
    codebook_size: int = 128
    # K, entries in the codebook
    code_dim: int = 64
    # D, length of each codebook entry and of each encoder output vector
    beta: float = 0.25
    # weight of the commitment term ||z_e - sg[e]||^2 (Eq. 3)
    recon_loss: str = field(default="ce", metadata={"choices": RECON_LOSSES})
    # decoder likelihood: mse (Gaussian on RGB) or ce (categorical over the palette colours of each pixel)
    restart_dead: bool = True
    # after each stage-1 epoch, re-initialise entries no training sprite used from random encoder outputs
    codebook_ema: bool = False
    # update the codebook by exponential moving averages of its assigned encoder
    # outputs (paper, Appendix A.1) instead of by the codebook loss term
    codebook_decay: float = 0.99
    # gamma, the decay of those moving averages (with --codebook-ema)
    prior_epochs: int = 300
    # stage 2: passes over the training sprites' codes for the prior (0 = no prior)
    prior_dim: int = 128
    # width of the prior transformer (4 layers of 128 give about 0.8M parameters)
    prior_layers: int = 4
    # transformer blocks in the prior
    prior_heads: int = 4
    # attention heads per block (must divide --prior-dim)
    prior_dropout: float = 0.5
    # dropout in the prior, against overfitting a 0.8M-parameter prior to a few hundred sprites
    sampler: str = field(default="prior", metadata={"choices": SAMPLERS})
    # how codes are drawn: prior (the transformer) or random (uniform: shows why a prior is needed)
    temperature: float = 1.0
    # prior sampling: divide the logits by this (< 1: safer, more common codes)
    top_k: int = 0
    # prior sampling: draw only from the k most likely codes at each step (0 = all)
    condition: str = field(default="none", metadata={"choices": common.LABEL_KINDS})
    # class label the prior is conditioned on, as its first token (common.Labeller): none, colour (the
    # sprite's one non-black palette colour: 7 classes) or cluster (k-means on foreground masks)
    clusters: int = 8
    # shape clusters of --condition cluster
    p_uncond: float = 0.1
    # label dropout: the chance that a sprite's class token is replaced by the plain start token, so one
    # prior learns p(z | y) and p(z) (Ho and Salimans 2022's recipe, used here on a transformer)
    guidance: float = 2.0
    # classifier-free guidance on the prior's logits: l = l_uncond + w (l_cond - l_uncond); 0 = unconditional,
    # 1 = plain conditional (conditional checkpoints only)

    sample_flags = ("sampler", "temperature", "top_k", "guidance")  # what `vqvae.py sample` may override
    run_name_flags = ("recon_loss", "sampler")  # named in every MLflow run name (common.run_name)

    def __post_init__(self):
        super().__post_init__()  # also refuses a --recon-loss, --sampler or --condition not among the field's choices
        if self.hidden < 4 or self.hidden % 4:
            raise ValueError(f"--hidden must be a positive multiple of 4, got {self.hidden}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("--codebook-size must be at least 2 and --code-dim at least 1")
        if self.beta < 0 or self.prior_epochs < 0:
            raise ValueError("--beta and --prior-epochs cannot be negative")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ValueError(f"--codebook-decay must be in (0, 1), got {self.codebook_decay}")
        if self.prior_layers < 1 or self.prior_heads < 1 or self.prior_dim % self.prior_heads:
            raise ValueError(f"--prior-heads ({self.prior_heads}) must divide --prior-dim ({self.prior_dim}), "
                             f"and --prior-layers must be at least 1")
        if not 0.0 <= self.prior_dropout < 1.0:
            raise ValueError(f"--prior-dropout must be in [0, 1), got {self.prior_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.top_k <= self.codebook_size:
            raise ValueError(f"--top-k must be in [0, --codebook-size], got {self.top_k}")
        if self.clusters < 2 or not 0 <= self.p_uncond < 1 or self.guidance < 0:
            raise ValueError("--clusters must be at least 2, --p-uncond in [0, 1) and --guidance at least 0")


# What compare.py's registry and the tests know of this model (the keys: at the registry); the
# random-codes panel shows what the prior is for. TINY trains in seconds on 2 cores (the tests).
COMPARE = dict(panels=[("VQ-VAE (prior)", {"sampler": "prior"}), ("VQ-VAE (random codes)", {"sampler": "random"})],
               budgets={"vqvae": ("epochs", "VQ-VAE stage-1 epochs"), "prior": ("prior_epochs", "VQ-VAE prior epochs")},
               quick=dict(epochs=10, prior_epochs=10))
# prior_epochs=0 keeps `--epochs 1` a one-epoch run; the vqvae tests run both stages
TINY = dict(hidden=16, codebook_size=16, code_dim=8, prior_dim=32, prior_layers=1, prior_heads=2,
            prior_epochs=0, batch_size=16, lr=3e-3, n_samples=8, n_eval=16, sample_every=0)


# -----------------------------------------------------------------------------
# Stage 1 building blocks: encoder, vector quantizer, decoder
# -----------------------------------------------------------------------------
# Departure from the paper: its image model has two residual blocks of 256 channels on each side;
# sprites are tiny, so each side has one residual block of 64 channels (with a 16-channel bottleneck),
# and a 1x1 convolution maps the encoder's 64 channels to the code dimension D.


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the paper's residual block (Section 4.1)."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, bottleneck, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(bottleneck, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """x (B, 3, 16, 16) in [-1, 1] -> z_e (B, D, 4, 4): one D-vector per 4x4 patch."""

    def __init__(self, hidden: int, code_dim: int):
        super().__init__()
        h = hidden
        self.net = nn.Sequential(
            nn.Conv2d(3, h // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, h/2, 8, 8)
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1),              # (B, h, 4, 4)
            ResidualBlock(h, h // 4), nn.ReLU(),
            nn.Conv2d(h, code_dim, 1),                                 # (B, D, 4, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, D, 4, 4) -> (B, out_channels, 16, 16): RGB in [-1, 1] (mse) or
    palette logits (ce)."""

    def __init__(self, hidden: int, code_dim: int, out_channels: int):
        super().__init__()
        h = hidden
        self.net = nn.Sequential(
            nn.Conv2d(code_dim, h, 3, padding=1),                                # (B, h, 4, 4)
            ResidualBlock(h, h // 4), nn.ReLU(),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),    # (B, h/2, 8, 8)
            nn.ConvTranspose2d(h // 2, out_channels, 4, stride=2, padding=1),    # (B, out, 16, 16)
        )

    def forward(self, z_q: Tensor) -> Tensor:
        return self.net(z_q)


class VectorQuantizer(nn.Module):
    """The codebook e (K, D) and the nearest-neighbour lookup z_e -> z_q.

    Two ways to learn the codebook:
      gradient (default)  the codebook term ||sg[z_e] - e||^2 of Eq. 3 pulls
                          each used entry towards the encoder outputs assigned
                          to it, through the optimizer;
      EMA (--codebook-ema) no codebook loss: each entry is set to the running
                          average of the encoder outputs assigned to it
                          (Appendix A.1), N_i <- gamma N_i + (1 - gamma) n_i,
                          m_i <- gamma m_i + (1 - gamma) sum_j z_e_j,
                          e_i = m_i / N_i. This is k-means run online, one
                          batch at a time; it does not depend on the learning
                          rate and the paper reports faster learning with it.
    """

    def __init__(self, codebook_size: int, code_dim: int, use_ema: bool, decay: float):
        super().__init__()
        k = codebook_size
        self.use_ema, self.decay = use_ema, decay
        # Departure from the paper (which does not say): entries start uniform in
        # [-1/K, 1/K], a common choice. Restarts soon move unused ones onto the data.
        self.codebook = nn.Parameter(torch.empty(k, code_dim).uniform_(-1 / k, 1 / k), requires_grad=not use_ema)
        # EMA statistics (kept in both modes, so every checkpoint has the same keys)
        self.register_buffer("ema_count", torch.ones(k))                     # N_i
        self.register_buffer("ema_sum", self.codebook.detach().clone())      # m_i
        # How often each entry was chosen in this stage-1 epoch's training
        # steps: a buffer, so a mid-epoch checkpoint resumes it exactly.
        self.register_buffer("epoch_counts", torch.zeros(k))

    def nearest(self, z_e: Tensor) -> Tensor:
        """z_e (B, D, H, W) -> k (B, H, W), the index of the nearest entry (Eq. 1)."""
        b, d, h, w = z_e.shape
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
        e = self.codebook.float()
        # ||z - e_k||^2 = ||z||^2 - 2 z.e_k + ||e_k||^2, for all pairs at once
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)[None]  # (B*H*W, K)
        return dist.argmin(dim=1).view(b, h, w)

    def lookup(self, k: Tensor) -> Tensor:
        """k (B, H, W) -> z_q (B, D, H, W) = e_k (Eq. 2)."""
        return self.codebook[k].permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z_e (B, D, H, W) -> (z_q for the decoder, k, codebook term, commitment term)."""
        k = self.nearest(z_e)
        z_q = self.lookup(k).to(z_e.dtype)
        # ||sg[z_e] - e||^2: only the codebook gets this gradient
        codebook_loss = F.mse_loss(z_q.float(), z_e.detach().float())
        # ||z_e - sg[e]||^2: only the encoder gets this gradient
        commitment_loss = F.mse_loss(z_e.float(), z_q.detach().float())
        # Departure from the paper: both terms are means over the D dimensions
        # and the 16 grid cells instead of sums (recon is per pixel too); this
        # rescales all three terms alike, so the paper's weights 1 and beta keep
        # their meaning.
        #
        # The straight-through estimator (Section 3.2). Forward: z_e + (z_q - z_e)
        # = z_q, so the decoder sees the codebook vector. Backward: the bracket is
        # detached, so d(output)/d(z_e) = identity and the decoder's gradient with
        # respect to z_q is copied unchanged onto z_e. Why this works: z_q is the
        # nearest entry to z_e, so z_e ~ z_q, and the gradient at z_q says how the
        # decoder's input should move -- a good guess for how z_e should move.
        # The commitment term keeps z_e close to z_q so the guess stays good.
        z_q_st = z_e + (z_q - z_e).detach()
        return z_q_st, k, codebook_loss, commitment_loss

    @torch.no_grad()
    def ema_update(self, z_e: Tensor, k: Tensor) -> None:
        """One EMA step of the codebook (Appendix A.1) from a batch's z_e (B, D, H, W)
        and their assignments k (B, H, W)."""
        d = z_e.shape[1]
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)               # (N, D)
        onehot = F.one_hot(k.flatten(), self.codebook.shape[0]).float()     # (N, K)
        g = self.decay
        # N_i <- gamma N_i + (1 - gamma) n_i,   n_i = entries of the batch assigned to i
        self.ema_count.mul_(g).add_(onehot.sum(0), alpha=1 - g)
        # m_i <- gamma m_i + (1 - gamma) sum_{j assigned to i} z_e_j
        self.ema_sum.mul_(g).add_(onehot.T @ flat, alpha=1 - g)
        # Departure from the paper: Laplace smoothing of N (as in the authors'
        # Sonnet code) so an entry nobody uses never divides by ~0.
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + self.codebook.shape[0] * 1e-5) * n
        # e_i = m_i / N_i
        self.codebook.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def restart(self, dead: Tensor, pool: Tensor) -> int:
        """Re-initialise the entries where `dead` (K,) is True with random rows
        of `pool` (M, D), encoder outputs of training sprites. Returns how many.
        Randomness from torch's global RNG (seeded and checkpointed)."""
        n = int(dead.sum())
        if n == 0:
            return 0
        if n <= pool.shape[0]:  # distinct vectors where possible
            pick = torch.randperm(pool.shape[0], device=pool.device)[:n]
        else:
            pick = torch.randint(pool.shape[0], (n,), device=pool.device)
        fresh = pool[pick].to(self.codebook.dtype)
        self.codebook[dead] = fresh
        self.ema_sum[dead] = fresh  # with N_i = 1, the EMA mode's e_i = m_i / N_i is the new vector
        self.ema_count[dead] = 1.0
        return n


# -----------------------------------------------------------------------------
# Stage 2 building blocks: a small GPT over the 16 codes
# -----------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only
    (Vaswani et al. 2017, Eq. 1, with a causal mask)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 x (B, T, C)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))  # (B, H, T, C/H)
        # Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V, where M is -inf above the
        # diagonal: position t cannot look at the codes it has to predict later.
        att = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)  # (B, H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, T), True where s <= t
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = self.dropout(att) @ v                                   # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(b, t, c)                      # (B, T, C)
        return self.dropout(self.proj(y))


class TransformerBlock(nn.Module):
    """Pre-norm block as in GPT-2: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CodePrior(nn.Module):
    """p(z) = prod_t p(z_t | z_<t) over the 16 codes of a sprite in raster order.

    Input: tokens (B, T), T <= 16: a start token (id K) followed by the first
    T-1 codes. Output: logits (B, T, K); position t predicts code t from the
    start token and codes 0..t-1.

    Conditioning (--condition, n_classes > 0): class c's start token is id K + 1 + c,
    so the first token says which class to draw, p(z | y) = prod_t p(z_t | y, z_<t);
    the plain start token K is the null label (p(z), for guidance)."""

    def __init__(self, codebook_size: int, dim: int, layers: int, heads: int, dropout: float, n_classes: int = 0):
        super().__init__()
        self.start = codebook_size  # the start token's id: one past the codes
        self.n_classes = n_classes
        self.tok_emb = nn.Embedding(codebook_size + 1 + n_classes, dim)
        self.pos_emb = nn.Parameter(torch.zeros(N_CODES, dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size)
        for m in self.modules():  # GPT-2's initialisation: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        assert t <= N_CODES, f"the prior models {N_CODES} codes, got a sequence of {t}"
        x = self.dropout(self.tok_emb(tokens) + self.pos_emb[:t])  # (B, T, dim)
        return self.head(self.ln_f(self.blocks(x)))                # (B, T, K)

    def inputs_for(self, codes: Tensor, y: Tensor | None = None) -> Tensor:
        """codes (B, 16) -> the inputs that predict them: start token (of class y (B,)), codes 0..14."""
        start = torch.full_like(codes[:, :1], self.start) if y is None else self.start_token(y)[:, None]
        return torch.cat([start, codes[:, :-1]], dim=1)  # (B, 16)

    def start_token(self, y: Tensor) -> Tensor:
        """Classes y (B,) in 0..n_classes (n_classes = null) -> first tokens (B,): K + 1 + y, or K for null."""
        return torch.where(y >= self.n_classes, self.start, self.start + 1 + y)


# -----------------------------------------------------------------------------
# The model: both stages in one module, so one checkpoint holds everything
# -----------------------------------------------------------------------------


class VQVAE(nn.Module):
    def __init__(self, config: Config, out_channels: int, n_classes: int = 0):
        super().__init__()
        self.encoder = Encoder(config.hidden, config.code_dim)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.codebook_ema,
                                         config.codebook_decay)
        self.decoder = Decoder(config.hidden, config.code_dim, out_channels)
        self.prior = CodePrior(config.codebook_size, config.prior_dim, config.prior_layers,
                               config.prior_heads, config.prior_dropout, n_classes)
        # 0 until the prior starts training, then the number of stage-1 epochs
        # its codes came from: the checkpoint knows its stage.
        self.register_buffer("stage1_epochs", torch.zeros(()))

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Sprites (B, 3, 16, 16) in [0, 1] -> codes (B, 16) in raster order."""
        k = self.quantizer.nearest(self.encoder(common.to_model_range(x)))  # (B, 4, 4)
        return k.flatten(1)                                                 # (B, 16)


# -----------------------------------------------------------------------------
# Strategy: losses, sampling, codebook health and pictures
# -----------------------------------------------------------------------------


class VQVAEStrategy(common.Strategy):
    """Stage 1 trains the VQ-VAE on Eq. 3, stage 2 the prior on the codes; the stage follows from the epoch."""

    name = "vqvae"

    def __init__(self, config: Config, palette: Tensor):
        self.config = config
        self.palette = palette  # (P, 3) in [0, 1]: the ce decoder's classes
        self.stage = 1          # set by on_epoch_start; sampling and get_metrics outside a run see stage 1
        self.z_e_pool = None    # the last training batch's encoder outputs (N, D): restart material
        # --condition: the class of a sprite (common.Labeller, None when unconditional) and the
        # class `sample --class` asks for (None: one class per row of 8)
        self.labeller = common.make_labeller(config.condition, palette, config.data, config.clusters, config.seed)
        self.sample_class: int | None = None

    def total_epochs(self, config: Config) -> int:
        return config.epochs + config.prior_epochs

    def build_model(self, config: Config) -> nn.Module:
        out_channels = self.palette.shape[0] if config.recon_loss == "ce" else 3
        return VQVAE(config, out_channels, self.labeller.n_classes if self.labeller else 0)

    def describe(self, model: nn.Module) -> str:
        config = self.config
        count = lambda m: sum(p.numel() for p in m.parameters())
        stage1 = count(model.encoder) + count(model.quantizer) + count(model.decoder)
        return (f"vqvae: stage 1 = encoder {count(model.encoder):,} + codebook {count(model.quantizer):,} "
                f"({config.codebook_size} x {config.code_dim}) + decoder {count(model.decoder):,} = {stage1:,} "
                f"parameters (--recon-loss {config.recon_loss}); stage 2 = prior {count(model.prior):,}")

    # -- stages ---------------------------------------------------------------

    def stage_of(self, epoch: int) -> int:
        return 1 if epoch <= self.config.epochs else 2

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.stage = self.stage_of(epoch)
        done = int(model.stage1_epochs)
        if done and done != self.config.epochs:
            raise common.UserError(f"this checkpoint's prior was trained on the codes of a {done}-epoch VQ-VAE; "
                                   f"resume it with --epochs {done} (--prior-epochs may change)")
        if self.stage == 2 and not done:
            model.stage1_epochs.fill_(self.config.epochs)
            print(f"stage 2: training the prior on the codes of the training sprites "
                  f"(VQ-VAE frozen after {self.config.epochs} epochs)")

    # -- losses ---------------------------------------------------------------

    def recon_mean(self, out: Tensor, x: Tensor) -> Tensor:
        """The reconstruction term per pixel, averaged over the batch (the `recon`
        metric; vae.py's recon_sum is its per-sprite sum): decoder output
        (B, C, 16, 16), sprites x (B, 3, 16, 16) in [0, 1]."""
        out = out.float()
        if self.config.recon_loss == "mse":
            # sum over RGB of (x - x_hat)^2, x in [-1, 1]; mean over pixels and sprites
            return (out - common.to_model_range(x)).pow(2).sum(1).mean()
        # ce: -log p(palette index of the pixel | z_q), mean over pixels and sprites
        return F.cross_entropy(out, common.palette_index(x, self.palette))

    def prior_nll(self, model: nn.Module, codes: Tensor, y: Tensor | None = None) -> Tensor:
        """-log p(z_t | z_<t) (or p(z_t | y, z_<t) given classes y (B,)), nats per code, averaged over codes (B, 16)."""
        logits = model.prior(model.prior.inputs_for(codes, y))  # (B, 16, K)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))

    def train_step(self, model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
        if self.stage == 2:
            codes = model.codes(batch)  # no gradient: the VQ-VAE is frozen
            nll = self.prior_nll(model, codes, self.drop_labels(self.class_labels(batch)) if self.labeller else None)
            return {"loss": nll, "bits_per_code": nll / math.log(2)}

        z_e = model.encoder(common.to_model_range(batch))  # (B, D, 4, 4)
        z_q, k, codebook_loss, commitment_loss = model.quantizer(z_e)
        recon = self.recon_mean(model.decoder(z_q), batch)
        if self.config.codebook_ema:
            # the codebook is learned by the EMA update below, not by a loss term
            loss = recon + self.config.beta * commitment_loss
        else:
            # L = recon + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2       (Eq. 3)
            # The codebook term has weight 1, not beta: writing beta * (both
            # terms) would move the codebook 4x slower than the paper does.
            loss = recon + codebook_loss + self.config.beta * commitment_loss
        with torch.no_grad():  # bookkeeping for restarts and EMA
            q = model.quantizer
            q.epoch_counts += torch.bincount(k.flatten(), minlength=q.epoch_counts.shape[0]).float()
            self.z_e_pool = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # (B*16, D)
            if self.config.codebook_ema:
                q.ema_update(z_e.detach(), k)
        return {"loss": loss, "recon": recon, "codebook": codebook_loss, "commitment": commitment_loss}

    @torch.no_grad()
    def get_metrics(self, model: nn.Module, batch: Tensor) -> dict[str, float]:
        z_e = model.encoder(common.to_model_range(batch))
        z_q, k, codebook_loss, commitment_loss = model.quantizer(z_e)
        out = model.decoder(z_q)
        recon = self.recon_mean(out, batch)
        same = common.palette_index(self.decode_output(out), self.palette) == common.palette_index(batch, self.palette)
        codebook_weight = 0.0 if self.config.codebook_ema else 1.0
        metrics = {"recon": recon.item(), "codebook": codebook_loss.item(), "commitment": commitment_loss.item(),
                   "pixel_acc": same.float().mean().item(),
                   "loss": (recon + codebook_weight * codebook_loss + self.config.beta * commitment_loss).item()}
        if self.stage == 2:
            nll = self.prior_nll(model, k.flatten(1), self.class_labels(batch) if self.labeller else None)
            metrics.update(loss=nll.item(), nll=nll.item(), bits_per_code=nll.item() / math.log(2))
        return metrics

    # -- codebook health ------------------------------------------------------

    @torch.no_grad()
    def code_counts(self, model: nn.Module, sprites: Tensor) -> Tensor:
        """How often each entry is chosen by the codes of `sprites`: (K,) floats."""
        k = torch.cat([model.codes(sprites[i:i + 256]) for i in range(0, sprites.shape[0], 256)])
        return torch.bincount(k.flatten(), minlength=self.config.codebook_size).float()

    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, epoch: int, val: Tensor) -> dict[str, float]:
        counts = self.code_counts(model, val)
        p = counts / counts.sum()
        # perplexity = exp(H(p)) = exp(-sum_k p_k log p_k): K if all entries are equally used, 1 if one is
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        metrics = {"codebook_usage": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}
        if self.stage == 1:
            q = model.quantizer
            dead = q.epoch_counts == 0
            restarted = 0
            # Codebook collapse: an entry that no encoder output is near gets no
            # codebook gradient, so it stays unused forever, and the model works
            # with fewer codes. Departure from the paper: restart such entries at
            # random encoder outputs of training sprites (as Jukebox, Dhariwal et
            # al. 2020, does), where they are sure to be used. Not after the last
            # stage-1 epoch: the prior learns the codebook as it was validated.
            if self.config.restart_dead and epoch < self.config.epochs and self.z_e_pool is not None:
                restarted = q.restart(dead, self.z_e_pool)
            metrics.update(dead_codes=float(dead.sum()), restarted=float(restarted))
            q.epoch_counts.zero_()  # here, not at epoch start: a resumed epoch keeps its counts
        return metrics

    # -- decoding and sampling ------------------------------------------------

    def decode_output(self, out: Tensor) -> Tensor:
        """Decoder output (B, C, 16, 16) -> sprites (B, 3, 16, 16) in [0, 1]:
        the RGB mean (mse) or each pixel's most likely palette colour (ce)."""
        out = out.float()
        if self.config.recon_loss == "mse":
            return common.from_model_range(out)
        return self.palette[out.argmax(dim=1)].permute(0, 3, 1, 2)  # (B, 16, 16, 3) -> (B, 3, 16, 16)

    def decode(self, model: nn.Module, codes: Tensor) -> Tensor:
        """Code grids (B, 16) -> sprites (B, 3, 16, 16) in [0, 1] (vae.py's decode does this for z)."""
        z_q = model.quantizer.lookup(codes.view(-1, GRID, GRID))  # (B, 4, 4) -> (B, D, 4, 4)
        return self.decode_output(model.decoder(z_q))

    # -- conditioning and guidance (--condition) ---------------------------------

    def class_labels(self, images: Tensor) -> Tensor:
        """images (B, 3, 16, 16) in [0, 1] -> y (B,); no foreground -> the null label n_classes."""
        y = self.labeller(images)
        return torch.where(y >= 0, y, self.labeller.n_classes)

    def drop_labels(self, y: Tensor) -> Tensor:
        """Label dropout (Ho & Salimans 2022): each label becomes the null label with probability
        --p-uncond, one draw per sprite from the global RNG (seeded and checkpointed)."""
        drop = torch.rand(y.shape, device=y.device) < self.config.p_uncond  # (B,)
        return torch.where(drop, self.labeller.n_classes, y)

    def requested_classes(self, n: int, device: torch.device) -> Tensor:
        return common.requested_classes(self.labeller.n_classes, self.sample_class, n, device)

    def class_accuracy(self, samples: Tensor, y: Tensor) -> float:
        """Fraction of samples whose class (by the labeller of the training sprites) is the requested y."""
        return float((self.labeller(samples) == y).float().mean())

    def prior_logits(self, model: nn.Module, tokens: Tensor, y: Tensor | None) -> Tensor:
        """The prior's logits for the next code (n, K), given tokens (n, T) whose first token is
        replaced by class y's start token. Classifier-free guidance on the logits:
            l = l(y = null) + w (l(y) - l(y = null))
        i.e. p(z_t | .) proportional to p(z_t | z_<t) (p(z_t | y, z_<t) / p(z_t | z_<t))^w per code:
        the same extrapolation as diffusion.py's on eps, here on log-probabilities. Both
        branches in one batched call of 2n sequences; w = 0 or 1 needs only one."""
        if y is None:
            return model.prior(tokens)[:, -1].float()
        w, prior = self.config.guidance, model.prior
        null = torch.full_like(y, self.labeller.n_classes)
        with_start = lambda labels: torch.cat([prior.start_token(labels)[:, None], tokens[:, 1:]], dim=1)  # (n, T)
        if w == 0 or w == 1:
            return prior(with_start(null if w == 0 else y))[:, -1].float()
        both = prior(torch.cat([with_start(y), with_start(null)]))[:, -1].float()  # (2n, K)
        cond, uncond = both.chunk(2)
        return uncond + w * (cond - uncond)

    @torch.no_grad()
    def sample_codes(self, model: nn.Module, n: int, generator: torch.Generator, sampler: str,
                     y: Tensor | None = None) -> Tensor:
        """n code grids (n, 16): uniform (random) or from the prior, one code at a time
        (of the classes y (n,) for a conditional prior, guided at --guidance)."""
        device = generator.device
        k = self.config.codebook_size
        if sampler == "random":
            # z_t ~ Uniform{0..K-1}, independently: the VQ-VAE's own (useless) prior
            return torch.randint(k, (n, N_CODES), generator=generator, device=device)
        tokens = torch.full((n, 1), model.prior.start, dtype=torch.long, device=device)
        for _ in range(N_CODES):
            # z_t ~ softmax(logits(z_<t) / temperature), restricted to the top k if asked
            logits = self.prior_logits(model, tokens, y) / self.config.temperature  # (n, K)
            if self.config.top_k:
                kth = logits.topk(self.config.top_k, dim=-1).values[:, -1:]  # (n, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            z_t = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (n, 1)
            tokens = torch.cat([tokens, z_t], dim=1)
        return tokens[:, 1:]  # drop the start token: (n, 16)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, generator: torch.Generator, sampler: str | None = None,
               y: Tensor | None = None) -> Tensor:
        """n sprites; a conditional prior draws the classes y (n,) (default: requested_classes)."""
        if self.labeller is not None and y is None:
            y = self.requested_classes(n, generator.device)
        codes = self.sample_codes(model, n, generator, sampler or self.config.sampler, y)
        return self.decode(model, codes)

    @torch.no_grad()
    def sample_classes(self, model: nn.Module, y: Tensor, generator: torch.Generator, chunk: int = 256) -> Tensor:
        """Samples (n, 3, 16, 16) of the classes y (n,) from the prior, in chunks, at --guidance."""
        return torch.cat([self.sample(model, len(part), generator, "prior", part) for part in y.split(chunk)])

    # -- pictures and the end of the run --------------------------------------

    @torch.no_grad()
    def images(self, model: nn.Module, val: Tensor, generator: torch.Generator) -> dict:
        other = "random" if self.config.sampler == "prior" else "prior"
        pictures = {f"samples_{other}": (self.sample(model, self.config.n_samples, generator, other), 8)}

        # Reconstructions: each row of real validation sprites above the same sprites decoded.
        order = torch.randperm(val.shape[0], generator=generator, device=generator.device).to(val.device)
        pictures["reconstructions"] = common.reconstruction_strip(
            val, order, lambda real: self.decode(model, model.codes(real)))

        # The most used codes, one by one: the 4x4 pixels each code draws, cut from
        # the decoding of the first validation sprite that uses it, enlarged 4x.
        # (Decoding a code on its own, e.g. tiled over the grid, shows patterns
        # the decoder never saw in training: a real sprite is the honest context.)
        codes = torch.cat([model.codes(val[i:i + 256]) for i in range(0, val.shape[0], 256)])  # (N, 16)
        counts = torch.bincount(codes.flatten(), minlength=self.config.codebook_size)
        top = counts.argsort(descending=True, stable=True)[:32]
        top = top[counts[top] > 0]
        first = torch.stack([(codes == c).flatten().nonzero()[0, 0] for c in top])  # index into codes.flatten()
        sprite, cell = first // N_CODES, first % N_CODES
        decoded = self.decode(model, codes[sprite])                         # (n, 3, 16, 16)
        rows = (cell // GRID)[:, None] * 4 + torch.arange(4, device=cell.device)  # (n, 4) pixel rows of the cell
        cols = (cell % GRID)[:, None] * 4 + torch.arange(4, device=cell.device)   # (n, 4) pixel columns
        n = torch.arange(top.shape[0], device=cell.device)[:, None, None]
        patch = decoded.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # (n, 4, 4, 3)
        big = patch.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)     # (n, 16, 16, 3)
        pictures["codebook"] = (big.permute(0, 3, 1, 2), 8)                     # (n, 3, 16, 16)
        return pictures

    @torch.no_grad()
    def on_train_end(self, model: nn.Module, train: Tensor) -> dict[str, float]:
        """The shared sprite-quality metrics for the sampler the Trainer did not
        score, on the same number of samples with the same seed."""
        other = "random" if self.config.sampler == "prior" else "prior"
        gen = torch.Generator(train.device).manual_seed(self.config.seed + 2)
        n = self.config.n_eval
        x = torch.cat([self.sample(model, min(256, n - s), gen, other) for s in range(0, n, 256)])
        extra = {f"sample_{other}/{k}": v for k, v in common.sprite_metrics(x, train, self.palette).items()}
        if self.labeller is not None:  # balanced classes (i mod n_classes), from the prior
            y = torch.arange(n, device=train.device) % self.labeller.n_classes
            x = self.sample_classes(model, y, torch.Generator(train.device).manual_seed(self.config.seed + 2))
            extra["sample_prior/class_accuracy"] = self.class_accuracy(x, y)
        return extra


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    common.main(VQVAEStrategy, Config, argv)


if __name__ == "__main__":
    main()

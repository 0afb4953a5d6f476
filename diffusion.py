"""diffusion.py -- a denoising diffusion model (DDPM) with a small U-Net, sampled with DDPM or DDIM.

Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239
Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502

The idea in three lines:
  forward process  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): a sprite drowned in
                   Gaussian noise over T = 1000 small steps, in closed form (q_sample, Eq. 4);
  training         a U-Net eps_theta(x_t, t) learns to predict the noise that was added (Algorithm 1);
  sampling         start from pure noise and remove the predicted noise step by step: all 1000 steps
                   (DDPM, Algorithm 2) or 50 (DDIM, Eq. 12; deterministic when eta = 0).

Run (from the repository root):
    python diffusion.py                                # train the defaults (520 epochs; 15 min, 2 cores)
    python diffusion.py --epochs 400                   # longer; --help lists every flag
    python diffusion.py --resume runs/diffusion/<run>/checkpoints/last.pt   # continue a run
    python diffusion.py sample --checkpoint runs/diffusion/<run>/checkpoints/last.pt --n 64 --out grid.png
    python diffusion.py sample --checkpoint ... --sampler ddim --steps 50 --eta 0 --gif ddim.gif
    python diffusion.py sample --checkpoint ... --sampler ddpm           # 1000 ancestral steps
    python diffusion.py sample --checkpoint ... --sampler dpm++ --steps 15   # DPM-Solver++(2M), Lu et al. 2022
    python diffusion.py --eval-every-minutes 5 ...     # time to quality: score the EMA model every 5 minutes
    python diffusion.py --condition colour             # p(x | colour) and p(x) in one U-Net (label dropout)
    python diffusion.py sample --checkpoint ... --class red --guidance 3     # classifier-free guidance
(The tools -- bench, plot, the guidance sweep, labels -- are compare.py's.)

Levers beyond the paper, each a flag with its citation in Config: U-Net size (--channel-mult, --res-blocks),
cosine schedule (Nichol & Dhariwal 2021), v-prediction (Salimans & Ho 2022), min-SNR weighting (Hang et al.
2023), LR warm-up and cosine decay, DPM-Solver++ (Lu et al. 2022), autoguidance (Karras et al. 2024),
self-conditioning (Chen et al. 2022), the shifted cosine schedule (Hoogeboom et al. 2023), rectified flow
(--schedule flow --sampler euler --loss-weight none: Liu et al. 2022; tutorial 04), EDM's levels and
preconditioning (--schedule edm, Karras et al. 2022) and more EMA lengths in one run (--ema-extra, Karras et al.
2024); self-conditioning, the shift, flow and --ema-extra are off by default.
The defaults, chosen by measurement (tutorial 04): the small U-Net with one residual block per level, EDM's path
and preconditioning with P_mean -0.6, dropout 0.05, the lr schedule, 520 epochs, and DPM-Solver++ (20 steps) with
autoguidance w 2.5 at the levels t in [0.5, 0.9]. The README shows the flags of the reference model and of the
earlier defaults (cosine, min-SNR; two blocks per level; dropout 0.1).

Metrics (the shared ones are documented in common.py and the README):
    train/loss  noise-prediction MSE, mean over pixels of (eps - eps_theta(x_t, t))^2 (Algorithm 1),
                one random t per sprite (with --prediction v the MSE on v, with --loss-weight min-snr
                weighted per sprite, with --schedule edm EDM's lambda ||D - x_0||^2 (the default): values are
                not comparable across those flags)
    val/loss    the same on the validation sprites, with noise and t fixed (the Trainer reseeds), so
                epochs compare; it measures denoising, not sample quality -- the sample/ metrics do that
    sample/class_accuracy  (--condition runs, end of run) fraction of --n-eval samples, classes
                balanced, whose class (common.Labeller) is the one asked for, at --guidance
Pictures, every --sample-every epochs and at the end, from the EMA weights:
    samples/    a grid of sprites drawn with the configured sampler
    denoising/  the strip: for 4 validation sprites, x_t (upper row) and the model's predicted x_0
                (lower row) at t = 0, 50, 100, 200, 400, 599, 799, 999 (0 to 100% of T - 1)
    trajectory.gif  (end of the run) one DDIM run, frame by frame, from noise to 16 sprites
"""

from __future__ import annotations

import contextlib
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
SCHEDULES = ("linear", "cosine", "flow", "edm")
FLOW_PATHS = ("flow", "edm")  # the schedules on the path x_t = (1 - t) x_0 + t eps (euler, heun; edm also dpm++)
PREDICTIONS = ("eps", "v")
LOSS_WEIGHTS = ("none", "min-snr")
CLASS_WEIGHTS = ("none", "balanced")
LR_DECAYS = ("none", "cosine")
SAMPLERS = ("ddim", "ddpm", "dpm++", "euler", "heun")
FLOW_SAMPLERS = ("euler", "heun")  # the samplers of FLOW_PATHS, and only of them

# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------


@dataclass
class Config(common.TrainConfig):
    epochs: int = 520
    # passes over the training sprites (at batch 32, 25 optimizer steps each: 13,000 steps)
    batch_size: int = 32
    # sprites per optimizer step
    lr: float = 1e-3
    # AdamW peak learning rate (Ho et al. 2020: 2e-4 over 800k steps), shaped by
    # --warmup-steps and --lr-decay
    ema_decay: float = 0.995
    # EMA of the weights, used for validation and every sample; its time constant is 1 / (1 - decay)
    # steps (Ho et al. 2020: 0.9999, for runs of 800k steps)
    ema_extra: str = ""
    # more EMA decays kept in the same run, e.g. 0.99,0.999 (Karras et al. 2024, "Analyzing and improving the
    # training dynamics of diffusion models", Sec. 3: choose the EMA length after training): each one's val loss every
    # epoch (val/ema<decay>_loss, on val/loss's noise) and sprite metrics at the end (ema<decay>/...); the run's own
    # model stays --ema-decay's
    sample_every: int = 50
    # sample grid, denoising strip and sprite-quality metrics every this many epochs (0 = only at the end)
    base_channels: int = 24
    # U-Net width at 16x16 (24: 0.52M parameters, 0.99M with --res-blocks 2; 64 with 2: 7.0M); the widths at
    # 16x16, 8x8 and 4x4 are this times --channel-mult
    channel_mult: str = "1,2,4"
    # width multipliers of the three levels 16x16, 8x8, 4x4 (Ho et al. 2020: 1,2,2,2 on CIFAR-10)
    res_blocks: int = 1
    # residual blocks per level on each side of the U-Net (Ho et al. 2020: 2); the 4x4 middle has twice this.
    # 1 trains 1.7x the steps in the same FLOPs, and scores better than 2 at equal compute (tutorial 04)
    dropout: float = 0.05
    # dropout inside each residual block (Ho et al. 2020: 0.1 on CIFAR-10). 0.05 measured best at the default's
    # length: over 12 sampling seeds recall 0.770 against 0.741 at 0.1, precision and near copies level, the
    # lowest val loss; 0 spreads the samples (tutorial 04)
    timesteps: int = 1000
    # T, the number of noise levels of the forward process
    schedule: str = field(default="edm", metadata={"choices": SCHEDULES})
    # noise schedule: linear (Ho et al. 2020, beta 1e-4 to 0.02) or cosine (Nichol and Dhariwal 2021,
    # Eq. 17: alpha_bar falls slowly at both ends, so fewer of the T levels are almost pure noise) or flow
    # (Liu et al. 2022, "Flow straight and fast"; Lipman et al. 2022, "Flow matching"): x_t = (1 - t) x_0 + t eps,
    # t in [0, 1] seen by the U-Net as the level t (T - 1), velocity u = eps - x_0 as --prediction v, unweighted;
    # or edm (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models", Table 1):
    # the same path with sigma = t / (1 - t), ln sigma ~ N(--p-mean, 1.2^2) in training, the U-Net preconditioned
    # (edm_precond, sigma_data measured on the training sprites) and their rho = 7 levels in sampling (Eq. 5)
    log_snr_shift: float = 0.0
    # S, added to the cosine schedule's log SNR in nats: log SNR'(t) = log(alpha_bar_t / (1 - alpha_bar_t)) + S,
    # alpha_bar'_t = sigmoid(log SNR'(t)) (Hoogeboom et al. 2023, "simple diffusion", Sec. 3.1: their shift
    # 2 log(64 / d) for a d x d image against a 64x64 base is S = 2 log 4 = 2.77 at d = 16); S > 0 = less noise
    # at every t, S < 0 = more. 0 = off, |S| <= 10 (--schedule cosine only)
    p_mean: float = -0.6
    # --schedule edm: the mean P_mean of ln sigma in training, ln sigma ~ N(P_mean, 1.2^2) (Karras et al. 2022,
    # Table 1: -1.2, for 32x32 and larger); 0 puts the median training level at sigma = 1 (t = 0.5), as rectified
    # flow's; |P_mean| <= 5
    prediction: str = field(default="v", metadata={"choices": PREDICTIONS})
    # what the U-Net predicts: eps, the noise (Ho et al. 2020), or v = sqrt(alpha_bar) eps -
    # sqrt(1 - alpha_bar) x_0 (Salimans and Ho 2022, Sec. 4), well scaled at every noise level
    loss_weight: str = field(default="none", metadata={"choices": LOSS_WEIGHTS})
    # none (Ho et al.'s L_simple) or min-snr: weight each t by min(SNR_t, gamma) / SNR_t for eps,
    # min(SNR_t, gamma) / (SNR_t + 1) for v (Hang et al. 2023, "Efficient Diffusion Training via
    # Min-SNR Weighting"), so the easy low-noise levels stop dominating the gradient
    snr_gamma: float = 5.0
    # gamma of --loss-weight min-snr (Hang et al.'s choice: 5)
    warmup_steps: int = 100
    # linear learning-rate warm-up over this many optimizer steps (Goyal et al. 2017; 0 = none)
    lr_decay: str = field(default="cosine", metadata={"choices": LR_DECAYS})
    # none (constant --lr) or cosine: lr falls as 0.5 (1 + cos(pi progress)) to 0 at the last step
    # (Loshchilov and Hutter 2017, SGDR, without restarts)
    sampler: str = field(default="dpm++", metadata={"choices": SAMPLERS})
    # ddim (Song et al. 2021, --steps steps), ddpm (Ho et al. 2020, Algorithm 2: all T steps) or dpm++
    # (DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: second order, --steps steps); --schedule flow: euler
    # or heun (Karras et al. 2022, Algorithm 1, here on dx/dt = u_theta: 2 U-Net calls a step), --steps steps;
    # --schedule edm: euler, heun or dpm++
    steps: int = 20
    # model calls of ddim and dpm++: the sub-sequence of the T noise levels visited
    # (ignored by ddpm); uniform steps of euler and heun from t = 1 to 0
    eta: float = 0.0
    # DDIM noise scale: 0 = deterministic (same seed, same sprites), 1 = DDPM-like noise (ddim only)
    condition: str = field(default="none", metadata={"choices": common.LABEL_KINDS})
    # class label the U-Net is conditioned on (common.Labeller): none, colour (the sprite's one
    # non-black palette colour: 7 classes) or cluster (k-means on foreground masks: --clusters classes)
    clusters: int = 8
    # shape clusters of --condition cluster
    p_uncond: float = 0.1
    # label dropout: the chance that a training sprite's label is replaced by the null label, so one
    # network learns p(x | y) and p(x) (Ho and Salimans 2022, "Classifier-Free Diffusion Guidance": 0.1 to 0.2)
    class_weight: str = field(default="none", metadata={"choices": CLASS_WEIGHTS})
    # none, or balanced: each labelled sprite's loss is weighted by N / (K n_y) (its class's share of the
    # training sprites, inverted; mean weight 1), so a class of 15 sprites gets as much gradient as one of
    # 505. Each p(x | y) keeps its optimum (the weight is constant within a class); dropped labels keep
    # weight 1, so p(x) is not reweighted (--condition runs only)
    guidance: float = 2.0
    # classifier-free guidance w: eps = eps_uncond + w (eps_cond - eps_uncond); 0 = unconditional,
    # 1 = plain conditional, > 1 extrapolates away from p(x) (conditional checkpoints only)
    guide_at: float = 0.25
    # autoguidance's guide (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the EMA
    # weights after this fraction of the steps, kept in the checkpoint (the paper: 1/16; 1/4 guides better here)
    autoguidance: float = 2.5
    # autoguidance w (same paper): D = D_guide + w (D_main - D_guide) at each sampler step, 2 U-Net calls; 1 = off
    # (exactly the main model), > 1 steps away from the guide's errors (the paper: w ~ 2-3)
    guide_interval: str = "0.5,0.9"
    # lo,hi: autoguidance only at the sampler steps whose noise level t / (T - 1) is in [lo, hi], one U-Net call
    # elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"); 0,1 = every step
    self_cond: bool = False
    # self-conditioning (Chen, Zhang and Hinton 2022, "Analog Bits", Sec. 3.3): the U-Net also sees its previous
    # estimate x0_prev of x_0 (3 more input channels): the sampler's last step's, zeros at the first; in training,
    # for half the batches its own no-grad estimate from x0_prev = 0 (detached), else x0_prev = 0

    # what `diffusion.py sample` may override: the sampler, not what the U-Net learnt (a U-Net trained on T
    # levels would be sampled on another schedule without a word)
    sample_flags = ("sampler", "steps", "eta", "guidance", "autoguidance", "guide_interval")

    # Checkpoints written before a field existed were trained with these values (common.saved_config).
    LEGACY = dict(channel_mult="1,2,4", res_blocks=2, schedule="linear", prediction="eps", loss_weight="none",
                  warmup_steps=0, lr_decay="none", condition="none", guide_at=0.0, autoguidance=1.0,
                  guide_interval="0,1", log_snr_shift=0.0, self_cond=False, ema_extra="", p_mean=-1.2)

    def __post_init__(self):
        super().__post_init__()  # also refuses a value not among a field's choices (--sampler, --schedule, ...)
        if self.snr_gamma <= 0:
            raise ValueError(f"--snr-gamma must be positive, got {self.snr_gamma}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps cannot be negative, got {self.warmup_steps}")
        if not -10 <= self.log_snr_shift <= 10:
            raise ValueError(f"--log-snr-shift must be in [-10, 10], got {self.log_snr_shift}")
        if self.log_snr_shift and self.schedule != "cosine":
            raise ValueError(f"--log-snr-shift needs --schedule cosine, got --schedule {self.schedule}")
        try:
            decays = [float(d) for d in self.ema_extra.split(",")] if self.ema_extra else []
        except ValueError:  # not numbers
            decays = [-1.0]
        if not all(0 < d < 1 for d in decays):
            raise ValueError(f"--ema-extra must be decays in (0, 1) separated by commas, like 0.99,0.999, "
                             f"got {self.ema_extra!r}")
        if not -5 <= self.p_mean <= 5:
            raise ValueError(f"--p-mean must be in [-5, 5], got {self.p_mean}")
        if self.p_mean not in (Config.p_mean, EDM_P_MEAN) and self.schedule != "edm":  # EDM_P_MEAN: LEGACY's
            raise ValueError(f"--p-mean needs --schedule edm, got --schedule {self.schedule}")
        if self.res_blocks < 1:
            raise ValueError(f"--res-blocks must be at least 1, got {self.res_blocks}")
        mult = self.channel_mult.split(",")
        if len(mult) != 3 or not all(m.strip().isdigit() and int(m) >= 1 for m in mult):
            raise ValueError(f"--channel-mult must be three positive integers like 1,2,4, got {self.channel_mult!r}")
        if self.timesteps < 2:
            raise ValueError(f"--timesteps must be at least 2, got {self.timesteps}")
        if not 2 <= self.steps <= self.timesteps:
            raise ValueError(f"--steps must be between 2 and --timesteps ({self.timesteps}), got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"--eta cannot be negative, got {self.eta}")
        if self.base_channels < 2 or self.base_channels % 2:
            raise ValueError(f"--base-channels must be an even number >= 2, got {self.base_channels}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.clusters < 2:
            raise ValueError(f"--clusters must be at least 2, got {self.clusters}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"--p-uncond must be in [0, 1), got {self.p_uncond}")
        if not 0 <= self.guide_at < 1:
            raise ValueError(f"--guide-at must be in [0, 1), got {self.guide_at}")
        try:
            lo, hi = (float(v) for v in self.guide_interval.split(","))
        except ValueError:  # not two numbers
            lo = hi = -1.0
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"--guide-interval must be two numbers lo,hi with 0 <= lo <= hi <= 1, like 0.2,0.8, "
                             f"got {self.guide_interval!r}")
        samplers = FLOW_SAMPLERS + (("dpm++",) if self.schedule == "edm" else ())  # dpm++ needs sigma_max < inf
        if self.schedule in FLOW_PATHS and (self.sampler not in samplers or self.prediction != "v"
                                            or self.loss_weight != "none"):
            raise ValueError(f"--schedule {self.schedule} needs --sampler {' or '.join(samplers)}, --prediction v (the "
                             f"velocity u) and --loss-weight none, got --sampler {self.sampler} --prediction "
                             f"{self.prediction} --loss-weight {self.loss_weight}")
        if self.schedule not in FLOW_PATHS and self.sampler in FLOW_SAMPLERS:
            raise ValueError(f"--sampler {self.sampler} integrates the ODE of --schedule flow or edm; use ddim, "
                             f"ddpm or dpm++ with --schedule {self.schedule}")
        if self.autoguidance != 1 and not self.guide_at:  # also a checkpoint from before autoguidance (LEGACY)
            raise ValueError("--autoguidance needs a guide; this run keeps none (--guide-at 0, or trained before "
                             "autoguidance): use --autoguidance 1")


# What compare.py (its registry holds one line per model: the Strategy) and the
# tests know of this model, declared next to its Config; the keys are explained
# at compare.py's registry. TINY trains in a few seconds on 2 cores (the tests), on the
# cosine path of the DDPM samplers that most tests check (the edm and flow paths have tests of their own).
COMPARE = dict(panels=[("diffusion", {})], budgets={"diffusion": ("epochs", "diffusion epochs")},
               quick=dict(epochs=2))
TINY = dict(base_channels=8, timesteps=10, steps=5, batch_size=16, lr=1e-2, schedule="cosine", loss_weight="min-snr")


# -----------------------------------------------------------------------------
# The noise schedule (Ho et al. 2020, Sec. 4)
# -----------------------------------------------------------------------------

BETA_1, BETA_T = 1e-4, 0.02  # the paper's linear schedule for T = 1000


COSINE_S = 0.008  # Nichol & Dhariwal's offset: beta_1 is not vanishingly small


def cosine_schedule(T: int, device: torch.device, shift: float = 0.0) -> dict[str, Tensor]:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar_t = f(t) / f(0) with
    f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008; beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    clipped to <= 0.999 (their Sec. 3.2: near t = T the ratio goes to 0). alpha_bar
    falls almost linearly through the middle, where the linear schedule has
    already destroyed the sprite by t ~ 600. shift S (--log-snr-shift, Hoogeboom et al. 2023, Sec. 3.1):
    alpha_bar'_t = sigmoid(log(alpha_bar_t / (1 - alpha_bar_t)) + S), and beta_t from alpha_bar' as above."""
    t = torch.arange(T + 1, dtype=torch.float64)  # 0..T; index i + 1 is the paper's t = i + 1
    f = torch.cos((t / T + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2  # (T + 1,)
    beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # (T,)
    if shift:
        alpha_bar = torch.sigmoid(torch.logit(torch.cumprod(1 - beta, 0)) + shift)  # (T,) log SNR + S
        beta = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return schedule_from_beta(beta, device)


def linear_schedule(T: int, device: torch.device) -> dict[str, Tensor]:
    """Ho et al. 2020, Sec. 4: beta_t rising linearly from 1e-4 to 0.02."""
    return schedule_from_beta(torch.linspace(BETA_1, BETA_T, T, dtype=torch.float64), device)


def schedule_from_beta(beta: Tensor, device: torch.device) -> dict[str, Tensor]:
    """beta_t (T,) and everything the loss and the samplers derive from it,
    computed once in float64, stored as float32 on the device. Index
    t = 0..T-1 is the paper's t = 1..T. Also the log signal-to-noise ratio
    lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) that DPM-Solver++ steps in,
    and SNR_t = alpha_bar_t / (1 - alpha_bar_t) for min-SNR weighting."""
    alpha = 1.0 - beta
    alpha_bar = torch.cumprod(alpha, 0)  # alpha_bar_t = prod_{s <= t} alpha_s
    table = dict(beta=beta, alpha=alpha, alpha_bar=alpha_bar,
                 sqrt_alpha_bar=alpha_bar.sqrt(), sqrt_one_minus_alpha_bar=(1 - alpha_bar).sqrt(),
                 snr=alpha_bar / (1 - alpha_bar), log_snr=0.5 * (alpha_bar.log() - (1 - alpha_bar).log()))
    return {k: v.float().to(device) for k, v in table.items()}


def ddim_timesteps(T: int, steps: int) -> Tensor:
    """The DDIM sub-sequence tau, in sampling order: `steps` timesteps evenly
    spread from T-1 (pure noise) down to 0 (the last, least noisy level), e.g.
    999, 979, ..., 20, 0 for T = 1000 and 50 steps. Both ends are included:
    the classic off-by-one, range(0, T, T // steps) reversed, starts at 980 and
    never shows the model the noise level that x_T was drawn at."""
    assert 2 <= steps <= T, f"DDIM needs 2 <= steps <= T, got steps={steps}, T={T}"
    # spacing (T-1)/(steps-1) >= 1, so the rounded values stay strictly decreasing
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()  # (steps,)


# --schedule edm (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2) in training (--p-mean); levels (Eq. 5)
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = -1.2, 1.2, 0.002, 80.0, 7.0


def edm_precond(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Karras et al. 2022, Table 1, "Network and preconditioning": the denoiser is
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) on x = x_0 + sigma eps, with
      c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
      c_in = 1 / sqrt(sigma^2 + sigma_data^2),             c_noise = ln(sigma) / 4,
    chosen (their App. B.6) so that F's input c_in x and its target (x_0 - c_skip x) / c_out both have unit
    variance at every sigma when x_0 has std sigma_data, and the loss weight lambda = 1 / c_out^2 makes every sigma
    count alike."""
    root = (sigma ** 2 + sigma_data ** 2).sqrt()
    return sigma_data ** 2 / root ** 2, sigma * sigma_data / root, 1 / root, sigma.log() / 4


def edm_sigmas(steps: int, device: torch.device) -> Tensor:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1
    (N = steps): rho = 7 crowds the levels near sigma_min, where the sprite's detail is decided. (steps,)"""
    i = torch.arange(steps, device=device, dtype=torch.float64) / (steps - 1)
    lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
    return ((hi + i * (lo - hi)) ** EDM_RHO).float()


# -----------------------------------------------------------------------------
# Building blocks of the U-Net
# -----------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the integer timestep (the Transformer's position
    encoding, Vaswani et al. 2017, as in Ho et al. Sec. 4): t (B,) -> (B, dim),
    [sin(t w_0) .. sin(t w_{dim/2-1}), cos(t w_0) .. cos(t w_{dim/2-1})] with
    w_i = 10000^(-i / (dim/2)): nearby t get similar vectors, at every scale."""
    half = dim // 2
    w = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (dim/2,)
    angles = t.float()[:, None] * w[None, :]  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the paper when the width allows it (gcd keeps tiny test widths legal)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv -> + time embedding -> GroupNorm -> SiLU ->
    dropout -> 3x3 conv, added to the input (a 1x1 conv when the width changes).
    Every block sees the timestep, so every layer can adapt to the noise level."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(t_dim, c_out)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # as in Ho et al.'s code: each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.time_proj(temb)[:, :, None, None]  # (B, c_out) -> (B, c_out, 1, 1): one shift per channel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


# -----------------------------------------------------------------------------
# The model: eps_theta(x_t, t)
# -----------------------------------------------------------------------------


class UNet(nn.Module):
    """eps_theta: a noisy sprite x_t (B, 3, 16, 16) in about [-1, 1] and its
    timestep t (B,) -> the predicted noise (B, 3, 16, 16) (or v, --prediction v).
    Drawn for the reference widths (--channel-mult 1,2,4, --res-blocks 2):

        16x16   64 ch  2 blocks ------------------ skip ------------- 2 blocks  64 ch -> 3 ch
          | stride-2 conv                                               ^ nearest x2
         8x8   128 ch  2 blocks ---- skip ---- 2 blocks 128 ch
          | stride-2 conv                        ^ nearest x2
         4x4   256 ch  2 blocks  ->  2 blocks 256 ch

    No self-attention: Ho et al. add it at 16x16 for 32x32 images, to connect
    distant pixels. Here 16x16 is the whole sprite, and at 4x4 a 3x3 conv
    already sees (almost) all of it: after the two downsamplings each 4x4 cell
    covers a quarter of the sprite's width, so two 3x3 convs there span the
    entire image. Attention would add parameters and time, not reach.
    """

    def __init__(self, base: int = 64, dropout: float = 0.1, mult: tuple[int, int, int] = (1, 2, 4), blocks: int = 2,
                 n_classes: int = 0, self_cond: bool = False):
        super().__init__()
        c1, c2, c3 = (base * m for m in mult)  # widths at 16x16, 8x8, 4x4 (64, 128, 256 by default)
        self.t_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, self.t_dim), nn.SiLU(), nn.Linear(self.t_dim, self.t_dim))
        # Conditioning (--condition): one learned vector per class, added to the time embedding,
        # so every ResBlock sees "which class" exactly as it sees "which noise level". Row n_classes
        # is the null label of classifier-free guidance (no class: p(x)). Zero at the start: the
        # conditional model begins as the unconditional one. No classes: no such layer at all, and
        # an unconditional model has exactly the parameters (and checkpoints) it always had.
        self.n_classes = n_classes
        self.class_emb = nn.Embedding(n_classes + 1, self.t_dim) if n_classes else None
        if self.class_emb is not None:
            nn.init.zeros_(self.class_emb.weight)
        self.conv_in = nn.Conv2d(3, c1, 3, padding=1)
        block = lambda a, b: ResBlock(a, b, self.t_dim, dropout)
        stack = lambda a, b, k: nn.ModuleList([block(a, b)] + [block(b, b) for _ in range(k - 1)])  # k blocks, a -> b
        self.down1 = stack(c1, c1, blocks)
        self.downsample1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = stack(c1, c2, blocks)
        self.downsample2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.bottom = stack(c2, c3, 2 * blocks)
        self.up2 = stack(c3 + c2, c2, blocks)
        self.up1 = stack(c2 + c1, c1, blocks)
        self.norm_out = group_norm(c1)
        self.conv_out = nn.Conv2d(c1, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predicts eps = 0 at first: the loss starts at 1
        nn.init.zeros_(self.conv_out.bias)
        # --self-cond (Chen et al. 2022, Sec. 3.3): x0_prev as 3 more input channels. A conv of the concatenation
        # [x_t, x0_prev] is conv_in(x_t) + cond_in(x0_prev); bias-free and zero at first (built last: the other
        # layers draw the same weights), so x0_prev = 0 (None) adds exactly 0 and the model starts as the plain one.
        self.cond_in = nn.Conv2d(3, c1, 3, padding=1, bias=False) if self_cond else None
        if self.cond_in is not None:
            nn.init.zeros_(self.cond_in.weight)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, x0_prev: Tensor | None = None) -> Tensor:
        assert x.shape[1:] == (3, 16, 16) and t.shape == x.shape[:1], \
            f"expected x (B, 3, 16, 16) and t (B,), got {tuple(x.shape)} and {tuple(t.shape)}"
        temb = self.time_mlp(timestep_embedding(t, self.t_dim // 4))  # (B, t_dim)
        if self.class_emb is not None:  # y (B,) in 0..n_classes, n_classes = null; None = all null
            y = torch.full(t.shape, self.n_classes, device=t.device) if y is None else y  # (t: a float with flow)
            assert y.shape == t.shape, f"expected labels y {tuple(t.shape)}, got {tuple(y.shape)}"
            temb = temb + self.class_emb(y)  # (B, t_dim)
        else:
            assert y is None, "this U-Net was built without classes (--condition none)"
        # The blocks only ever use SiLU(temb), so it is applied once here.
        temb = F.silu(temb)  # (B, t_dim)
        # Shapes below for the reference widths 64, 128, 256.
        h = self.conv_in(x)  # (B, 64, 16, 16)
        if x0_prev is not None:  # --self-cond; None = zeros
            h = h + self.cond_in(x0_prev)
        for blk in self.down1:
            h = blk(h, temb)
        skip1 = h  # (B, 64, 16, 16)
        h = self.downsample1(h)  # (B, 64, 8, 8)
        for blk in self.down2:
            h = blk(h, temb)
        skip2 = h  # (B, 128, 8, 8)
        h = self.downsample2(h)  # (B, 128, 4, 4)
        for blk in self.bottom:
            h = blk(h, temb)  # (B, 256, 4, 4)
        # Departure from the paper: upsampling is nearest-neighbour without the extra 3x3 conv;
        # the first block after the concatenation convolves the upsampled features anyway.
        h = torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip2], dim=1)  # (B, 256 + 128, 8, 8)
        for blk in self.up2:
            h = blk(h, temb)  # (B, 128, 8, 8)
        h = torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip1], dim=1)  # (B, 128 + 64, 16, 16)
        for blk in self.up1:
            h = blk(h, temb)  # (B, 64, 16, 16)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 16, 16)


# -----------------------------------------------------------------------------
# Strategy: the loss, the samplers, the pictures
# -----------------------------------------------------------------------------


class DiffusionStrategy(common.Strategy):
    """DDPM training (Algorithm 1) and two samplers: DDPM ancestral sampling
    (Algorithm 2) and DDIM (Song et al. 2021, Eq. 12)."""

    name = "diffusion"

    def __init__(self, config: Config, palette: Tensor):
        self.config, self.palette = config, palette
        self.T = config.timesteps
        # beta_t, alpha_t, alpha_bar_t and their square roots, once, on the training device (flow reads none).
        self.schedule = cosine_schedule(self.T, palette.device, config.log_snr_shift) if config.schedule == "cosine" \
            else linear_schedule(self.T, palette.device)
        # --condition: the class of each sprite (common.Labeller; None when unconditional), the
        # class `sample --class` asks for (None: a grid with one class per row of 8), and the
        # labels of the sampling run in progress (set by `conditioned`, read by model_output).
        self.labeller = common.make_labeller(config.condition, palette, config.data, config.clusters, config.seed)
        self.sample_class: int | None = None
        self._y: Tensor | None = None
        self.guide, self._guide_net = None, None  # autoguidance: the guide's weights (after_step) and its U-Net
        self.emas = {float(d): None for d in config.ema_extra.split(",")} if config.ema_extra else {}  # --ema-extra
        self._sigma_data: float | None = None  # --schedule edm: measured when first needed, or the checkpoint's
        # --class-weight balanced: w_y = N / (K n_y) from the training split's class sizes n_y (K,)
        self.class_weights: Tensor | None = None
        if self.labeller is not None and config.class_weight == "balanced":
            y = self.class_labels(common.load_sprites(config.data, palette.device, config.palette_size, config.seed).train)
            n_y = torch.bincount(y, minlength=self.labeller.n_classes)[:self.labeller.n_classes].float()  # (K,)
            assert (n_y > 0).all(), f"--class-weight balanced: a class without training sprites ({n_y.tolist()})"
            self.class_weights = n_y.sum() / (len(n_y) * n_y)  # (K,), mean 1 over the training sprites

    @property
    def sigma_data(self) -> float:
        """--schedule edm: the std of the training sprites in [-1, 1] (Karras et al. 2022 take 0.5), measured on
        --data once and kept in the checkpoint, so sampling needs no data file; 0 for the other schedules."""
        if self.config.schedule != "edm":
            return 0.0
        if self._sigma_data is None:
            c = self.config
            self._sigma_data = float(common.to_model_range(common.load_sprites(c.data, self.palette.device,
                                                                               c.palette_size, c.seed).train).std())
        return self._sigma_data

    def build_model(self, config: Config) -> nn.Module:
        mult = tuple(int(m) for m in config.channel_mult.split(","))
        model = UNet(config.base_channels, config.dropout, mult, config.res_blocks,
                     self.labeller.n_classes if self.labeller else 0, config.self_cond)
        # channels_last (NHWC) weights: oneDNN's CPU convolutions then run in NHWC, and a U-Net
        # call on 16 sprites is ~1.1x as fast (measured, median of 10 interleaved calls on 2 cores);
        # training speed is unchanged. Same numbers either way: only the memory layout differs.
        return model.to(memory_format=torch.channels_last)

    def describe(self, model: nn.Module) -> str:
        parts = {"encoder (16x16, 8x8)": [model.conv_in, model.down1, model.downsample1, model.down2, model.downsample2]
                 + ([model.cond_in] if model.cond_in else []),
                 "bottom (4x4)": [model.bottom], "decoder (8x8, 16x16)": [model.up2, model.up1, model.norm_out, model.conv_out],
                 "time embedding MLP": [model.time_mlp]}
        if model.class_emb is not None:
            parts[f"class embedding ({model.n_classes} {self.config.condition} classes + null)"] = [model.class_emb]
        counts = {k: sum(p.numel() for m in ms for p in m.parameters()) for k, ms in parts.items()}
        return "U-Net parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + (
            f"; EDM sigma_data {self.sigma_data:.4f} (std of the training sprites in [-1, 1])" if self.sigma_data
            else "")

    # -- training -------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Eq. 4 in closed form: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
        for any t in one step -- no need to run the chain of t noisings."""
        if self.config.schedule in FLOW_PATHS:  # x_t = (1 - t) x_0 + t eps (_coef; Liu et al. 2022, Eq. 1)
            a, b = self._coef(t)
            return a * x0 + b * eps
        s = self.schedule
        return s["sqrt_alpha_bar"][t][:, None, None, None] * x0 + s["sqrt_one_minus_alpha_bar"][t][:, None, None, None] * eps

    def loss(self, model: nn.Module, batch: Tensor, drop_labels: bool = True) -> Tensor:
        """Algorithm 1: t ~ Uniform({1..T}), eps ~ N(0, I),
        minimise || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
        (the paper's simplified objective L_simple, Eq. 14).
        --prediction v: the target is v instead (Salimans & Ho 2022, see v_target);
        --loss-weight min-snr: each sprite's squared error is weighted by w_t (min_snr_weight);
        --condition: eps_theta(x_t, t, y) with each sprite's class y, replaced by the null
        label with probability --p-uncond when drop_labels (Ho & Salimans 2022, Algorithm 1);
        --self-cond: the U-Net is called through self_conditioned; --schedule edm: through preconditioned."""
        edm = self.config.schedule == "edm"
        model = self.preconditioned(model)
        model = self.self_conditioned(model) if self.config.self_cond else model
        x0 = common.to_model_range(batch)  # (B, 3, 16, 16) in [-1, 1]
        if self.config.schedule in FLOW_PATHS:  # t / (T - 1) = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024, Sec. 3.1)
            n = torch.randn(x0.shape[0], device=x0.device)  # (B,)
            if edm:  # logit(t) = ln(t / (1 - t)) = ln sigma ~ N(--p-mean, 1.2^2), clamped to sigma_min ... sigma_max
                n = (self.config.p_mean + EDM_P_STD * n).clamp(math.log(EDM_SIGMA_MIN), math.log(EDM_SIGMA_MAX))
            t = torch.sigmoid(n) * (self.T - 1)  # (B,) continuous
        else:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)  # (B,)
        eps = torch.randn_like(x0)
        weight = None
        if self.labeller is None:  # unconditional: the same random draws and calls as ever
            out = model(self.q_sample(x0, t, eps), t).float()
        else:
            y = self.class_labels(batch)
            y = self.drop_labels(y) if drop_labels else y
            out = model(self.q_sample(x0, t, eps), t, y).float()
            if self.class_weights is not None and drop_labels:  # --class-weight balanced, training only
                # (validation loss stays the plain mean): w_y per sprite, the null label keeps 1
                weight = torch.cat([self.class_weights, self.class_weights.new_ones(1)])[y]  # (B,)
        target = eps if self.config.prediction == "eps" else self.v_target(x0, t, eps)
        err = ((out - target) ** 2).mean(dim=(1, 2, 3))  # (B,) squared error per sprite
        if self.config.loss_weight == "min-snr":
            err = self.min_snr_weight(t) * err
        if edm:  # EDM's loss lambda(sigma) ||D - x_0||^2, lambda = 1 / c_out^2 (Table 1),
            # is lambda tau^2 ||u - (eps - x_0)||^2, since u - (eps - x_0) = (x_0 - D) / tau (preconditioned)
            tau = t / (self.T - 1)  # (B,)
            err = tau ** 2 / edm_precond(tau / (1 - tau), self.sigma_data)[1] ** 2 * err
        if weight is not None:
            err = weight * err
        return err.mean()

    def self_conditioned(self, model: nn.Module):
        """Self-conditioning in training (Chen et al. 2022, Sec. 3.3): with probability 1/2 per batch (one draw from
        the global RNG), x0_prev = the U-Net's own estimate of x_0 given x0_prev = 0, without gradient (detached);
        otherwise x0_prev = 0. The U-Net is then trained given x0_prev, as the samplers will call it."""
        def net(x_t: Tensor, t: Tensor, *y: Tensor) -> Tensor:
            x0_prev = None
            if torch.rand(()) < 0.5:
                with torch.no_grad():
                    x0_prev = self.x0_from_eps(x_t, t, self.as_eps(x_t, t, model(x_t, t, *y).float()))
            return model(x_t, t, *y, x0_prev=x0_prev)
        return net

    def preconditioned(self, model: nn.Module):
        """--schedule edm: the U-Net is Karras et al.'s F. On the flow's x_t, x = x_t / (1 - t) = x_0 + sigma eps with
        sigma = t / (1 - t), D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (edm_precond), returned as the velocity
        u = eps_hat - D with eps_hat = (x - D) / sigma (= (x_t - D) / t), so its loss, samplers and guidance serve
        unchanged.
        t is clamped to sigma_min ... sigma_max (the strip asks for t = 0 and 1). Other schedules: the model itself."""
        if self.config.schedule != "edm":
            return model

        def net(x_t: Tensor, t: Tensor, *y: Tensor, **kw) -> Tensor:
            tau = (t / (self.T - 1)).clamp(EDM_SIGMA_MIN / (1 + EDM_SIGMA_MIN), EDM_SIGMA_MAX / (1 + EDM_SIGMA_MAX))
            sigma = (tau / (1 - tau))[:, None, None, None]  # (B, 1, 1, 1)
            c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
            x = x_t * (1 + sigma)  # x_0 + sigma eps  (1 / (1 - t) = 1 + sigma)
            D = c_skip * x + c_out * model(c_in * x, c_noise.flatten(), *y, **kw).float()
            return (x - D) / sigma - D  # u = eps_hat - D: the flow's velocity, D its x_0
        return net

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor, clip: bool = True) -> Tensor:
        """x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Eq. 4 solved for x_0), clipped to [-1, 1]
        as the samplers clip it (unless clip=False): --self-cond's x0_prev."""
        a, b = self._coef(t)
        x0 = (x_t - b * eps) / a
        return x0.clamp(-1.0, 1.0) if clip else x0

    def _coef(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) for each t (B,), as (B, 1, 1, 1); --schedule flow: 1 - t / (T - 1),
        t / (T - 1) (the levels t are continuous there, t / (T - 1) in [0, 1] is the flow's time)."""
        if self.config.schedule in FLOW_PATHS:
            tau = t[:, None, None, None] / (self.T - 1)
            return 1 - tau, tau
        s = self.schedule
        return s["sqrt_alpha_bar"][t][:, None, None, None], s["sqrt_one_minus_alpha_bar"][t][:, None, None, None]

    def v_target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Salimans & Ho 2022, Sec. 4 and App. D: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.
        (Their alpha_t, sigma_t are our sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t).) v has unit
        variance at every t, unlike eps at t ~ 0 (it barely changes x_t) or x_0 at t ~ T.
        --schedule flow: the velocity u = dx_t/dt = eps - x_0 (v is dx/dphi on the path cos(phi) x_0 + sin(phi) eps),
        so the loss is flow matching's || u_theta(x_t, t) - (eps - x_0) ||^2 (Lipman et al. 2022, Eq. 23)."""
        if self.config.schedule in FLOW_PATHS:
            return eps - x0
        a, b = self._coef(t)
        return a * eps - b * x0

    def x0_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Invert v_target, using a^2 + b^2 = 1 (a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t)):
        x_0 = a x_t - b v,  eps = b x_t + a v.  --schedule flow (x_t = a x_0 + b eps, a + b = 1): x_0 = x_t - b u,
        eps = x_t + a u."""
        a, b = self._coef(t)
        if self.config.schedule in FLOW_PATHS:
            return x_t - b * v, x_t + a * v
        return a * x_t - b * v, b * x_t + a * v

    def min_snr_weight(self, t: Tensor) -> Tensor:
        """Hang et al. 2023, Eq. 7-8: SNR_t = alpha_bar_t / (1 - alpha_bar_t); the
        weight that turns each prediction's MSE into min(SNR_t, gamma) x (the MSE on x_0):
        eps-prediction  w_t = min(SNR_t, gamma) / SNR_t,
        v-prediction    w_t = min(SNR_t, gamma) / (SNR_t + 1).   (B,)"""
        snr = self.schedule["snr"][t]
        clipped = snr.clamp(max=self.config.snr_gamma)
        return clipped / snr if self.config.prediction == "eps" else clipped / (snr + 1)

    def eps_theta(self, model: nn.Module, x_t: Tensor, t: Tensor, x0_prev: Tensor | None = None) -> Tensor:
        """The samplers speak eps: the U-Net's output (guided, see model_output) as eps; x0_prev is
        --self-cond's input (ignored without it)."""
        return self.as_eps(x_t, t, self.model_output(model, x_t, t, x0_prev).float())

    def as_eps(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The U-Net's output as eps: itself, or converted from v when --prediction v."""
        return out if self.config.prediction == "eps" else self.x0_eps_from_v(x_t, t, out)[1]

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The Trainer multiplies --lr by this before optimizer step `step` (0-based):
        linear warm-up min(1, (step + 1) / warmup_steps) (Goyal et al. 2017), then with
        --lr-decay cosine 0.5 (1 + cos(pi p)), p = the fraction of post-warm-up steps done
        (Loshchilov & Hutter 2017)."""
        cfg = self.config
        factor = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_decay == "cosine" and step >= cfg.warmup_steps:
            p = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            factor *= 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        return factor

    def train_step(self, model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
        return {"loss": self.loss(model, batch)}

    @torch.no_grad()
    def get_metrics(self, model: nn.Module, batch: Tensor) -> dict[str, float]:
        # The Trainer reseeds the RNG before validation: the same t and eps every epoch.
        # A conditional model is validated with every true label (no dropout): the loss of p(x | y).
        return {"loss": float(self.loss(model, batch, drop_labels=False))}

    # -- conditioning and classifier-free guidance (--condition, Ho & Salimans 2022) ---

    def class_labels(self, images: Tensor) -> Tensor:
        """images (B, 3, 16, 16) in [0, 1] -> y (B,) in 0..n_classes-1; a sprite without
        a class (no foreground: never a real sprite) gets the null label n_classes."""
        y = self.labeller(images)
        return torch.where(y >= 0, y, self.labeller.n_classes)

    def drop_labels(self, y: Tensor) -> Tensor:
        """Label dropout: each label becomes the null label n_classes with probability
        --p-uncond (one uniform draw per sprite from the global RNG, which the Trainer
        seeds and checkpoints). The dropped sprites teach the same network p(x), the
        unconditional model that guidance needs; the rest teach p(x | y)."""
        drop = torch.rand(y.shape, device=y.device) < self.config.p_uncond  # (B,)
        return torch.where(drop, self.labeller.n_classes, y)

    def requested_classes(self, n: int, device: torch.device) -> Tensor:
        """The classes of n samples (common.requested_classes): --class, or one per row of 8."""
        return common.requested_classes(self.labeller.n_classes, self.sample_class, n, device)

    @contextlib.contextmanager
    def conditioned(self, y: Tensor | None):
        """Sampling with labels y (n,) (None: unconditional): the samplers' model calls go
        through model_output, which reads them."""
        self._y = y
        try:
            yield
        finally:
            self._y = None

    def model_output(self, model: nn.Module, x_t: Tensor, t: Tensor, x0_prev: Tensor | None = None) -> Tensor:
        """The U-Net's output for the samplers (class-guided by cfg_output), autoguided (Karras et al. 2024, Sec. 4:
        D = w D_main + (1 - w) D_guide) on eps or v: at a fixed x_t both are affine in D = x0_pred, alike for both
        networks, and w + (1 - w) = 1, so it is the paper's D. w = 1 or no guide yet: the main model alone.
        The guide (same architecture) gets the same --self-cond x0_prev."""
        out, w = self.cfg_output(model, x_t, t, x0_prev), self.config.autoguidance
        lo, hi = (float(v) for v in self.config.guide_interval.split(","))
        inside = (t >= lo * (self.T - 1)) & (t <= hi * (self.T - 1))  # (B,) --guide-interval, on the level index
        if w == 1 or self.guide is None or not inside.any():
            return out
        if self._guide_net is None:
            self._guide_net = self.net_of(self.guide)
        guide = self.cfg_output(self._guide_net.to(x_t.device).eval(), x_t, t, x0_prev)
        guided = guide + w * (out - guide)  # Karras et al. 2024, arXiv 2406.02507: D_guide + w (D_main - D_guide)
        return torch.where(inside[:, None, None, None], guided, out)  # the samplers' steps: all in or all out

    def net_of(self, weights: dict[str, Tensor]) -> nn.Module:
        """A U-Net of this config holding `weights` (a snapshot): built on the meta device, so no RNG draw and no copy
        (not under inference mode: no_grad calls use it too)."""
        with torch.inference_mode(False), torch.device("meta"):
            net = self.build_model(self.config)
            net.load_state_dict(weights, assign=True)
        return net

    def after_step(self, model: nn.Module, step: int, total_steps: int, trained: nn.Module | None = None) -> None:
        """At step round(--guide-at x total_steps) the EMA weights, copied, become the guide (no RNG draw).
        --ema-extra: each average e <- d e + (1 - d) theta of the trained weights theta, the update of the Trainer's
        EMA (torch.optim.swa_utils, whose first step copies theta), so e equals a run's EMA with --ema-decay d."""
        if self.guide is None and self.config.guide_at and step == max(1, round(self.config.guide_at * total_steps)):
            self.guide = {k: v.detach().clone() for k, v in model.state_dict().items()}
        theta = trained.state_dict() if self.emas else {}
        for d, avg in self.emas.items():
            if avg is None:
                self.emas[d] = {k: v.detach().clone() for k, v in theta.items()}
            else:
                torch._foreach_lerp_(list(avg.values()), [theta[k].detach() for k in avg], 1 - d)

    def extra_state(self) -> dict:
        extra = {f"ema{d:g}": avg for d, avg in self.emas.items() if avg is not None}
        if self.config.schedule == "edm":
            extra["sigma_data"] = self.sigma_data
        return extra if self.guide is None else {"guide": self.guide, **extra}

    def load_extra_state(self, extra: dict) -> None:
        self.guide, self._guide_net = extra.get("guide"), None
        self._sigma_data = extra.get("sigma_data", self._sigma_data)  # older edm checkpoints: measured on --data
        self.emas = {d: extra.get(f"ema{d:g}") for d in self.emas}  # one added on --resume starts at the resumed step

    def on_epoch_end(self, model: nn.Module, epoch: int, val: Tensor) -> dict[str, float]:
        """--ema-extra: each average's val loss, on the noise of val/loss (the same seed, batches and draws)."""
        out = {}
        for d, avg in ((d, avg) for d, avg in self.emas.items() if avg is not None):  # None: no step yet
            net = self.net_of(avg).eval()
            with torch.random.fork_rng(devices=[val.device] if val.device.type == "cuda" else []):
                torch.manual_seed(self.config.seed + 1)  # as the Trainer's validate
                loss = sum(self.get_metrics(net, b)["loss"] * len(b) for b in val.split(self.config.batch_size))
            out[f"ema{d:g}_loss"] = loss / len(val)
        return out

    def cfg_output(self, model: nn.Module, x_t: Tensor, t: Tensor, x0_prev: Tensor | None = None) -> Tensor:
        """The U-Net's output, guided when sampling with labels.
        Classifier-free guidance (Ho & Salimans 2022, Eq. 6, with their w + 1 written as our w):
            eps_guided = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null))
        Both branches in one batched U-Net call of 2n sprites: the same weights, one pass.
        With --prediction v the same line combines v: v and eps are linear in each other at a
        fixed x_t (eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v), so guiding v is
        exactly guiding eps. w = 0 needs only the null branch and w = 1 only the conditional
        one: a single plain call of n sprites, the same numbers as without guidance.
        --self-cond: both branches get x0_prev, the previous step's guided estimate."""
        y, w, model = self._y, self.config.guidance, self.preconditioned(model)
        sc = {"x0_prev": x0_prev} if self.config.self_cond and x0_prev is not None else {}  # None: zeros
        if y is None:
            return model(x_t, t, **sc)
        null = torch.full_like(y, self.labeller.n_classes)
        if w == 0:
            return model(x_t, t, null, **sc)
        if w == 1:
            return model(x_t, t, y, **sc)
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]),
                    **{k: torch.cat([v, v]) for k, v in sc.items()})  # (2n, 3, 16, 16)
        out_cond, out_uncond = out.chunk(2)  # (n, 3, 16, 16) each
        return out_uncond + w * (out_cond - out_uncond)

    def class_accuracy(self, samples: Tensor, y: Tensor) -> float:
        """Fraction of samples (n, 3, 16, 16) in [0, 1] whose class, by the labeller that
        labelled the training sprites, is the requested y (n,): for colour, the sample's
        majority non-black colour (after snapping to the palette); for cluster, the
        nearest centre of its foreground mask."""
        return float((self.labeller(samples) == y).float().mean())

    def on_train_end(self, model: nn.Module, train: Tensor) -> dict[str, float]:
        """Conditional runs: class accuracy of --n-eval samples with balanced classes
        (sample i asks for class i mod n_classes), seed + 2 as the sprite metrics. --ema-extra: each average's
        sprite metrics (ema<decay>/...), from the same seed as sample/."""
        n, device, out = self.config.n_eval, train.device, {}
        for d, avg in ((d, avg) for d, avg in self.emas.items() if avg is not None):
            x = common.draw_samples(self, self.net_of(avg).eval(), n, self.config.seed + 2, device)
            out.update({f"ema{d:g}/{k}": v for k, v in common.sprite_metrics(x, train, self.palette).items()})
        if self.labeller is not None:
            y = torch.arange(n, device=device) % self.labeller.n_classes
            x = self.sample_classes(model, y, torch.Generator(device).manual_seed(self.config.seed + 2))
            out["sample/class_accuracy"] = self.class_accuracy(x, y)
        return out

    @torch.no_grad()
    def sample_classes(self, model: nn.Module, y: Tensor, generator: torch.Generator, chunk: int = 256) -> Tensor:
        """Samples (n, 3, 16, 16) in [0, 1] of the classes y (n,), in chunks, at --guidance."""
        return torch.cat([self.sample(model, len(part), generator, part) for part in y.split(chunk)])

    # -- sampling -------------------------------------------------------------

    def sample(self, model: nn.Module, n: int, generator: torch.Generator, y: Tensor | None = None) -> Tensor:
        """n sprites; a conditional model draws the classes y (n,) (default: requested_classes)."""
        cfg = self.config
        if self.labeller is not None and y is None:
            y = self.requested_classes(n, generator.device)
        with self.conditioned(y):
            if cfg.sampler == "dpm++":
                x0 = self.sample_dpm_pp(model, n, generator, cfg.steps)
            elif cfg.schedule in FLOW_PATHS:
                x0 = self.sample_flow(model, n, generator, cfg.steps)
            elif cfg.sampler == "ddpm":
                x0 = self.sample_ddpm(model, n, generator)
            else:
                x0 = self.sample_ddim(model, n, generator, cfg.steps, cfg.eta)
        return common.from_model_range(x0)  # (n, 3, 16, 16) in [0, 1]

    @torch.inference_mode()
    def sample_ddpm(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        """Algorithm 2, all T steps: x_T ~ N(0, I); for t = T..1:
        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z,
        with sigma_t^2 = beta_t and z ~ N(0, I) (z = 0 at the last step). --self-cond: x0_prev from each eps_theta."""
        s, device = self.schedule, generator.device  # sampling runs where its generator is
        coef_eps = s["beta"] / s["sqrt_one_minus_alpha_bar"]  # (T,) beta_t / sqrt(1 - alpha_bar_t)
        inv_sqrt_alpha = s["alpha"].rsqrt()  # (T,)
        sigma = s["beta"].sqrt()  # (T,)
        ts = torch.arange(self.T, device=device)
        x, x0_prev = torch.randn(n, 3, 16, 16, generator=generator, device=device), None  # x_T
        for t in range(self.T - 1, -1, -1):  # Python ints: no host sync inside the loop
            eps_theta = self.eps_theta(model, x, ts[t].expand(n), x0_prev)  # one batched U-Net call per step
            if self.config.self_cond:
                x0_prev = self.x0_from_eps(x, ts[t].expand(n), eps_theta)
            x = inv_sqrt_alpha[t] * (x - coef_eps[t] * eps_theta)
            if t > 0:
                x = x + sigma[t] * torch.randn(x.shape, generator=generator, device=device)
        return x  # x_0, in about [-1, 1]

    @torch.inference_mode()
    def sample_ddim(self, model: nn.Module, n: int, generator: torch.Generator, steps: int, eta: float,
                    frames: list[Tensor] | None = None) -> Tensor:
        """DDIM (Song et al. 2021) over the sub-sequence tau of ddim_timesteps.
        From x_t to the next level s < t (Eq. 12, alpha there is our alpha_bar):

          x_s = sqrt(alpha_bar_s) * x0_pred                                  "predicted x_0"
              + sqrt(1 - alpha_bar_s - sigma_t^2) * eps_theta(x_t, t)        "direction pointing to x_t"
              + sigma_t * z                                                  "random noise", z ~ N(0, I)

          x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)
          sigma_t = eta * sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_s)   (Eq. 16)

        eta = 0: no noise, the same x_T always gives the same sprite; eta = 1: DDPM's noise level.
        After the last level (t = 0), s is the clean data: alpha_bar_s = 1, sigma = 0, x_s = x0_pred.
        `frames`, if given, collects x_T and every x_s in [0, 1] (for the GIF). --self-cond: x0_prev = last x0_pred."""
        s, device = self.schedule, generator.device
        tau = ddim_timesteps(self.T, steps).to(device)  # (steps,) T-1 ... 0
        ab = s["alpha_bar"][tau]  # (steps,) alpha_bar_t
        ab_next = torch.cat([ab[1:], ab.new_ones(1)])  # (steps,) alpha_bar_s of the next level; 1 after t = 0
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).sqrt()  # (steps,) Eq. 16
        dir_coef = (1 - ab_next - sigma ** 2).clamp(min=0).sqrt()  # (steps,) clamp: rounding below 0
        sqrt_ab, sqrt_1m_ab, sqrt_ab_next = ab.sqrt(), (1 - ab).sqrt(), ab_next.sqrt()
        x, x0_pred = torch.randn(n, 3, 16, 16, generator=generator, device=device), None  # x_T
        if frames is not None:
            frames.append(common.from_model_range(x))
        for i in range(steps):  # Python ints index device tensors: no host sync inside the loop
            eps_theta = self.eps_theta(model, x, tau[i].expand(n), x0_pred)  # one batched U-Net call per step
            x0_pred = (x - sqrt_1m_ab[i] * eps_theta) / sqrt_ab[i]
            # Departure from the paper: x0_pred is clipped to the data range [-1, 1] (as in Ho et al.'s
            # code), and eps recomputed from the clipped x0_pred so both terms describe the same x_t.
            x0_pred = x0_pred.clamp(-1.0, 1.0)
            eps_theta = (x - sqrt_ab[i] * x0_pred) / sqrt_1m_ab[i]
            x = sqrt_ab_next[i] * x0_pred + dir_coef[i] * eps_theta
            if eta > 0:
                x = x + sigma[i] * torch.randn(x.shape, generator=generator, device=device)
            if frames is not None:
                frames.append(common.from_model_range(x))
        return x  # x_0, in [-1, 1]

    @torch.inference_mode()
    def sample_dpm_pp(self, model: nn.Module, n: int, generator: torch.Generator, steps: int,
                      frames: list[Tensor] | None = None) -> Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the
        probability-flow ODE solved in lambda_t = log(alpha_t / sigma_t) (alpha_t = sqrt(alpha_bar_t),
        sigma_t = sqrt(1 - alpha_bar_t)), with the data prediction x0_theta = (x_t - sigma_t eps_theta) / alpha_t,
        second order by reusing the previous step's x0_theta (multistep: one model call per step).
        From level t_{i-1} to t_i, with h_i = lambda_{t_i} - lambda_{t_{i-1}}:

          first step      x_{t_1} = sigma_{t_1} / sigma_{t_0} x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x0_0
          later steps     r_i = h_{i-1} / h_i,  D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}
                          x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

        Same levels as DDIM (ddim_timesteps: T-1 ... 0, `steps` model calls); after t = 0 the
        clean data has sigma = 0, lambda = infinity, and the update reduces to x = x0_theta
        (first order at the last step, as DDIM ends). DDIM is exactly the first-order
        update (D_i = x0_{i-1}); the second-order term cancels most of its error per step.
        --self-cond: the U-Net also gets x0_prev, the previous step's x0_theta. --schedule edm: the flow's path,
        alpha_t = 1 - t = 1 / (1 + sigma), sigma_t = t, lambda = -ln sigma, at Eq. 5's levels (sigma_max 80 to 0.002),
        from x = t_0 z as sample_flow. `frames` as in sample_ddim."""
        s, device = self.schedule, generator.device
        if self.config.schedule == "edm":
            sig = edm_sigmas(steps, device)  # (steps,) Karras et al.'s sigma, 80 ... 0.002
            tau, alpha, sigma, lam = sig / (1 + sig) * (self.T - 1), 1 / (1 + sig), sig / (1 + sig), -sig.log()
            x = torch.randn(n, 3, 16, 16, generator=generator, device=device) * sigma[0]
        else:
            tau = ddim_timesteps(self.T, steps).to(device)  # (steps,) T-1 ... 0
            alpha, sigma, lam = s["sqrt_alpha_bar"][tau], s["sqrt_one_minus_alpha_bar"][tau], s["log_snr"][tau]
            x = torch.randn(n, 3, 16, 16, generator=generator, device=device)  # x_T
        x0_prev, h_prev = None, None
        if frames is not None:
            frames.append(common.from_model_range(x))
        for i in range(steps):
            # one batched U-Net call per step; --self-cond's x0_prev clipped, as in training
            sc = x0_prev.clamp(-1.0, 1.0) if self.config.self_cond and x0_prev is not None else None
            eps_theta = self.eps_theta(model, x, tau[i].expand(n), sc)
            # Departure from the paper's plain form: x0_theta clipped to the data range [-1, 1],
            # as in sample_ddim (Lu et al.'s "thresholding" for data prediction, Sec. 5, in its simplest form).
            # Not on the EDM path, as Euler and Heun there: clipping cost colour on it (tutorial 04).
            x0 = self.x0_from_eps(x, tau[i].expand(n), eps_theta, clip=self.config.schedule != "edm")
            if i == steps - 1:
                if frames is not None:
                    frames.append(common.from_model_range(x0))
                return x0  # t = 0 -> clean data: sigma = 0, so x = x0_theta
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                d = x0  # first step: first order (= DDIM)
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
            if frames is not None:
                frames.append(common.from_model_range(x))
        return x  # not reached: steps >= 2

    @torch.inference_mode()
    def sample_flow(self, model: nn.Module, n: int, generator: torch.Generator, steps: int,
                    frames: list[Tensor] | None = None) -> Tensor:
        """--schedule flow: dx_t/dt = u_theta(x_t, t) from x_1 ~ N(0, I) to t = 0 in `steps` steps h = 1 / steps
        (Liu et al. 2022, Sec. 2.1), t_{i+1} = t_i - h:
          euler  x_{t_{i+1}} = x_{t_i} - h u_theta(x_{t_i}, t_i)                (DDIM, eta = 0, on this path)
          heun   x' = Euler's x_{t_{i+1}};  x_{t_{i+1}} = x_{t_i} - h/2 (u_theta(x_{t_i}, t_i) + u_theta(x', t_{i+1}))
        (Karras et al. 2022, Algorithm 1; its last step is Euler, sigma = 0; u_theta at t = 0 exists, so not here).
        Both guidances combine u (affine in eps at a fixed x_t). No clipping (but of --self-cond's x0_prev).
        `frames` as in sample_ddim.
        --schedule edm: the levels t = sigma / (1 + sigma) of Eq. 5's sigmas, then 0; x_{t_0} = t_0 z, i.e.
        x = sigma_max z (their Algorithm 1; x_0's share (1 - t_0) x_0 is ignored, as there). On this path Euler is their
        Euler step in sigma (both are DDIM); Heun's correction is taken in t, not sigma (a departure)."""
        device, x0_prev = generator.device, None  # x0_prev: --self-cond's input, from the last step's u
        u_theta = lambda x, t, x0p: self.model_output(model, x, t.expand(n), x0p).float()
        if self.config.schedule == "edm":
            sigma = edm_sigmas(steps, device)
            ts = torch.cat([sigma / (1 + sigma), sigma.new_zeros(1)]) * (self.T - 1)  # (steps + 1,)
        else:
            ts = torch.linspace(self.T - 1, 0, steps + 1, device=device)  # (steps + 1,) t (T - 1), t = 1 ... 0
        x = torch.randn(n, 3, 16, 16, generator=generator, device=device) * (ts[0] / (self.T - 1))  # x_1 (flow)
        frames = [] if frames is None else frames
        frames.append(common.from_model_range(x))
        for i in range(steps):
            h = (ts[i] - ts[i + 1]) / (self.T - 1) if self.config.schedule == "edm" else 1 / steps  # flow: uniform
            u = u_theta(x, ts[i], x0_prev)
            if self.config.self_cond:  # --self-cond: the next calls' x0_prev, x_0 = x_t - t u, clipped as in training
                x0_prev = self.x0_eps_from_v(x, ts[i].expand(n), u)[0].clamp(-1.0, 1.0)
            x_next = x - h * u
            if self.config.sampler == "heun":
                x_next = x - h / 2 * (u + u_theta(x_next, ts[i + 1], x0_prev))
            x = x_next
            frames.append(common.from_model_range(x))
        return x  # x_0

    # -- pictures ---------------------------------------------------------------

    def trajectory(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        """For the GIF: one DDIM run (--steps, --eta; flow and edm: their sampler, on edm dpm++ too) frame by
        frame, x_T ... x_0, then the final sprites snapped to the palette as they appear in grids.
        Returns (steps + 2, n, 3, 16, 16) in [0, 1]."""
        frames: list[Tensor] = []
        y = self.requested_classes(n, generator.device) if self.labeller is not None else None
        with self.conditioned(y):
            if self.config.schedule == "edm" and self.config.sampler == "dpm++":
                x0 = self.sample_dpm_pp(model, n, generator, self.config.steps, frames)
            elif self.config.schedule in FLOW_PATHS:
                x0 = self.sample_flow(model, n, generator, self.config.steps, frames)
            else:
                x0 = self.sample_ddim(model, n, generator, self.config.steps, self.config.eta, frames)
        frames.append(common.snap_to_palette(common.from_model_range(x0), self.palette))
        return torch.stack(frames)  # (steps + 2, n, 3, 16, 16)

    @torch.no_grad()
    def images(self, model: nn.Module, val: Tensor, generator: torch.Generator) -> dict:
        """The denoising strip: 4 validation sprites noised to x_t by q_sample at
        8 levels t (upper row of each pair) and the model's one-shot estimate
        x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t) (lower row).
        At large t the division by sqrt(alpha_bar_t) (0.006 at t = 999) magnifies
        every error in eps_theta: one step cannot denoise there, which is why
        samplers take many small ones."""
        s = self.schedule
        x0 = common.to_model_range(val[:4])  # (4, 3, 16, 16)
        k = x0.shape[0]
        levels = [0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]
        t = torch.tensor([round(f * (self.T - 1)) for f in levels], device=x0.device)  # (8,) 0, 50, ..., 999
        x0_rep = x0.repeat_interleave(len(levels), 0)  # (4 * 8, 3, 16, 16): sprite-major
        t_rep = t.repeat(k)  # (4 * 8,)
        eps = torch.randn(x0_rep.shape, generator=generator, device=x0.device)
        x_t = self.q_sample(x0_rep, t_rep, eps)
        # a conditional model is told each sprite's true class (and guided at --guidance)
        y = self.class_labels(val[:4]).repeat_interleave(len(levels)) if self.labeller is not None else None
        with self.conditioned(y):
            if self.config.schedule in FLOW_PATHS:  # x0_pred = x_t - t u: no division by 1 - t
                x0_pred = self.x0_eps_from_v(x_t, t_rep, self.model_output(model, x_t, t_rep).float())[0]
            else:
                eps_theta = self.eps_theta(model, x_t, t_rep)
                x0_pred = (x_t - s["sqrt_one_minus_alpha_bar"][t_rep][:, None, None, None] * eps_theta) \
                    / s["sqrt_alpha_bar"][t_rep][:, None, None, None]
        rows = torch.stack([x_t.view(k, len(levels), 3, 16, 16), x0_pred.view(k, len(levels), 3, 16, 16)], 1)
        strip = rows.reshape(k * 2 * len(levels), 3, 16, 16)  # (4, 2, 8, ...) -> rows: x_t, x0_pred per sprite
        return {"denoising": (common.from_model_range(strip), len(levels))}


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    # the tools that once were modes here live in compare.py; their old spelling names the new one
    common.main(DiffusionStrategy, Config, argv, moved={m: f"python compare.py {m}" for m in ("plot", "guidance", "labels")})


if __name__ == "__main__":
    main()

"""common.py -- the shared boilerplate behind vae.py, vqvae.py and diffusion.py.

Plumbing only: the architectures, losses, samplers and model-specific metrics live in
the model files. Here is what every model needs and what is easy to get subtly wrong
when written three times: bounds on input, Config dataclasses as flags, device, data
and the k-means palette, class labels, pictures, sprite-quality metrics, the Strategy
a model file implements, fail-soft MLflow, atomic checkpoints, the one training loop
(AdamW, EMA, AMP, clipping, resume, Ctrl-C, NaN guard) with its locked run folder,
`python X.py sample`, and the --amp decision. Why each section is shared and stays in
this one file: docs/learn/00-strategy-pattern.md, "What is in common.py, and why".
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import dataclasses
import datetime
import inspect
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import download  # the data pipeline (NumPy + Pillow only): dataset paths, grids, atomic writes

Tensor = torch.Tensor


class UserError(Exception):
    """A problem the user can fix: printed as one line, `error: ...`, exit status 2, no traceback."""


# -----------------------------------------------------------------------------
# Bounds on input: sizes, sampling scales, checkpoints
# -----------------------------------------------------------------------------
# Every value that sizes an allocation or scales a sampler is checked once, before anything
# is allocated: past these a run would fail in the allocator or sample NaN, not refuse in one line.

SPRITES_MAX = 4096          # sprites one grid, score or `sample` draws: 4096 x 3 x 16 x 16 float32 = 12 MB
PARAMS_MAX = 100_000_000    # parameters of a model: 0.4 GB fp32, 1.6 GB with AdamW's two moments and an EMA
SEED_MAX = 2**32 - 1        # NumPy's seeds are 32-bit
BOUNDS = {  # Config field -> (least, most) allowed; a field a model does not have is skipped
    "n_samples": (1, SPRITES_MAX), "n_eval": (1, SPRITES_MAX),
    "timesteps": (2, 100_000),  # T: the schedule holds T float64s per coefficient
    "prior_dim": (1, None),
    # sampling scales: past these, logits / temperature, sigma_t or w (l_cond - l_uncond) overflow float32
    # (3.4e38) and softmax or the sampler gives NaN; the docs use temperatures 0.7 to 1, eta 0 to 1, w 0 to 8
    # (a negative value gets the model's own message, from its Config)
    "temperature": (1e-3, 1e3), "eta": (None, 1.0), "guidance": (None, 100.0), "autoguidance": (0.0, 100.0),
}
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a model's name: a registry key, its file's stem
DEVICES = r"auto|cpu|mps|cuda(:\d+)?"       # what --device accepts


def check_range(flag: str, value, least=None, most=None) -> None:
    """One line for a value outside [least, most] (NaN is outside every range)."""
    inside = (least is None or value >= least) and (most is None or value <= most)
    if not inside or (isinstance(value, float) and not math.isfinite(value)):
        span = f"between {least} and {most}" if least is not None and most is not None else \
            f"at least {least}" if least is not None else f"at most {most}"
        raise UserError(f"{flag} must be {span}, got {value}; use a value in that range (common.BOUNDS says why)")


def check_model_size(strategy, config) -> None:
    """Count the parameters on the meta device (shapes, no memory): --latent-dim 400000000 allocates nothing."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in strategy.build_model(config).parameters())
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"these flags build no model ({first_line(e)}); check the size flags") from None
    if n > PARAMS_MAX:
        raise UserError(f"these flags build a model of {n:,} parameters, more than the {PARAMS_MAX:,} this "
                        f"project allows (4 bytes each, 4 copies in training); use smaller size flags")


def check_suffix(flag: str, path, suffixes: tuple[str, ...]) -> None:
    """A file written in one format is refused under another's name (a GIF as anim.jpg)."""
    if Path(path).suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: this writes {' or '.join(suffixes)} files; give a name ending in one")


def check_checkpoint(state, path) -> None:
    """A damaged or hand-made checkpoint is refused on loading, naming what is wrong, not by a KeyError later."""
    bad = lambda what: UserError(f"{path} is not a usable checkpoint: {what}; use a checkpoints/last.pt "
                                 f"written by this project's training")
    if not isinstance(state, dict):
        raise bad(f"it holds a {type(state).__name__}, not a dict")
    for key, kind in (("model", dict), ("config", dict), ("strategy", str), ("palette", Tensor)):
        if not isinstance(state.get(key), kind):
            raise bad(f"'{key}' is {type(state.get(key)).__name__}, not {kind.__name__}")
    if not NAME.fullmatch(state["strategy"]):
        raise bad("its model name is not a name of this project's models")
    ema = state.get("ema")
    if ema is not None and (not isinstance(ema, dict) or set(ema) != {"n_averaged"} | {f"module.{k}" for k in state["model"]}):
        raise bad("its 'ema' does not hold the same weights as its 'model'")
    extra = state.get("extra", {})  # Strategy.extra_state: named snapshots of the model's weights, or finite floats
    if not isinstance(extra, dict) or any(not (isinstance(w, dict) and set(w) == set(state["model"])
                                               or type(w) is float and math.isfinite(w)) for w in extra.values()):
        raise bad("its 'extra' does not hold snapshots of the weights of its 'model' (or numbers)")
    snapshots = {k: w for k, w in extra.items() if isinstance(w, dict)}
    for key, weights in [("model", state["model"]), ("ema", state.get("ema")), *snapshots.items()]:
        for k, v in (weights or {}).items():
            if not isinstance(v, Tensor) or (v.is_floating_point() and not torch.isfinite(v).all()):
                raise bad(f"'{key}' entry {str(k)[:60]!r} is not a finite tensor")
    if any(w[k].shape != v.shape for w in snapshots.values() for k, v in state["model"].items()):
        raise bad("a snapshot in its 'extra' has weights of other shapes than its 'model'")
    palette, size = state["palette"], state["config"].get("palette_size")
    if palette.ndim != 2 or palette.shape[1] != 3 or not torch.isfinite(palette).all() or \
            palette.min() < 0 or palette.max() > 1 or not 2 <= len(palette) <= (size if type(size) is int else 256):
        raise bad(f"its palette of shape {tuple(palette.shape)} is not --palette-size ({size}) RGB colours in [0, 1]")
    for key in ("epoch", "step", "resume_batch"):
        if key in state and not (type(state[key]) is int and state[key] >= 0):
            raise bad(f"'{key}' is {state[key]!r}, not a count")
    run_id = state.get("mlflow_run_id")
    if run_id is not None and not (isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{1,64}", run_id)):
        raise bad("its MLflow run id is not an id")


def check_saved_config(config_cls, saved: dict) -> None:
    """A checkpoint's config values have their fields' types (an int for a float is fine); strings are printable."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    for f in dataclasses.fields(config_cls):
        value = saved.get(f.name)
        kind = kinds.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if f.name in saved and kind and (not isinstance(value, kind) or (bool not in kind and isinstance(value, bool))
                                         or (isinstance(value, str) and printable(value) != value)):
            raise UserError(f"the checkpoint's config has {f.name} = {printable(repr(value))[:60]}, not of type "
                            f"{f.type}; it was not written by this project's training")


def printable(text: str) -> str:
    """Text read from a file without its control characters (ANSI/OSC escapes, newlines...)."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "", str(text))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (MLflow's can run to pages)."""
    return (str(e).strip().splitlines() or [""])[0][:300]


# -----------------------------------------------------------------------------
# Config -> argparse
# -----------------------------------------------------------------------------
# Each model file subclasses TrainConfig. The comment under each field is its
# --help text (field_help), so a hyperparameter is documented once, where declared.


@dataclass
class TrainConfig:
    epochs: int = 100
    # passes over the training sprites
    batch_size: int = 64
    # sprites per optimizer step
    lr: float = 1e-3
    # AdamW learning rate
    weight_decay: float = 0.0
    # AdamW decoupled weight decay
    grad_clip: float = 1.0
    # clip the global gradient norm to this value (0 = no clipping)
    ema_decay: float = 0.0
    # decay of the exponential moving average of the weights used for sampling
    # and validation (0 = no EMA)
    amp: bool = False
    # bf16 autocast for forward passes (faster on GPUs and on CPUs with bf16 instructions). On a CPU
    # without them (no avx512_bf16/amx_bf16 flag) bf16 is emulated, ~10x slower: it says so and trains in fp32
    amp_force: bool = False
    # with --amp: use bf16 autocast even on a CPU without bf16 instructions
    compile: bool = False
    # torch.compile the model (slow first epoch, faster afterwards)
    seed: int = 0
    # one seed for initialisation, batches, flips, noise and samples
    device: str = "auto"
    # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    data: str = "data/sprites-colored.npz"
    # prepared dataset from download.py (the default one is downloaded if missing)
    flip: bool = True
    # random horizontal flips of training sprites
    palette_size: int = 8
    # colours in the k-means palette that samples are snapped to
    out: str = ""
    # run folder (default: runs/<model>/<date-time>)
    sample_every: int = 10
    # write a sample grid every this many epochs (0 = only at the end)
    n_samples: int = 64
    # sprites in each sample grid
    n_eval: int = 256
    # samples scored by the sprite-quality metrics at the end of training
    eval_every_minutes: float = 0.0
    # time-to-quality: score the EMA model on --n-eval samples every this many minutes of training
    # wall time (scoring time is left off the clock), into time_to_quality.json and MLflow (0 = off)
    resume: str = ""
    # checkpoint to continue from; flags given with it override its config
    mlflow: bool = True
    # track the run with MLflow (--no-mlflow to skip)

    def __post_init__(self):  # here, so that the parser, the tests and compare.py refuse alike
        for name in ("epochs", "batch_size", "palette_size", "n_samples", "n_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.sample_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--sample-every, --grad-clip and --weight-decay cannot be negative")
        if self.eval_every_minutes < 0:
            raise ValueError(f"--eval-every-minutes cannot be negative, got {self.eval_every_minutes}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not re.fullmatch(DEVICES, self.device):
            raise ValueError(f"unknown --device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        for f in dataclasses.fields(self):  # the model's own fields too
            value, choices, flag = getattr(self, f.name), f.metadata.get("choices"), "--" + f.name.replace("_", "-")
            # `--lr nan` would train on silently: `nan <= 0` is False, so range checks let NaN through
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
            if choices and value not in choices:  # e.g. vae.py's --recon-loss
                raise ValueError(f"unknown {flag} {value!r}; use one of {', '.join(choices)}")
            if f.name in BOUNDS and value is not None and not (f.name == "temperature" and value <= 0):  # <= 0: argmax
                try:
                    check_range(flag, value, *BOUNDS[f.name])
                except UserError as e:
                    raise ValueError(str(e)) from None
        if not 0 <= self.seed <= SEED_MAX:  # it must fit every RNG it seeds
            raise ValueError(f"--seed must be between 0 and {SEED_MAX}, got {self.seed}")


def field_help(config_cls) -> dict[str, str]:
    """The comment lines under each dataclass field, as its help text."""
    helps: dict[str, str] = {}
    for klass in filter(dataclasses.is_dataclass, reversed(config_cls.__mro__)):
        name = None
        for line in inspect.getsource(klass).splitlines():
            if field := re.match(r"\s+(\w+)\s*:\s*[^=]+=", line):
                name = field.group(1)
                helps[name] = ""
            elif (comment := re.match(r"\s+#\s?(.*)", line)) and name:
                helps[name] = (helps[name] + " " + comment.group(1)).strip()
            else:
                name = None
    return helps


def add_config_flags(parser, config_cls, suppress_defaults=False, only: set[str] | None = None):
    """One flag per Config field: `batch_size` becomes `--batch-size`."""
    helps = field_help(config_cls)
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = argparse.SUPPRESS if suppress_defaults else f.default
        help_text = (helps.get(f.name) or "(undocumented)").replace("%", "%%")  # argparse reads % as a format
        if not suppress_defaults and f.default != "" and "(default" not in help_text:
            help_text += " (default: %(default)s)"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:  # listed choices are shown (--recon-loss {mse,bce,ce}); the Config checks them, for every path
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}.get(f.type, f.type),
                                default=default, help=help_text,
                                metavar="{" + ",".join(choices) + "}" if choices else f.name.upper())


def make_config(config_cls, parser: argparse.ArgumentParser, values: dict):
    """Build the Config, turning a refused value into argparse's clean error."""
    try:
        return config_cls(**values)
    except ValueError as e:
        parser.error(str(e))  # prints usage + "error: ..." and exits with status 2


# -----------------------------------------------------------------------------
# Device, seeding and data
# -----------------------------------------------------------------------------
# ~900 sprites of 16x16x3 bytes (0.7 MB) live on the device as one tensor; a batch
# is an index into it: no DataLoader, no workers.


def select_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu -- unless --device names one."""
    if not re.fullmatch(DEVICES, name):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not mps:
        raise UserError("--device mps was asked for, but MPS is not available here; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all GPUs) and NumPy: with the generators saved in checkpoints, a CPU run repeats exactly."""
    torch.manual_seed(seed)
    np.random.seed(seed)


@dataclass
class Sprites:
    train: Tensor    # (N_train, 3, 16, 16) float32 in [0, 1], on the device
    val: Tensor      # (N_val, 3, 16, 16) float32 in [0, 1], on the device
    palette: Tensor  # (K, 3) float32 in [0, 1], k-means colours of the training pixels
    path: Path       # the .npz it came from


def load_sprites(path: str | os.PathLike, device: torch.device, palette_size: int = 8, seed: int = 0) -> Sprites:
    """download.py's .npz (download.load_dataset reads and checks it) as tensors, with its palette."""
    images, is_val = download.load_dataset(path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)  # (N, 16, 16, 3) -> (N, 3, 16, 16)
    palette = kmeans_palette(images[~is_val].reshape(-1, 3), k=palette_size, seed=seed)  # (N_train*256, 3) pixels
    is_val = torch.from_numpy(is_val)
    return Sprites(train=x[~is_val].to(device), val=x[is_val].to(device),
                   palette=torch.from_numpy(palette).float().div(255).to(device), path=Path(path))


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] images -> [-1, 1], the range the models work in (checked)."""
    assert x.min() >= 0.0 and x.max() <= 1.0, f"expected images in [0, 1], got [{x.min():.3f}, {x.max():.3f}]"
    return x * 2.0 - 1.0


def from_model_range(y: Tensor) -> Tensor:
    """[-1, 1] model outputs -> [0, 1] images (clamped: models overshoot)."""
    return ((y + 1.0) / 2.0).clamp(0.0, 1.0)


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each sprite left-right with probability 1/2 (a sword pointing left is still a sword); the
    flips come from `generator`, on the CPU, so a seed flips the same sprites on every device."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (B,)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


# -----------------------------------------------------------------------------
# Palette: k-means++ over pixel colours, and snapping
# -----------------------------------------------------------------------------


def kmeans_palette(pixels: np.ndarray, k: int = 8, seed: int = 0, iters: int = 50,
                   init: str = "k-means++") -> np.ndarray:
    """Cluster RGB pixels (M, 3) into k colours, (k, 3) uint8, the most pixels first. k-means++ (Arthur &
    Vassilvitskii 2007) draws each new centre with probability proportional to its squared distance to the
    nearest centre so far; a random start puts most centres on the black background (70% of all pixels) and
    misses sprite colours: `init="random"` is kept to show that (docs/learn/01-data-pipeline.md)."""
    centres, _ = kmeans(np.asarray(pixels).reshape(-1, 3), k, seed, iters, init)
    return np.clip(np.rint(centres), 0, 255).astype(np.uint8)


def kmeans(points: np.ndarray, k: int, seed: int = 0, iters: int = 50,
           init: str = "k-means++") -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on the *distinct* rows of points (M, D), each weighted by its count: pixel art repeats
    a few exact colours (D = 3) and masks (D = 256) thousands of times. Returns the centres (k, D) float64,
    heaviest first, and their weights (k,); k is at most the number of distinct rows."""
    assert init in ("k-means++", "random"), f"unknown init {init!r}"
    points = np.asarray(points, dtype=np.float64)
    assert points.ndim == 2, f"expected points (M, D), got shape {points.shape}"
    colours, counts = np.unique(points, axis=0, return_counts=True)  # (C, D) distinct rows, (C,)
    weights = counts / counts.sum()
    rng = np.random.default_rng(seed)
    k_eff = min(k, len(colours))
    if init == "random":
        centres = colours[rng.choice(len(colours), size=k_eff, p=weights)]  # (k, D)
    else:
        centres = [colours[rng.choice(len(colours), p=weights)]]
        for _ in range(1, k_eff):
            d2 = ((colours[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)  # (C,)
            p = weights * d2
            centres.append(colours[rng.choice(len(colours), p=p / p.sum())])
        centres = np.array(centres)  # (k, D)
    for _ in range(iters):  # Lloyd's iterations on weighted rows
        assign = ((colours[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)  # (C,)
        new = np.array([np.average(colours[assign == j], axis=0, weights=counts[assign == j])
                        if (assign == j).any() else centres[j] for j in range(k_eff)])
        if np.allclose(new, centres):
            break
        centres = new
    assign = ((colours[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    mass = np.bincount(assign, weights=counts, minlength=k_eff)  # (k,) rows held by each centre
    order = np.argsort(-mass, kind="stable")
    return centres[order], mass[order]


def palette_index(images: Tensor, palette: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H, W) index of the nearest palette colour."""
    d = ((images[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)  # (N, K, H, W)
    return d.argmin(1)


def snap_to_palette(images: Tensor, palette: Tensor) -> Tensor:
    """Replace every pixel by its nearest palette colour; works on any device."""
    return palette[palette_index(images, palette)].permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)


# -----------------------------------------------------------------------------
# Class labels for conditioning: a sprite's colour, or its shape cluster
# -----------------------------------------------------------------------------
# A conditional model (--condition) learns p(x | y). y is a function of the sprite itself, computed from
# each batch (a mirrored sprite gets the cluster of its mirrored mask), so the data, split and batches are
# those of an unconditional run.
#   colour   the sprite's one non-black palette colour (7 classes on the Kenney sprites): it fixes every
#            pixel's colour, H(X|Y) keeps only shape.
#   cluster  the nearest of k k-means centres of the training sprites' foreground masks (256 values of
#            0 or 1): a rough shape, nothing of the colour.

LABEL_KINDS = ("none", "colour", "cluster")

# Names for `sample --class NAME`: each colour class takes the nearest of these.
COLOUR_NAMES = {"black": (0, 0, 0), "white": (240, 240, 240), "grey": (128, 128, 128), "red": (230, 60, 40),
                "orange": (230, 130, 40), "yellow": (240, 200, 30), "green": (40, 200, 80), "blue": (60, 140, 220),
                "purple": (140, 60, 200), "pink": (240, 120, 180), "maroon": (128, 40, 60), "brown": (140, 80, 40)}


def background_index(palette: Tensor) -> int:
    """The background: the darkest palette colour (black)."""
    return int(palette.sum(1).argmin())


def foreground_masks(images: Tensor, palette: Tensor) -> Tensor:
    """(N, 3, 16, 16) in [0, 1] -> (N, 256) float, 1 where the snapped pixel is not the background."""
    return (palette_index(images, palette) != background_index(palette)).flatten(1).float()  # (N, 16, 16) -> (N, 256)


class Labeller:
    """A sprite's class y and its name, and a name or index -> y. Classes: the non-black
    palette colours in palette order ("colour"), or the rows of `centres` (k, 256) ("cluster")."""

    def __init__(self, kind: str, palette: Tensor, centres: Tensor | None = None):
        assert kind in ("colour", "cluster"), f"a Labeller needs kind colour or cluster, got {kind!r}"
        assert (kind == "cluster") == (centres is not None), "cluster labels need centres, colour labels none"
        self.kind, self.palette = kind, palette
        self.colours = [i for i in range(len(palette)) if i != background_index(palette)]  # palette index per class
        self.centres = centres.to(palette.device) if centres is not None else None
        self.n_classes = len(self.colours) if kind == "colour" else len(centres)
        if not self.n_classes:  # e.g. all-black sprites: nothing to condition on or to draw per class
            raise UserError(f"{kind} labels need a colour other than black in the palette and there is none "
                            f"(are the sprites all black?); use other data or --condition none")
        self.names = self._names()

    def _names(self) -> list[str]:
        if self.kind == "cluster":
            return [f"cluster{j}" for j in range(self.n_classes)]
        rgb = (self.palette[self.colours] * 255).round().cpu()  # (C, 3)
        named = torch.tensor(list(COLOUR_NAMES.values()), dtype=torch.float32)  # (12, 3)
        names = [list(COLOUR_NAMES)[int(((named - c) ** 2).sum(1).argmin())] for c in rgb]
        # two colours with one name: both get their hex code as well
        return [n if names.count(n) == 1 else f"{n}-{'%02x%02x%02x' % tuple(int(v) for v in c)}"
                for n, c in zip(names, rgb)]

    def __call__(self, images: Tensor) -> Tensor:
        """images (N, 3, 16, 16) in [0, 1] -> classes (N,) long; -1 for a colour
        label of a sprite without foreground (no colour to name)."""
        if self.kind == "cluster":
            d = torch.cdist(foreground_masks(images, self.palette), self.centres)  # (N, k)
            return d.argmin(1)
        idx = palette_index(images, self.palette).flatten(1)  # (N, 16, 16) -> (N, 256) palette indices
        counts = torch.stack([(idx == i).sum(1) for i in self.colours], 1)  # (N, C) pixels of each colour
        return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)  # majority colour (exactly one in real sprites)

    def parse(self, text: str) -> int:
        """`--class` value: a class name or an index 0..n_classes-1."""
        if text.strip().isdigit() and int(text) < self.n_classes:
            return int(text)
        if text in self.names:
            return self.names.index(text)
        raise UserError(f"unknown class {text!r} for {self.kind} labels; use a name "
                        f"({', '.join(self.names)}) or an index 0..{self.n_classes - 1}")


def fit_shape_clusters(images: Tensor, palette: Tensor, k: int, seed: int) -> Tensor:
    """k-means on the foreground masks of `images` (N, 3, 16, 16): centres (k, 256) float32,
    largest cluster first, each the fraction of its sprites that cover each pixel."""
    masks = foreground_masks(images, palette).cpu().numpy()  # (N, 256)
    centres, _ = kmeans(masks, k, seed)
    return torch.from_numpy(centres).float().to(palette.device)


def make_labeller(kind: str, palette: Tensor, data: str, clusters: int, seed: int) -> Labeller | None:
    """A run's labeller (None for "none"). Clusters are fitted on the training split of `data`:
    same data and seed, same centres, so sampling a checkpoint rebuilds its clusters."""
    if kind == "none":
        return None
    if kind == "colour":
        return Labeller("colour", palette)
    train = load_sprites(data, palette.device, len(palette), seed).train
    return Labeller("cluster", palette, fit_shape_clusters(train, palette, clusters, seed))


def requested_classes(n_classes: int, sample_class: int | None, n: int, device: torch.device) -> Tensor:
    """The classes (n,) a conditional model draws: `sample --class` for all, else one class per
    row of 8 (rows cycle through the classes), so a default grid shows every class."""
    if sample_class is not None:
        return torch.full((n,), sample_class, dtype=torch.long, device=device)
    return (torch.arange(n, device=device) // 8) % n_classes


# -----------------------------------------------------------------------------
# Pictures
# -----------------------------------------------------------------------------


def make_grid(images: Tensor, nrow: int = 8, scale: int = 4, palette: Tensor | None = None) -> Image.Image:
    """Sprites (N, 3, 16, 16) in [0, 1] -> one PIL image (snapped to `palette` if given)."""
    if palette is not None:
        images = snap_to_palette(images, palette)
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return download.grid_image(x.permute(0, 2, 3, 1).cpu().numpy(), nrow, scale, gutter=(48, 48, 48))  # (N, 16, 16, 3)


def reconstruction_strip(val: Tensor, order: Tensor, reconstruct: Callable[[Tensor], Tensor]) -> tuple[Tensor, int]:
    """The autoencoders' picture: up to 4 rows of up to 8 validation sprites (in `order`), each
    row followed by its reconstructions; (sprites, sprites per row) as Strategy.images returns."""
    per_row = min(8, val.shape[0])
    rows = max(1, min(4, val.shape[0] // per_row))
    real = val[order[:rows * per_row]]
    rec = reconstruct(real)
    pairs = torch.stack([real.view(rows, per_row, 3, 16, 16), rec.view(rows, per_row, 3, 16, 16)], dim=1)
    return pairs.reshape(-1, 3, 16, 16), per_row  # (rows, 2, per_row, 3, 16, 16) -> (rows * 2 * per_row, ...)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temporary file, then rename: readers see the old file or the new one, never half."""
    download.write_atomic(Path(path), lambda f: f.write(data))


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    download.write_atomic(Path(path), lambda f: img.save(f, format="PNG"))
    return Path(path)


def save_gif(frames: Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Frames (F, N, 3, 16, 16) in [0, 1] -> a looping GIF of grids (not snapped): 80 ms a frame, the last held 2 s."""
    grids = [make_grid(f, nrow=nrow, scale=4) for f in frames]
    download.write_atomic(Path(path), lambda f: grids[0].save(f, format="GIF", save_all=True, append_images=grids[1:],
                                                              loop=0, duration=[80] * (len(grids) - 1) + [2000]))
    return Path(path)


# -----------------------------------------------------------------------------
# Sprite-quality metrics (shared by every model and by compare.py)
# -----------------------------------------------------------------------------


@torch.no_grad()
def sprite_metrics(samples: Tensor, reference: Tensor, palette: Tensor, k: int = 3, seed: int = 0) -> dict[str, float]:
    """Score raw samples (N, 3, 16, 16) against the training sprites `reference` (M, 3, 16, 16),
    all in [0, 1], with `palette` (K, 3), black the background.

    palette_distance  mean RGB distance (0-255) of a raw pixel to its nearest palette colour
    one_colour_rate   snapped samples with exactly one non-black colour, as every Kenney sprite
    density_in_range  snapped samples whose foreground covers 15% to 50%, like the training set
    precision/recall  samples inside the real manifold / real sprites inside the samples' one
                      (Kynkaenniemi et al. 2019, arXiv:1904.06991: the union of balls reaching
                      each point's k-th neighbour, k=3, in the 768-D pixels of snapped sprites;
                      the real set subsampled to N, seeded). Copying the data scores precision 1.
    density/coverage  the same balls around the real sprites only (Naeem et al. 2020, arXiv:2002.09797, with k=3):
                      density  = mean over samples of how many real balls hold the sample, / k (about 1 or more for
                                 samples like the data; more where samples crowd the dense parts);
                      coverage = real sprites whose ball holds a sample. Unlike recall, a sample's own spread never
                                 widens a ball: samples pushed apart into the gaps raise recall but not coverage
    near_copy_rate    snapped samples within 3 of 256 pixels of a training sprite: memorisation
    unique_rate       distinct snapped samples / samples
    """
    n = samples.shape[0]
    palette = palette.to(samples.device)
    raw = samples.float().clamp(0, 1)
    d = ((raw[:, None] - palette[None, :, :, None, None]) ** 2).sum(2).sqrt().amin(1)  # (N, H, W)
    palette_distance = (d * 255).mean().item()

    snapped = snap_to_palette(raw, palette)
    black = palette[background_index(palette)]
    fg = (snapped - black[None, :, None, None]).abs().sum(1) > 1e-6  # (N, H, W) foreground mask
    density = fg.float().mean((1, 2))
    colours_used = [len(torch.unique(s.permute(1, 2, 0)[f], dim=0)) for s, f in zip(snapped, fg)]
    one_colour_rate = float(np.mean([c == 1 for c in colours_used]))
    density_in_range = ((density >= download.DENSITY_MIN) & (density <= download.DENSITY_MAX)).float().mean().item()

    ref = snap_to_palette(reference.float().to(samples.device), palette)
    q = lambda t: (t * 255).round().to(torch.int16).flatten(1)  # (N, 768) exact colour codes
    diff_pixels = torch.stack([(q(s[None]).view(1, 3, -1) != q(ref).view(-1, 3, 256)).any(1).sum(1).min()
                               for s in snapped])  # (N,) pixels that differ from the nearest training sprite
    near_copy_rate = (diff_pixels <= 3).float().mean().item()
    unique_rate = len(torch.unique(q(snapped), dim=0)) / n

    real = ref[reference_index(ref.shape[0], n, seed).to(ref.device)]
    precision, recall = _knn_precision_recall(real.flatten(1), snapped.flatten(1), k)
    density, coverage = _knn_density_coverage(real.flatten(1), snapped.flatten(1), k)
    return dict(palette_distance=palette_distance, one_colour_rate=one_colour_rate,
                density_in_range=density_in_range, precision=precision, recall=recall,
                near_copy_rate=near_copy_rate, unique_rate=unique_rate, density=density, coverage=coverage)


def reference_index(m: int, n: int, seed: int = 0) -> Tensor:
    """Which of m training sprites sprite_metrics scores n samples against: n of them, seeded; all when m <= n."""
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n] if m > n else torch.arange(m)


def _knn_precision_recall(real: Tensor, fake: Tensor, k: int) -> tuple[float, float]:
    def radii(x):  # distance of each point to its k-th nearest neighbour in its own set
        return torch.cdist(x, x).kthvalue(min(k + 1, x.shape[0]), dim=1).values  # +1: itself at 0

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (N_fake, N_real)
    precision = (d <= r_real[None]).any(1).float().mean().item()
    recall = (d.T <= r_fake[None]).any(1).float().mean().item()
    return precision, recall


def _knn_density_coverage(real: Tensor, fake: Tensor, k: int) -> tuple[float, float]:
    # Naeem et al. 2020 (arXiv:2002.09797), with B_i the ball around real point i reaching its k-th real neighbour:
    #   density  = 1 / (k M) sum_j sum_i 1[fake_j in B_i]     coverage = 1 / N sum_i 1[some fake_j in B_i]
    r_real = torch.cdist(real, real).kthvalue(min(k + 1, real.shape[0]), dim=1).values  # (N,) +1: itself at 0
    inside = torch.cdist(fake, real) <= r_real[None]  # (M, N): fake j in real i's ball
    return inside.float().sum().item() / (k * fake.shape[0]), inside.any(0).float().mean().item()


# -----------------------------------------------------------------------------
# The Strategy: what a model file implements
# -----------------------------------------------------------------------------


class Strategy(abc.ABC):
    """What a model file implements: set `name`, write the four abstract methods, override the optional
    hooks it needs (each does nothing by default). Built as `Cls(config, palette)`; the Trainer calls these
    methods and nothing else. The strategy says *what* to compute (model, loss, sampler); the Trainer owns
    *how* it is optimised (backward, AdamW, clipping, autocast, EMA, checkpoints): written once, for every
    model, because they are easy to get subtly wrong (EMA of buffers, autocast scope, optimizer state)."""

    name: str = ""  # "vae", "vqvae", ...: names the run folder and MLflow experiment

    # -- required ---------------------------------------------------------------

    @abc.abstractmethod
    def build_model(self, config) -> nn.Module:
        """The network, freshly initialised from torch's global RNG (seeded by the Trainer); prints nothing."""

    @abc.abstractmethod
    def train_step(self, model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
        """batch (B, 3, 16, 16) in [0, 1] -> {"loss": scalar to minimise, other scalars to log}; random
        numbers from torch's global RNG (the Trainer seeds and checkpoints it)."""

    @abc.abstractmethod
    def sample(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        """n new sprites (n, 3, 16, 16) in [0, 1], not snapped; every random number from `generator`."""

    @abc.abstractmethod
    def get_metrics(self, model: nn.Module, batch: Tensor) -> dict[str, float]:
        """Validation metrics for one batch (the Trainer averages them)."""

    # -- optional hooks: the defaults do nothing ----------------------------------

    def describe(self, model: nn.Module) -> str:
        """One line on what build_model built, printed at the start of a run ("" prints nothing)."""
        return ""

    def total_epochs(self, config) -> int:
        """Epochs in all, for a strategy that trains in stages (vqvae.py: the VQ-VAE, then its prior)."""
        return config.epochs

    def stage_of(self, epoch: int) -> int:
        """The stage of epoch `epoch` (1-based): a step's FLOPs are counted once per stage, and
        time-to-quality points are scored in the last one, where the model that samples trains."""
        return 1

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Before each training epoch (1-based), e.g. a KL warm-up schedule."""

    def on_epoch_end(self, model: nn.Module, epoch: int, val: Tensor) -> dict[str, float]:
        """After each epoch's validation, e.g. codebook restarts: extra val/ metrics (names without the
        prefix). `val` is the training split when there is no validation one (its metrics are dropped)."""
        return {}

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The learning rate at optimizer step `step` of `total_steps`, as a multiple of --lr."""
        return 1.0

    def images(self, model: nn.Module, val: Tensor, generator: torch.Generator) -> dict[str, tuple[Tensor, int]]:
        """Extra pictures with each sample grid, from validation sprites: name -> (sprites, sprites per row)."""
        return {}

    def trajectory(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor | None:
        """Frames of one sampling run, (F, n, 3, 16, 16) in [0, 1], for trajectory.gif and `sample --gif`."""
        return None

    def on_train_end(self, model: nn.Module, train: Tensor) -> dict[str, float]:
        """Extra end-of-run metrics with full names (e.g. sample_random/precision), into metrics.json."""
        return {}

    def after_step(self, model: nn.Module, step: int, total_steps: int, trained: nn.Module | None = None) -> None:
        """After optimizer step `step` (1-based), with the eval model and the trained one, e.g. to keep an early
        snapshot (diffusion.py's autoguidance) or more averages of the weights. It must not draw random numbers."""

    def extra_state(self) -> dict[str, dict[str, Tensor] | float]:
        """Named snapshots of the model's weights (state dicts), or numbers, for the checkpoint's "extra"."""
        return {}

    def load_extra_state(self, extra: dict[str, dict[str, Tensor] | float]) -> None:
        """extra_state's snapshots, back from a checkpoint (on --resume and when sampling)."""

    def animates(self) -> bool:
        return type(self).trajectory is not Strategy.trajectory


# -----------------------------------------------------------------------------
# MLflow: imported lazily (it takes seconds), and never allowed to kill a run
# -----------------------------------------------------------------------------


class Tracker:
    """Fail-soft MLflow (default store: sqlite:///mlflow.db here): checked once at start; after that a
    failed call prints one warning and training goes on untracked."""

    lost = ""  # process-wide: after a failed call no tracker calls MLflow (compare.py's runs share a parent)

    def __init__(self, enabled: bool, experiment: str, run_name: str, run_id: str | None = None):
        self.run_id = self.experiment_id = None
        self.experiment = experiment
        self.epoch = 0        # the Trainer's current epoch, for `stopped`
        self.stopped = ""     # after a failed call: "tracking stopped at epoch N (...)"
        if not enabled:
            return
        if Tracker.lost:
            self.stopped = f"not tracked: MLflow failed earlier in this process ({Tracker.lost})"
            return
        # one retry, short waits: a lost server costs a few seconds once, not minutes
        for key, value in (("MAX_RETRIES", "1"), ("BACKOFF_FACTOR", "1"), ("BACKOFF_JITTER", "0.5"),
                           ("TIMEOUT", "5")):
            os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{key}", value)
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        check_tracking_uri(uri)
        check_store(uri)
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        for name in ("mlflow.store.db.utils", "mlflow.store.db_migrations", "alembic"):  # start-up INFO chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        import mlflow

        self.mlflow = mlflow
        try:
            nested = mlflow.active_run() is not None  # compare.py's parent run: a child in its experiment
            if not nested:
                found = mlflow.get_experiment_by_name(experiment)  # created here, silently, when new
                mlflow.set_experiment(experiment_id=found.experiment_id if found
                                      else mlflow.create_experiment(experiment))
            try:
                run = (mlflow.start_run(run_id=run_id, nested=nested) if run_id
                       else mlflow.start_run(run_name=run_name, nested=nested))
            except Exception as e:  # e.g. resuming a run that lives in another store
                print(f"warning: cannot reopen MLflow run {run_id} ({first_line(e)}); starting a new one")
                run = mlflow.start_run(run_name=run_name, nested=nested)
        except Exception as e:  # a tracking URI MLflow cannot use, e.g. an unknown scheme
            raise UserError(f"MLflow cannot track to {uri or mlflow.get_tracking_uri()} ({type(e).__name__}: "
                            f"{first_line(e)}); fix MLFLOW_TRACKING_URI or pass --no-mlflow") from None
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.experiment = mlflow.get_experiment(self.experiment_id).name  # a nested run: the parent's
        print(f"MLflow: run '{run.info.run_name}' ({self.run_id}) in experiment '{self.experiment}' "
              f"at {mlflow.get_tracking_uri()}")

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        if self.run_id is None or self.stopped or Tracker.lost:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            # one warning, then no more calls: a lost server would cost its retries on every call
            self.stopped = f"tracking stopped at epoch {self.epoch} ({what} failed: {type(e).__name__})"
            Tracker.lost = self.stopped
            print(f"warning: MLflow {what} failed ({type(e).__name__}: {first_line(e)}); training continues "
                  f"without tracking (noted in metrics.json)")
            self._forget_run()

    def _forget_run(self):
        """End the run after a failed call, so that neither end() nor MLflow's exit hook retries it: told
        to the server once, with no retry and a 1-second timeout (that server just failed)."""
        fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}
        with mock.patch.dict(os.environ, fast), contextlib.suppress(Exception):  # restored afterwards
            active = self.mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                self.mlflow.end_run(status="FAILED")

    def how_to_view(self) -> str:
        """The command that serves this store and this run's page in the "Model training" view
        (MLflow 3 opens an experiment on its GenAI "Traces" page, where training runs do not show)."""
        if self.run_id is None:
            return ""
        uri = self.mlflow.get_tracking_uri()
        remote = uri.startswith(("http://", "https://"))
        page = (f"{uri.rstrip('/') if remote else 'http://127.0.0.1:5000'}/#/experiments/{self.experiment_id}"
                f"/runs/{self.run_id}?workflowType=machine_learning")
        if remote:
            return f"MLflow: this run is at {page}"
        here = uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]) == Path.cwd() / "mlflow.db"
        store = "sqlite:///mlflow.db" if here else uri  # MLflow's default store, in this folder
        return f"MLflow: to look at this run, start `mlflow ui --backend-store-uri {store}` here, then open\n  {page}"

    def set_tags(self, tags: dict):
        self._call("set_tags", lambda: self.mlflow.set_tags({k: str(v)[:500] for k, v in tags.items()}))

    def log_params(self, params: dict):
        self._call("log_params", lambda: self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int):
        self._call("log_metrics", lambda: self.mlflow.log_metrics(metrics, step=step))

    def log_metric_history(self, history: list[tuple[str, float, int]]):
        """Many (key, value, step) at once: one round trip per epoch, not per step."""

        def send():
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            client = self.mlflow.MlflowClient()
            metrics = [Metric(k, v, now, s) for k, v, s in history]
            for i in range(0, len(metrics), 1000):  # the API's batch limit
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self._call("log_batch", send)

    def log_image(self, key: str, img: Image.Image, step: int):
        self._call("log_image", lambda: self.mlflow.log_image(np.asarray(img), key=key, step=step))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None):
        self._call("log_artifact", lambda: self.mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def log_dataset(self, path: Path, images: Tensor):
        def send():
            import mlflow.data
            arr = (images.detach().cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            with warnings.catch_warnings():  # a local path matches two of MLflow's source types, which is harmless
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                self.mlflow.log_input(mlflow.data.from_numpy(arr, source=str(path.resolve()), name=path.stem),
                                      context="training")
        self._call("log_input", send)

    def set_description(self, text: str):
        self._call("set_description", lambda: self.mlflow.set_tag("mlflow.note.content", text))

    def end(self, status: str = "FINISHED"):
        if self.stopped or self.run_id is None or Tracker.lost:
            if self.run_id is not None:
                self._forget_run()  # e.g. compare.py's parent run, after a child lost the server
            return
        self._call("end_run", lambda: self.mlflow.end_run(status=status))


def check_tracking_uri(uri: str) -> None:
    """A URL missing its '://' (`http//host:5000`), which MLflow would take as a folder name."""
    if uri and "://" not in uri and re.match(r"(https?|file|sqlite|postgresql|mysql|mssql|databricks)\b", uri):
        raise UserError(f"MLFLOW_TRACKING_URI={uri!r} is not a valid URI (no '://'); "
                        f"use e.g. http://127.0.0.1:5000 or sqlite:///mlflow.db, or pass --no-mlflow")


def check_store(uri: str) -> None:
    """A local store (sqlite or a folder; none: ./mlflow.db, artifacts in ./mlruns) that cannot be
    written fails at start in one line, not after pages of SQLAlchemy tracebacks or minutes of retries."""
    if uri and not uri.startswith(("sqlite:", "file:")) and "://" in uri:
        return  # a server or a database MLflow reaches itself
    if not uri or uri.startswith("sqlite:"):
        db = Path(uri[len("sqlite:///"):]) if uri else Path("mlflow.db")
        places = [db] if db.exists() else [db.parent or Path(".")]
        places.append(Path("mlruns") if Path("mlruns").exists() else Path("."))  # the default artifact root
        places += [db.parent] if db.exists() else []  # sqlite writes its journal next to the file
    else:
        places = [Path(uri[len("file://"):] if uri.startswith("file:") else uri)]
        while not places[0].exists() and places[0] != places[0].parent:
            places[0] = places[0].parent
    for place in places:
        try:  # a real write: permissions alone say nothing of a read-only mount, nor to root
            if place.is_dir():
                tempfile.TemporaryFile(dir=place).close()
            else:
                open(place, "ab").close()
        except OSError as e:
            why = "does not exist" if not place.exists() else f"is not writable ({e.strerror})"
            raise UserError(f"MLflow cannot write its store: {place.resolve()} {why}; pass --no-mlflow, or set "
                            f"MLFLOW_TRACKING_URI to a writable one (e.g. sqlite:////tmp/mlflow.db)")


def check_server(uri: str, tries: int = 2, timeout: float = 3.0) -> None:
    """An unreachable tracking server fails the run at start, in one line."""
    import urllib.request

    err = None
    for _ in range(tries):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
            return
        except Exception as e:
            err = e
            time.sleep(0.5)
    raise UserError(f"MLflow server {uri} is unreachable ({err}); start it, unset MLFLOW_TRACKING_URI "
                    f"to log to ./mlflow.db, or pass --no-mlflow")


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomic: a crash mid-write never destroys the previous checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """weights_only=True: a checkpoint is data, never code, so one from elsewhere cannot run anything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; give a run folder's checkpoints/last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path} ({type(e).__name__}); is it a checkpoint of this project?")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint of this project")  # e.g. a weights file
    check_checkpoint(state, path)
    return state


# -----------------------------------------------------------------------------
# The Trainer
# -----------------------------------------------------------------------------


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; train() names the last good checkpoint."""


class Trainer:
    """The one training loop. Per epoch: shuffle, flip, train_step -> backward -> clip -> AdamW -> EMA;
    validation, a progress line, a checkpoint, every `sample_every` epochs a sample grid. Ctrl-C finishes
    the step and saves a checkpoint that resumes exactly there."""

    def __init__(self, strategy: Strategy, config: TrainConfig, train: Tensor, val: Tensor,
                 palette: Tensor, run_dir: Path, tracker: Tracker | None = None,
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = random_hflip):
        self.strategy, self.config = strategy, config
        self.train, self.val, self.palette = train, val, palette
        self.run_dir, self.tracker = Path(run_dir), tracker or Tracker(False, "", "")
        self.augment = augment if config.flip else None
        self.device = train.device
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.epochs = strategy.total_epochs(config)  # config.epochs, unless the strategy trains in stages
        check_model_size(strategy, config)
        self.model = strategy.build_model(config).to(self.device)
        self.step_model = torch.compile(self.model) if config.compile else self.model  # checkpoints hold the original
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # EMA of weights and buffers (normalisation statistics): theta_ema <- d theta_ema + (1 - d) theta
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
            use_buffers=True) if config.ema_decay > 0 else None
        # shuffles and flips: a CPU generator of their own, the same on every device
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.epoch = 0          # last completed epoch
        self.step = 0           # optimizer steps so far
        self.resume_batch = 0   # > 0 when resuming in the middle of an epoch
        self.epoch_gen_state = self.data_gen.get_state()
        self.epoch_sums: dict[str, float] = {}
        self.history: list[dict] = []  # one dict of metrics per epoch
        self.train_seconds = 0.0       # wall time spent in fit(), summed over resumes
        self.total_steps = self.epochs * math.ceil(train.shape[0] / config.batch_size)
        self.quality_curve: list[dict] = []  # time-to-quality points (--eval-every-minutes)
        self._eval_pause = 0.0  # seconds of this fit() spent scoring those points: off the training clock
        self.scoring_seconds = 0.0  # all of those seconds, summed over resumes: the curve's cost
        # training compute, the machine-independent clock: FLOPs per sprite of one step, counted once per stage
        self.flops_per_sprite: dict[int, float] = {}  # stage -> FLOPs per sprite of one training step
        self.train_flops = 0.0
        self.last_stage = strategy.stage_of(self.epochs)
        self.stop_requested = False
        self.stop_signal = signal.SIGINT  # the signal that set stop_requested: the exit status is 128 + it
        self._fit_start = None

    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation and sampling: the EMA if kept."""
        return self.ema.module if self.ema is not None else self.model

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step": self.step, "resume_batch": self.resume_batch,
            "data_gen_state": self.data_gen.get_state(), "epoch_gen_state": self.epoch_gen_state,
            "epoch_sums": self.epoch_sums,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": dataclasses.asdict(self.config), "strategy": self.strategy.name,
            "palette": self.palette.cpu(), "history": self.history, "mlflow_run_id": self.tracker.run_id,
            "train_seconds": self.train_seconds + self._fit_seconds(), "quality_curve": self.quality_curve,
            "train_flops": self.train_flops, "flops_per_sprite": self.flops_per_sprite,
            "scoring_seconds": self.scoring_seconds,
            "extra": self.strategy.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step, self.resume_batch = state["epoch"], state["step"], state["resume_batch"]
        self.epoch_gen_state, self.epoch_sums = state["epoch_gen_state"], state["epoch_sums"]
        self.history = state["history"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.quality_curve = state.get("quality_curve", [])
        # checkpoints from before the compute clock: it restarts at 0 FLOPs there
        self.train_flops, self.flops_per_sprite = state.get("train_flops", 0.0), state.get("flops_per_sprite", {})
        self.scoring_seconds = state.get("scoring_seconds", 0.0)
        self.strategy.load_extra_state(state.get("extra", {}))
        self.data_gen.set_state(state["data_gen_state"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self) -> None:
        save_checkpoint(self.ckpt_path, self.state_dict())

    # -- the loop -------------------------------------------------------------

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    def fit(self) -> list[dict]:
        """Train from the epoch after the last completed one to the end; returns the history."""
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        previous_term = signal.signal(signal.SIGTERM, self._on_sigint)  # kill, a scheduler, a container stop
        self._fit_start, self._eval_pause = time.time(), 0.0
        epochs_timed = 0
        if self.config.sample_every and self.epoch == 0 and self.resume_batch == 0:
            self.write_pictures(0)  # the untrained model, where MLflow's image slider starts (forked RNGs)
        try:
            for epoch in range(self.epoch + 1, self.epochs + 1):
                t0, pause_at_start = time.time(), self._eval_pause
                step_log = self.train_epoch(epoch)
                if step_log is None:  # stopped inside the epoch; the checkpoint says where
                    return self.history
                train_time = time.time() - t0 - (self._eval_pause - pause_at_start)
                epochs_timed += 1
                self.end_epoch(epoch, train_time, step_log, epochs_timed)
                if self.stop_requested:
                    print(f"interrupted after epoch {epoch}; checkpoint saved. Resume with: --resume {shlex.quote(str(self.ckpt_path))}")
                    return self.history
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            signal.signal(signal.SIGTERM, previous_term)
            self.train_seconds += self._fit_seconds()
            self._fit_start = None
        return self.history

    def train_epoch(self, epoch: int) -> list[tuple[str, float, int]] | None:
        """One pass: the per-step log [(train_step/<name>, value, step)], or None if Ctrl-C stopped it midway."""
        cfg, n = self.config, self.train.shape[0]
        n_batches = math.ceil(n / cfg.batch_size)
        self.tracker.epoch = epoch
        if self.resume_batch == 0:  # a fresh epoch: remember where its shuffle began
            self.epoch_gen_state, self.epoch_sums = self.data_gen.get_state(), {}
        self.data_gen.set_state(self.epoch_gen_state)
        perm = torch.randperm(n, generator=self.data_gen)
        flip_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.data_gen)))
        self.strategy.on_epoch_start(self.model, epoch)
        self.model.train()
        stage = self.strategy.stage_of(epoch)
        if stage not in self.flops_per_sprite:  # once per stage, off the clock
            t0 = time.time()
            self.flops_per_sprite[stage] = count_step_flops(self.strategy, self.model, self.train[:cfg.batch_size],
                                                            self.autocast) / min(cfg.batch_size, n)
            self._eval_pause += time.time() - t0
        step_log: list[tuple[str, float, int]] = []
        for i in range(n_batches):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(self.device)
            batch = self.train[idx]
            if self.augment is not None:  # drawn for every batch, so skipping keeps the stream aligned
                batch = self.augment(batch, flip_gen)
            if i < self.resume_batch:
                continue  # already trained on before the interruption
            scalars = self.optimizer_step(batch, epoch, i)
            self.train_flops += self.flops_per_sprite[stage] * batch.shape[0]
            if stage == self.last_stage:
                self.maybe_score_curve(epoch - 1 + (i + 1) / n_batches)
            for k, v in scalars.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v * batch.shape[0]
                step_log.append((f"train_step/{k}", v, self.step))  # x-axis: optimizer step
            if self.stop_requested and i + 1 < n_batches:
                self.resume_batch = i + 1
                self.save()
                self.tracker.log_metric_history(step_log)
                print(f"\ninterrupted in epoch {epoch}, step {i + 1}/{n_batches}; checkpoint saved. "
                      f"Resume with: --resume {shlex.quote(str(self.ckpt_path))}")
                return None
        self.resume_batch = 0
        self.epoch = epoch
        return step_log

    def end_epoch(self, epoch: int, train_time: float, step_log: list, epochs_timed: int) -> None:
        """Validation, the checkpoint, MLflow, the progress line; every --sample-every epochs, pictures and scores."""
        cfg, n = self.config, self.train.shape[0]
        metrics = {f"train/{k}": v / n for k, v in self.epoch_sums.items()}
        metrics["system/images_per_sec"] = n / max(train_time, 1e-9)  # the machine's speed, not the model's
        metrics.update(self.validate(epoch))
        self.history.append({"epoch": epoch, **metrics})
        self.save()  # every epoch: the last good state is always on disk
        self.tracker.log_metric_history(step_log)
        self.tracker.log_metrics(metrics, step=epoch)
        # the clock of train_seconds (over resumes, curve scoring left off), so the last line reads what the tables
        # say; the ETA is wall time, from this fit's epochs
        elapsed = self.train_seconds + self._fit_seconds()
        eta = (time.time() - self._fit_start) / epochs_timed * (self.epochs - epoch)
        print(self.progress_line(epoch, metrics, elapsed, eta), flush=True)
        if epochs_timed == 1:  # every model's script is named after it
            hint = contention_hint(self.device, f"OMP_NUM_THREADS=1 python {self.strategy.name}.py "
                                                f"--resume {self.ckpt_path}")
            if hint:
                print(hint, flush=True)
        if cfg.sample_every and epoch % cfg.sample_every == 0 and epoch < self.epochs:
            self.write_pictures(epoch)
            quality = self.score_samples(epoch)  # quality during training, not only at the end
            self.history[-1].update(quality)
            self.tracker.log_metrics(quality, step=epoch)

    def optimizer_step(self, batch: Tensor, epoch: int, i: int) -> dict[str, float]:
        """One step: the loss (autocast), the NaN guard, backward, clipping, the learning rate, AdamW, EMA."""
        with self.autocast():
            out = self.strategy.train_step(self.step_model, batch)
        loss = out["loss"]
        scalars = {k: float(v.detach()) for k, v in out.items()}  # one host sync per step; these models are small
        if not math.isfinite(scalars["loss"]):
            raise NonFiniteLoss(f"train/loss became {scalars['loss']} in epoch {epoch}, step {i + 1} "
                                f"(optimizer step {self.step + 1})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            scalars["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        # The strategy's warm-up / decay, from the saved step: a LambdaLR's state (last_epoch, base_lrs) would be
        # a second copy of step and --lr to save, restore and rewrite when --resume changes --lr.
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * self.strategy.lr_factor(self.step, self.total_steps)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        self.strategy.after_step(self.eval_model, self.step, self.total_steps, self.model)
        return scalars

    def _fit_seconds(self) -> float:
        """Training wall time of the current fit() so far, scoring for the curve left out."""
        return time.time() - self._fit_start - self._eval_pause if self._fit_start else 0.0

    def maybe_score_curve(self, epoch: float) -> None:
        """--eval-every-minutes M: past each multiple of M training minutes, score the eval model into a
        curve point. Its time is kept off the clock and its RNG forked: training is the same without it."""
        every = self.config.eval_every_minutes
        minutes = (self.train_seconds + self._fit_seconds()) / 60
        last = max((p["minutes"] for p in self.quality_curve if not p.get("final")), default=0.0)
        if not every or math.floor(minutes / every) <= math.floor(last / every):
            return  # the next multiple of `every` minutes is not reached yet
        t0 = time.time()
        self.add_curve_point(self.score_samples(self.epoch), minutes, epoch)
        self._eval_pause += time.time() - t0
        self.scoring_seconds += time.time() - t0

    def add_curve_point(self, quality: dict, minutes: float, epoch: float, final: bool = False) -> None:
        """A point {minutes, tflop, epoch, step, sample/...} on both clocks, to time_to_quality.json and MLflow."""
        tflop = self.train_flops / 1e12
        self.quality_curve.append({"minutes": minutes, "tflop": tflop, "epoch": epoch, "step": self.step,
                                   **quality, **({"final": True} if final else {})})
        self.tracker.log_metrics({**quality, "sample/minutes": minutes, "sample/tflop": tflop}, step=math.ceil(epoch))
        atomic_write_bytes(self.run_dir / "time_to_quality.json", json.dumps(self.quality_curve, indent=1).encode())

    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested, self.stop_signal = True, signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: finishing this step, then saving a checkpoint (Ctrl-C again to abort at once)")

    @contextlib.contextmanager
    def evaluating(self, seed: int | None = None):
        """The eval model in eval mode, no gradients, under a fork of torch's RNG (reseeded with `seed`):
        validation, pictures and scores never move training's random stream."""
        model = self.eval_model
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                yield model
        finally:
            self.model.train()

    def validate(self, epoch: int) -> dict[str, float]:
        """get_metrics averaged over the validation split, the same noise every epoch (comparable)."""
        sums: dict[str, float] = {}
        with self.evaluating(seed=self.config.seed + 1) as model:
            for i in range(0, self.val.shape[0], self.config.batch_size):
                batch = self.val[i:i + self.config.batch_size]
                with self.autocast():
                    m = self.strategy.get_metrics(model, batch)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * batch.shape[0]
        with torch.no_grad():  # no validation sprites: the hook runs on the training ones, its metrics dropped
            extra = self.strategy.on_epoch_end(self.model, epoch, self.val if len(self.val) else self.train)
        extra = extra if len(self.val) else {}
        out = {f"val/{k}": v / self.val.shape[0] for k, v in sums.items()}
        out.update({f"val/{k}": float(v) for k, v in extra.items()})
        return out

    def generate(self, n: int, seed: int) -> Tensor:
        """n raw samples from the eval model, reproducible."""
        with self.evaluating() as model:
            return draw_samples(self.strategy, model, n, seed, self.device, self.config.amp)

    def write_pictures(self, epoch: int, final: bool = False) -> dict[str, Path]:
        """The sample grid (one seed, so the grids show the same noise turning into sprites) and the
        strategy's pictures, to the run folder and MLflow."""
        name = "final" if final else f"epoch_{epoch:04d}"
        pictures = {"samples": (self.generate(self.config.n_samples, self.config.seed), 8)}
        if len(self.val) >= 2:  # the extra pictures show validation sprites (a VAE interpolation: pairs)
            gen = torch.Generator(self.device).manual_seed(self.config.seed)
            with self.evaluating() as model:
                pictures.update(self.strategy.images(model, self.val, gen))
        paths = {}
        for key, (images, nrow) in pictures.items():
            img = make_grid(images, nrow=nrow, scale=4, palette=self.palette)
            paths[key] = save_png(img, self.run_dir / key / f"{name}.png")
            self.tracker.log_image(key, img, step=epoch)  # the image chart (MLflow names these files itself)
            self.tracker.log_artifact(paths[key], artifact_path=key)  # the same, named as in the run folder
        return paths

    def score_samples(self, epoch: int) -> dict[str, float]:
        """Sprite-quality metrics of n_eval samples (seed + 2) as sample/<metric>, printed: every grid, and the end."""
        samples = self.generate(self.config.n_eval, self.config.seed + 2)
        quality = {f"sample/{k}": v for k, v in sprite_metrics(samples, self.train, self.palette).items()}
        print(f"sprite quality on {self.config.n_eval} samples (epoch {epoch}):",
              " ".join(f"{k.removeprefix('sample/')} {v:.3f}" for k, v in quality.items()), flush=True)
        return quality

    def write_animation(self, n: int = 16) -> Path | None:
        """The strategy's `trajectory` of n sprites as run_dir/trajectory.gif, if it has one."""
        if not self.strategy.animates():
            return None
        gen = torch.Generator(self.device).manual_seed(self.config.seed)
        with self.evaluating() as model, self.autocast():
            frames = self.strategy.trajectory(model, n, gen).float()
        path = save_gif(frames, self.run_dir / "trajectory.gif", nrow=4)
        self.tracker.log_artifact(path)
        return path

    def progress_line(self, epoch: int, metrics: dict, elapsed: float, eta: float, width: int = 110) -> str:
        """At most `width` characters: the losses, then as many metrics as fit (MLflow has them all),
        e.g. "epoch  12/200 | train loss 2.04 | val loss 2 pixel_acc 0.7 | 40 img/s | 0:00:20, ETA 0:01:00"."""
        head = f"epoch {epoch:>{len(str(self.epochs))}}/{self.epochs}"
        tail = f"{metrics['system/images_per_sec']:.0f} img/s | {fmt_time(elapsed)}, ETA {fmt_time(eta)}"
        order = [k for k in ("train/loss", "val/loss") if k in metrics]
        order += [k for k in metrics if k.startswith("val/") and k not in order]
        order += [k for k in metrics if k.startswith("train/") and k not in order and "grad_norm" not in k]

        def render(keys):
            groups = {}
            for k in keys:
                prefix, _, short = k.partition("/")
                groups.setdefault(prefix, []).append(f"{short} {metrics[k]:.4g}")
            return " | ".join([head] + [f"{p} " + " ".join(items) for p, items in groups.items()] + [tail])

        shown = []
        for k in order:
            if len(render(shown + [k])) > width:
                break
            shown.append(k)
        return render(shown)


def count_step_flops(strategy, model: nn.Module, batch: Tensor, autocast: Callable = contextlib.nullcontext) -> float:
    """FLOPs of the loss's forward and backward on `batch` (torch's FlopCounterMode counts matrix products and
    convolutions, not the optimizer's update), on a copy of the model under a forked RNG: training is untouched."""
    from torch.utils.flop_counter import FlopCounterMode

    copy = deepcopy(model)
    with torch.random.fork_rng(devices=[batch.device] if batch.device.type == "cuda" else []), \
            FlopCounterMode(display=False) as counter:
        with autocast():
            loss = strategy.train_step(copy, batch)["loss"]
        loss.backward()
    return float(counter.get_total_flops())


@torch.no_grad()
def draw_samples(strategy, model: nn.Module, n: int, seed: int, device: torch.device, amp: bool = False) -> Tensor:
    """n raw samples (n, 3, 16, 16) in [0, 1], in chunks of 256 (bounded memory): same seed, same sprites."""
    gen = torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in range(0, n, 256):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            chunks.append(strategy.sample(model, min(256, n - start), gen).float())
    x = torch.cat(chunks)
    check_samples(x, n)
    return x


def check_samples(x: Tensor, n: int) -> None:
    assert x.shape == (n, 3, 16, 16), f"sample() must return ({n}, 3, 16, 16), got {tuple(x.shape)}"
    assert torch.isfinite(x).all(), "sample() returned non-finite values"
    assert x.min() >= -1e-4 and x.max() <= 1 + 1e-4, f"sample() must return [0, 1], got [{x.min():.3f}, {x.max():.3f}]"


def fmt_time(seconds: float) -> str:
    """H:MM:SS, e.g. 0:16:05."""
    return str(datetime.timedelta(seconds=round(seconds)))


# -----------------------------------------------------------------------------
# Training a model: the run folder, train, resume, finish
# -----------------------------------------------------------------------------


class RunFolder:
    """`with RunFolder(path):` a run folder claimed by one run at a time through run.lock (the owner's PID).
    On POSIX the claim is an flock(2), which the kernel drops when its process dies however it dies, so a
    killed run's lock is taken over. Entering sweeps the *.tmp of interrupted writes; leaving removes the
    lock and the folders it created, if still empty."""

    LOCK = "run.lock"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # deepest first
        self.fd: int | None = None

    def __enter__(self) -> "RunFolder":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._claim()
        except BaseException:
            self._remove_empty()
            raise
        self._sweep()
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path / self.LOCK)
            os.close(self.fd)
            self.fd = None
        self._remove_empty()

    def _claim(self) -> None:
        lock = self.path / self.LOCK
        try:
            import fcntl
        except ImportError:  # Windows: an exclusive create; a stale lock must be deleted by hand
            try:
                self.fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise UserError(f"{self.path} is in use by another run ({lock} exists); wait for it to finish, "
                                f"choose another --out, or delete {lock} if no run is using it") from None
            os.write(self.fd, f"{os.getpid()}\n".encode())
            return
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.path} is in use by another run (PID {owner}); wait for it to finish "
                                f"or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # the owner removed the file while we locked it: claim the new one
        stale = os.read(fd, 32).decode(errors="replace").strip()
        if stale:
            print(f"note: {lock} was left by PID {stale}, which has ended; taking the folder over")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _sweep(self) -> None:
        """Temporary files of atomic writes a kill left: this run owns the folder now."""
        orphans = [p for p in self.path.rglob("*.tmp") if p.is_file()]
        for p in orphans:
            p.unlink()
        if orphans:
            print(f"note: removed {len(orphans)} temporary file(s) left by an interrupted write in {self.path}")

    def _remove_empty(self) -> None:
        for p in self.created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break


def train(strategy_cls, config: TrainConfig) -> Path:
    """Train one model end to end (every model file's main() and compare.py); returns the run
    folder. Every input is checked before the folder is claimed; Ctrl-C raises Interrupted."""
    resume_state = load_checkpoint(config.resume) if config.resume else None
    name = strategy_cls.name
    if resume_state:
        check_model_type(resume_state, name, config.resume)
        old = resume_state["config"].get("batch_size")  # a mid-epoch checkpoint counts batches of its own size
        if resume_state.get("resume_batch") and old != config.batch_size:
            raise UserError(f"{config.resume} stopped in the middle of epoch {resume_state.get('epoch', 0) + 1} at "
                            f"--batch-size {old}; resume with that --batch-size and change it at an epoch boundary, "
                            f"so that every sprite of the epoch is trained exactly once")
    device = select_device(config.device)
    seed_everything(config.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = load_sprites(config.data, device, config.palette_size, config.seed)
    palette = resume_state["palette"].to(device) if resume_state else data.palette
    if config.amp and not amp_worth_it(device, config.amp_force):
        config = dataclasses.replace(config, amp=False)

    started = time.localtime()
    if resume_state:
        run_dir = Path(config.resume).resolve().parent.parent
    else:
        run_dir = Path(config.out) if config.out else Path("runs") / name / time.strftime("%Y%m%d-%H%M%S", started)
    with RunFolder(run_dir):
        if not resume_state and (run_dir / "checkpoints" / "last.pt").exists():
            raise UserError(f"{run_dir} already holds a run; continue it with "
                            f"--resume {run_dir / 'checkpoints' / 'last.pt'} or choose another --out")
        strategy = strategy_cls(config, palette)
        tracker = Tracker(config.mlflow, experiment=name, run_name=run_name(name, config, started),
                          run_id=resume_state.get("mlflow_run_id") if resume_state else None)
        status = "FAILED"
        try:
            trainer = Trainer(strategy, config, data.train, data.val, palette, run_dir, tracker)
            description = strategy.describe(trainer.model)
            if description:
                print(description)
            print(f"{name}: {trainer.n_params():,} parameters | {data.train.shape[0]} train / {data.val.shape[0]} val "
                  f"sprites from {data.path} | device {device}{' + bf16 autocast' if config.amp else ''} | run folder {run_dir}")
            if not len(data.val):
                print(f"note: {data.path} has no validation sprites: no val/ metrics and no validation pictures")
            if resume_state:
                resume(trainer, resume_state, config)
                where = f"epoch {trainer.epoch + 1}, step {trainer.resume_batch + 1}" if trainer.resume_batch else f"epoch {trainer.epoch + 1}"
                print(f"resuming from {config.resume} at {where}")
            else:
                settings = dataclasses.asdict(config)
                tracker.log_params({k: v for k, v in settings.items() if k not in PLUMBING})
                tracker.set_tags({"run_folder": str(run_dir.resolve()), "device": str(device), "data": str(data.path),
                                  **{k: settings[k] for k in ("sample_every", "n_samples")},
                                  "n_params": trainer.n_params(), "n_train": data.train.shape[0],
                                  "n_val": data.val.shape[0]})
                tracker.log_dataset(data.path, data.train)

            trainer.fit()
            if trainer.stop_requested:
                status = "KILLED"
                raise Interrupted(f"interrupted; checkpoint saved, resume with: --resume {shlex.quote(str(trainer.ckpt_path))}",
                                  status=128 + trainer.stop_signal)
            final = finish(trainer, data)
            status = "FINISHED"
            print(f"done: {final['samples']} | checkpoint {trainer.ckpt_path}")
            if tracker.run_id:
                print(tracker.how_to_view())
        except NonFiniteLoss as e:
            good = f"the last good checkpoint is {trainer.ckpt_path} (epoch {trainer.epoch})" if trainer.ckpt_path.exists() \
                else "no epoch finished, so there is no checkpoint"
            raise UserError(f"{e}; {good}. Try a lower --lr or --grad-clip 1") from None
        except OSError as e:  # e.g. the disk filled up: the last checkpoint written is still whole
            ckpt = run_dir / "checkpoints" / "last.pt"
            then = f"the last good checkpoint is {ckpt}; free some space, then --resume {ckpt}" if ckpt.exists() \
                else "no checkpoint was written; free some space or choose another --out"
            raise UserError(f"cannot write {e.filename or run_dir} ({e.strerror or e}); {then}") from None
        finally:
            tracker.end(status)
    return run_dir


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint; exit status 128 + the signal (130, 143)."""

    def __init__(self, message: str, status: int = 130):
        super().__init__(message)
        self.status = status


def check_model_type(state: dict, name: str, path) -> None:
    """Another model's checkpoint is refused by its type, before its config or weights confuse."""
    kind = state.get("strategy")
    if kind != name:  # only a model file beside this one becomes a command to copy
        known = isinstance(kind, str) and NAME.fullmatch(kind) is not None \
            and kind not in ("common", "compare", "download") and Path(__file__).with_name(f"{kind}.py").is_file()
        advice = f"`python {kind}.py --resume {shlex.quote(str(path))}`" if known else "the script that trained it"
        raise UserError(f"{path} is a {kind} checkpoint, not {name}; resume it with {advice}")


def resume(trainer: Trainer, state: dict, config: TrainConfig) -> None:
    """Restore a checkpoint into the trainer. Changed flags take effect, printed and logged (--lr
    and --weight-decay written into the restored optimizer); a changed shape is refused."""
    saved = state["config"]
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(config).items()
               if k in saved and saved[k] != v and k not in ("resume", "out")}
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:  # weights of another shape
        flags = ", ".join(f"--{k.replace('_', '-')} {new} (checkpoint: {old})" for k, (old, new) in changed.items())
        raise UserError(f"{config.resume} does not fit the model built from {flags or 'these flags'} "
                        f"({first_line(e)}); resume without changing the model's shape, or start a new run "
                        f"with another --out") from None
    for key in ("lr", "weight_decay"):
        if key in changed:
            for group in trainer.optimizer.param_groups:
                group[key] = getattr(config, key)
    if changed:
        print("resuming with changed settings: " + ", ".join(
            f"--{k.replace('_', '-')} {new} (was {old})" for k, (old, new) in changed.items()))
        trainer.tracker.log_params({f"resumed_at_epoch_{trainer.epoch}/{k}": new for k, (_, new) in changed.items()})


# where and how a run is kept, not what is trained: MLflow tags or nothing, not params
PLUMBING = ("mlflow", "out", "resume", "device", "data", "sample_every", "n_samples")


def run_name(model: str, config: TrainConfig, when: time.struct_time) -> str:
    """The model, its Config's `run_name_flags` values, the epochs, changed flags and the start,
    e.g. "vae ce 200ep lr=0.003 2026-11-30 04:10"."""
    picked, changed = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in getattr(config, "run_name_flags", ()):
            picked.append(str(value))
        elif f.name not in PLUMBING and f.name != "epochs" and value != f.default:
            changed.append(f"{f.name.replace('_', '-')}={value:g}" if isinstance(value, float)
                           else f"{f.name.replace('_', '-')}={value}")
    text = " ".join([model, *picked, f"{config.epochs}ep", *changed])
    text = text if len(text) <= 70 else text[:67] + "..."
    return f"{text} {time.strftime('%Y-%m-%d %H:%M', when)}"


def finish(trainer: Trainer, data: Sprites) -> dict[str, Path]:
    """End of training: final pictures, scores of n_eval samples, metrics.json, the checkpoint to MLflow."""
    cfg = trainer.config
    paths = trainer.write_pictures(trainer.epoch, final=True)
    trainer.write_animation()
    quality = trainer.score_samples(trainer.epoch)
    if cfg.eval_every_minutes:  # the curve ends with the end-of-run score
        trainer.add_curve_point(quality, trainer.train_seconds / 60, trainer.epoch, final=True)
    with trainer.evaluating() as model:
        extra = trainer.strategy.on_train_end(model, data.train)  # e.g. vqvae.py's second sampler
    if extra:
        print("end-of-run metrics:", " ".join(f"{k} {v:.3f}" for k, v in extra.items()))
    quality.update(extra)
    trainer.tracker.log_metrics(quality, step=trainer.epoch)
    summary = {"epochs": trainer.epoch, "n_params": trainer.n_params(), "train_seconds": trainer.train_seconds,
               "train_tflop": trainer.train_flops / 1e12, **trainer.history[-1], **quality}
    if trainer.quality_curve:  # --eval-every-minutes: the curve, and what scoring it cost (off the clock)
        summary.update(scoring_seconds=trainer.scoring_seconds, time_to_quality=trainer.quality_curve)
    if trainer.tracker.stopped:  # MLflow failed mid-run: say where its record ends
        summary["mlflow"] = trainer.tracker.stopped
    if not len(trainer.val):
        summary["note"] = "no validation sprites: no val/ metrics and no validation pictures"
    atomic_write_bytes(trainer.run_dir / "metrics.json", json.dumps(summary, indent=2).encode())
    trainer.tracker.log_artifact(trainer.run_dir / "metrics.json")
    trainer.tracker.log_artifact(trainer.ckpt_path)
    return paths


def saved_config(config_cls, saved: dict) -> dict:
    """A checkpoint's config as config_cls's arguments: unknown fields dropped; fields newer than
    the checkpoint take config_cls.LEGACY's values (which rebuild its model), not today's defaults."""
    check_saved_config(config_cls, saved)
    known = {f.name for f in dataclasses.fields(config_cls)}
    legacy = {k: v for k, v in getattr(config_cls, "LEGACY", {}).items() if k not in saved}
    return {**legacy, **{k: v for k, v in saved.items() if k in known}}


# -----------------------------------------------------------------------------
# Sampling a trained checkpoint: `python X.py sample`
# -----------------------------------------------------------------------------


class Trained(NamedTuple):
    strategy: Strategy
    model: nn.Module       # the eval model (the EMA weights, if kept), in eval mode, on the device
    palette: torch.Tensor  # (K, 3) the run's palette, on the device
    config: TrainConfig    # the run's Config, with the overrides
    state: dict            # the whole checkpoint (epoch, train_seconds, ...)


def load_for_sampling(checkpoint: str | os.PathLike, device: torch.device, strategy_cls, config_cls,
                      overrides: dict | None = None, state: dict | None = None) -> Trained:
    """Rebuild a trained strategy_cls model; `overrides` replace config values (a temperature); `state`:
    the checkpoint already loaded (compare.py's load_any)."""
    state = load_checkpoint(checkpoint) if state is None else state
    name = state.get("strategy")
    if name != strategy_cls.name:
        raise UserError(f"{checkpoint} is a {name} checkpoint, not {strategy_cls.name}")
    try:
        config = config_cls(**{**saved_config(config_cls, state["config"]), **(overrides or {})})
    except ValueError as e:  # e.g. a sampling flag out of range
        raise UserError(str(e)) from None
    palette = state["palette"].to(device)
    strategy = strategy_cls(config, palette)
    strategy.load_extra_state(state.get("extra", {}))
    check_model_size(strategy, config)
    model = strategy.build_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{checkpoint} does not fit the model these flags build ({first}); "
                        f"drop the architecture flags") from None
    if state.get("ema") is not None:  # sample with the EMA weights, as training did
        ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
        ema.load_state_dict(state["ema"])
        model = ema.module
    return Trained(strategy, model.to(device).eval(), palette, config, state)


def sample_command(strategy_cls, config_cls, argv: list[str]) -> None:
    """`python X.py sample`: draw sprites from a trained checkpoint of that model."""
    parser = download.OneLineParser(
        prog=f"{Path(sys.argv[0]).name} sample",
        description="Draw sprites from a trained checkpoint. Model flags given here override the checkpoint's "
                    "config (e.g. a sampling temperature).")
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/last.pt from a run folder")
    parser.add_argument("--n", type=int, default=64, help="number of sprites (default: %(default)s)")
    parser.add_argument("--out", default="", metavar="FILE.png|FOLDER|FILE.gif",
                        help="by its suffix: .png a grid; none, a folder of one 16x16 PNG per sprite; .gif an "
                             "animation of one sampling run (models with a trajectory: diffusion.py). "
                             "Default: sample-seed<SEED>.png in the checkpoint's run folder")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same sprites (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--gif", default="", help="also write an animated GIF of one sampling run of the first "
                        "(up to) 16 sprites, for models that define a trajectory (diffusion.py)")
    parser.add_argument("--class", dest="sample_class", metavar="NAME|INDEX",
                        help="checkpoints trained with --condition: draw only this class (e.g. red, cluster3 or 2); "
                             "default: one class per row of 8")
    # the model's own fields, or only its `sample_flags` (not e.g. vae.py's KL weight)
    own = model_fields(config_cls) & set(getattr(config_cls, "sample_flags", model_fields(config_cls)))
    if own:
        add_config_flags(parser.add_argument_group("model flags (override the checkpoint's config)"),
                         config_cls, suppress_defaults=True, only=own)
    args = parser.parse_args(argv)
    check_range("--n", args.n, 1, SPRITES_MAX)
    check_range("--seed", args.seed, 0, SEED_MAX)
    if args.gif:
        check_suffix("--gif", args.gif, (".gif",))
    out = sample_out(args.out, args.checkpoint, args.seed)
    overrides = {k: v for k, v in vars(args).items() if k in own}
    device = select_device(args.device)
    strategy, model, palette, _, _ = load_for_sampling(args.checkpoint, device, strategy_cls, config_cls, overrides)
    if args.sample_class is not None:  # conditioning (diffusion.py --condition): the labeller names the classes
        labeller = getattr(strategy, "labeller", None)
        if labeller is None:
            raise UserError(f"{args.checkpoint} was trained without classes; --class needs a checkpoint "
                            f"trained with --condition colour or --condition cluster")
        strategy.sample_class = labeller.parse(args.sample_class)
    if (args.gif or out.suffix.lower() == ".gif") and not strategy.animates():
        raise UserError(f"{strategy_cls.name} has no sampling trajectory to animate; write a .png or a folder")
    if out.suffix.lower() == ".gif":
        args.gif, out = str(out), None
    if out is not None:  # None: --out NAME.gif, only the animation below
        t0 = time.perf_counter()
        x = draw_samples(strategy, model, args.n, args.seed, device)
        took = f"sampled in {time.perf_counter() - t0:.2f} s on {device}"  # draw_samples reads x: the device is done
        if out.suffix.lower() == ".png":
            save_png(make_grid(x, nrow=8, scale=4, palette=palette), out)
            print(f"wrote {args.n} sprites to {out} ({took})")
        else:
            snapped = (snap_to_palette(x, palette) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for i, sprite in enumerate(snapped):  # (n, 16, 16, 3) uint8
                save_png(Image.fromarray(sprite), out / f"{i:04d}.png")
            print(f"wrote {args.n} PNGs (16x16) to {out}/ ({took})")
    if args.gif:
        with torch.no_grad():
            frames = strategy.trajectory(model, min(args.n, 16), torch.Generator(device).manual_seed(args.seed))
        save_gif(frames.float(), args.gif, nrow=4)
        print(f"wrote an animation of {min(args.n, 16)} sprites ({frames.shape[0]} frames) to {args.gif}")


def sample_out(out: str, checkpoint: str, seed: int) -> Path:
    """By --out's suffix: .png a grid, .gif an animation, none (or a folder) one PNG per sprite;
    default: sample-seed<SEED>.png in the checkpoint's run folder."""
    if not out:
        ckpt = Path(checkpoint)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return run_dir / f"sample-seed{seed}.png"
    path = Path(out)
    if path.suffix.lower() not in ("", ".png", ".gif") and not path.is_dir():
        raise UserError(f"--out {out}: cannot write {path.suffix} files; use a .png (a grid), a folder name "
                        f"without a suffix (one PNG per sprite) or a .gif (an animation, diffusion.py)")
    return path


def model_fields(config_cls) -> set[str]:
    """A model's own Config fields, not TrainConfig's: what `sample` and bench let a user override."""
    return {f.name for f in dataclasses.fields(config_cls)} - {f.name for f in dataclasses.fields(TrainConfig)}


# -----------------------------------------------------------------------------
# Speed: the --amp decision and the busy-CPU hint (cheap checks, nothing timed)
# -----------------------------------------------------------------------------


def native_bf16(device: torch.device) -> tuple[bool | None, str]:
    """Does this device do bf16 in hardware (None: cannot tell), and what was found, in words. CPU: the
    avx512_bf16 or amx_bf16 flag (x86) or bf16 (Arm) in /proc/cpuinfo."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    if device.type != "cpu":
        return True, f"{device.type}: bf16 not checked"
    try:
        flags = set(" ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)).split())
    except OSError:
        return None, "no /proc/cpuinfo to read CPU flags from"
    found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return bool(found), (f"CPU flags {', '.join(found)}" if found else "no avx512_bf16 or amx_bf16 CPU flag")


def amp_worth_it(device: torch.device, force: bool) -> bool:
    """--amp's decision: bf16 autocast, except on a CPU known to lack bf16 instructions (PyTorch emulates
    bf16 there, ~10x slower, docs/results/bench/log.txt): it says so and trains in fp32, unless --amp-force."""
    native, found = native_bf16(device)
    if native is not False or force:
        return True
    print(f"--amp: this CPU has {found}, so bf16 would be emulated (about 10x slower than fp32 on such a CPU, "
          f"docs/results/bench/log.txt); training runs in fp32 (--amp-force to use bf16 anyway)")
    return False


def contention_hint(device: torch.device, resume_command: str, threshold: float = 0.6) -> str:
    """On a CPU with several threads: when the 1-minute load average (this run included) leaves each less
    than `threshold` of a core, PyTorch's threads wait for each other; one line points to OMP_NUM_THREADS=1."""
    if device.type != "cpu" or torch.get_num_threads() < 2 or not hasattr(os, "getloadavg"):
        return ""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if cpus >= threshold * load:
        return ""
    return (f"hint: other processes share these CPU cores (load average {load:.1f} on {cpus} CPUs), so training "
            f"is slower than on an idle machine; one thread is often much faster then: Ctrl-C, then {resume_command}")


# -----------------------------------------------------------------------------
# The command line of a model file: train, sample
# -----------------------------------------------------------------------------


def parse_train_args(config_cls, argv: list[str], strategy_name: str = "") -> TrainConfig:
    prog = Path(sys.argv[0]).name
    parser = download.OneLineParser(
        usage=f"{prog} [options]                     train (options below)\n"
              f"       {prog} sample --checkpoint PATH ...  draw sprites from a run ({prog} sample --help)",
        description=(sys.modules[config_cls.__module__].__doc__ or "").split("\n\n")[0],
        epilog=f"other modes: `{prog} sample --help`; speed: `python compare.py bench --models NAME`")
    add_config_flags(parser, config_cls)
    args = parser.parse_args(argv)
    values = vars(args)
    if values.get("resume"):
        # the checkpoint's config, overridden by the flags given now
        only_given = argparse.ArgumentParser(add_help=False)
        add_config_flags(only_given, config_cls, suppress_defaults=True)
        given = vars(only_given.parse_args(argv))
        state = load_checkpoint(values["resume"])
        if strategy_name:
            check_model_type(state, strategy_name, values["resume"])
        values = {**saved_config(config_cls, state["config"]), **given, "resume": values["resume"]}
    return make_config(config_cls, parser, values)


def main(strategy_cls, config_cls, argv: list[str] | None = None, moved: dict[str, str] | None = None) -> None:
    """Every model file's command line: `python X.py [flags]` trains, `python X.py sample` draws. `moved`:
    {old mode: its compare.py command}; the old spelling (and `bench`) is refused naming the new one."""
    argv = sys.argv[1:] if argv is None else argv
    moved = {"bench": f"python compare.py bench --models {strategy_cls.name}", **(moved or {})}

    def run():
        if argv[:1] == ["sample"]:
            sample_command(strategy_cls, config_cls, argv[1:])
        elif argv[:1] and argv[0] in moved:
            raise UserError(f"`python {strategy_cls.name}.py {argv[0]}` has moved; run `{moved[argv[0]]}` instead")
        else:
            train(strategy_cls, parse_train_args(config_cls, argv, strategy_cls.name))
    # a UserError, DataError or OSError (full disk): one line, status 2; Ctrl-C 130; a bug: its traceback
    download.guarded(run, user_errors=(UserError,))

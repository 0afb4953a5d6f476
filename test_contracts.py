"""Contract tests: `pytest test_contracts.py` (the whole suite: a few minutes on 2 cores).

Two kinds of test, as the project's style asks:
- contract tests: shapes, ranges, finite losses, determinism, reference formulas;
- each script run as a subprocess on a tiny budget.
Everything runs on synthetic sprites made here; tests that need the real
Kenney tilesheet read it from ../shared/ and are skipped, with the reason, when
it is absent.

The sections follow the files they test, after the shared helpers: common.py,
vae.py, vqvae.py, diffusion.py, compare.py, download.py, then the docs. Every
test's name starts with the file it tests (test_vqvae_..., test_docs_...), so
`pytest test_contracts.py -k vqvae` runs a file's tests; the tests over every
model of compare.py's registry carry the model's name in their id.

Run this file directly to train the tiny test model with the real CLI:
`python test_contracts.py --epochs 2 --data data/sprites-colored.npz`.
"""

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import compare
import download
import diffusion
import vae
import vqvae


# =============================================================================
# Shared helpers: synthetic data, the tiny test strategy, tiny configurations, running scripts
# =============================================================================


ROOT = Path(__file__).resolve().parent
REAL_SHEET = ROOT.parent / "shared" / "data" / "kenney-1-bit-pack" / "colored-transparent_packed.png"
needs_real_sheet = pytest.mark.skipif(not REAL_SHEET.exists(), reason=f"real tilesheet not at {REAL_SHEET}")
SHEET_COLOURS = [(56, 217, 115), (60, 172, 215), (122, 68, 74), (191, 121, 88),
                 (207, 198, 184), (230, 72, 46), (244, 180, 27)]


def synthetic_sheet(cols=8, rows=8, seed=0) -> np.ndarray:
    """An RGBA sheet of 16x16 tiles: each a random blob of one sheet colour
    with a density drawn from 0.05 to 0.6, so the filter keeps some and drops
    some; tile 0 is empty."""
    rng = np.random.default_rng(seed)
    sheet = np.zeros((rows * 16, cols * 16, 4), np.uint8)
    for t in range(1, rows * cols):
        r, c = divmod(t, cols)
        n_fg = int(rng.uniform(0.05, 0.6) * 256)
        mask = np.zeros(256, bool)
        mask[rng.choice(256, n_fg, replace=False)] = True
        tile = np.zeros((256, 4), np.uint8)
        tile[mask] = (*SHEET_COLOURS[t % 7], 255)
        sheet[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = tile.reshape(16, 16, 4)
    return sheet


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A prepared dataset (.npz) made by download.py from a synthetic sheet."""
    d = tmp_path_factory.mktemp("data")
    sheet = d / "sheet.png"
    sheet.write_bytes(png_bytes(synthetic_sheet(cols=12, rows=10)))
    return download.prepare(source=str(sheet), out=str(d), log=lambda *a: None)


def make_zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@dataclass
class TinyConfig(common.TrainConfig):
    hidden: int = 32
    # width of the tiny denoising autoencoder
    nan_at_step: int = 0
    # return a NaN loss at this training step (0 = never): tests the NaN guard
    interrupt_at_step: int = 0
    # send ourselves Ctrl-C (SIGINT) at this step (0 = never): tests interruption


class TinyStrategy(common.Strategy):
    """A denoising autoencoder on flattened sprites: small, fast, and its loss
    falls quickly, which is all the Trainer tests need."""

    name = "tiny"

    def __init__(self, config, palette):
        self.config, self.palette, self.calls = config, palette, 0

    def build_model(self, config):
        self.built = nn.Sequential(nn.Flatten(), nn.Linear(768, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 768))
        return self.built

    def train_step(self, model, batch):
        # steps of the trained model only: the Trainer's FLOP count runs one train_step on a copy first
        step = getattr(model, "_orig_mod", model) is self.built
        self.calls += step
        x = common.to_model_range(batch)
        y = model(x + 0.1 * torch.randn_like(x)).view(-1, 3, 16, 16)  # uses the global RNG, as models do
        loss = ((y - x) ** 2).mean()
        if step and self.calls == self.config.nan_at_step:
            loss = loss * float("nan")
        if step and self.calls == self.config.interrupt_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return {"loss": loss, "abs_err": (y - x).abs().mean()}

    def sample(self, model, n, generator):
        z = torch.randn(n, 3, 16, 16, generator=generator, device=generator.device)
        return common.from_model_range(torch.tanh(model(z).view(n, 3, 16, 16)))

    def get_metrics(self, model, batch):
        x = common.to_model_range(batch)
        return {"loss": float(((model(x).view(-1, 3, 16, 16) - x) ** 2).mean())}


def loss_before_after(strategy, model, batch, steps, lr, measure=None) -> tuple[float, float]:
    """The loss on a fixed batch, measured with the same noise before and after
    `steps` AdamW steps, so the comparison is about the weights only."""
    measure = measure or (lambda: float(strategy.train_step(model, batch)["loss"].detach()))

    def fixed():
        with torch.random.fork_rng():
            torch.manual_seed(123)
            return measure()

    before = fixed()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = strategy.train_step(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, fixed()


def last_pt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def state_of(run_dir: Path) -> dict:
    return common.load_checkpoint(last_pt(run_dir))


def params_of(run_dir: Path) -> dict:
    return state_of(run_dir)["model"]


@pytest.fixture(scope="module")
def sprites(dataset):
    return common.load_sprites(dataset, torch.device("cpu"))


@pytest.fixture(scope="module")
def vae_run(dataset, tmp_path_factory) -> Path:
    """One tiny finished vae run laid out as the model script writes it: runs/vae/<date-time>/."""
    out = tmp_path_factory.mktemp("runs") / "vae" / "20260101-000000"
    with contextlib.redirect_stdout(io.StringIO()):
        return common.train(vae.VAEStrategy, tiny_config("vae", dataset, epochs=1, sample_every=0, out=str(out)))


# The commands are read from the pages at test time: the lines of fenced
# shell blocks (only the `$ ` lines where a block shows output too) and inline
# `python X.py ...` spans, in page order. Each is parsed by the very parser its
# script builds for it, caught by intercepting ArgumentParser.parse_args, so
# flags and subcommands added later are known without a list kept here.
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "learn").glob("*.md")),
             *sorted((ROOT / "docs" / "results").rglob("README.md"))]  # the tutorials and the lab notes
ALL_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SUBCOMMANDS = ("sample", "bench", "report", "plot", "guidance", "labels")
COMMAND = re.compile(r"^(?:\w+=\S+\s+)*(?:nice -n \d+\s+)?(?:time\s+)?(python3?\s+[\w-]+\.py\b.*)$")


def doc_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after `python`) of every `python X.py ...` command on a page, in page order."""
    lines = page.read_text().splitlines()
    fenced, blocks, current = [False] * len(lines), [], None
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced[i] = True
            if current is None:  # an opening fence
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            fenced[i] = True
            current.append((i + 1, line.strip()))
    candidates = []
    for block in blocks:
        prompts = [(no, line[2:]) for no, line in block if line.startswith("$ ")]
        pending = None
        for no, line in prompts or block:
            if pending:
                no, line = pending[0], pending[1] + " " + line
            pending = (no, line[:-1]) if line.endswith("\\") else None
            if not pending:
                candidates.append((no, line))
    prose = "\n".join("" if f else line for f, line in zip(fenced, lines))
    for m in re.finditer(r"`(python3?\s[^`]+)`", prose):  # inline spans may wrap onto the next line
        candidates.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    commands = []
    for no, line in sorted(candidates):
        for part in re.split(r"&&|;|\|", line):
            m = COMMAND.match(part.strip())
            if m:
                commands.append((no, shlex.split(m.group(1), comments=True)[1:]))
    return commands


# Each model of compare.py's registry declares its tiny configuration (TINY) next
# to its Config, small enough for a few seconds on 2 cores; "tiny" is the test
# strategy's. A fourth model joins the registry tests below by its registry line.

TINY: dict[str, dict] = {"tiny": dict(epochs=2, batch_size=16, lr=3e-3, sample_every=0),
                         **{name: compare.module_of(cls).TINY for name, (cls, _) in compare.MODELS.items()}}


def tiny_config(name: str, dataset: Path | None = None, tmp_path: Path | None = None, **kw) -> common.TrainConfig:
    """The one tiny-configuration builder: TINY[name] for `name`, a model of
    compare.py's registry or "tiny" (TinyConfig), on the CPU, untracked, with 8
    sprites per grid and 16 scored; `dataset` is its --data, `tmp_path` holds its
    run folder (tmp_path/run); keywords override."""
    config_cls = TinyConfig if name == "tiny" else compare.MODELS[name][1]
    base = dict(device="cpu", mlflow=False, n_samples=8, n_eval=16)
    if dataset is not None:
        base["data"] = str(dataset)
    if tmp_path is not None:
        base["out"] = str(tmp_path / "run")
    return config_cls(**{**base, **TINY[name], **kw})


def tiny_model(name: str, palette: torch.Tensor, dataset: Path | None = None, **kw):
    """(strategy, model) of tiny_config(name, dataset, **kw), the model freshly built from seed 0."""
    torch.manual_seed(0)
    config = tiny_config(name, dataset, **kw)
    strategy = compare.MODELS[name][0](config, palette)
    return strategy, strategy.build_model(config)


def tiny_flags(name: str) -> list[str]:
    """TINY[name] as command-line flags."""
    flags = []
    for k, v in TINY[name].items():
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return flags


@pytest.fixture(params=list(compare.MODELS))
def model(request, dataset, sprites):
    """(module, Strategy class, tiny Config, palette, fixed batch) for each model of the registry."""
    cls, _ = compare.MODELS[request.param]
    return compare.module_of(cls), cls, tiny_config(request.param, dataset), sprites.palette, sprites.train[:16]


def run_script(*args, cwd: Path = ROOT, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """The one subprocess runner: `python ARGS...` (a script and its arguments, or
    -c CODE) in `cwd`, its output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kw)


T = "test_contracts.py"  # the tiny test model's CLI: common.main, as every model file uses it
TRAIN_FLAGS = ["--data", "{data}", "--no-mlflow", "--device", "cpu", "--epochs", "1", "--batch-size", "16",
               "--n-eval", "16", "--n-samples", "8", "--sample-every", "0"]


def start_until_first_epoch(*args) -> subprocess.Popen:
    """`python test_contracts.py ARGS` started and read up to its first epoch line: a checkpoint exists then."""
    proc = subprocess.Popen([sys.executable, T, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch"):
            return proc
    raise AssertionError(proc.communicate(timeout=60)[1])


def script_entry(script: str):
    """The function `python <script> ARGS` calls with ARGS."""
    if script == "test_contracts.py":
        return lambda argv: common.main(TinyStrategy, TinyConfig, argv)
    return importlib.import_module(script[:-3]).main


def run_script_main(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a script's main(argv) here, as `python script argv` would: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with pytest.raises(SystemExit) as e:
            script_entry(script)(argv)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def assert_one_clean_line(code, out, err, fragment):
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert fragment in lines[0], (fragment, lines[0])


# =============================================================================
# The layers: download.py <- common.py <- the model files <- compare.py
# =============================================================================

LAYERS = {"download": 0, "common": 1, "vae": 2, "vqvae": 2, "diffusion": 2, "compare": 3}


def test_layers_no_file_imports_one_above_it_and_the_registry_names_each_model_after_its_file():
    """Every import in every project file, at the top or inside a function,
    points to a lower layer: the model files import common.py (and no other
    model file), common.py imports download.py, only compare.py imports the
    model files, and a registry model is in LAYERS, named after its file. An edge
    running back up (e.g. common.py importing compare.py for a mode) fails here."""
    assert set(LAYERS) >= {cls.__module__ for cls in compare.REGISTRY}
    for name, (cls, config_cls) in compare.MODELS.items():  # messages say `python <name>.py` for a <name> checkpoint
        assert issubclass(cls, common.Strategy) and cls.__module__ == name, (name, cls)
        assert issubclass(config_cls, common.TrainConfig) and (ROOT / f"{name}.py").exists()
    upward = []
    for name, layer in LAYERS.items():
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in LAYERS and LAYERS[top] >= layer:
                    upward.append(f"{name}.py:{node.lineno} imports {top}")
    assert not upward, upward


# =============================================================================
# common.py: palette, data, pictures, metrics, Config -> argparse, the Trainer, MLflow, the CLI, faults
# =============================================================================


# -----------------------------------------------------------------------------
# Palette (k-means++ and snapping), data helpers, pictures, metrics
# -----------------------------------------------------------------------------


def test_common_kmeans_recovers_a_known_palette_and_snap_picks_the_nearest_colour():
    # 8 colours, black dominant (as in sprites), each pixel jittered by +-1.
    rng = np.random.default_rng(1)
    truth = np.array([(0, 0, 0)] + SHEET_COLOURS, float)
    counts = [5000] + [300] * 7
    pixels = np.concatenate([np.repeat(truth[i:i + 1], c, 0) for i, c in enumerate(counts)])
    pixels = np.clip(pixels + rng.integers(-1, 2, pixels.shape), 0, 255)
    palette = common.kmeans_palette(pixels, k=8, seed=0)
    assert palette.shape == (8, 3) and palette.dtype == np.uint8
    assert tuple(palette[0]) == (0, 0, 0) or np.abs(palette[0].astype(int)).max() <= 1  # most pixels first
    for colour in truth:  # every true colour has a centroid within 1 level
        assert np.abs(palette.astype(float) - colour).max(1).min() <= 1, colour
    assert np.array_equal(palette, common.kmeans_palette(pixels, k=8, seed=0))  # deterministic
    palette = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 0, 1]])
    x = torch.tensor([[0.1, 0.1, 0.0], [0.8, 0.3, 0.1], [0.2, 0.1, 0.7], [0.49, 0.0, 0.0]])  # 4 pixels
    images = x.T.reshape(1, 3, 1, 4)  # (1, 3, 1, 4)
    snapped = common.snap_to_palette(images, palette)
    assert snapped.shape == images.shape
    assert common.palette_index(images, palette).flatten().tolist() == [0, 1, 2, 0]
    assert torch.equal(snapped[0, :, 0, 1], palette[1])


@needs_real_sheet
def test_common_kmeans_on_the_real_sheet_finds_black_and_the_seven_colours_and_random_init_does_not():
    """Random initialisation wastes centres on black: the failure k-means++ exists
    to avoid (docs/learn/01-data-pipeline.md)."""
    arrays, _ = download.build_dataset(download.load_sheet(REAL_SHEET.read_bytes()))
    pixels = arrays["images"][~arrays["is_val"]].reshape(-1, 3)
    palette = common.kmeans_palette(pixels, k=8, seed=0).astype(int)
    assert tuple(palette[0]) == (0, 0, 0)
    for colour in SHEET_COLOURS:
        assert np.abs(palette - np.array(colour)).max(1).min() <= 2, colour
    palette = common.kmeans_palette(pixels, k=8, seed=0, init="random").astype(int)
    found = sum(np.abs(palette - np.array(c)).max(1).min() <= 2 for c in SHEET_COLOURS)
    assert found < 7 and (palette.sum(1) <= 3).sum() >= 3


def test_common_load_sprites_split_and_ranges_hflip_mirrors_about_half_seeded_and_the_grid_has_gutters(
        dataset, sprites):
    with np.load(dataset) as npz:
        n_val = int(npz["is_val"].sum())
        n = len(npz["images"])
    assert sprites.train.shape == (n - n_val, 3, 16, 16) and sprites.val.shape == (n_val, 3, 16, 16)
    assert sprites.train.dtype == torch.float32 and 0 <= sprites.train.min() and sprites.train.max() <= 1
    assert sprites.palette.shape == (8, 3)
    x = sprites.train[:4]
    assert torch.allclose(common.from_model_range(common.to_model_range(x)), x)
    with pytest.raises(AssertionError, match=r"\[0, 1\]"):
        common.to_model_range(x * 2)
    x = torch.arange(64 * 3 * 16 * 16, dtype=torch.float32).view(64, 3, 16, 16)
    a = common.random_hflip(x, torch.Generator().manual_seed(0))
    b = common.random_hflip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = (a != x).flatten(1).any(1)
    assert 16 < flipped.sum() < 48
    assert torch.equal(a[flipped], x[flipped].flip(-1))
    img = common.make_grid(torch.rand(10, 3, 16, 16), nrow=8, scale=4)
    assert img.size == ((8 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    assert img.getpixel((0, 0)) == (48, 48, 48)  # gutter


def test_common_sprite_metrics_on_real_sprites_and_on_noise_and_knn_reference_values(sprites):
    real = common.sprite_metrics(sprites.train, sprites.train, sprites.palette)
    assert real["palette_distance"] < 1e-3
    assert real["one_colour_rate"] == 1.0 and real["density_in_range"] == 1.0
    assert real["near_copy_rate"] == 1.0 and real["precision"] == 1.0 and real["coverage"] == 1.0
    assert real["density"] >= 4 / 3  # each real ball holds its own sprite and its k = 3 neighbours, as samples
    noise = common.sprite_metrics(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                                  sprites.train, sprites.palette)
    assert noise["palette_distance"] > 20 and noise["near_copy_rate"] == 0.0 and noise["one_colour_rate"] == 0.0
    assert noise["unique_rate"] == 1.0 and noise["coverage"] < 0.1 and noise["density"] < real["density"] / 4
    dup = common.sprite_metrics(sprites.train[:1].repeat(10, 1, 1, 1), sprites.train, sprites.palette)
    assert dup["unique_rate"] == pytest.approx(0.1)
    # 1-D worked example: real points 0..9 (k=1 radius 1 each); fakes at 0.5
    # (inside), 20 and 30 (outside): precision 1/3. The fake set's radii are
    # 19.5, 10, 10, so every real point lies within 19.5 of the fake at 0.5.
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[0.5], [20.0], [30.0]])
    precision, recall = common._knn_precision_recall(real, fake, k=1)
    assert precision == pytest.approx(1 / 3) and recall == 1.0
    # Density and coverage keep to the real balls: the fake at 0.5 lies in the balls of 0 and 1 (radius 1), the
    # fakes at 20 and 30 in none, so density = 2 / (k M) = 2/3 and coverage = 2/10, where recall above said 1.
    density, coverage = common._knn_density_coverage(real, fake, k=1)
    assert density == pytest.approx(2 / 3) and coverage == pytest.approx(0.2)


# -----------------------------------------------------------------------------
# Config -> argparse, the Trainer driven end to end by the tiny strategy, the CLI as a user runs it
# -----------------------------------------------------------------------------


BAD_FLAGS = [  # (Config, flags, message): one row per check of a Config's __post_init__: TrainConfig's
    # (through TinyConfig; one row stands for each loop over fields: at least 1, listed choices, BOUNDS),
    # then each model's own. An argparse type error is BAD_INPUT's `--epochs abc`.
    (TinyConfig, ["--epochs", "0"], "--epochs must be at least 1"),
    (TinyConfig, ["--lr", "0"], "--lr must be positive"),
    (TinyConfig, ["--grad-clip", "-1"], "--sample-every, --grad-clip and --weight-decay cannot be negative"),
    (TinyConfig, ["--eval-every-minutes", "-1"], "--eval-every-minutes cannot be negative"),
    (TinyConfig, ["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (TinyConfig, ["--device", "tpu"], "unknown --device"),
    (vae.Config, ["--recon-loss", "mse", "--temperature", "1"], "--temperature applies to --recon-loss ce only"),
    (vae.Config, ["--kl-weight", "-1"], "cannot be negative"),
    (vqvae.Config, ["--top-k", "999"], "--top-k must be in"),
    (diffusion.Config, ["--steps", "1001"], "--steps must be between 2 and --timesteps"),
    (diffusion.Config, ["--sampler", "plms"], "unknown --sampler 'plms'; use one of ddim, ddpm, dpm++, euler, heun"),
    (diffusion.Config, ["--eta", "-0.5"], "--eta cannot be negative"),
    (diffusion.Config, ["--snr-gamma", "0"], "--snr-gamma must be positive"),
    (diffusion.Config, ["--warmup-steps", "-1"], "--warmup-steps cannot be negative"),
    (diffusion.Config, ["--log-snr-shift", "11"], "--log-snr-shift must be in [-10, 10], got 11"),
    (diffusion.Config, ["--log-snr-shift", "1", "--schedule", "linear"], "--log-snr-shift needs --schedule cosine"),
    (diffusion.Config, ["--res-blocks", "0"], "--res-blocks must be at least 1"),
    (diffusion.Config, ["--channel-mult", "1,0,2"], "--channel-mult must be three positive integers"),
    (diffusion.Config, ["--guide-at", "1"], "--guide-at must be in [0, 1)"),
    (diffusion.Config, ["--autoguidance", "-1"], "--autoguidance must be between 0.0 and 100.0"),
    (diffusion.Config, ["--autoguidance", "2", "--guide-at", "0"], "--autoguidance needs a guide"),
    (diffusion.Config, ["--p-mean", "6"], "--p-mean must be in [-5, 5], got 6"),
    (diffusion.Config, ["--p-mean", "0", "--schedule", "cosine"], "--p-mean needs --schedule edm, got --schedule cosine"),
    (diffusion.Config, ["--ema-extra", "0.99,1"], "--ema-extra must be decays in (0, 1) separated by commas"),
    (diffusion.Config, ["--guide-interval", "0.8,0.2"], "--guide-interval must be two numbers lo,hi"),
    (diffusion.Config, ["--schedule", "flow"], "--schedule flow needs --sampler euler or heun, --prediction v (the "
     "velocity u) and --loss-weight none, got --sampler dpm++ --prediction v --loss-weight none"),
    (diffusion.Config, ["--sampler", "heun", "--schedule", "cosine"], "--sampler heun integrates the ODE of --schedule flow or edm; use ddim, "
     "ddpm or dpm++ with --schedule cosine"),
]


@pytest.mark.parametrize("config_cls, flags, message", BAD_FLAGS,
                         ids=[f"{cls.__module__}:{' '.join(flags)}" for cls, flags, _ in BAD_FLAGS])
def test_common_parser_refuses_a_bad_flag_of_every_config(config_cls, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_train_args(config_cls, flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_common_trainer_reduces_the_loss_writes_outputs_never_overwrites_a_run_and_stops_on_a_nan_loss(dataset, tmp_path):
    run = common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path, epochs=6, sample_every=3, ema_decay=0.9))
    metrics = json.loads((run / "metrics.json").read_text())
    state = state_of(run)
    history = state["history"]
    assert len(history) == 6 and history[-1]["train/loss"] < 0.7 * history[0]["train/loss"]
    assert history[-1]["val/loss"] < history[0]["val/loss"]
    assert (run / "samples" / "epoch_0003.png").exists() and (run / "samples" / "final.png").exists()
    for key in ("sample/palette_distance", "sample/precision", "sample/near_copy_rate", "val/loss"):
        assert key in metrics and np.isfinite(metrics[key])
    assert state["ema"] is not None and state["epoch"] == 6
    with pytest.raises(common.UserError, match="already holds a run"):
        common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path, epochs=1))
    n_batches = -(-int((~np.load(dataset)["is_val"]).sum()) // 16)
    cfg = tiny_config("tiny", dataset, tmp_path / "nan", epochs=3, nan_at_step=n_batches + 2)  # in epoch 2
    with pytest.raises(common.UserError, match=r"nan in epoch 2.*last good checkpoint.*epoch 1"):
        common.train(TinyStrategy, cfg)
    state = state_of(tmp_path / "nan" / "run")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_common_resume_at_an_epoch_boundary_or_after_ctrl_c_mid_epoch_equals_an_uninterrupted_run_and_takes_new_flags(
        dataset, tmp_path, capsys):
    full = params_of(common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path / "full", ema_decay=0.9)))
    part = common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path / "part", epochs=1, ema_decay=0.9))
    cfg = tiny_config("tiny", dataset, tmp_path / "cut", ema_decay=0.9, interrupt_at_step=3)
    with pytest.raises(common.Interrupted, match="resume with"):
        common.train(TinyStrategy, cfg)  # SIGINT at step 3 of epoch 1
    cut = last_pt(tmp_path / "cut" / "run")
    state = common.load_checkpoint(cut)
    assert state["epoch"] == 0 and state["resume_batch"] == 3
    with pytest.raises(common.UserError, match="resume with that --batch-size"):  # 3 old batches are not 3 new ones
        common.train(TinyStrategy, dataclasses.replace(cfg, batch_size=64, resume=str(cut)))
    for resumed in (common.train(TinyStrategy, dataclasses.replace(cfg, interrupt_at_step=0, resume=str(cut))),
                    common.train(TinyStrategy, tiny_config("tiny", dataset, ema_decay=0.9,
                                                           resume=str(last_pt(part))))):
        assert all(torch.equal(full[k], v) for k, v in params_of(resumed).items())
    # --lr and --weight-decay given with --resume take effect on the restored optimizer, and say so
    config = common.parse_train_args(TinyConfig, ["--resume", str(last_pt(part)), "--epochs", "3", "--lr", "0.0005",
                                                  "--weight-decay", "0.01"])
    capsys.readouterr()
    common.train(TinyStrategy, config)
    assert "resuming with changed settings: --epochs 3 (was 2), --lr 0.0005 (was 0.003), " \
           "--weight-decay 0.01 (was 0.0)" in capsys.readouterr().out
    state = state_of(part)
    assert {(g["lr"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]} == {(0.0005, 0.01)}
    assert state["config"]["lr"] == 0.0005 and state["epoch"] == 3


def test_common_checkpoint_loads_with_weights_only_and_refuses_garbage(fault_inputs, tmp_path, capsys):
    """A NaN weight is refused (issue 27.1; unreadable files: BAD_INPUT); an advice line
    quotes its path; no control character from a file reaches the terminal."""
    state = torch.load(fault_inputs["tiny"], weights_only=True)
    assert {"model", "optimizer", "epoch", "torch_rng", "config", "palette"} <= set(state)
    torch.save({**state, "model": {**state["model"], "w": torch.tensor(float("nan"))}}, tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match="'w' is not a finite tensor"):
        common.load_checkpoint(tmp_path / "bad.pt")
    for extra, ok in (({"sigma_data": 0.66}, True), ({"sigma_data": float("nan")}, False), ({"guide": "x"}, False)):
        torch.save({**state, "extra": extra}, tmp_path / "extra.pt")  # Strategy.extra_state: snapshots, or floats
        if ok:
            assert common.load_checkpoint(tmp_path / "extra.pt")["extra"] == extra
        else:
            with pytest.raises(common.UserError, match="its 'extra' does not hold snapshots"):
                common.load_checkpoint(tmp_path / "extra.pt")
    with pytest.raises(common.UserError, match="`python vqvae.py --resume '/a b/last.pt'`"):
        common.check_model_type({"strategy": "vqvae"}, "vae", "/a b/last.pt")
    with pytest.raises(SystemExit):
        download.fail("from a file: \x1b]0;title\x07\x1b[31mred")
    assert "\x1b" not in capsys.readouterr().err


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_common_cli_real_ctrl_c_or_sigterm_saves_and_resumes(sig, status, dataset, tmp_path):
    """Ctrl-C, or SIGTERM as kill, a job scheduler or a container stop sends, after the first epoch."""
    out = tmp_path / "run"
    proc = start_until_first_epoch("--epochs", 1000, "--data", dataset, "--out", out, "--no-mlflow",
                                   "--batch-size", 8, "--device", "cpu")
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == status and "Resume with: --resume" in rest and "Traceback" not in err, err
    state = state_of(out)
    assert 1 <= state["epoch"] < 1000
    r = run_script(T, "--resume", last_pt(out), "--epochs", state["epoch"] + 1)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "sprite quality" in r.stdout


def test_common_sample_out_decides_by_suffix_and_sample_never_imports_mlflow_or_compare(vae_run):
    assert common.sample_out("", "runs/vae/x/checkpoints/last.pt", 3) == Path("runs/vae/x/sample-seed3.png")
    assert common.sample_out("", "elsewhere/model.pt", 0) == Path("elsewhere/sample-seed0.png")
    for out in ("grid.png", "GRID.PNG", "sprites", "anim.gif"):
        assert common.sample_out(out, "c.pt", 0) == Path(out)
    with pytest.raises(common.UserError, match=r"--out out\.jpg: cannot write \.jpg files; use a \.png"):
        common.sample_out("out.jpg", "c.pt", 0)
    # by default into the run folder, never importing MLflow (seconds of imports) nor compare.py (a layer up)
    probe = ("import runpy, sys; sys.argv = ['vae.py', 'sample', '--checkpoint', sys.argv[1], '--n', '4', "
             "'--temperature', '0.5']; "
             "runpy.run_path('vae.py', run_name='__main__'); print('loaded:', 'mlflow' in sys.modules, 'compare' in sys.modules)")
    r = run_script("-c", probe, last_pt(vae_run))
    assert r.returncode == 0, r.stderr
    assert "loaded: False False" in r.stdout and (vae_run / "sample-seed0.png").exists()


# -----------------------------------------------------------------------------
# Every model of compare.py's registry: the Strategy contract, its script, time to quality and the compute clock
# -----------------------------------------------------------------------------


def test_common_strategy_contract_shapes_range_determinism_and_train_steps_reduce_the_loss(model):
    module, cls, config, palette, batch = model
    results = []
    for _ in range(2):  # twice from one seed: the same loss and the same sprites
        torch.manual_seed(3)
        strategy = cls(config, palette)
        net = strategy.build_model(config)
        out = strategy.train_step(net, batch)
        net.eval()
        with torch.no_grad():
            x = strategy.sample(net, 5, torch.Generator().manual_seed(7))
            metrics = strategy.get_metrics(net, batch)
        results.append((float(out["loss"].detach()), x))
    assert out["loss"].shape == () and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert all(torch.as_tensor(v).numel() == 1 for v in out.values())
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert metrics and all(np.isfinite(float(v)) for v in metrics.values())
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    torch.manual_seed(0)
    strategy = cls(config, palette)
    net = strategy.build_model(config)
    before, after = loss_before_after(strategy, net, batch, steps=30, lr=config.lr)
    assert after < 0.9 * before, (before, after)


def test_common_model_script_runs_and_samples_as_a_subprocess(model, dataset, tmp_path):
    """Each model's script trains and samples as a user runs it; the VQ-VAE through both stages."""
    name = model[0].__name__
    vq = name == "vqvae"
    r = run_script(f"{name}.py", *tiny_flags(name), *(["--prior-epochs", "1"] if vq else []), "--epochs", "1",
                   "--data", dataset, "--out", tmp_path / "run", "--no-mlflow", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    epochs = 2 if vq else 1
    assert "parameters" in r.stdout and f"epoch {epochs}/{epochs}" in r.stdout and "sprite quality" in r.stdout
    assert (tmp_path / "run" / "samples" / "final.png").exists()
    if vq:
        assert "stage 1 = encoder" in r.stdout and "stage 2: training the prior" in r.stdout
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        for key in ("val/codebook_usage", "val/perplexity", "val/bits_per_code", "sample/precision",
                    "sample_random/precision"):
            assert np.isfinite(metrics[key]), key
        for picture in ("samples_random", "reconstructions", "codebook"):
            assert (tmp_path / "run" / picture / "final.png").exists(), picture
    r = run_script(f"{name}.py", "sample", "--checkpoint", last_pt(tmp_path / "run"),
                   "--n", 4, "--out", tmp_path / "grid.png", *(["--sampler", "random"] if vq else []))
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "grid.png").size == ((4 * 17 + 1) * 4, (1 * 17 + 1) * 4)


@pytest.mark.parametrize("name", ["vae", "vqvae", "diffusion"])
def test_common_time_to_quality_points_leave_training_unchanged(name, sprites, tmp_path):
    """--eval-every-minutes scores the EMA model while training; the points go
    to time_to_quality.json, on both clocks (minutes and TFLOP, each rising), and
    the losses are the same as without them (scoring forks the RNG), for every
    model. The VQ-VAE's points start with its prior (stage 2); diffusion's LR
    warm-up hook sets the optimizer's lr."""
    own = dict(warmup_steps=8, sampler="dpm++") if name == "diffusion" else dict(prior_epochs=1) if name == "vqvae" else {}
    losses = {}
    for every in (0.0, 1e-9):  # 1e-9 minutes: a point after every step
        torch.manual_seed(0)
        cfg = tiny_config(name, epochs=1, eval_every_minutes=every, n_eval=8, ema_decay=0.9, batch_size=16, **own)
        run = tmp_path / f"every-{every}"
        trainer = common.Trainer(compare.MODELS[name][0](cfg, sprites.palette), cfg, sprites.train[:48],
                                 sprites.val[:8], sprites.palette, run)
        with contextlib.redirect_stdout(io.StringIO()):
            history = trainer.fit()
        losses[every] = [h["train/loss"] for h in history]
    assert losses[0.0] == losses[1e-9]
    points = json.loads((run / "time_to_quality.json").read_text())
    steps = 3 * (2 if name == "vqvae" else 1)
    first = 4 if name == "vqvae" else 1  # the prior's first step
    assert [p["step"] for p in points] == list(range(first, steps + 1)) and points[-1]["epoch"] == pytest.approx(cfg.epochs + own.get("prior_epochs", 0))
    assert all(a["minutes"] < b["minutes"] and a["tflop"] < b["tflop"] for a, b in zip(points, points[1:]))
    # the compute clock: FLOPs per sprite of a step of each stage, times the sprites trained on so far
    per_sprite = trainer.flops_per_sprite
    stage1 = per_sprite[1] * 48 * cfg.epochs
    assert points[-1]["tflop"] == pytest.approx((stage1 + per_sprite.get(2, 0) * 48) / 1e12)
    if name == "vqvae":  # its curve starts after stage 1, in minutes and in compute
        assert set(per_sprite) == {1, 2} and points[0]["epoch"] > cfg.epochs and points[0]["tflop"] > stage1 / 1e12
    assert all(0 < p["minutes"] for p in points) and "sample/precision" in points[0]
    assert not (tmp_path / "every-0.0" / "time_to_quality.json").exists()
    if name == "diffusion":
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 3 / 8)  # 3 steps of 8 warm-up


def test_common_step_flops_match_a_hand_count_of_one_conv_and_one_linear_layer():
    """count_step_flops (the compute clock) counts one training step, forward and
    backward, as 2 FLOPs per multiply-add: a 3x3 convolution (3 -> 4 channels,
    16x16, padding 1) then a linear layer (1024 -> 5), on a batch of 2. Backward
    costs twice the forward (input and weight gradients), except that the first
    layer's input needs no gradient."""
    class Net(common.Strategy):
        def build_model(self, config): ...
        def train_step(self, model, batch): return {"loss": model(batch).square().mean()}
        def sample(self, model, n, generator): ...
        def get_metrics(self, model, batch): ...

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
    batch = torch.rand(2, 3, 16, 16)
    conv = 2 * 2 * (4 * 16 * 16) * (3 * 3 * 3)  # 2 * batch * outputs * (multiply-adds per output)
    linear = 2 * 2 * 5 * 1024
    before = [p.clone() for p in model.parameters()]
    assert common.count_step_flops(Net(), model, batch) == (conv + conv) + (linear + 2 * linear)
    assert all(p.grad is None for p in model.parameters())  # counted on a copy: the model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("native, force, expected", [
    (False, False, False),  # AVX2-only CPU: bf16 emulated, ~10x slower -> fp32, with one line
    (False, True, True),    # --amp-force: the user insists
    (None, False, True),    # no CPU flags to read: --amp as asked
    (True, False, True),    # native bf16 (avx512_bf16 / AMX): trust the hardware
])
def test_common_amp_decision(monkeypatch, capsys, native, force, expected):
    monkeypatch.setattr(common, "native_bf16", lambda device: (native, "mocked CPU flags"))
    assert common.amp_worth_it(torch.device("cpu"), force) is expected
    printed = capsys.readouterr().out
    if expected:
        assert printed == ""
    else:
        assert printed.count("\n") == 1 and "mocked CPU flags, so bf16 would be emulated" in printed \
            and "--amp-force" in printed
    native, found = common.native_bf16(torch.device("cpu"))  # this machine's real flags
    assert native in (True, False, None) and found


# -----------------------------------------------------------------------------
# Bad input and faults: one clean line, exit status 2, nothing lost (issue 12)
# -----------------------------------------------------------------------------


# Every expected failure of every script is `error: <what is wrong>; <what to
# do>` on one line with exit status 2 and no traceback, and leaves its input
# files as they were. The table runs each script's own main() in this process
# (fast); the rows that depend on the environment of a fresh process run as a
# subprocess. Concurrency, MLflow server loss, a full disk and Ctrl-C have
# their own tests (resume with new flags: the resume test above).
@pytest.fixture(scope="module")
def fault_inputs(dataset, vae_run, tmp_path_factory) -> dict[str, str]:
    """Files the bad-input table points at: finished runs, garbage, degenerate
    datasets, a zip bomb and a zip whose header lies about its member's size."""
    d = tmp_path_factory.mktemp("faults")
    tiny = common.train(TinyStrategy, tiny_config("tiny", dataset, d / "tiny", epochs=1)) / "checkpoints" / "last.pt"
    vae_ckpt = last_pt(vae_run)
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not a dataset")
    (d / "afile").write_text("a file, not a folder")
    with np.load(dataset) as z:
        arrays = {k: z[k] for k in z.files}
    for name, change in [("short_is_val", dict(is_val=arrays["is_val"][:-3])),
                         ("empty", dict(images=arrays["images"][:0], is_val=arrays["is_val"][:0])),
                         ("black", dict(images=np.zeros_like(arrays["images"])))]:
        np.savez_compressed(d / f"{name}.npz", **{**arrays, **change})
    big = b"\0" * (download.MAX_MEMBER_BYTES + 1)  # deflates to ~10 KB
    (d / "bomb.zip").write_bytes(make_zip({download.SHEET_NAME: big}))
    # The same member with its sizes in both headers rewritten to 6,000 bytes.
    raw = bytearray(make_zip({download.SHEET_NAME: big}))
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.index(sig)
        raw[at + offset:at + offset + 4] = (6000).to_bytes(4, "little")
    (d / "lying.zip").write_bytes(bytes(raw))
    state = torch.load(vae_ckpt, weights_only=True)  # issue 26/27: a checkpoint without palette, one named like a command
    torch.save({k: v for k, v in state.items() if k != "palette"}, d / "nopal.pt")
    torch.save({**state, "strategy": "vae.py; touch /tmp/x; echo"}, d / "evil.pt")
    os.mkfifo(d / "fifo")
    Image.fromarray(synthetic_sheet()).convert("L").save(d / "gray.png")
    return dict(dir=str(d), data=str(dataset), tiny=str(tiny), vae=str(vae_ckpt))


SAMPLE = ["sample", "--checkpoint", "{tiny}"]
BAD_INPUT = [  # (script, arguments, one-line message fragment, paths that must not exist afterwards)
    # resuming another model's checkpoint, or with another architecture (issue case 5)
    ("vae.py", ["--resume", "{tiny}"], "is a tiny checkpoint, not vae", []),
    ("vae.py", ["--resume", "{vae}", "--latent-dim", "4"], "does not fit the model built from --latent-dim 4", []),
    (T, ["--resume", "{dir}/garbage.pt"], "cannot load checkpoint", []),
    (T, ["sample", "--checkpoint", "{dir}/missing.pt"], "missing.pt not found", []),
    # unwritable --out, one row per kind of OSError (case 6; a full and a read-only disk: test_common_full_and_...)
    (T, [*TRAIN_FLAGS, "--out", "/proc/i12-run"], "cannot write or read /proc/i12-run", []),
    (T, [*SAMPLE, "--out", "{dir}/afile/grid.png"], "a file is in the way", []),
    # values (case 7): one row per check; the Config's own checks are BAD_FLAGS
    (T, [*TRAIN_FLAGS, "--lr", "nan"], "--lr must be a finite number", []),
    (T, [*TRAIN_FLAGS, "--seed", "99999999999"], "--seed must be between 0 and 4294967295", []),
    (T, [*SAMPLE, "--seed", "-1"], "--seed must be between", []),
    (T, [*SAMPLE, "--device", "tpu"], "unknown --device 'tpu'", []),
    ("vae.py", ["sample", "--checkpoint", "{vae}", "--out", "{dir}/a.gif"], "no sampling trajectory to animate", []),
    ("compare.py", ["--seed", "-1", "--out", "{dir}/cmp1"], "--seed must be between", ["{dir}/cmp1"]),
    ("compare.py", ["--eval-every-minutes", "nan", "--out", "{dir}/cmp2"], "--eval-every-minutes must be a number",
     ["{dir}/cmp2"]),
    # compare.py does not create --out when it then fails (case 6)
    ("compare.py", ["--checkpoints", "{dir}/none", "--out", "{dir}/cmp4", "--no-mlflow", "--device", "cpu",
                    "--data", "{data}"], "no vae run in", ["{dir}/cmp4"]),
    # degenerate and corrupt datasets (case 9; an empty validation split trains: test_common_empty_validation_split)
    (T, [*TRAIN_FLAGS, "--data", "{dir}/short_is_val.npz"], "but is_val of shape", []),
    (T, [*TRAIN_FLAGS, "--data", "{dir}/empty.npz"], "has no training sprites (0 sprites", []),
    (T, [*TRAIN_FLAGS, "--data", "{dir}/missing.npz"], "missing.npz not found", []),
    (T, [*TRAIN_FLAGS, "--data", "{dir}/garbage.npz"], "cannot read dataset", []),
    # a zip member that inflates far past the real 6 KB sheet (case 4), and one whose headers lie about it
    ("download.py", ["--from", "{dir}/bomb.zip", "--out", "{dir}/d1"], "inflates to more than 10 MB", ["{dir}/d1"]),
    ("download.py", ["--from", "{dir}/lying.zip", "--out", "{dir}/d2"], "is not a readable zip", ["{dir}/d2"]),
    # usage errors: one line and a pointer to --help (case 11), one row per parser
    (T, ["--epochs", "abc"], "invalid int value: 'abc'; run `python", []),
    (T, ["sample"], "required: --checkpoint; run `python", []),
    ("compare.py", ["bench", "--n", "x"], "invalid int value: 'x'; run `python", []),
    ("compare.py", ["--bogus"], "unrecognized arguments: --bogus; run `python compare.py --help`", []),
    ("download.py", ["--variant", "x"], "invalid choice: 'x' (choose from", []),
    # the modes that moved to compare.py: the old spelling names the new command
    (T, ["bench"], "`python tiny.py bench` has moved; run `python compare.py bench --models tiny`", []),
    ("diffusion.py", ["plot", "--out", "x.png"], "has moved; run `python compare.py plot` instead", []),
    # round two (issue 26): one row per root cause, each refused by its one check
    ("vae.py", [*TRAIN_FLAGS, "--latent-dim", "400000000"], "these flags build a model of", []),  # 1 sizes
    ("vae.py", ["sample", "--checkpoint", "{vae}", "--temperature", "1e-300"], "--temperature must be between", []),  # 2
    ("vae.py", ["sample", "--checkpoint", "{dir}/nopal.pt"], "not a usable checkpoint: 'palette'", []),  # 3
    ("diffusion.py", [*TRAIN_FLAGS, "--data", "{dir}/black.npz", "--condition", "colour"], "need a colour", []),  # 4
    ("compare.py", ["plot", "{dir}/garbage.pt", "--out", "{dir}/p.png"], "is not valid JSON", []),  # 5 tools
    (T, [*TRAIN_FLAGS, "--data", "{dir}/fifo"], "is not a regular file", []),  # 6 (SIGTERM: its own test)
    ("download.py", ["--from", "{dir}/gray.png", "--out", "{dir}/d3"], "grayscale or bilevel", ["{dir}/d3"]),  # 7
    # issue 27: a checkpoint's name is a registry name, and the small things
    ("vae.py", ["--resume", "{dir}/evil.pt"], "its model name is not a name of this project", []),
    ("vae.py", ["sample", "--checkpoint", "{vae}", "--gif", "{dir}/anim.jpg"], "this writes .gif files", []),
    ("compare.py", ["plot", "--schedules", "--out", "{dir}/p.jpg"], "this writes .png files", []),
    ("compare.py", ["guidance", "--checkpoint", "{vae}", "--seed", "-1", "--out", "{dir}/g"], "--seed must be", ["{dir}/g"]),
]
BAD_INPUT_SUBPROCESS = [  # MLflow reads its tracking URI once per process: these run in a fresh one (case 8)
    (T, [*TRAIN_FLAGS, "--mlflow", "--out", "{dir}/m1/run"], "foo://bar", "MLflow cannot track to foo://bar",
     ["{dir}/m1"]),
    (T, [*TRAIN_FLAGS, "--mlflow", "--out", "{dir}/m2/run"], "http//127.0.0.1:5000", "is not a valid URI",
     ["{dir}/m2"]),
    # a store that cannot be written (issue 26.6, 27.3): one line at start, not pages of SQLAlchemy tracebacks
    (T, [*TRAIN_FLAGS, "--mlflow", "--out", "{dir}/m3/run"], "sqlite:////proc/i26.db", "cannot write its store",
     ["{dir}/m3"]),
]


@pytest.mark.parametrize("script, args, fragment, absent", BAD_INPUT,
                         ids=[f"{s} {' '.join(a[-2:])}" for s, a, _, _ in BAD_INPUT])
def test_common_bad_input_is_one_clean_line_and_changes_no_file(script, args, fragment, absent, fault_inputs,
                                                                monkeypatch, capsys):
    fill = lambda s: s.format(**fault_inputs)
    inputs = [fault_inputs["dir"], Path(fault_inputs["data"]).parent, Path(fault_inputs["vae"]).parent.parent]
    hashes = lambda: {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                      for folder in inputs for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    before = hashes()
    code, out, err = run_script_main(script, [fill(a) for a in args], monkeypatch, capsys)
    assert_one_clean_line(code, out, err, fragment)
    after = hashes()
    assert {k: after.get(k) for k in before} == before, "an input file changed"
    for path in absent:
        assert not Path(fill(path)).exists(), f"{fill(path)} was left behind"


@pytest.mark.parametrize("script, args, uri, fragment, absent", BAD_INPUT_SUBPROCESS,
                         ids=[row[2] for row in BAD_INPUT_SUBPROCESS])
def test_common_bad_tracking_uri_is_one_clean_line(script, args, uri, fragment, absent, fault_inputs):
    fill = lambda s: s.format(**fault_inputs)
    r = run_script(script, *map(fill, args), env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert_one_clean_line(r.returncode, r.stdout, r.stderr, fragment)
    for path in absent:
        assert not Path(fill(path)).exists(), f"{fill(path)} was left behind"


def test_common_two_runs_into_one_folder_second_refused_first_unharmed(dataset, tmp_path):
    """A run claims its folder (run.lock, with its PID): a second run, or a
    resume of its checkpoint, is refused in one line while it lives; the first
    finishes untouched; the lock is gone afterwards."""
    out = tmp_path / "run"
    flags = ["--data", dataset, "--out", out, "--no-mlflow", "--batch-size", 8, "--device", "cpu",
             "--n-eval", 16, "--n-samples", 8, "--sample-every", 0]
    first = start_until_first_epoch("--epochs", 1000, "--seed", 0, *flags)
    try:
        assert (out / "run.lock").read_text().strip() == str(first.pid)
        second = run_script(T, "--epochs", 3, "--seed", 1, *flags)
        assert_one_clean_line(second.returncode, second.stdout, second.stderr,
                              f"is in use by another run (PID {first.pid})")
        again = run_script(T, "--resume", last_pt(out), "--epochs", 5)
        assert_one_clean_line(again.returncode, again.stdout, again.stderr, f"(PID {first.pid})")
    finally:
        first.send_signal(signal.SIGINT)
        rest, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, err
    state = state_of(out)
    assert state["config"]["seed"] == 0 and state["config"]["epochs"] == 1000  # the first run's, unharmed
    assert not (out / "run.lock").exists()


def test_common_ctrl_c_while_a_script_imports_exits_quietly():
    proc = subprocess.Popen([sys.executable, "vae.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # past the interpreter's start, inside `import torch` (seconds on 2 cores)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if "usage:" in out:
        pytest.skip("the imports were done within 1 s: nothing left to interrupt")
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_common_stale_lock_and_orphan_temp_files_are_taken_over_and_a_failed_start_leaves_no_run_folder(
        dataset, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.lock").write_text(f"{dead.pid}\n")
    (run / "checkpoints" / "last.pt.k3x9.tmp").write_bytes(b"half a checkpoint")
    common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path, epochs=1))
    out = capsys.readouterr().out
    assert f"was left by PID {dead.pid}, which has ended; taking the folder over" in out
    assert "removed 1 temporary file(s)" in out
    assert not list(run.rglob("*.tmp")) and not (run / "run.lock").exists()
    with pytest.raises(common.UserError, match="does not fit"):  # a failed start, after the folder was claimed
        common.train(TinyStrategy, tiny_config("tiny", dataset, epochs=2, hidden=8, resume=str(last_pt(run))))
    with pytest.raises(common.UserError, match="MLFLOW_TRACKING_URI"):
        cfg = tiny_config("tiny", dataset, tmp_path / "b" / "deep", mlflow=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", "http//nowhere")
            common.train(TinyStrategy, cfg)
    assert not (tmp_path / "b").exists()  # the folders the failed start created are gone again
    assert not (run / "run.lock").exists()  # the resumed run's folder keeps its run
    assert state_of(run)["epoch"] == 1


class FakeMLflowServer:
    """Just enough of MLflow's REST API for a run to start and log to it. After
    `die_after` metric batches it closes its port, as a crashed server would."""

    def __init__(self, die_after: int):
        import http.server
        import threading

        self.die_after, self.batches, self.requests = die_after, 0, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests += 1
                run = {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING",
                                "artifact_uri": "mlflow-artifacts:/1/r1/artifacts", "lifecycle_stage": "active"}}
                reply = ({"experiment": {"experiment_id": "1", "name": "tiny", "lifecycle_stage": "active"}}
                         if "experiments/get" in self.path else {"run": run} if "runs/" in self.path and (
                             "create" in self.path or "get" in self.path) else {})
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if "log-batch" in self.path and b"metrics" in body:
                    server.batches += 1
                    if server.batches == server.die_after:
                        server.died_at = time.time()
                        threading.Thread(target=server.stop).start()

            do_GET = do_POST = do_PUT = do_PATCH = answer

        self.died_at = None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_common_mlflow_server_lost_mid_run_costs_seconds_and_is_noted(dataset, tmp_path, monkeypatch, capsys):
    """The server dies after epoch 1's metrics: one warning, no further MLflow
    call (so no retries), training finishes, metrics.json says where tracking
    stopped, and the MLflow calls after the loss cost a few seconds in all."""
    server = FakeMLflowServer(die_after=2)  # log_params' batch carries no metrics; epoch 1's does
    monkeypatch.setattr(common.Tracker, "lost", "")  # restored after the test: later tests track again
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for key in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{key}", raising=False)  # the Tracker's own defaults
    spent = []
    call = common.Tracker._call

    def timed(self, *args, **kwargs):
        t0 = time.time()
        call(self, *args, **kwargs)
        if server.died_at:
            spent.append(time.time() - t0)
    monkeypatch.setattr(common.Tracker, "_call", timed)
    import mlflow

    previous = mlflow.get_tracking_uri()  # an earlier test may have set one for this process
    mlflow.set_tracking_uri(server.url)
    try:
        run = common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path, epochs=4, mlflow=True))
    finally:
        mlflow.set_tracking_uri(previous)
    out = capsys.readouterr().out
    assert server.died_at is not None
    assert out.count("warning: MLflow") == 1 and "ERROR" not in out, out
    assert "training continues without tracking" in out and "epoch 4/4" in out
    note = json.loads((run / "metrics.json").read_text())["mlflow"]
    assert re.fullmatch(r"tracking stopped at epoch [12] \(log_batch failed: \w+\)", note), note
    print(f"MLflow: {len(spent)} tracker calls after the server was lost took {sum(spent):.2f} s in all")
    assert sum(spent) < 5, spent  # one failing call, tried twice; no call after it
    assert mlflow.active_run() is None  # nothing left for MLflow's exit hook to retry
    later = common.Tracker(True, "tiny", "later")  # e.g. compare.py's next model: not tracked, no call made
    assert later.run_id is None and "MLflow failed earlier" in later.stopped
    t0 = time.time()  # a server unreachable from the start: refused fast, in one line
    with pytest.raises(common.UserError, match="unreachable.*--no-mlflow"):
        common.check_server("http://127.0.0.1:9", tries=2, timeout=1)
    assert time.time() - t0 < 10


def test_common_empty_validation_split_trains_and_notes_it(dataset, tmp_path, capsys):
    with np.load(dataset) as z:
        arrays = {k: z[k] for k in z.files}
    path = tmp_path / "no_val.npz"
    np.savez_compressed(path, **{**arrays, "is_val": np.zeros(len(arrays["images"]), bool)})
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for strategy, config in ((vae.VAEStrategy, tiny_config("vae", path, tmp_path / "vae", epochs=1, sample_every=1)),
                             (vqvae.VQVAEStrategy, tiny_config("vqvae", path, epochs=1, out=str(tmp_path / "vq")))):
        metrics = json.loads((common.train(strategy, config) / "metrics.json").read_text())
        assert "no validation sprites" in metrics["note"]
        assert not any(k.startswith("val/") for k in metrics) and np.isfinite(metrics["sample/precision"])
    assert "has no validation sprites" in capsys.readouterr().out
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_common_full_and_read_only_disk_are_one_line_and_keep_the_last_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    """A 1 MB tmpfs holds one checkpoint of the tiny model (~0.6 MB) but not
    the temporary copy of the next: the run stops with one line naming the
    last good checkpoint, which is whole. Then the same disk read-only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        args = ["--data", str(dataset), "--out", str(disk / "run"), "--no-mlflow", "--device", "cpu", "--epochs", "3",
                "--batch-size", "16", "--n-eval", "16", "--n-samples", "8", "--sample-every", "0"]
        code, out, err = run_script_main(T, args, monkeypatch, capsys)
        assert_one_clean_line(code, out, err, "No space left on device")
        assert "the last good checkpoint is" in err and "--resume" in err
        assert state_of(disk / "run")["epoch"] == 1
        assert not list(disk.rglob("*.tmp")) and not (disk / "run" / "run.lock").exists()
        ckpt = str(last_pt(disk / "run"))
        code, out, err = run_script_main(T, ["sample", "--checkpoint", ckpt, "--n", "3000", "--out", str(disk / "each")],
                                         monkeypatch, capsys)
        assert_one_clean_line(code, out, err, "No space left on device")
        assert f"cannot write {disk / 'each'}/0" in err and ".tmp" not in err  # the target, not its temporary twin
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, out, err = run_script_main(T, [*args[:2], "--out", str(disk / "other"), *args[4:]], monkeypatch, capsys)
        assert_one_clean_line(code, out, err, "Read-only file system")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -----------------------------------------------------------------------------
# A new user's first hour: what MLflow shows, sampling outputs, hints, --help; class labels
# -----------------------------------------------------------------------------


def test_common_mlflow_run_has_a_step_0_grid_a_descriptive_name_and_no_plumbing_params(dataset, tmp_path, monkeypatch,
                                                                                       capsys):
    import logging
    import warnings
    import mlflow

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    chatter = []  # INFO records of MLflow's start-up, caught before any handler prints them
    catcher = logging.Handler(logging.INFO)
    catcher.emit = lambda record: chatter.append(record.getMessage())
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).addHandler(catcher)
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # as in a fresh process: the Tracker must quieten them
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_dir = common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path, epochs=2, sample_every=1,
                                                             mlflow=True, lr=0.003))
    finally:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).removeHandler(catcher)
    assert not [m for m in chatter if "database tables" in m or "does not exist" in m], chatter
    assert not [w for w in caught if "dataset source" in str(w.message)]
    printed = capsys.readouterr().out
    run_id = state_of(run_dir)["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["hidden"] == "32" and run.inputs.dataset_inputs
    assert "sample/precision" in run.data.metrics and {"images", "last.pt"} <= {a.path for a in client.list_artifacts(run_id)}
    assert re.fullmatch(r"tiny 2ep .*lr=0\.003.* \d{4}-\d{2}-\d{2} \d{2}:\d{2}", run.info.run_name), run.info.run_name
    assert not set(common.PLUMBING) & set(run.data.params), run.data.params
    assert run.data.params["lr"] == "0.003"
    assert run.data.tags["run_folder"] == str(run_dir.resolve()) and run.data.tags["device"] == "cpu"
    artifacts = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(p.startswith("images/samples+step+0+") for p in artifacts), artifacts  # the untrained model's grid
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == [
        "samples/epoch_0000.png", "samples/epoch_0001.png", "samples/final.png"]
    # per-step metrics under their own prefix, x-axis the optimizer step; epoch metrics, x-axis the epoch
    steps = [m.step for m in client.get_metric_history(run_id, "train_step/loss")]
    assert steps == list(range(1, 2 * math.ceil(int(run.data.tags["n_train"]) / 16) + 1))
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    assert not [k for k in run.data.metrics if k.startswith("train/") and k.endswith("_step")]
    assert "system/images_per_sec" in run.data.metrics and "train/images_per_sec" not in run.data.metrics
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in printed
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}" in printed
    assert f"in experiment 'tiny'" in printed
    # a run opened inside another (compare.py's children) is in the parent's experiment, and says so
    parent = common.Tracker(True, "compare", "parent")
    child = common.Tracker(True, "vae", "child")
    child.end()
    parent.end()
    assert child.experiment == "compare" and "in experiment 'compare'" in capsys.readouterr().out.splitlines()[-1]


def test_common_run_name_lists_the_changed_flags_and_the_progress_line_fits_110_columns_losses_first():
    when = time.strptime("2026-01-02 03:04", "%Y-%m-%d %H:%M")
    assert common.run_name("vae", vae.Config(), when) == "vae ce 200ep 2026-01-02 03:04"
    name = common.run_name("vae", vae.Config(recon_loss="mse", kl_weight=1e-3, out="x", device="cpu"), when)
    assert name == "vae mse 200ep kl-weight=0.001 2026-01-02 03:04"  # no plumbing (out, device)
    assert common.run_name("vqvae", vqvae.Config(sampler="random"), when) == "vqvae ce random 500ep 2026-01-02 03:04"
    # diffusion names no choice field: its choices appear as changed flags, like any other
    name = common.run_name("diffusion", diffusion.Config(condition="colour", sampler="heun"), when)
    assert name == f"diffusion {diffusion.Config.epochs}ep sampler=heun condition=colour 2026-01-02 03:04"
    metrics = {"train/loss": 2.0361, "train/recon": 2.0359, "train/kl": 0.05122, "train/grad_norm": 0.9,
               "val/recon": 1.997, "val/kl": 0.5647, "val/loss": 1.9971, "val/nelbo": 511.8, "val/bpd": 2.884,
               "val/pixel_acc": 0.7007, "system/images_per_sec": 40.2}
    line = common.Trainer.progress_line(types.SimpleNamespace(epochs=200), 12, metrics, 20.0, 3600.0)
    assert len(line) <= 110, (len(line), line)
    assert line.startswith("epoch  12/200 | train loss 2.036 | val loss 1.997 ") and "grad_norm" not in line
    assert line.endswith("| 40 img/s | 0:00:20, ETA 1:00:00")


def test_common_help_of_every_script_and_mode_shows_each_default_once_and_sample_only_sampling_flags(monkeypatch,
                                                                                                   capsys):
    """`--help` of every script and mode prints its help and exits 0 (a '%' in a Config
    comment once crashed diffusion.py --help): every model of the registry, the tiny
    model, compare.py and download.py, and every mode the docs use; every Config field's comment is its help."""
    for cls in [common.TrainConfig, TinyConfig] + [config_cls for _, config_cls in compare.MODELS.values()]:
        helps = common.field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)]
        assert not missing, f"{cls.__module__}.{cls.__name__}: no comment under {missing}"
    cases = [(m, [*mode, "--help"]) for m in [f"{name}.py" for name in compare.MODELS] + [T] for mode in ([], ["sample"])]
    cases += [("compare.py", [*mode, "--help"]) for mode in ([], ["plot"], ["labels"], ["bench"], ["report"], ["guidance"])]
    cases += [("download.py", ["--help"])]
    in_docs = {(argv[0], argv[1] if argv[1:2] and argv[1] in SUBCOMMANDS else None)
               for page in DOC_PAGES for _, argv in doc_commands(page)}
    assert len(in_docs) >= 8 and all((s, [m, "--help"] if m else ["--help"]) in cases for s, m in in_docs), in_docs
    texts = {}
    for script, argv in cases:
        code, text, err = run_script_main(script, argv, monkeypatch, capsys)
        assert code == 0 and text.lstrip().startswith(("usage:", "=== vae ===\nusage:")) and "--help" in text, \
            (script, argv, code, text[:300], err[-300:])
        texts[script, argv[0]] = " ".join(text.split())  # argparse wraps lines
    assert len(texts) == len(cases) >= 15  # 4 models x 2 modes (train, sample) + 7 more
    text = texts["vae.py", "--help"]
    assert all("--" + f.name.replace("_", "-") in text for f in dataclasses.fields(vae.Config))
    assert "sprites per optimizer step (default: 64)" in text and "sample --checkpoint PATH" in text
    assert "python compare.py bench --models NAME" in text
    assert text.count("(default: runs/<model>/<date-time>)") == 1 and "(default: )" not in text
    assert "--recon-loss {mse,bce,ce}" in text
    text = texts["vae.py", "sample"]
    assert "--temperature" in text and "--kl-weight" not in text and "--kl-warmup-epochs" not in text


def test_common_busy_cpu_hint_from_the_load_average(dataset, tmp_path, monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 1.0, 1.0))  # 5 runnable threads on 2 cores: 40% each
    hint = common.contention_hint(cpu, "OMP_NUM_THREADS=1 python vae.py --resume X")
    assert hint.startswith("hint: other processes share these CPU cores (load average 5.0 on 2 CPUs)")
    assert hint.endswith("Ctrl-C, then OMP_NUM_THREADS=1 python vae.py --resume X") and "\n" not in hint
    assert common.contention_hint(torch.device("cuda"), "X") == ""
    common.train(TinyStrategy, tiny_config("tiny", dataset, tmp_path, epochs=2))  # once, after epoch 1
    out = capsys.readouterr().out
    assert out.count("hint: ") == 1 and f"--resume {tmp_path / 'run' / 'checkpoints' / 'last.pt'}" in out
    assert out.index("hint: ") > out.index("epoch 1/2") and out.index("hint: ") < out.index("epoch 2/2")
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 1.0, 1.0))  # 67% of a core each: no hint
    assert common.contention_hint(cpu, "X") == ""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: no hint
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    assert common.contention_hint(cpu, "X") == ""


def test_common_colour_labels_are_the_known_colours_and_labels_are_deterministic(dataset, sprites):
    g = torch.Generator().manual_seed(0)  # 70 sprites on black, sprite i a random blob in SHEET_COLOURS[i % 7]
    which = torch.arange(70) % 7
    masks = torch.rand(70, 1, 16, 16, generator=g) < torch.rand(70, 1, 1, 1, generator=g) * 0.5 + 0.1  # (70, 1, 16, 16)
    x = masks * (torch.tensor(SHEET_COLOURS, dtype=torch.float32) / 255)[which][:, :, None, None]  # (70, 3, 16, 16)
    palette = torch.from_numpy(common.kmeans_palette((x.permute(0, 2, 3, 1) * 255).round().numpy().reshape(-1, 3))) / 255
    labeller = common.Labeller("colour", palette)
    assert labeller.n_classes == 7
    y = labeller(x)
    class_rgb = (palette[labeller.colours] * 255).round().int()  # (7, 3) the colour of each class
    assert [tuple(c) for c in class_rgb[y].tolist()] == [SHEET_COLOURS[i] for i in which.tolist()]
    assert labeller(x.flip(-1)).equal(y) and labeller(torch.zeros(1, 3, 16, 16)).item() == -1  # no foreground
    assert labeller.names.count("red") == 1 and labeller.parse("red") == labeller.names.index("red")
    a, b = (common.make_labeller("cluster", sprites.palette, str(dataset), 4, 0) for _ in range(2))
    assert a.centres.shape == (4, 256) and a.centres.equal(b.centres) and a(sprites.train).equal(b(sprites.train))
    counts = torch.bincount(a(sprites.train), minlength=4)
    assert (counts > 0).all() and counts.tolist() == sorted(counts.tolist(), reverse=True)  # largest cluster first
    assert not a.centres.equal(common.make_labeller("cluster", sprites.palette, str(dataset), 4, 1).centres)


# =============================================================================
# vae.py
# =============================================================================


MODES = ["mse", "bce", "ce"]


@pytest.mark.parametrize("mode", MODES)
def test_vae_strategy_contract_and_each_recon_loss_reduces_the_loss_on_a_fixed_batch(sprites, mode):
    strategy, model = tiny_model("vae", sprites.palette, recon_loss=mode)
    out = strategy.train_step(model, sprites.train[:16])
    assert set(out) == {"loss", "recon", "kl"} and out["kl"] >= 0
    gen = lambda seed=3: torch.Generator().manual_seed(seed)
    x = strategy.sample(model, 5, gen())
    assert x.shape == (5, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, strategy.sample(model, 5, gen()))  # same seed, same sprites
    if mode != "ce":  # an untrained ce decoder's argmax is the same colour for every z
        assert not torch.equal(x, strategy.sample(model, 5, gen(4)))
    metrics = strategy.get_metrics(model, sprites.val[:8])
    expected = {"loss", "recon", "kl", "nelbo", "pixel_acc"} | ({"bpd"} if mode == "ce" else set())
    assert set(metrics) == expected and all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["pixel_acc"] <= 1
    if mode == "ce":
        assert metrics["bpd"] == pytest.approx(metrics["nelbo"] / (256 * math.log(2)), rel=1e-5)
    pictures = strategy.images(model, sprites.val, gen(0))
    rec, per_row = pictures["reconstructions"]
    assert per_row == min(8, len(sprites.val)) and rec.shape[0] % (2 * per_row) == 0 and rec.shape[1:] == (3, 16, 16)
    assert torch.equal(rec[:8], rec[:8].clamp(0, 1))
    inter, per_row = pictures["interpolation"]
    assert per_row == 10 and inter.shape[0] % 10 == 0 and 0 <= inter.min() and inter.max() <= 1
    strategy, model = tiny_model("vae", sprites.palette, recon_loss=mode)
    before, after = loss_before_after(strategy, model, sprites.train[:32], steps=40, lr=3e-3)
    assert after < 0.7 * before, (before, after)


def test_vae_tiny_run_writes_pictures_repeats_exactly_and_reports_its_latents(vae_run, dataset, tmp_path, capsys):
    again = common.train(vae.VAEStrategy, tiny_config("vae", dataset, tmp_path, epochs=1, sample_every=0))
    ha, hb = (state_of(r)["history"] for r in (vae_run, again))
    assert [h["train/loss"] for h in ha] == [h["train/loss"] for h in hb]
    assert Image.open(vae_run / "samples" / "final.png").tobytes() == Image.open(again / "samples" / "final.png").tobytes()
    for name in ("samples", "reconstructions", "interpolation"):
        assert (vae_run / name / "final.png").exists(), name
    metrics = json.loads((vae_run / "metrics.json").read_text())
    for key in ("train/recon", "train/kl", "val/recon", "val/kl", "val/nelbo", "val/bpd", "sample/precision"):
        assert key in metrics and math.isfinite(metrics[key]), key
    r = vae.latent_report(str(last_pt(vae_run)), n=16)
    assert 0 <= r["active_units"] <= TINY["vae"]["latent_dim"] and r["agg_kl"] >= 0
    assert {"prior/precision", "aggregate/precision", "aggregate/near_copy_rate"} <= set(r)
    assert "active_units" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("mode", MODES)
def test_vae_negative_elbo_is_minus_the_decoder_log_likelihood_plus_kl(sprites, mode):
    strategy, _ = tiny_model("vae", sprites.palette, recon_loss=mode, kl_weight=5e-4)
    g = torch.Generator().manual_seed(1)
    x = sprites.val[:4]
    kl = torch.rand(4, generator=g)
    if mode == "mse":
        out = torch.randn(4, 3, 16, 16, generator=g)
        sigma = math.sqrt(128 * 5e-4)  # the variance the docstring states
        log_p = torch.distributions.Normal(out, sigma).log_prob(common.to_model_range(x)).sum((1, 2, 3))
    elif mode == "bce":
        x = (x > 0.5).float()  # Bernoulli is a likelihood for binary values only
        out = torch.randn(4, 3, 16, 16, generator=g)
        log_p = torch.distributions.Bernoulli(logits=out).log_prob(x).sum((1, 2, 3))
    else:
        out = torch.randn(4, sprites.palette.shape[0], 16, 16, generator=g)
        index = common.palette_index(x, sprites.palette)
        log_p = torch.distributions.Categorical(logits=out.permute(0, 2, 3, 1)).log_prob(index).sum((1, 2))
    assert torch.allclose(strategy.negative_elbo(out, x, kl), -log_p + kl, rtol=1e-5)


def test_vae_kl_warmup_is_linear_then_constant(sprites):
    strategy, model = tiny_model("vae", sprites.palette, kl_weight=0.01, kl_warmup_epochs=4)
    weights = []
    for epoch in range(1, 7):
        strategy.on_epoch_start(model, epoch)
        weights.append(strategy.kl_weight)
    assert weights == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    no_warmup, _ = tiny_model("vae", sprites.palette, kl_weight=0.01, kl_warmup_epochs=0)
    assert no_warmup.kl_weight == 0.01


def test_vae_ce_samples_are_exact_palette_colours_and_temperature_draws_from_the_generator(sprites):
    strategy, model = tiny_model("vae", sprites.palette, recon_loss="ce")
    x = strategy.sample(model, 6, torch.Generator().manual_seed(0))
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 1, 3)  # (6 * 256, 1, 3)
    assert (pixels == sprites.palette[None]).all(-1).any(-1).all()
    # with a temperature the pixels are draws: a new generator seed, new pixels even for one z
    hot, _ = tiny_model("vae", sprites.palette, recon_loss="ce", temperature=1.0)
    z = torch.zeros(1, model.latent_dim)
    a, b, c = (hot.decode(model, z, torch.Generator().manual_seed(s), temperature=1.0) for s in (0, 1, 0))
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_vae_closed_form_kl_matches_torch_distributions_and_latent_stats_count_active_units():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, 32, generator=g) * 2, torch.randn(6, 32, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(vae.kl_divergence(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(vae.kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))
    torch.manual_seed(0)
    n = 20000
    # dims 0-1 informative: mu ~ N(0, 0.75), sigma^2 = 0.25, so q(z) = N(0, 1) exactly;
    # dims 2-3 collapsed: q(z_j|x) = N(0, 1) for every x (KL 0).
    mu = torch.cat([torch.randn(n, 2) * 0.75 ** 0.5, torch.zeros(n, 2)], 1)
    logvar = torch.cat([torch.full((n, 2), math.log(0.25)), torch.zeros(n, 2)], 1)
    r = vae.latent_stats(mu, logvar)
    assert r["active_units"] == 2 and r["latent_dim"] == 4
    # per-dim KL of an informative dim: 1/2 (E[mu^2] + 0.25 - 1 - log 0.25)
    assert r["kl_dim_max"] == pytest.approx(0.5 * (0.75 + 0.25 - 1 - math.log(0.25)), rel=0.02)
    assert r["agg_kl"] < 1e-3 and r["agg_var_min"] == pytest.approx(1, abs=0.03) and r["agg_mean_norm"] < 0.03
    # shifted and squeezed codes: the aggregate posterior leaves the prior
    far = vae.latent_stats(mu * 0.1 + 2, logvar - 3)
    assert far["agg_mean_norm"] == pytest.approx(4, rel=0.01) and far["agg_kl"] > 5


# =============================================================================
# vqvae.py
# =============================================================================


@pytest.fixture
def vq_setup(dataset, sprites):
    """(strategy, model, train sprites, val sprites) for the tiny configuration."""
    return (*tiny_model("vqvae", sprites.palette, dataset, epochs=5), sprites.train, sprites.val)


def grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_vqvae_straight_through_gradient_reaches_the_encoder_and_codebook_and_commitment_are_separate_terms(vq_setup):
    strategy, model, train, _ = vq_setup
    out = strategy.train_step(model, train[:16])
    v = {k: float(t.detach()) for k, t in out.items()}
    assert v["loss"] == pytest.approx(v["recon"] + v["codebook"] + 0.25 * v["commitment"])
    out["codebook"].backward(retain_graph=True)  # ||sg[z_e] - e||^2: the codebook only
    assert model.quantizer.codebook.grad.abs().sum() > 0
    assert all(g is None for g in grads(model.encoder))
    model.zero_grad(set_to_none=True)
    out["commitment"].backward(retain_graph=True)  # ||z_e - sg[e]||^2: the encoder only
    assert model.quantizer.codebook.grad is None
    assert all(g is not None and g.abs().sum() > 0 for g in grads(model.encoder))
    model.zero_grad(set_to_none=True)
    out["recon"].backward()  # the reconstruction term alone: its only way back is the straight-through copy
    assert all(g is not None and g.abs().sum() > 0 for g in grads(model.encoder))
    assert model.quantizer.codebook.grad is None  # recon never reaches the codebook (z_q's gradient goes to z_e)
    model.zero_grad(set_to_none=True)  # without the estimator, decoding e_k directly, the encoder gets nothing
    z_e = model.encoder(common.to_model_range(train[:16]))
    strategy.recon_mean(model.decoder(model.quantizer.lookup(model.quantizer.nearest(z_e))), train[:16]).backward()
    assert all(g is None for g in grads(model.encoder))


def test_vqvae_codebook_ema_moves_entries_without_a_codebook_loss_and_usage_and_perplexity(dataset, sprites):
    strategy, model = tiny_model("vqvae", sprites.palette, dataset, codebook_ema=True, codebook_decay=0.5)
    before = model.quantizer.codebook.detach().clone()
    out = strategy.train_step(model, sprites.train[:16])
    v = {k: float(t.detach()) for k, t in out.items()}
    assert v["loss"] == pytest.approx(v["recon"] + 0.25 * v["commitment"])
    assert not model.quantizer.codebook.requires_grad
    used = model.quantizer.epoch_counts > 0
    assert not torch.allclose(model.quantizer.codebook[used], before[used])    # moved towards their z_e
    assert torch.allclose(model.quantizer.codebook[~used], before[~used], atol=1e-4)
    with torch.no_grad():
        model.quantizer.codebook[1:] = 100.0  # everything maps to entry 0
    m = strategy.on_epoch_end(model, 1, sprites.val)
    assert m["codebook_usage"] == pytest.approx(1 / 16) and m["perplexity"] == pytest.approx(1.0)


@pytest.mark.parametrize("restart_dead, epoch", [(True, 1), (False, 1), (True, 5)],
                         ids=["restart", "no-restart-flag", "last-epoch"])
def test_vqvae_dead_code_restart_revives_unused_entries_except_with_no_restart_or_in_the_last_epoch(
        vq_setup, dataset, restart_dead, epoch):
    strategy, model, train, val = vq_setup
    strategy.config = tiny_config("vqvae", dataset, epochs=5, restart_dead=restart_dead)
    q = model.quantizer
    with torch.no_grad():
        q.codebook[8:] = 100.0  # far from every encoder output: entries 8..15 are dead
    batch = train[:16]
    strategy.train_step(model, batch)
    assert (q.epoch_counts[8:] == 0).all() and q.epoch_counts.sum() == 16 * 16
    used_before = int((strategy.code_counts(model, batch) > 0).sum())
    before = q.codebook.detach().clone()
    metrics = strategy.on_epoch_end(model, epoch, val)
    assert metrics["dead_codes"] >= 8
    if not (restart_dead and epoch == 1):
        assert metrics["restarted"] == 0 and torch.equal(q.codebook, before)
        return
    assert metrics["restarted"] == metrics["dead_codes"]
    assert (torch.cdist(q.codebook[8:], strategy.z_e_pool).min(dim=1).values < 1e-5).all()  # each on an encoder output
    assert int((strategy.code_counts(model, batch) > 0).sum()) > used_before
    assert (q.epoch_counts == 0).all()  # counting starts afresh for the next epoch


def test_vqvae_prior_mask_is_causal_and_samplers_in_range_seeded_and_top_k(dataset, vq_setup):
    strategy, model, _, _ = vq_setup
    prior = model.prior.eval()
    torch.manual_seed(1)
    codes = torch.randint(16, (3, 16))
    logits = prior(prior.inputs_for(codes))
    assert logits.shape == (3, 16, 16)
    for j in range(16):
        changed = codes.clone()
        changed[:, j] = (codes[:, j] + 1) % 16
        other = prior(prior.inputs_for(changed))
        # code j is an input at position j + 1 only: positions 0..j predict it and
        # the codes before it, and must not see it.
        assert torch.equal(logits[:, :j + 1], other[:, :j + 1]), j
        if j < 15:
            assert not torch.allclose(logits[:, j + 1:], other[:, j + 1:]), j
    model.eval()
    gen = lambda s: torch.Generator().manual_seed(s)
    prior = strategy.sample(model, 6, gen(0))
    noise = strategy.sample(model, 6, gen(0), "random")
    assert prior.shape == noise.shape == (6, 3, 16, 16) and 0 <= prior.min() and prior.max() <= 1
    assert torch.equal(prior, strategy.sample(model, 6, gen(0)))
    assert not torch.equal(strategy.sample_codes(model, 6, gen(0), "prior"),
                           strategy.sample_codes(model, 6, gen(0), "random"))
    strategy.config = tiny_config("vqvae", dataset, top_k=1)  # greedy: the generator no longer matters
    assert torch.equal(strategy.sample_codes(model, 4, gen(0), "prior"), strategy.sample_codes(model, 4, gen(1), "prior"))


def test_vqvae_resume_into_stage_two_equals_an_uninterrupted_run(dataset, tmp_path):
    """Both stages through the Trainer: a run cut at the stage boundary resumes exactly."""
    train = lambda path, **kw: common.train(vqvae.VQVAEStrategy, tiny_config("vqvae", dataset, path, **{"epochs": 1, **kw}))
    full = train(tmp_path / "full", prior_epochs=1)
    cut = train(tmp_path / "cut", prior_epochs=0)
    assert float(params_of(cut)["stage1_epochs"]) == 0
    a, b = params_of(full), params_of(train(None, prior_epochs=1, resume=str(last_pt(cut))))
    assert float(a["stage1_epochs"]) == 1 and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(common.UserError, match="--epochs 1"):  # the prior has trained: stage 1 cannot grow under it
        train(None, prior_epochs=1, epochs=2, resume=str(last_pt(full)))


def test_vqvae_conditional_prior_class_token_dropout_and_guided_logits(dataset, sprites):
    strategy, model = tiny_model("vqvae", sprites.palette, dataset, condition="colour", epochs=1, prior_epochs=1)
    model.eval()
    prior, k = model.prior, strategy.config.codebook_size
    with torch.no_grad():  # GPT-2's N(0, 0.02) start makes every logit about 0: scale up, so the class matters
        prior.tok_emb.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
        prior.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    codes, y = torch.randint(k, (4, 16)), torch.tensor([0, 2, 6, 7])  # 7 = the null label of 7 colour classes
    assert prior.inputs_for(codes, y)[:, 0].tolist() == [k + 1, k + 3, k + 7, k]  # class tokens; null = start token
    assert prior.inputs_for(codes)[:, 1:].equal(codes[:, :-1])
    torch.manual_seed(0)
    dropped = strategy.drop_labels(torch.zeros(20000, dtype=torch.long)) == 7
    assert dropped.float().mean().item() == pytest.approx(strategy.config.p_uncond, abs=0.01)
    y = y[:3]
    calls = []
    forward = prior.forward
    prior.forward = lambda tokens: (calls.append(tokens.shape[0]), forward(tokens))[1]
    draw = lambda w, labels=y: (setattr(strategy.config, "guidance", w),
                                strategy.sample_codes(model, 3, torch.Generator().manual_seed(5), "prior", labels))[1]
    uncond = draw(1.0, torch.full((3,), 7))  # the null label: the unconditional prior
    assert draw(0.0).equal(uncond) and not draw(1.0).equal(uncond)
    calls.clear()
    draw(3.0)
    assert calls == [6] * 16  # one call of 2 x 3 sequences per code
    tokens = torch.cat([torch.full((3, 1), k), codes[:3, :5]], dim=1)
    strategy.config.guidance = 2.5
    with torch.no_grad():
        guided = strategy.prior_logits(model, tokens, y)
        c = forward(torch.cat([prior.start_token(y)[:, None], tokens[:, 1:]], 1))[:, -1]
        u = forward(tokens)[:, -1]
    assert torch.allclose(guided, u + 2.5 * (c - u), atol=1e-5)


# =============================================================================
# diffusion.py
# =============================================================================


def reference_ddpm(**kw) -> diffusion.DiffusionStrategy:
    """diffusion.py's strategy with the reference DDPM's settings (Config.LEGACY: linear
    schedule, eps-prediction), on a random 8-colour palette; keywords override."""
    return diffusion.DiffusionStrategy(diffusion.Config(**{**diffusion.Config.LEGACY, **kw}), torch.rand(8, 3))


class Oracle(nn.Module):
    """The ideal eps_theta when the data is one sprite x_star: from
    x_t = sqrt(alpha_bar_t) x_star + sqrt(1 - alpha_bar_t) eps the noise is
    eps = (x_t - sqrt(alpha_bar_t) x_star) / sqrt(1 - alpha_bar_t) exactly."""

    def __init__(self, strategy, x_star):
        super().__init__()
        self.s, self.x_star = strategy.schedule, x_star

    def forward(self, x, t):
        a = self.s["sqrt_alpha_bar"][t][:, None, None, None]
        b = self.s["sqrt_one_minus_alpha_bar"][t][:, None, None, None]
        return (x - a * self.x_star) / b


class GaussianOracle(nn.Module):
    """The ideal eps_theta when every pixel of the data is N(mu, s^2), independent:
    x_t = a x_0 + b eps is Gaussian too, and E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2)
    (a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t))."""

    def __init__(self, strategy, mu, s):
        super().__init__()
        self.sched, self.mu, self.s = strategy.schedule, mu, s

    def forward(self, x, t):
        a = self.sched["sqrt_alpha_bar"][t][:, None, None, None].double()
        b = self.sched["sqrt_one_minus_alpha_bar"][t][:, None, None, None].double()
        return (b * (x.double() - a * self.mu) / (a ** 2 * self.s ** 2 + b ** 2)).float()


# -----------------------------------------------------------------------------
# Reference formulas: the schedules, q_sample, v, min-SNR, the LR schedule, the samplers on an exact eps_theta
# -----------------------------------------------------------------------------


def test_diffusion_linear_and_cosine_schedules_and_q_sample_match_their_closed_forms_and_the_forward_chain():
    """Ho et al.'s Eq. 4 (closed form) on the linear schedule, and against Eq. 2 run
    step by step, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z, on 50,000 noisings
    of one pixel: the same mean and standard deviation at several t."""
    strategy = reference_ddpm()
    s = strategy.schedule
    beta = np.linspace(1e-4, 0.02, 1000)
    assert np.allclose(s["beta"].numpy(), beta, atol=1e-9)
    alpha_bar = np.cumprod(1 - beta)
    assert np.allclose(s["alpha_bar"].numpy(), alpha_bar, rtol=1e-5)
    assert 3e-5 < alpha_bar[-1] < 5e-5  # x_T is noise: 0.6% of the sprite's amplitude is left
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    eps = torch.randn(5, 3, 16, 16, generator=g)
    t = torch.tensor([0, 1, 250, 998, 999])
    x_t = strategy.q_sample(x0, t, eps)
    ab = torch.tensor(alpha_bar[t.numpy()], dtype=torch.float64)[:, None, None, None]  # float64: 1 - ab at t = 0
    assert torch.allclose(x_t.double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double(), atol=1e-6)
    g, beta_t = torch.Generator().manual_seed(0), s["beta"].double()
    x = torch.full((50_000,), 0.7, dtype=torch.float64)
    for t in range(300):
        x = (1 - beta_t[t]).sqrt() * x + beta_t[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in (0, 99, 299):  # 3 standard errors of a difference of two 50,000-sample estimates: 0.02
            closed = strategy.q_sample(torch.full((50_000, 1, 1, 1), 0.7), torch.full((50_000,), t),
                                       torch.randn(50_000, 1, 1, 1, generator=g)).flatten().double()
            assert abs(x.mean() - closed.mean()) < 0.02 and abs(x.std() - closed.std()) < 0.02, t
            assert abs(x.mean() - s["sqrt_alpha_bar"][t] * 0.7) < 0.02, t
    # the cosine schedule (Nichol & Dhariwal 2021, Eq. 17), its betas clipped at 0.999
    T, offset = 1000, 0.008
    sched = diffusion.cosine_schedule(T, torch.device("cpu"))
    f = lambda t: np.cos((t / T + offset) / (1 + offset) * np.pi / 2) ** 2
    t = np.arange(1, T + 1)  # the paper's t = 1..T is index 0..T-1
    closed = f(t) / f(0)
    beta = 1 - closed / np.concatenate([[1.0], closed[:-1]])
    unclipped = beta <= 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta hits the 0.999 clip
    assert np.allclose(sched["alpha_bar"].numpy()[:-1], closed[:-1], rtol=1e-5, atol=1e-9)
    assert sched["beta"].max() == pytest.approx(0.999)
    assert np.allclose(sched["alpha_bar"][-1].item(), closed[-2] * (1 - 0.999), rtol=1e-4)
    assert (sched["alpha_bar"][1:] < sched["alpha_bar"][:-1]).all()
    # SNR and log-SNR follow from alpha_bar (computed in float64 before storing float32)
    snr = closed[:-1] / (1 - closed[:-1])
    assert np.allclose(sched["snr"].numpy()[:-1], snr, rtol=1e-5)
    assert np.allclose(sched["log_snr"].numpy()[:-1], 0.5 * np.log(snr), atol=1e-5)


def test_diffusion_log_snr_shift_adds_s_to_the_cosine_log_snr_and_zero_is_the_cosine_schedule():
    """Hoogeboom et al. 2023, Sec. 3.1: log SNR'(t) = log(alpha_bar_t / (1 - alpha_bar_t)) + S, alpha_bar' = sigmoid."""
    T, cpu = 1000, torch.device("cpu")
    plain = diffusion.cosine_schedule(T, cpu)
    for same in (diffusion.cosine_schedule(T, cpu, 0.0), diffusion.DiffusionStrategy(diffusion.Config(schedule="cosine"), torch.rand(8, 3)).schedule):
        assert same.keys() == plain.keys() and all(torch.equal(same[k], v) for k, v in plain.items())
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.array([0, 100, 500, 900, 998])  # index i is the paper's t = i + 1 (not 999: its beta is clipped)
    ab = f(i + 1) / f(0)
    for S in (2.77, -1.5):
        s = diffusion.DiffusionStrategy(diffusion.Config(schedule="cosine", log_snr_shift=S), torch.rand(8, 3)).schedule
        assert np.allclose(2 * s["log_snr"].numpy()[i], np.log(ab / (1 - ab)) + S, atol=1e-4)  # log_snr: log SNR / 2
        assert np.allclose(np.log(s["snr"].numpy()[i]), np.log(ab / (1 - ab)) + S, atol=1e-4)
        assert torch.allclose(torch.cumprod(s["alpha"].double(), 0), s["alpha_bar"].double(), rtol=1e-4)  # the betas
        assert ((s["alpha_bar"] > plain["alpha_bar"]) == (S > 0)).all()  # S > 0: less noise at every t


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_min_snr_weights_match_the_formula(prediction):
    gamma = 5.0
    strategy = diffusion.DiffusionStrategy(diffusion.Config(prediction=prediction, loss_weight="min-snr",
                                                            snr_gamma=gamma, schedule="linear"), torch.rand(8, 3))
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    t = torch.tensor([0, 50, 200, 500, 999])
    snr = alpha_bar[t.numpy()] / (1 - alpha_bar[t.numpy()])
    expected = np.minimum(snr, gamma) / (snr if prediction == "eps" else snr + 1)
    w = strategy.min_snr_weight(t).numpy()
    assert np.allclose(w, expected, rtol=1e-4)
    # high noise (SNR < gamma): eps weight is exactly 1; low noise: clipped to gamma / SNR < 1
    assert (w <= 1 + 1e-6).all() and (w[-1] == pytest.approx(1.0) if prediction == "eps" else w[0] < 1e-3)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_v_target_and_its_inverse_round_trip(schedule):
    strategy = diffusion.DiffusionStrategy(diffusion.Config(schedule=schedule, prediction="v"), torch.rand(8, 3))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 600, 998, 999])
    strategy.schedule = {k: v.double() for k, v in strategy.schedule.items()}  # exact in float64
    x0_back, eps_back = strategy.x0_eps_from_v(strategy.q_sample(x0, t, eps), t, strategy.v_target(x0, t, eps))
    assert torch.allclose(x0_back, x0, atol=1e-6) and torch.allclose(eps_back, eps, atol=1e-6)


def test_diffusion_lr_warmup_and_cosine_decay_and_old_checkpoint_configs_get_the_legacy_values():
    strategy = diffusion.DiffusionStrategy(diffusion.Config(warmup_steps=10, lr_decay="cosine"), torch.rand(8, 3))
    f = [strategy.lr_factor(step, 110) for step in range(110)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway through the decay
    assert f[-1] < 0.01 and all(a >= b for a, b in zip(f[9:], f[10:]))
    assert {reference_ddpm().lr_factor(s, 100) for s in range(100)} == {1.0}  # the reference keeps --lr fixed
    # an old checkpoint's config gets the reference's (LEGACY) values, not the new defaults
    old = {f.name: getattr(diffusion.Config(), f.name) for f in dataclasses.fields(common.TrainConfig)}
    old.update(base_channels=64, dropout=0.1, timesteps=1000, sampler="ddim", steps=50, eta=0.0, retired_field=1)
    values = common.saved_config(diffusion.Config, old)
    assert "retired_field" not in values
    for k, v in diffusion.Config.LEGACY.items():
        assert values[k] == v, k
    assert common.saved_config(diffusion.Config, {**old, "schedule": "cosine"})["schedule"] == "cosine"


@pytest.mark.parametrize("T, steps", [(1000, 50), (1000, 1000), (1000, 2), (1000, 3), (10, 5), (10, 10), (7, 4)])
def test_diffusion_ddim_timesteps_cover_the_schedule_and_end_at_zero(T, steps):
    tau = diffusion.ddim_timesteps(T, steps)
    assert tau.dtype == torch.long and len(tau) == steps
    assert tau[0] == T - 1, "DDIM must start where x_T is drawn, t = T-1 (the off-by-one starts at T - T/steps)"
    assert tau[-1] == 0, "DDIM must end at t = 0, the last noise level before clean data"
    assert (tau[1:] < tau[:-1]).all(), "timesteps must strictly decrease"
    if steps == T:
        assert tau.tolist() == list(range(T - 1, -1, -1))
    if (T, steps) == (1000, 50):
        gaps = (tau[:-1] - tau[1:]).tolist()
        assert set(gaps) <= {20, 21} and tau.tolist()[:3] == [999, 979, 958]


@pytest.mark.parametrize("sampler, eta, steps", [("ddim", 0.0, 50), ("ddim", 1.0, 50), ("ddpm", 0.0, 50),
                                                 ("dpm++", 0.0, 10)])
def test_diffusion_samplers_return_the_data_when_eps_theta_is_exact(sampler, eta, steps):
    """With the oracle eps_theta for a one-sprite data set, every DDIM step
    predicts x_0 = x_star exactly, and Algorithm 2's last step lands on it
    too: every sampler must return x_star. A sampler that stopped one level
    early (at alpha_bar_0 instead of clean data) would leave noise of ~0.01."""
    strategy = reference_ddpm(sampler=sampler, eta=eta, steps=steps)  # the oracle predicts eps
    x_star = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = strategy.sample(Oracle(strategy, x_star), 3, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 16, 16)
    assert torch.allclose(out, common.from_model_range(x_star).expand(3, -1, -1, -1), atol=2e-4)


def test_diffusion_dpm_solver_pp_recovers_a_gaussian_in_few_steps():
    """With the oracle, the probability-flow ODE maps x_T to
    x_0 = mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + b_T^2) exactly (an affine map
    between Gaussians). DPM-Solver++(2M) must land there in 10 steps, much
    closer than DDIM (its first-order special case) with the same 10 steps."""
    mu, s, n = 0.1, 0.2, 8
    strategy = reference_ddpm(sampler="dpm++", steps=10)  # the oracle predicts eps
    oracle = GaussianOracle(strategy, mu, s)
    z = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # the sampler's x_T
    a, b = strategy.schedule["sqrt_alpha_bar"][-1].item(), strategy.schedule["sqrt_one_minus_alpha_bar"][-1].item()
    exact = mu + s * (z - a * mu) / math.sqrt(a ** 2 * s ** 2 + b ** 2)
    dpm = strategy.sample_dpm_pp(oracle, n, torch.Generator().manual_seed(0), 10)
    ddim = strategy.sample_ddim(oracle, n, torch.Generator().manual_seed(0), 10, 0.0)
    err_dpm, err_ddim = (dpm - exact).abs().max().item(), (ddim - exact).abs().max().item()
    assert err_dpm < 0.01, err_dpm
    assert err_dpm < err_ddim / 3, (err_dpm, err_ddim)
    assert dpm.mean().item() == pytest.approx(mu, abs=0.01) and dpm.std().item() == pytest.approx(s, abs=0.01)


class FlowOracle(nn.Module):
    """The ideal velocity when every pixel of the data is N(mu, s^2), independent: x_t = (1 - t) x_0 + t eps
    is N((1 - t) mu, (1 - t)^2 s^2 + t^2), and u = E[eps - x_0 | x_t] = (t - (1 - t) s^2) (x_t - (1 - t) mu)
    / ((1 - t)^2 s^2 + t^2) - mu. It is called, as the U-Net is, at t (T - 1)."""

    def __init__(self, T, mu, s):
        super().__init__()
        self.T, self.mu, self.s = T, mu, s

    def forward(self, x, t):
        t, (mu, s2) = (t.double() / (self.T - 1))[:, None, None, None], (self.mu, self.s ** 2)
        return ((t - (1 - t) * s2) * (x.double() - (1 - t) * mu) / ((1 - t) ** 2 * s2 + t ** 2) - mu).float()


def test_diffusion_flow_x_t_and_target_follow_the_formula_and_euler_and_heun_recover_a_gaussian():
    """Rectified flow (--schedule flow): the U-Net sees x_t = (1 - t) x_0 + t eps at t (T - 1), t logit-normal, and
    the loss is the MSE to eps - x_0. With the oracle velocity the ODE maps x_1 to x_0 = mu + s x_1 exactly (an
    affine map between Gaussians): Euler (first order) halves its error from 10 to 20 steps, Heun (second order)
    divides it by about 4 and is 20 times nearer (measured max errors: Euler 0.19, 0.098; Heun 0.018, 0.0055)."""
    strategy = diffusion.DiffusionStrategy(diffusion.Config(schedule="flow", sampler="euler", loss_weight="none"),
                                           torch.rand(8, 3))
    seen = []
    zero = lambda x, t: seen.append((x, t)) or torch.zeros_like(x)  # records what the U-Net is given
    batch = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = strategy.loss(zero, batch)
    torch.manual_seed(1)
    t = torch.sigmoid(torch.randn(64))  # logit-normal(0, 1), Esser et al. 2024
    x0, eps = batch * 2 - 1, torch.randn(64, 3, 16, 16)
    (x_t, t_net), = seen
    assert torch.allclose(t_net, t * 999) and 0.35 < t.mean() < 0.65 and t.min() > 0 and t.max() < 1
    assert torch.allclose(x_t, (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps, atol=1e-6)
    assert loss.item() == pytest.approx(((eps - x0) ** 2).mean().item(), rel=1e-5)  # u_theta = 0: the target's MSE
    mu, s, n = 0.1, 0.2, 8
    oracle, z = FlowOracle(strategy.T, mu, s), torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    exact, err = mu + s * z, {}
    for sampler, steps in itertools.product(diffusion.FLOW_SAMPLERS, (10, 20)):
        strategy.config.sampler = sampler
        x = strategy.sample_flow(oracle, n, torch.Generator().manual_seed(0), steps)  # x_1 = z
        err[sampler, steps] = (x - exact).abs().max().item()
        assert x.mean().item() == pytest.approx(exact.mean().item(), abs=0.002), (sampler, steps)
        assert x.std().item() == pytest.approx(exact.std().item(), rel=0.15 if steps == 20 else 0.25), (sampler, steps)
    assert err["euler", 20] < 0.6 * err["euler", 10] and err["heun", 20] < err["heun", 10] / 3, err
    assert err["heun", 20] < 0.01 and err["heun", 10] < err["euler", 20] / 5, err


class EDMOracle(nn.Module):
    """Karras et al.'s F when every pixel of the data is N(mu, s^2): from its input c_in x and c_noise it recovers
    sigma = exp(4 c_noise) and x = x_0 + sigma eps, and returns (E[x_0 | x] - c_skip x) / c_out, with
    E[x_0 | x] = mu + s^2 (x - mu) / (s^2 + sigma^2): the network that makes D the ideal denoiser."""

    def __init__(self, mu, s, sigma_data):
        super().__init__()
        self.mu, self.s, self.sd = mu, s, sigma_data

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise.double())[:, None, None, None]
        c_skip, c_out, c_in, _ = diffusion.edm_precond(sigma, self.sd)
        x = x_in.double() / c_in
        return ((self.mu + self.s ** 2 * (x - self.mu) / (self.s ** 2 + sigma ** 2) - c_skip * x) / c_out).float()


def test_diffusion_edm_preconditioning_levels_loss_and_sampler_follow_karras_et_al(dataset):
    """--schedule edm (Karras et al. 2022, Table 1): at sigma = sigma_data, c_skip = 1/2, c_out = sigma_data / sqrt(2),
    c_in = 1 / (sigma_data sqrt(2)); at every sigma F's input and target have unit variance when x_0 has std sigma_data
    (what the four coefficients are for); Eq. 5's levels; the loss gives the U-Net c_in x and ln(sigma) / 4 with
    ln sigma ~ N(-1.2, 1.2^2) and equals lambda ||D - x_0||^2; with the ideal F the samplers recover a Gaussian
    (DPM-Solver++ on this path: 2x nearer than Euler at the same calls)."""
    sd = 0.5
    c_skip, c_out, c_in, c_noise = diffusion.edm_precond(torch.tensor(sd), sd)
    assert (c_skip.item(), c_out.item(), c_in.item(), c_noise.item()) == pytest.approx(
        (0.5, sd / math.sqrt(2), 1 / (sd * math.sqrt(2)), math.log(sd) / 4))
    x0, n = sd * torch.randn(200_000, generator=torch.Generator().manual_seed(0)), torch.randn(200_000)
    for sigma in (0.01, 0.3, 3.0, 50.0):
        c_skip, c_out, c_in, _ = diffusion.edm_precond(torch.tensor(sigma), sd)
        x = x0 + sigma * n
        assert (c_in * x).std().item() == pytest.approx(1, abs=0.01), sigma
        assert ((x0 - c_skip * x) / c_out).std().item() == pytest.approx(1, abs=0.01), sigma
    levels = diffusion.edm_sigmas(18, torch.device("cpu")).double()
    assert levels[0].item() == pytest.approx(80) and levels[-1].item() == pytest.approx(0.002)
    assert torch.allclose(levels ** (1 / 7), torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 18, dtype=torch.float64),
                          rtol=1e-5)  # linear in sigma^(1/rho)
    strategy = diffusion.DiffusionStrategy(diffusion.Config(data=str(dataset), schedule="edm", sampler="euler",
                                                            loss_weight="none", p_mean=-1.2), torch.rand(8, 3))  # Table 1
    assert 0.3 < strategy.sigma_data < 1, strategy.sigma_data  # measured on the sprites, in [-1, 1]
    seen = []
    zero = lambda x, c: seen.append((x, c)) or torch.zeros_like(x)  # F = 0: D = c_skip x
    batch = torch.rand(512, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = strategy.loss(zero, batch)
    torch.manual_seed(1)
    ln_sigma, eps = -1.2 + 1.2 * torch.randn(512), torch.randn(512, 3, 16, 16)
    (x_in, c_net), = seen
    sigma, x0 = ln_sigma.exp()[:, None, None, None], batch * 2 - 1
    c_skip, c_out, c_in, c_noise = diffusion.edm_precond(sigma, strategy.sigma_data)
    x = x0 + sigma * eps
    assert torch.allclose(c_net, c_noise.flatten(), atol=1e-4) and abs(c_net.mean() * 4 + 1.2) < 0.15
    assert torch.allclose(x_in, c_in * x, atol=1e-4)
    shifted = diffusion.DiffusionStrategy(dataclasses.replace(strategy.config, p_mean=0.5), torch.rand(8, 3))
    shifted.loss(zero, batch)
    assert abs(seen[-1][1].mean() * 4 - 0.5) < 0.15  # --p-mean moves ln sigma's mean
    expected = (((c_skip * x - x0) ** 2).mean(dim=(1, 2, 3)) / c_out.flatten() ** 2).mean()  # lambda = 1 / c_out^2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    mu, s, n = 0.1, 0.2, 8
    z = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = mu + s * (80 * z - mu) / math.sqrt(s ** 2 + 80 ** 2)  # the ODE's map from x = sigma_max z, Gaussian to Gaussian
    err = {}
    for sampler, steps in itertools.product(diffusion.FLOW_SAMPLERS, (10, 20)):
        strategy.config.sampler = sampler
        x = strategy.sample_flow(EDMOracle(mu, s, strategy.sigma_data), n, torch.Generator().manual_seed(0), steps)
        err[sampler, steps] = (x - exact).abs().max().item()
    for steps in (10, 20):  # DPM-Solver++(2M) on the same path and levels, one call a step
        err["dpm++", steps] = (strategy.sample_dpm_pp(EDMOracle(mu, s, strategy.sigma_data), n,
                                                      torch.Generator().manual_seed(0), steps) - exact).abs().max().item()
    assert err["euler", 20] < 0.6 * err["euler", 10] and err["heun", 20] < err["heun", 10] / 3, err  # 1st, 2nd order
    assert err["heun", 20] < 0.05 and err["heun", 10] < err["euler", 20], err  # measured: 0.25, 0.13; 0.11, 0.025
    assert err["dpm++", 10] < err["euler", 10] / 2 and err["dpm++", 20] < err["euler", 20] / 2, err  # 0.10, 0.051


# -----------------------------------------------------------------------------
# Contracts: the U-Net, training, the samplers, pictures, a run and its sample mode
# -----------------------------------------------------------------------------


def test_diffusion_unet_width_and_depth_flags_and_the_reference_model():
    ref = reference_ddpm(base_channels=64)
    with contextlib.redirect_stdout(io.StringIO()):
        ref_net = ref.build_model(ref.config)
        cfg = diffusion.Config(base_channels=16, channel_mult="1,2,2", res_blocks=1)
        small = diffusion.DiffusionStrategy(cfg, torch.rand(8, 3)).build_model(cfg)
    n_ref = sum(p.numel() for p in ref_net.parameters())
    assert 6.8e6 < n_ref < 7.6e6, n_ref  # LEGACY + base 64 rebuilds today's 7.0M reference U-Net
    widths = {m.out_channels for m in ref_net.modules() if isinstance(m, nn.Conv2d)}
    assert {64, 128, 256} <= widths and max(widths) == 256
    assert not any("attn" in name.lower() for name, _ in ref_net.named_modules())
    assert ref_net(torch.randn(2, 3, 16, 16), torch.tensor([0, 999])).shape == (2, 3, 16, 16)
    widths = {m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)}
    assert max(widths) == 32 and {16, 32} <= widths
    assert len(small.down1) == len(small.up1) == 1 and len(small.bottom) == 2
    assert small(torch.randn(2, 3, 16, 16), torch.tensor([0, 9])).shape == (2, 3, 16, 16)


def test_diffusion_tiny_unet_with_10_timesteps_learns_and_every_sampler_stays_in_range_and_is_seeded(sprites):
    """Zero-initialised output: eps_theta = 0 (or v = 0) at first, so the loss starts at
    E[eps^2] = 1 (or E[v^2] = 1) per pixel under L_simple (--loss-weight none)."""
    strategy, model = tiny_model("diffusion", sprites.palette, loss_weight="none")
    batch = sprites.train[:32]
    before, after = loss_before_after(strategy, model, batch, steps=30, lr=strategy.config.lr,
                                      measure=lambda: strategy.get_metrics(model, batch)["loss"])
    assert before == pytest.approx(1.0, abs=0.15)
    assert after < 0.85 * before, (before, after)  # measured: 1.01 -> 0.76
    eps, eps_model = tiny_model("diffusion", sprites.palette, prediction="eps")
    torch.manual_seed(0)
    assert eps.loss(eps_model, batch).item() == pytest.approx(1.0, abs=0.2)
    model.eval()
    draws = {}
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpm++", 0.0)):  # eta 1: stochastic DDIM
        strategy.config.sampler, strategy.config.eta = sampler, eta
        a, b, c = (strategy.sample(model, 4, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
        common.check_samples(a, 4)  # (4, 3, 16, 16), finite, in [0, 1]
        assert torch.equal(a, b) and not torch.equal(a, c), (sampler, eta)  # reproducible from the generator alone
        draws[sampler, eta] = a
    assert not torch.equal(draws["ddim", 0.0], draws["ddim", 1.0])


class SelfCondSpy(nn.Module):
    """Wraps a U-Net: records, per call, whether x0_prev (--self-cond's input) was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.given = model, []

    def forward(self, x, t, y=None, x0_prev=None):
        self.given.append(x0_prev is not None and bool(x0_prev.abs().max() <= 1))  # given, and in the data range
        return self.model(x, t, y, x0_prev)


def test_diffusion_self_cond_unet_is_the_plain_one_at_x0_prev_zero_trains_and_every_sampler_feeds_x0_prev(sprites,
                                                                                                       dataset):
    """Chen et al. 2022, Sec. 3.3: the extra input conv starts at zero, so x0_prev = 0 is exactly the plain U-Net."""
    _, plain = tiny_model("diffusion", sprites.palette)
    strategy, model = tiny_model("diffusion", sprites.palette, self_cond=True)
    extra = model.state_dict().keys() - plain.state_dict().keys()
    assert extra == {"cond_in.weight"} and not model.cond_in.weight.any()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.state_dict().items())  # same seed, same weights
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that are not zero (the zero-initialised convs would hide a difference)
        for p in plain.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)
        model.load_state_dict(plain.state_dict(), strict=False)
        x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 3, 6, 9])
        out = plain.eval()(x, t)
        assert torch.equal(model.eval()(x, t, x0_prev=torch.zeros_like(x)), out) and torch.equal(model(x, t), out)
        model.cond_in.weight.normal_(generator=g)
        assert not torch.allclose(model(x, t, x0_prev=x.clamp(-1, 1)), out)
    # training: half the batches first estimate x_0 without x0_prev, then train given it
    model.train()
    spy, calls = SelfCondSpy(model), set()
    for seed in range(8):
        spy.given = []
        torch.manual_seed(seed)
        strategy.loss(spy, sprites.train[:8])
        calls.add(tuple(spy.given))
    assert calls == {(False,), (False, True)}  # x0_prev = 0, or the U-Net's own estimate first
    before, after = loss_before_after(strategy, model, sprites.train[:32], steps=20, lr=strategy.config.lr)
    assert math.isfinite(after) and after < before, (before, after)
    # sampling, class- and autoguided (--condition colour, a guide): every U-Net call after the first gets x0_prev
    strategy, model = tiny_model("diffusion", sprites.palette, dataset, self_cond=True, condition="colour")
    strategy.load_extra_state({"guide": model.state_dict()})
    edm = tiny_model("diffusion", sprites.palette, dataset, self_cond=True, condition="colour", schedule="edm",
                     loss_weight="none")
    edm[0].load_extra_state({"guide": edm[1].state_dict()})
    for (strategy, model), sampler in [((strategy, model), s) for s in ("ddim", "ddpm", "dpm++")] + [
            (edm, s) for s in ("euler", "heun", "dpm++")]:
        model.eval()
        strategy.config.sampler, spy = sampler, SelfCondSpy(model)
        a, b = (strategy.sample(spy, 4, torch.Generator().manual_seed(3)) for _ in range(2))
        common.check_samples(a, 4)
        n = len(spy.given) // 2  # the calls of a, then of b
        assert torch.equal(a, b) and spy.given[:n] == spy.given[n:] == [False] + [True] * (n - 1), sampler


@pytest.mark.parametrize("schedule", diffusion.FLOW_PATHS)
def test_diffusion_flow_tiny_unet_learns_and_euler_heun_pictures_and_autoguidance_stay_in_range_and_seeded(
        sprites, dataset, schedule):
    """--schedule flow (and edm) on the tiny U-Net: the loss falls (flow: from E[(eps - x_0)^2], u_theta = 0 at
    first); both samplers give sprites in [0, 1] from the generator alone (Heun: 2 U-Net calls a step); the strip and
    the GIF work on t in [0, 1]; autoguidance calls the guide at the steps whose t is in --guide-interval (flow:
    t = 1, 0.8, 0.6; edm: its levels sigma >= 1); edm keeps sigma_data in the checkpoint's extra state."""
    strategy, model = tiny_model("diffusion", sprites.palette, dataset, schedule=schedule, sampler="euler",
                                 loss_weight="none", guide_interval="0.5,1")
    batch = sprites.train[:32]
    before, after = loss_before_after(strategy, model, batch, steps=30, lr=strategy.config.lr,
                                      measure=lambda: strategy.get_metrics(model, batch)["loss"])
    x0 = common.to_model_range(batch)
    assert after < 0.85 * before, (before, after)
    assert schedule == "edm" or before == pytest.approx(1 + (x0 ** 2).mean().item(), rel=0.1), before
    model.eval()
    for sampler, calls in (("euler", 5), ("heun", 10)) + ((("dpm++", 5),) if schedule == "edm" else ()):
        strategy.config.sampler, counting = sampler, CountingUNet(model)
        a, b, c = (strategy.sample(m, 4, torch.Generator().manual_seed(s)) for m, s in ((counting, 3), (model, 3), (model, 4)))
        common.check_samples(a, 4)
        assert torch.equal(a, b) and not torch.equal(a, c) and len(counting.batches) == calls, sampler
    strip, _ = strategy.images(model, sprites.val, torch.Generator().manual_seed(0))["denoising"]
    assert strip.shape == (64, 3, 16, 16) and (strip[0] - sprites.val[0]).abs().mean() < 0.05  # t = 0: the sprite
    assert strategy.trajectory(model, 5, torch.Generator().manual_seed(0)).shape == (5 + 2, 5, 3, 16, 16)
    strategy.config.sampler, plain = "euler", strategy.sample(model, 4, torch.Generator().manual_seed(3))
    strategy.load_extra_state({"guide": {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}})
    strategy._guide_net = CountingUNet(strategy.build_model(strategy.config))
    strategy._guide_net.model.load_state_dict(strategy.guide)
    guided = strategy.sample(model, 4, torch.Generator().manual_seed(3))
    common.check_samples(guided, 4)
    inside = 3 if schedule == "flow" else int((diffusion.edm_sigmas(5, torch.device("cpu")) >= 1).sum())
    assert strategy._guide_net.batches == [4] * inside and not torch.equal(guided, plain)
    if schedule == "edm":  # the GIF follows dpm++; sigma_data travels in the checkpoint, so sampling needs no --data
        strategy.config.sampler = "dpm++"
        assert strategy.trajectory(model, 5, torch.Generator().manual_seed(0)).shape == (5 + 2, 5, 3, 16, 16)
        fresh = diffusion.DiffusionStrategy(dataclasses.replace(strategy.config, data="missing.npz"), sprites.palette)
        fresh.load_extra_state(strategy.extra_state())
        assert 0.3 < fresh.sigma_data == strategy.extra_state()["sigma_data"] == strategy.sigma_data < 1


def test_diffusion_default_edm_run_keeps_sigma_data_in_its_checkpoint_and_samples_without_the_data(dataset, tmp_path):
    """The default path end to end: a tiny edm run's checkpoint holds sigma_data (a float beside the guide), loads,
    and draws seeded sprites from it with its DPM-Solver++ after the dataset is gone."""
    data = tmp_path / "data.npz"
    data.write_bytes(Path(dataset).read_bytes())
    config = tiny_config("diffusion", data, tmp_path, schedule="edm", loss_weight="none", sampler="dpm++", epochs=1)
    run = common.train(diffusion.DiffusionStrategy, config)
    data.unlink()
    state = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert 0.3 < state["extra"]["sigma_data"] < 1 and "guide" in state["extra"]
    trained = common.load_for_sampling(run / "checkpoints" / "last.pt", torch.device("cpu"), diffusion.DiffusionStrategy,
                                       diffusion.Config)
    strategy, model = trained[0], trained[1]
    assert strategy.sigma_data == state["extra"]["sigma_data"]
    a, b = (strategy.sample(model, 4, torch.Generator().manual_seed(1)) for _ in range(2))
    common.check_samples(a, 4)
    assert torch.equal(a, b)


def test_diffusion_denoising_strip_and_trajectory(sprites):
    strategy, model = tiny_model("diffusion", sprites.palette)
    model.eval()
    pictures = strategy.images(model, sprites.val, torch.Generator().manual_seed(0))
    strip, per_row = pictures["denoising"]
    assert per_row == 8 and strip.shape == (4 * 2 * 8, 3, 16, 16)
    assert strip.min() >= 0 and strip.max() <= 1
    assert (strip[0] - sprites.val[0]).abs().mean() < 0.05  # sprite 0's first column: t = 0, barely noised
    frames = strategy.trajectory(model, 5, torch.Generator().manual_seed(0))
    assert frames.shape == (strategy.config.steps + 2, 5, 3, 16, 16)
    assert torch.equal(common.snap_to_palette(frames[-1], sprites.palette), frames[-1])  # last frame: snapped


@pytest.fixture(scope="module")
def tiny_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion-run") / "run"
    return common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", dataset, epochs=2, sample_every=1,
                                                                 out=str(out)))


def test_diffusion_training_run_writes_grids_strip_gif_and_quality_and_sample_mode_pngs_and_the_gif(tiny_run, tmp_path):
    for name in ("samples/epoch_0001.png", "samples/final.png", "denoising/epoch_0001.png",
                 "denoising/final.png", "trajectory.gif", "metrics.json"):
        assert (tiny_run / name).exists(), name
    with Image.open(tiny_run / "trajectory.gif") as gif:
        assert gif.n_frames == TINY["diffusion"]["steps"] + 2
    history = state_of(tiny_run)["history"]
    assert "sample/near_copy_rate" in history[0]  # scored at the epoch-1 grid, not only at the end
    assert "sample/near_copy_rate" in json.loads((tiny_run / "metrics.json").read_text())
    ckpt = last_pt(tiny_run)
    r = run_script("diffusion.py", "sample", "--checkpoint", ckpt, "--n", 10, "--out", tmp_path / "grid.png",
                   "--sampler", "ddim", "--steps", 4, "--eta", 0, "--gif", tmp_path / "ddim.gif")
    assert r.returncode == 0, r.stderr
    assert re.search(r"wrote 10 sprites to .*grid\.png \(sampled in \d+\.\d\d s on cpu\)", r.stdout), r.stdout
    assert Image.open(tmp_path / "grid.png").size == ((8 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    with Image.open(tmp_path / "ddim.gif") as gif:
        assert gif.n_frames == 4 + 2 and gif.size == ((4 * 17 + 1) * 4, (3 * 17 + 1) * 4)  # 10 sprites, 4 per row
    r = run_script("diffusion.py", "sample", "--checkpoint", ckpt, "--n", 3, "--out", tmp_path / "each", "--sampler", "ddpm")
    assert r.returncode == 0, r.stderr
    pngs = list((tmp_path / "each").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(p).size == (16, 16) for p in pngs)


# -----------------------------------------------------------------------------
# Guidance: classifier-free (diffusion.py --condition, common.Labeller) and autoguidance (Karras et al. 2024)
# -----------------------------------------------------------------------------


def test_diffusion_class_weight_balanced_weights_each_labelled_sprite_by_its_class_size_and_labels_drop_at_p_uncond(
        sprites, dataset):
    """--class-weight balanced: w_y = N / (K n_y), mean 1 over the training sprites; a dropped
    (null) label keeps weight 1; validation loss is the plain mean. Labels drop at the rate --p-uncond."""
    strategy, model = tiny_model("diffusion", sprites.palette, dataset, condition="colour",
                                 class_weight="balanced", p_uncond=0.5, loss_weight="none")
    y = strategy.class_labels(sprites.train)
    n_y = torch.bincount(y, minlength=strategy.labeller.n_classes).float()
    assert torch.allclose(strategy.class_weights, len(y) / (len(n_y) * n_y))
    assert strategy.class_weights[y].mean().item() == pytest.approx(1.0, abs=1e-5)
    batch = sprites.train[:16]
    plain, _ = tiny_model("diffusion", sprites.palette, dataset, condition="colour", p_uncond=0.5, loss_weight="none")
    torch.manual_seed(3)
    weighted = strategy.loss(model, batch)
    torch.manual_seed(3)  # the same t, eps and dropout draws, redone by hand
    x0 = common.to_model_range(batch)
    t = torch.randint(0, strategy.T, (16,))
    eps = torch.randn_like(x0)
    labels = strategy.drop_labels(strategy.class_labels(batch))
    err = ((model(strategy.q_sample(x0, t, eps), t, labels) - strategy.v_target(x0, t, eps)) ** 2).mean(dim=(1, 2, 3))
    w = torch.where(labels == strategy.labeller.n_classes, 1.0, torch.cat([strategy.class_weights, torch.ones(1)])[labels])
    assert (labels == strategy.labeller.n_classes).any() and torch.allclose(weighted, (w * err).mean(), atol=1e-6)
    val = [(torch.manual_seed(3), s.loss(model, batch, drop_labels=False))[1] for s in (strategy, plain)]
    assert torch.allclose(*val)
    with pytest.raises(ValueError, match="unknown --class-weight 'equal'; use one of none, balanced"):
        tiny_config("diffusion", class_weight="equal")
    strategy.config.p_uncond = 0.1
    null = strategy.labeller.n_classes
    torch.manual_seed(0)
    y = torch.zeros(200, 64, dtype=torch.long)  # 200 steps of a batch of 64
    dropped = torch.stack([strategy.drop_labels(row) for row in y]) == null
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)  # 12,800 draws: sd 0.0027
    strategy.config.p_uncond = 0.0
    assert (strategy.drop_labels(y[0]) != null).all()


def untrained_but_not_blind(model):
    """Draw the zero-initialised weights (the class embedding, each block's last conv, the
    output conv) at random, so that the output depends on the class as a trained model's does."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05 if p.dim() > 1 else 0.01, generator=g)
    model.class_emb.weight.data *= 20  # embeddings: unit scale, as nn.Embedding's default


class CountingUNet(nn.Module):
    """Wraps a U-Net: counts the calls and the batch size of each."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


class FixedLabel(nn.Module):
    """A U-Net told one label (or the null label, y=None) whatever the sampler asks."""

    def __init__(self, model, y):
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x, t, y=None):
        return self.model(x, t, None if self.y is None else self.y[: x.shape[0]])


@pytest.mark.parametrize("sampler,prediction", [("ddim", "eps"), ("ddpm", "v"), ("dpm++", "v")])
def test_diffusion_guidance_zero_is_unconditional_one_conditional_and_w_extrapolates_in_one_unet_call_per_step(
        sprites, dataset, sampler, prediction):
    strategy, model = tiny_model("diffusion", sprites.palette, dataset, condition="colour", sampler=sampler,
                                 prediction=prediction)
    untrained_but_not_blind(model)
    model.eval()
    y = torch.tensor([0, 3, 5, 6])
    draw = lambda m, w, labels: (setattr(strategy.config, "guidance", w),
                                 strategy.sample(m, 4, torch.Generator().manual_seed(7), labels))[1]
    plain = diffusion.DiffusionStrategy(strategy.config, sprites.palette)
    plain.labeller = None  # no labels passed: the model is called exactly as given
    uncond = plain.sample(FixedLabel(model, None), 4, torch.Generator().manual_seed(7))
    cond = plain.sample(FixedLabel(model, y), 4, torch.Generator().manual_seed(7))
    assert torch.equal(draw(model, 0.0, y), uncond) and torch.equal(draw(model, 1.0, y), cond)
    assert not torch.equal(uncond, cond)
    counting = CountingUNet(model)
    guided = draw(counting, 3.0, y)
    steps = strategy.T if sampler == "ddpm" else strategy.config.steps
    assert counting.batches == [8] * steps  # both branches in one call of 2 x 4 sprites per step
    assert not torch.equal(guided, cond)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 6, 9])
    strategy.config.guidance = 2.5
    with torch.no_grad(), strategy.conditioned(y):
        guided = strategy.model_output(model, x, t)
        c, u = model(x, t, y), model(x, t)
    assert torch.allclose(guided, u + 2.5 * (c - u), atol=1e-5)  # eps_u + w (eps_c - eps_u), on eps or v


def test_diffusion_conditional_run_resumes_exactly_scores_class_accuracy_and_samples_a_class_by_name(
        dataset, tmp_path, monkeypatch, capsys):
    kw = dict(condition="colour", sample_every=0, ema_decay=0.9, epochs=2)
    full = common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", dataset, tmp_path / "full", **kw))
    part = common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", dataset, tmp_path / "part",
                                                                 **{**kw, "epochs": 1}))
    resumed = common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", dataset, **kw,
                                                                    resume=str(last_pt(part))))
    a, b = params_of(full), params_of(resumed)
    assert "class_emb.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    assert 0 <= json.loads((full / "metrics.json").read_text())["sample/class_accuracy"] <= 1
    ckpt = last_pt(full)
    r = run_script("diffusion.py", "sample", "--checkpoint", ckpt, "--n", 8, "--out", tmp_path / "red.png", "--class", "red")
    assert r.returncode == 0 and (tmp_path / "red.png").exists(), r.stderr
    code, out, err = run_script_main("diffusion.py", ["sample", "--checkpoint", str(ckpt), "--class", "teal"],
                                     monkeypatch, capsys)
    assert_one_clean_line(code, out, err, "unknown class 'teal' for colour labels")
    assert "an index 0..6" in err
    r = run_script("compare.py", "guidance", "--checkpoint", ckpt, "--w", "0,2", "--n", 14, "--grid-class", "red",
                   "--out", tmp_path / "sweep")
    assert r.returncode == 0, r.stderr
    for name in ("w0/metrics.json", "w2/metrics.json", "real.json", "sweep.png", "grid-red.png"):
        assert (tmp_path / "sweep" / name).exists(), name
    m = json.loads((tmp_path / "sweep" / "w2" / "metrics.json").read_text())
    assert 0 <= m["sample/class_accuracy"] <= 1 and m["guidance"] == 2 and "sample/precision" in m
    real = json.loads((tmp_path / "sweep" / "real.json").read_text())
    assert real["class_accuracy_mirrored"] == 1.0 and real["colour_entropy"] == 0.0  # colour labels: exact
    assert Image.open(tmp_path / "sweep" / "grid-red.png").size == ((8 * 17 + 1) * 4, (2 * 17 + 1) * 4)  # 2 rows of 2


def test_diffusion_autoguidance_w_one_is_exactly_the_main_model_and_w_combines_main_and_guide(sprites, dataset):
    strategy, model = tiny_model("diffusion", sprites.palette, dataset, prediction="v", autoguidance=1.0,
                                 guide_interval="0,1")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that are not zero (the zero-initialised convs would make both nets alike)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)
    model.eval()
    guide = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    guide_net = strategy.build_model(strategy.config).eval()
    guide_net.load_state_dict(guide)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 3, 6, 9])
    plain = strategy.sample(model, 4, torch.Generator().manual_seed(7))  # no guide: the main model
    strategy.load_extra_state({"guide": guide})
    counting = CountingUNet(model)
    assert strategy.config.autoguidance == 1 and torch.equal(strategy.sample(counting, 4, torch.Generator().manual_seed(7)), plain)
    assert counting.batches == [4] * strategy.config.steps  # w = 1: the guide is never called
    with torch.no_grad():
        main_out, guide_out = model(x, t), guide_net(x, t)
        assert torch.equal(strategy.model_output(model, x, t), main_out)
        for w in (0.0, 2.5):
            strategy.config.autoguidance = w
            out = strategy.model_output(model, x, t)
            assert torch.allclose(out, guide_out + w * (main_out - guide_out), atol=1e-6)  # D_g + w (D_m - D_g)
        assert not torch.allclose(out, main_out, atol=1e-3)
    counting, strategy._guide_net = CountingUNet(model), CountingUNet(strategy._guide_net)
    assert not torch.equal(strategy.sample(counting, 4, torch.Generator().manual_seed(7)), plain)
    assert counting.batches == strategy._guide_net.batches == [4] * strategy.config.steps  # both nets, once a step


class TimedUNet(CountingUNet):
    """Also records the level t of each call (the samplers pass one t for the whole batch)."""

    def forward(self, x, t, y=None):
        self.levels = getattr(self, "levels", []) + [int(t[0])]
        return super().forward(x, t, y)


def test_diffusion_guide_interval_calls_the_guide_only_at_the_levels_inside_it(sprites, dataset):
    strategy, model = tiny_model("diffusion", sprites.palette, dataset, autoguidance=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)
    model.eval()
    strategy.load_extra_state({"guide": {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}})
    plain = strategy.sample(model, 4, torch.Generator().manual_seed(7))  # w = 1
    strategy.config.autoguidance = 2.0
    tau = diffusion.ddim_timesteps(strategy.T, strategy.config.steps).tolist()  # T = 10: 9, 7, 4, 2, 0
    for interval, inside in (("0,1", tau), ("0.3,0.8", [7, 4]), ("0.5,0.5", [])):  # 0.3 x 9 = 2.7 ... 7.2
        strategy.config.guide_interval = interval
        strategy.sample(model, 1, torch.Generator())  # builds the guide's U-Net
        main, strategy._guide_net = TimedUNet(model), TimedUNet(strategy._guide_net)
        x = strategy.sample(main, 4, torch.Generator().manual_seed(7))
        assert main.levels == tau and getattr(strategy._guide_net, "levels", []) == inside, interval
        assert torch.equal(x, plain) == (not inside)  # no guided step: exactly the main model
        strategy._guide_net = strategy._guide_net.model


class CutDiffusion(diffusion.DiffusionStrategy):
    """diffusion.py's strategy, sent Ctrl-C (SIGINT) in its training step number `cut_at`."""
    cut_at = 0

    def train_step(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.cut_at + 1:  # + 1: the Trainer's FLOP count runs one train_step first, on a copy
            os.kill(os.getpid(), signal.SIGINT)
        return super().train_step(model, batch)


def test_diffusion_guide_snapshot_is_the_ema_at_guide_at_kept_in_the_checkpoint_and_resumes_exactly(dataset, tmp_path):
    kw = dict(data=str(dataset), sample_every=0, ema_decay=0.9, epochs=1, guide_at=0.5, n_eval=8)
    full = common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", **kw, out=str(tmp_path / "full")))
    done = state_of(full)
    k = round(0.5 * done["step"])  # the snapshot's step: half of the run's steps
    guide = done["extra"]["guide"]
    assert set(guide) == set(done["model"]) and not all(torch.equal(guide[n], done["model"][n]) for n in guide)
    off = common.load_checkpoint(common.train(diffusion.DiffusionStrategy, tiny_config(
        "diffusion", **{**kw, "guide_at": 0.0, "autoguidance": 1.0}, out=str(tmp_path / "off"))) / "checkpoints" / "last.pt")
    losses = lambda state: [(h["train/loss"], h["val/loss"]) for h in state["history"]]
    assert off["extra"] == {} and losses(off) == losses(done)  # the snapshot leaves training as it was
    assert all(torch.equal(off["model"][n], done["model"][n]) for n in guide)
    for cut in (k, k - 1):  # just after the snapshot (it must come back from the checkpoint), just before it
        out = tmp_path / f"cut{cut}"
        with pytest.raises(common.Interrupted):
            common.train(type("Cut", (CutDiffusion,), {"cut_at": cut}), tiny_config("diffusion", **kw, out=str(out)))
        state = state_of(out)
        assert state["step"] == cut and ("guide" in state["extra"]) == (cut == k)
        if cut == k:  # saved right after step k: the snapshot is that step's EMA, exactly
            assert all(torch.equal(state["extra"]["guide"][n], state["ema"][f"module.{n}"]) for n in guide)
        resumed = common.train(diffusion.DiffusionStrategy, tiny_config(
            "diffusion", **kw, out=str(out), resume=str(last_pt(out))))
        again = state_of(resumed)
        assert all(torch.equal(again["extra"]["guide"][n], guide[n]) for n in guide)
        assert all(torch.equal(again["model"][n], done["model"][n]) for n in guide)


def test_diffusion_ema_extra_equals_the_ema_of_a_run_with_that_decay_is_scored_and_resumes_exactly(dataset, tmp_path):
    """--ema-extra 0.5,0.99 beside --ema-decay 0.9: training is unchanged, the 0.5 average is exactly the EMA of a run
    with --ema-decay 0.5 and its val loss that run's val/loss; each average is scored at the end, and a run cut and
    resumed keeps them exactly."""
    kw = dict(data=str(dataset), sample_every=0, epochs=2, n_eval=8, guide_at=0.0, autoguidance=1.0)
    both = common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", **kw, ema_decay=0.9, ema_extra="0.5,0.99",
                                                                 out=str(tmp_path / "both")))
    alone = state_of(common.train(diffusion.DiffusionStrategy, tiny_config("diffusion", **kw, ema_decay=0.5,
                                                                           out=str(tmp_path / "alone"))))
    done = state_of(both)
    assert set(done["extra"]) == {"ema0.5", "ema0.99"} and done["step"] == alone["step"]
    assert all(torch.equal(done["model"][n], alone["model"][n]) for n in done["model"])  # training as it was
    assert all(torch.allclose(done["extra"]["ema0.5"][n], alone["ema"][f"module.{n}"], atol=1e-6) for n in done["model"])
    assert [h["val/ema0.5_loss"] for h in done["history"]] == pytest.approx([h["val/loss"] for h in alone["history"]])
    metrics = json.loads((both / "metrics.json").read_text())
    assert {"ema0.5/precision", "ema0.99/recall", "ema0.99/palette_distance"} <= set(metrics)
    out = tmp_path / "cut"
    with pytest.raises(common.Interrupted):
        common.train(type("Cut", (CutDiffusion,), {"cut_at": 7}), tiny_config("diffusion", **kw, ema_decay=0.9,
                                                                            ema_extra="0.5,0.99", out=str(out)))
    again = state_of(common.train(diffusion.DiffusionStrategy, tiny_config(
        "diffusion", **kw, ema_decay=0.9, ema_extra="0.5,0.99", out=str(out), resume=str(last_pt(out)))))
    assert all(torch.equal(again["extra"][e][n], done["extra"][e][n]) for e in done["extra"] for n in done["model"])


def test_diffusion_checkpoint_without_classes_or_a_guide_loads_samples_at_w_one_and_refuses_class_and_w_in_one_line(
        tiny_run, tmp_path, monkeypatch, capsys):
    """A checkpoint from before --condition and autoguidance; a damaged guide snapshot is refused when read."""
    ckpt = last_pt(tiny_run)
    state = common.load_checkpoint(ckpt)
    assert not any(k.startswith("class_emb") for k in state["model"])  # unconditional: the weights of old
    assert "guide" in state["extra"]  # every default run keeps one (--guide-at 0.25)
    guide = state["extra"]["guide"]
    for name, bad, message in [("partial", dict(list(guide.items())[1:]), "does not hold snapshots of the weights"),
                               ("reshaped", {k: v.reshape(-1) for k, v in guide.items()}, "weights of other shapes")]:
        common.save_checkpoint(tmp_path / f"{name}.pt", {**state, "extra": {"guide": bad}})
        with pytest.raises(common.UserError, match=message):
            common.load_checkpoint(tmp_path / f"{name}.pt")
    gone = ("condition", "clusters", "p_uncond", "guidance", "guide_at", "autoguidance", "guide_interval")
    old = {**{k: v for k, v in state.items() if k != "extra"}, "config": {
        k: v for k, v in state["config"].items() if k not in gone}}
    common.save_checkpoint(tmp_path / "old.pt", old)
    cpu = torch.device("cpu")
    was, new = (common.load_for_sampling(p, cpu, diffusion.DiffusionStrategy, diffusion.Config)
                for p in (tmp_path / "old.pt", ckpt))
    assert was.config.condition == "none" and was.strategy.labeller is None
    assert was.config.autoguidance == 1 and was.config.guide_at == 0 and was.strategy.guide is None
    new.config.autoguidance = 1.0  # the new run's main model, unguided, is what the old checkpoint holds
    assert torch.equal(common.draw_samples(was.strategy, was.model, 8, 0, cpu),
                       common.draw_samples(new.strategy, new.model, 8, 0, cpu))
    for flags, message in ((["--class", "red"], "trained without classes"),
                           (["--autoguidance", "2"], "--autoguidance needs a guide; this run keeps none")):
        code, out, err = run_script_main("diffusion.py", ["sample", "--checkpoint", str(tmp_path / "old.pt"), *flags,
                                                          "--out", str(tmp_path / "x.png")], monkeypatch, capsys)
        assert_one_clean_line(code, out, err, message)
        assert not (tmp_path / "x.png").exists()
    r = run_script("diffusion.py", "sample", "--checkpoint", ckpt, "--autoguidance", 2, "--n", 4, "--out", tmp_path / "g.png")
    assert r.returncode == 0 and (tmp_path / "g.png").exists(), r.stderr


# =============================================================================
# compare.py: the registry, bench, plot, the comparison, guidance, report
# =============================================================================


def test_compare_bench_prints_and_tabulates_its_figures_for_the_models_named(capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY["diffusion"].items() if k != "lr"]  # no optimizer flags
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:  # bench sets deterministic algorithms, as training does; this process goes on testing
        compare.main(["bench", "--models", "diffusion", "--repeats", "1", "--n", "2", *flags])
        printed = capsys.readouterr().out
        figures = compare.bench_command(TinyStrategy, TinyConfig, ["--repeats", "1", "--n", "2", "--batch-size", "8"])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for words in ("parameters:", "FLOPs", "matmul peak fp32:", "matmul peak bf16:", "fp32: training",
                  "fp32: sampling 2 sprites", "bf16 autocast (--amp): training", "of fp32 matmul peak",
                  "bf16 autocast vs fp32", "fp32 training step, where the time goes",
                  "fp32 sampling 2 sprites, where the time goes", "= 5 model calls",  # DDIM, --steps 5: one U-Net call a step
                  "=== diffusion ===", "\n| diffusion | "):
        assert words in printed, (words, printed)
    assert "=== vae ===" not in printed and "| vae |" not in printed
    printed = capsys.readouterr().out
    assert figures["params"] == sum(p.numel() for p in TinyStrategy(TinyConfig(), torch.rand(8, 3)).build_model(
        TinyConfig()).parameters())
    for p in ("fp32", "bf16"):
        assert figures[p]["train_sprites_per_s"] > 0 and figures[p]["sample_s"] > 0
    assert f"fp32: training {figures['fp32']['train_sprites_per_s']:.1f} sprites/s" in printed
    md = compare.bench_table({"tiny": figures, "again": figures})
    lines = md.splitlines()
    assert lines[0].startswith("| model | params | fp32 train sprites/s") and len(lines[0].split("|")) == 9
    assert lines[2].startswith(f"| tiny | {figures['params'] / 1e6:.2f}M | {figures['fp32']['train_sprites_per_s']:.1f} (")
    assert lines[3].startswith("| again |") and "sampling: 2 sprites" in md


def test_compare_amp_samples_in_fp32_on_a_cpu_without_bf16(monkeypatch, capsys):
    monkeypatch.setattr(common, "native_bf16", lambda device: (False, "mocked CPU flags"))
    seen = {}
    monkeypatch.setattr(compare, "compare", lambda configs, *args, **kw: seen.update(amp=args[6]))
    compare.main(["--amp", "--quick", "--no-mlflow", "--device", "cpu"])
    assert seen == {"amp": False} and "mocked CPU flags, so bf16 would be emulated" in capsys.readouterr().out


def test_compare_plot_draws_time_to_quality_curves_and_the_schedules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    points = [{"minutes": m, "epoch": m, "step": 10 * m, "sample/palette_distance": 9 - m} for m in (1, 2, 3)]
    (run / "time_to_quality.json").write_text(json.dumps(points))
    out = tmp_path / "curve.png"
    compare.plot_command([f"tiny={run}", "--metric", "palette_distance", "--x", "step", "--out", str(out)])
    compare.plot_command(["--schedules", "--out", str(tmp_path / "schedules.png")])
    assert Image.open(out).size == (640, 400) and (tmp_path / "schedules.png").exists()
    with pytest.raises(common.UserError, match="--eval-every-minutes"):
        compare.plot_command([str(tmp_path / "none"), "--out", str(out)])
    with pytest.raises(common.UserError, match="has no sample/recall"):
        compare.plot_command([str(run), "--metric", "recall", "--out", str(out)])


def test_compare_writes_figure_and_table_and_reloads_the_same_samples(dataset, tmp_path):
    configs = {name: tiny_config(name, dataset, epochs=1, out=str(tmp_path / "runs" / name), n_eval=8, sample_every=0,
                                 eval_every_minutes=1e-9, **({"prior_epochs": 1} if name == "vqvae" else {}))
               for name in compare.MODELS}  # eval_every_minutes 1e-9: a curve point after every step
    kw = dict(n_show=4, n_eval=8, device="cpu", use_mlflow=False)
    fig, md = compare.compare(configs, str(dataset), tmp_path / "runs", **kw)
    for row in ("| VAE |", "| VQ-VAE (prior) |", "| diffusion |", "| VQ-VAE (random codes) |",
                "| real (validation, n="):
        assert row in md, row
    assert (tmp_path / "runs" / "comparison.md").read_text() == md
    for chart in ("time_to_quality.png", "compute_to_quality.png"):
        assert Image.open(tmp_path / "runs" / chart).size == (900, 640)
    block = md[md.index("#### At equal training budgets"):]
    ends = {family: json.loads((tmp_path / "runs" / name / "time_to_quality.json").read_text())[-1]
            for name, family in compare.FAMILIES.items()}
    for family, p in ends.items():
        assert p.get("final") and f"| end | {family} | {p['minutes']:.1f} (end) | {p['tflop']:.3g} |" in block
    best = max(p["sample/precision"] for p in ends.values())
    assert f"**{best:.3f}**" in block.split("| end |", 1)[1]
    spread = md[md.index("#### Over sampling seeds 1 to 6"):md.index("#### At equal training budgets")]
    for row in ("| VAE |", "| VQ-VAE (prior) |", "| diffusion |", "| VQ-VAE (random codes) |",
                "| real (training, outside the reference, n=8) |"):
        assert row in spread, row
    fig2, md2 = compare.compare(configs, str(dataset), tmp_path / "again", checkpoints=tmp_path / "runs", **kw)
    assert Image.open(fig).tobytes() == Image.open(fig2).tobytes()
    assert md2[md2.index("#### Over"):md2.index("#### At")] == spread  # same seeds, same spread
    with pytest.raises(common.UserError, match="no vae run"):
        compare.compare(configs, str(dataset), tmp_path / "x", checkpoints=tmp_path / "empty", **kw)


def fenced_python(page: Path) -> list[str]:
    """The ```python blocks of a page, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_compare_fourth_model_from_tutorial_00(dataset, tmp_path):
    """Tutorial 00's walkthrough, as written: its toy.py and its registry (compare.py's
    own plus one line, and the import), in a scratch copy of the project; then
    compare.py --quick trains, samples and scores the fourth model with no other edit."""
    blocks = fenced_python(ROOT / "docs" / "learn" / "00-strategy-pattern.md")
    toy = next(b for b in blocks if b.startswith('"""toy.py'))
    registry = next(b for b in blocks if "REGISTRY = [" in b)
    source = (ROOT / "compare.py").read_text()
    ours = re.search(r"REGISTRY = \[\n.*?\n\]\n", source, re.S).group(0)
    theirs = re.search(r"REGISTRY = \[\n.*?\n\]\n", registry, re.S).group(0)
    added = [line for line in theirs.splitlines() if line not in ours.splitlines()]
    assert added == ["    toy.ToyStrategy,"] and len(theirs.splitlines()) == len(ours.splitlines()) + 1
    for name in ("common.py", "download.py", "vae.py", "vqvae.py", "diffusion.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "toy.py").write_text(toy)
    (tmp_path / "compare.py").write_text(source.replace(ours, theirs).replace("import vqvae\n", "import vqvae\nimport toy\n"))
    r = run_script("compare.py", "--quick", "--models", "toy", "--data", dataset, "--out", tmp_path / "cmp",
                   "--no-mlflow", "--device", "cpu", "--n-show", "4", "--n-eval", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "=== training toy ===" in r.stdout and "epoch 2/2" in r.stdout  # its --quick budget
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "SMOKE RUN" in md and "| toy autoencoder |" in md and "| VAE |" not in md
    assert (last_pt(tmp_path / "cmp" / "toy")).exists()
    assert (tmp_path / "cmp" / "time_to_quality.png").exists() and "| end | toy autoencoder |" in md  # --quick draws the curves
    help_ = run_script("compare.py", "--help", cwd=tmp_path)
    assert "--epochs-toy" in help_.stdout and "toy epochs (default: 100)" in " ".join(help_.stdout.split())


def test_compare_takes_the_newest_run_of_the_model_scripts_layout(vae_run, tmp_path, capsys):
    runs = vae_run.parent.parent  # runs/vae/20260101-000000 -> runs
    older = last_pt(runs / "vae" / "20251231-000000")
    older.parent.mkdir(parents=True)
    older.write_bytes(b"an older run")
    os.utime(older, (1, 1))
    path = compare.checkpoint_of("vae", {}, tmp_path, runs)  # loads it and checks it finished
    assert path == last_pt(vae_run)
    assert "the newest of 2 run(s)" in capsys.readouterr().out
    flat = last_pt(tmp_path / "flat" / "vae")  # what compare.py --out writes wins
    flat.parent.mkdir(parents=True)
    flat.write_bytes(b"x")
    assert compare.run_checkpoint(tmp_path / "flat", "vae") == flat
    with pytest.raises(common.UserError, match=r"no diffusion run in .*<run>/checkpoints/last.pt"):
        compare.run_checkpoint(runs, "diffusion")


def test_compare_report_rewrites_a_stale_table_and_refuses_a_missing_run(tmp_path):
    run = tmp_path / "docs" / "results" / "demo"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"val/kl": 12.5, "epochs": 3, "train_seconds": 75.0}))
    (run / "latent.json").write_text(json.dumps({"active_units": 7}))
    page = tmp_path / "docs" / "page.md"
    page.write_text("Before.\n<!-- results: runs=demo metrics=val/kl,latent/active_units,train_seconds -->\n"
                    "| stale |\n<!-- /results -->\nAfter.\n")
    (tmp_path / "README.md").write_text("no tables here\n")
    assert compare.report(tmp_path, write=False) == ["docs/page.md"] and "stale" in page.read_text()
    assert compare.report(tmp_path) == ["docs/page.md"]
    text = page.read_text()
    assert "| [demo](results/demo/) | 12.5 | 7 | 0:01:15 |" in text and "stale" not in text
    assert text.startswith("Before.\n<!-- results:") and text.endswith("<!-- /results -->\nAfter.\n")
    assert compare.report(tmp_path) == []  # idempotent
    page.write_text("<!-- results: runs=demo metrics=val/kl,epochs rows=metrics -->\n<!-- /results -->\n")
    compare.report(tmp_path)
    assert "| | [demo](results/demo/) |\n|---|---|\n| `val/kl` | 12.5 |\n| `epochs` | 3 |\n" in page.read_text()
    page.write_text("<!-- results: runs=gone metrics=val/kl -->\n<!-- /results -->\n")
    with pytest.raises(common.UserError, match="run 'gone'"):
        compare.report(tmp_path)
    (run / "metrics.json").write_bytes(b"\x89PNG corrupt")  # issue 26.5: one line, as every JSON read
    with pytest.raises(common.UserError, match="metrics.json is not valid JSON"):
        compare.run_results(run)


def test_compare_guidance_sweeps_a_conditional_vq_prior_and_refuses_an_unconditional_checkpoint(dataset, vae_run,
                                                                                                  tmp_path):
    """`python compare.py guidance` is one sweep for every model with --condition: here the VQ-VAE's prior."""
    run = common.train(vqvae.VQVAEStrategy, tiny_config("vqvae", dataset, tmp_path / "vq", condition="colour",
                                                        epochs=1, prior_epochs=1))
    compare.guidance_command(["--checkpoint", str(last_pt(run)), "--w", "0,3", "--n", "14",
                              "--grid-class", "red", "--out", str(tmp_path / "sweep")])
    m = json.loads((tmp_path / "sweep" / "w3" / "metrics.json").read_text())
    assert 0 <= m["sample/class_accuracy"] <= 1 and m["guidance"] == 3 and m["n"] == 14
    assert "compare.py guidance" in (tmp_path / "sweep" / "w3" / "command.txt").read_text()
    assert "checkpoint: vqvae, --condition colour" in (tmp_path / "sweep" / "w0" / "command.txt").read_text()
    with pytest.raises(common.UserError, match="trained without classes"):
        compare.guidance_command(["--checkpoint", str(last_pt(vae_run)), "--out", str(tmp_path / "x")])


def test_compare_conditional_trains_scores_and_tabulates_class_accuracy(dataset, sprites, tmp_path):
    configs = {"diffusion": tiny_config("diffusion", epochs=1, data=str(dataset), sample_every=0, n_eval=8)}
    ckpts = compare.conditional_checkpoints(configs, tmp_path, None, "colour")
    assert list(ckpts) == ["diffusion"] and ckpts["diffusion"] == last_pt(tmp_path / "diffusion-colour")
    assert compare.conditional_checkpoints(configs, tmp_path / "x", tmp_path, "colour") == ckpts  # --checkpoints: loaded
    with pytest.raises(common.UserError, match="no .*diffusion-cluster"):
        compare.conditional_checkpoints(configs, tmp_path / "x", tmp_path, "cluster")
    r = compare.evaluate("diffusion", {"guidance": 3.0}, ckpts["diffusion"], sprites, 4, 8, 0, torch.device("cpu"), False)
    assert 0 <= r["class_accuracy"] <= 1 and r.pop("show").shape == (4, 3, 16, 16)
    # the spread's first draw is the row itself (seed 1); the others are the next seeds, not copies of it
    assert len(r["spread"]) == compare.SPREAD_SEEDS and all(r["spread"][0][m] == r[m] for m in compare.METRICS)
    assert any(d != r["spread"][0] for d in r["spread"][1:])
    real = common.sprite_metrics(sprites.val, sprites.train, sprites.palette)
    md = compare.table([("diffusion | colour, w=3", r), ("real", real)])
    assert "| class_accuracy |" in md and md.rstrip().endswith("| - |")  # the real row has no class accuracy


def test_real_draws_come_from_outside_the_reference_sprite_metrics_scores_against(sprites, monkeypatch):
    samples = sprites.val[:8]
    m, n = sprites.train.shape[0], samples.shape[0]
    inside = common.reference_index(m, n)
    # sprite_metrics scores precision and recall against exactly these n training sprites
    full, sub = (common.sprite_metrics(samples, ref, sprites.palette) for ref in (sprites.train, sprites.train[inside]))
    assert (full["precision"], full["recall"]) == (sub["precision"], sub["recall"])
    assert common.reference_index(n, n).tolist() == list(range(n))  # no more sprites than samples: all of them
    draws = compare.real_draws(sprites, n, 3, seed=0)
    assert len(draws) == 3 and all(d["near_copy_rate"] == 1.0 and d["one_colour_rate"] == 1.0 for d in draws)
    assert draws == compare.real_draws(sprites, n, 3, seed=0) and draws != compare.real_draws(sprites, n, 3, seed=5)
    picked = []
    real_metrics = common.sprite_metrics  # which sprites were drawn: none of them is in the reference
    monkeypatch.setattr(common, "sprite_metrics", lambda x, *a: picked.append(x) or real_metrics(x, *a))
    compare.real_draws(sprites, n, 3, seed=0)
    monkeypatch.undo()
    ref = sprites.train[inside].flatten(1)
    for x in picked:
        hits = (x.flatten(1)[:, None] == sprites.train.flatten(1)[None]).all(-1)  # (n, m): which training sprite
        assert hits.any(1).all() and not hits[:, inside].any(), "a real draw took a sprite of the reference"
    assert compare.real_draws(sprites, m // 2 + 1, 2, seed=0) is None  # fewer than 2n training sprites: no row


# =============================================================================
# download.py: slicing, filtering, the split, zips, refusals, atomic writes
# =============================================================================


REAL_SHEET_SHA256 = "801243b8b35bcfde727bd52447bcae5c2abf36b0ae2f3ac7ee54f91791575e74"
# A 4 x 3 synthetic sheet: tile i draws its first COUNTS[i] pixels (reading order)
# in one colour. 38/256 and 129/256 lie just outside the 0.15..0.50 bounds,
# 39/256 and 128/256 (= 0.50 exactly) just inside.
COUNTS = [0, 38, 39, 128, 129, 64, 0, 256, 1, 100, 50, 200]
KEPT = [2, 3, 5, 9, 10]                                  # default density filter
NON_EMPTY = [i for i, c in enumerate(COUNTS) if c > 0]   # --all
COLOURS = [(230, 72, 46), (56, 217, 115), (60, 172, 215), (244, 180, 27)]


def make_sheet_rgba():
    sheet = np.zeros((3 * 16, 4 * 16, 4), np.uint8)
    for i, count in enumerate(COUNTS):
        tile = np.zeros((256, 4), np.uint8)
        tile[:, :3] = (255, 0, 255)             # colour under transparent pixels: must vanish
        tile[:count] = (*COLOURS[i % 4], 255)
        if i == 6:
            tile[:, 3] = 127                    # faint pixels count as background
        row, col = divmod(i, 4)
        sheet[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = tile.reshape(16, 16, 4)
    return sheet


@pytest.fixture
def sheet_png():
    return png_bytes(make_sheet_rgba())


@pytest.fixture
def pack_zip(sheet_png):
    decoy = png_bytes(np.full((32, 32, 4), 255, np.uint8))
    return make_zip({"Some Folder/License.txt": b"CC0",
                     "Some Folder/Tilesheet/colored_packed.png": decoy,
                     "Some Folder/Tilesheet/colored-transparent_packed.png": sheet_png})


@pytest.fixture
def sheet_file(tmp_path, sheet_png):
    path = tmp_path / "colored-transparent_packed.png"
    path.write_bytes(sheet_png)
    return path


def quiet(*args):
    pass


def test_download_slices_tiles_in_row_major_order_filters_density_inclusively_splits_by_tile_and_composites_on_black():
    rgba = make_sheet_rgba()
    tiles, index = download.slice_tiles(rgba)
    assert tiles.shape == (12, 16, 16, 4) and tiles.dtype == np.uint8
    assert index.tolist() == list(range(12))
    assert np.array_equal(tiles[6], rgba[16:32, 32:48])      # row 1, column 2
    assert (download.foreground(tiles).sum(axis=(1, 2)) == [0 if i == 6 else c for i, c in enumerate(COUNTS)]).all()
    arrays, non_empty = download.build_dataset(rgba)
    assert non_empty == len(NON_EMPTY) == 10   # tile 6, at alpha 127 throughout, is empty
    assert arrays["tile_index"].tolist() == KEPT
    assert arrays["density"].tolist() == pytest.approx([39 / 256, 0.5, 0.25, 100 / 256, 50 / 256])
    everything, _ = download.build_dataset(make_sheet_rgba(), keep_all=True)
    assert everything["tile_index"].tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert download.is_validation(np.arange(25)).tolist() == [i % 10 == 0 for i in range(25)]
    split = dict(zip(everything["tile_index"].tolist(), everything["is_val"].tolist()))
    assert all(split[i] == v for i, v in zip(arrays["tile_index"].tolist(), arrays["is_val"].tolist()))
    images = arrays["images"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    first = images[0].reshape(256, 3)                      # tile 2: 39 pixels
    assert (first[:39] == COLOURS[2]).all() and (first[39:] == 0).all()
    mono, _ = download.build_dataset(make_sheet_rgba(), variant="mono")
    assert {tuple(c) for c in mono["images"].reshape(-1, 3)} == {(0, 0, 0), (255, 255, 255)}
    assert (mono["images"].any(axis=3) == images.any(axis=3)).all()


def test_download_sheet_found_in_zip_by_file_name(tmp_path, pack_zip, sheet_png):
    source = tmp_path / "kenney_1-bit-pack.zip"
    source.write_bytes(pack_zip)
    lines = []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sprites-colored.npz.x1.tmp").write_bytes(b"a killed write")  # swept (the listing below)
    path = download.prepare(source, out=tmp_path / "out", log=lines.append)
    assert path == tmp_path / "out" / "sprites-colored.npz"
    # the rule: the first member of the sheet's name that is a sheet, so a decoy before the real one is passed over
    assert download.sheet_from_zip(make_zip({f"a/{download.SHEET_NAME}": b"decoy", download.SHEET_NAME: sheet_png})) \
        == sheet_png
    assert any(hashlib.sha256(pack_zip).hexdigest() in line for line in lines)
    with np.load(path) as data:
        assert set(data.files) == {"images", "tile_index", "is_val", "density", "source_sha256", "variant", "version"}
        assert str(data["source_sha256"]) == hashlib.sha256(sheet_png).hexdigest()
        assert str(data["variant"]) == "colored" and int(data["version"]) == 1
        assert data["tile_index"].dtype == np.int32 and data["is_val"].dtype == bool
        assert data["density"].dtype == np.float32
        assert data["tile_index"].tolist() == KEPT
    assert sorted(p.name for p in path.parent.iterdir()) == ["sprites-colored.npz", "sprites-colored.png"]
    with Image.open(path.with_suffix(".png")) as preview:
        assert preview.size == ((5 * 17 + 1) * 2, (17 + 1) * 2)


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    (make_zip({"Tilesheet/monochrome-transparent_packed.png": b"x"}),
     "does not contain colored-transparent_packed.png; is it the 1-Bit Pack?"),
    (b"PK\x03\x04 this zip was cut short", "not a readable zip"),
    (b"hello, I am text", "is not an image"),
    (png_bytes(np.zeros((20, 32, 4), np.uint8)), "is 32x20 pixels, not a grid of 16x16 tiles"),
    (png_bytes(np.full((32, 32, 4), 255, np.uint8)), "has no transparent pixels"),
], ids=["missing", "no-sheet", "cut-zip", "text", "not-16x16", "opaque"])
def test_download_bad_sources_raise_data_error(tmp_path, content, words):
    source = tmp_path / "input.bin"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(download.DataError, match=words):
        download.prepare(source, out=tmp_path / "out", log=quiet)
    assert not (tmp_path / "out" / "sprites-colored.npz").exists()


@pytest.mark.parametrize("is_offline, words", [
    (False, ["sha256", download.PACK_PAGE]),
    (True, ["no route to kenney.nl", "https://kenney.nl/assets/1-bit-pack", "--from", f"{download.SHEET_NAME}, works too",
            ". .venv/bin/activate", "python vae.py --epochs 200"]),
], ids=["wrong-checksum", "offline"])
def test_download_refuses_a_wrong_checksum_and_explains_the_offline_fallback(tmp_path, monkeypatch, pack_zip,
                                                                            is_offline, words):
    """Either way the one-line message says where to get the pack by hand and how to pass it;
    offline, also (issue 16) that the PNG sheet works too and what to run next. Nothing is written."""
    def fetch(url, timeout=30):
        if is_offline:
            raise urllib.error.URLError("no route to kenney.nl")
        return pack_zip
    monkeypatch.setattr(download, "fetch_url", fetch)
    with pytest.raises(download.DataError) as error:
        download.prepare(out=tmp_path, log=quiet)
    message = str(error.value)
    assert "\n" not in message and "python download.py --from PATH/TO/kenney_1-bit-pack.zip" in message
    assert all(w in message for w in words), message
    assert list(tmp_path.iterdir()) == []


def test_download_with_matching_checksum_builds_once_and_a_second_run_is_up_to_date_and_rewrites_nothing(
        tmp_path, monkeypatch, pack_zip, sheet_file):
    calls = []
    monkeypatch.setattr(download, "PACK_SHA256", hashlib.sha256(pack_zip).hexdigest())
    monkeypatch.setattr(download, "fetch_url", lambda url, timeout=30: calls.append(url) or pack_zip)
    path = download.prepare(out=tmp_path, keep_all=True, variant="mono", log=quiet)
    assert path.name == "sprites-mono-all.npz" and calls == [download.PACK_URL]
    lines = []
    assert download.prepare(out=tmp_path, keep_all=True, variant="mono", log=lines.append) == path
    assert calls == [download.PACK_URL] and "already exists" in lines[0]
    path = download.prepare(sheet_file, out=tmp_path / "sheet", log=quiet)
    stamp = path.stat().st_mtime_ns
    lines = []
    download.prepare(sheet_file, out=tmp_path / "sheet", log=lines.append)
    assert len(lines) == 1 and "up to date" in lines[0]
    assert path.stat().st_mtime_ns == stamp
    other = make_sheet_rgba()  # a different sheet under the same name is not "up to date"
    other[:16, :16, 3] = 255                       # tile 0 becomes full
    sheet_file.write_bytes(png_bytes(other))
    lines = []
    download.prepare(sheet_file, out=tmp_path / "sheet", log=lines.append)
    assert not any("up to date" in line for line in lines)


def test_download_failed_write_leaves_no_partial_files(tmp_path, monkeypatch, sheet_file):
    out = tmp_path / "out"
    good = download.prepare(sheet_file, out=out, log=quiet)
    before = good.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 half a dataset")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(download.np, "savez_compressed", broken_savez)
    with pytest.raises(download.DataError, match="No space left"):
        download.prepare(sheet_file, out=out, force=True, log=quiet)
    with pytest.raises(download.DataError):
        download.prepare(sheet_file, out=tmp_path / "fresh", log=quiet)
    assert good.read_bytes() == before
    assert list(out.glob("*.tmp")) == [] and list((tmp_path / "fresh").glob("*.tmp")) == []
    assert list((tmp_path / "fresh").glob("*.npz")) == []


def test_download_cli_prints_summary_and_fails_cleanly(tmp_path, sheet_file):
    done = run_script("download.py", "--from", sheet_file, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4x3 = 12 tiles, 10 non-empty" in done.stdout
    assert "kept: 5 colored sprites" in done.stdout and "palette (4 colours)" in done.stdout
    assert "split: 4 train, 1 validation" in done.stdout
    (tmp_path / "notes.txt").write_text("not a sheet")
    failed = run_script("download.py", "--from", tmp_path / "notes.txt", "--out", tmp_path)
    assert_one_clean_line(failed.returncode, failed.stdout, failed.stderr, "is not an image")


@needs_real_sheet
def test_download_real_sheet():
    png = REAL_SHEET.read_bytes()
    assert hashlib.sha256(png).hexdigest() == REAL_SHEET_SHA256
    rgba = download.load_sheet(png)
    assert rgba.shape == (352, 784, 4) and set(np.unique(rgba[..., 3])) == {0, 255}
    assert len(download.slice_tiles(rgba)[0]) == 1078
    focused, non_empty = download.build_dataset(rgba)
    assert non_empty == 1077 and len(focused["images"]) == 873
    assert int(focused["is_val"].sum()) == 81
    everything, _ = download.build_dataset(rgba, keep_all=True)
    assert len(everything["images"]) == 1077 and int(everything["is_val"].sum()) == 107
    colours = {tuple(c) for c in np.unique(focused["images"].reshape(-1, 3), axis=0).tolist()}
    assert colours == {(0, 0, 0), *SHEET_COLOURS}


def test_download_zip_member_is_read_in_bounded_chunks(monkeypatch):
    """The header is checked first, but not trusted: the member is read in
    chunks and refused as soon as it passes the bound."""
    data = make_zip({download.SHEET_NAME: b"\1" * 5000})
    monkeypatch.setattr(download, "MAX_MEMBER_BYTES", 10_000)
    assert len(download.sheet_from_zip(data)) == 5000
    monkeypatch.setattr(download, "MAX_MEMBER_BYTES", 4096)
    with pytest.raises(download.DataError, match="inflates to more than"):
        download.sheet_from_zip(data)

    class Archive:  # a header that under-states the size (Python's zipfile would stop at the header's size)
        def open(self, info):
            return io.BytesIO(b"\1" * 5000)
    info = zipfile.ZipInfo(download.SHEET_NAME)
    info.file_size = 100
    with pytest.raises(download.DataError, match="inflates to more than"):
        download.read_member(Archive(), info, "test")


# =============================================================================
# Docs: README.md and docs/ (commands, links, file:line links, word budgets, derivations, generated tables)
# =============================================================================


PLACEHOLDER = re.compile(r"<[\w .-]+>")  # <run>, <file>: a value the reader fills in, as the text says


class _ParserBuilt(BaseException):
    """Raised instead of parsing; carries the parser a script built. A BaseException,
    so that no script's `except` clause swallows it."""

    def __init__(self, parser):
        self.parser = parser


_DOC_PARSERS: dict = {}


def parser_of(script: str, sub: str | None, pre: tuple = ()):
    """The ArgumentParser that `python <script> [sub] [pre]` builds (None if it builds none);
    `pre`: words that choose the parser, e.g. compare.py bench's `--models diffusion`."""
    if (script, sub, pre) not in _DOC_PARSERS:
        def built(self, args=None, namespace=None):
            raise _ParserBuilt(self)
        _DOC_PARSERS[script, sub, pre] = None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(argparse.ArgumentParser, "parse_args", built)
            try:
                script_entry(script)(([sub] if sub else []) + list(pre))
            except _ParserBuilt as got:
                _DOC_PARSERS[script, sub, pre] = got.parser
            except BaseException:  # the script ran without building a parser for these words
                pass
    return _DOC_PARSERS[script, sub, pre]


def doc_command_problems(page: Path) -> list[str]:
    """Static checks of one page's commands: the script and every flag exist, the
    parser accepts the line, and every file a command reads is written by an earlier
    command on the same page (its --out), is the default dataset, or is a <placeholder>."""
    problems, produced = [], {str(Path(common.TrainConfig.data))}
    for no, argv in doc_commands(page):
        where = f"{page.name}:{no}: `python {' '.join(argv)}`"
        script, rest = argv[0], argv[1:]
        if not (ROOT / script).exists():
            problems.append(f"{where}: there is no {script}")
            continue
        sub = rest[0] if rest[:1] and rest[0] in SUBCOMMANDS else None
        args = rest[1:] if sub else rest
        # compare.py bench parses each model's flags with that model's parser: the first one named
        pre = tuple(args[args.index("--models"):args.index("--models") + 2]) if (script, sub) == (
            "compare.py", "bench") and "--models" in args else ()
        parser = parser_of(script, sub, pre)
        if parser is None:
            problems.append(f"{where}: `{script} {sub}` is not a mode of {script}")
            continue
        for token in args:
            flag = token.split("=")[0]
            if token.startswith("-") and flag not in parser._option_string_actions:
                problems.append(f"{where}: {flag} is not a flag of `python {script}{' ' + sub if sub else ''}`")
            if token.startswith("../") or token in ("...", "DIR", "PATH"):
                problems.append(f"{where}: {token!r} is not a path on a fresh clone; "
                                f"name a file the page writes, or a placeholder like <run>")
        if "-h" in args or "--help" in args:
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = vars(parser.parse_args(args))
        except SystemExit:
            if not any(PLACEHOLDER.search(t) for t in args):
                problems.append(f"{where}: refused: {err.getvalue().strip().splitlines()[-1]}")
            continue

        def reads(path, what):
            unclear = {"...", "DIR", "PATH"} & set(Path(path).parts) if path else True  # reported above
            if not unclear and not PLACEHOLDER.search(str(path)) and str(Path(path)) not in produced:
                problems.append(f"{where}: reads {what} {path}, which no earlier command on this page "
                                f"writes; give the training line an --out, or write a placeholder like <run>")
        reads(ns.get("checkpoint"), "the checkpoint")
        reads(ns.get("resume"), "the checkpoint")
        reads(ns.get("data"), "the dataset")
        models = ns.get("models") or list(compare.MODELS)
        if ns.get("checkpoints"):
            for m in models:
                reads(Path(ns["checkpoints"]) / m / "checkpoints" / "last.pt", "the checkpoint")
        if script == "download.py":
            produced.add(str(download.default_path(ns["variant"], ns["keep_all"], ns["out"])))
        elif sub is None and ns.get("out") and not ns.get("checkpoints") and not ns.get("resume"):
            outs = [Path(ns["out"]) / m for m in models] if script == "compare.py" else [Path(ns["out"])]
            produced.update(str(o / "checkpoints" / "last.pt") for o in outs)
    return problems


def test_docs_commands_name_real_flags_and_files_an_earlier_command_writes_and_the_check_catches_a_bad_page(tmp_path):
    commands = {page.name: doc_commands(page) for page in DOC_PAGES}
    assert sum(map(len, commands.values())) > 20, commands  # the extraction finds the pages' commands
    problems = [p for page in DOC_PAGES for p in doc_command_problems(page)]
    assert not problems, "\n".join(problems)
    page = tmp_path / "page.md"
    page.write_text("```bash\npython vae.py --epochs 200\n"
                    "python vae.py sample --checkpoint runs/vae-ce/checkpoints/last.pt --n 8\n"
                    "python vae.py --epochs 2 --no-such-flag 1\n```\n"
                    "Then `python vae.py sample --checkpoint runs/vae/<run>/checkpoints/last.pt`.\n")
    problems = doc_command_problems(page)
    assert len(problems) == 3, problems  # the placeholder <run> is not one of them
    assert "reads the checkpoint runs/vae-ce/checkpoints/last.pt" in problems[0]
    assert "--no-such-flag is not a flag" in problems[1] and "unrecognized arguments" in problems[2]
    page.write_text("```bash\npython vae.py --epochs 200 --out runs/vae-ce\n"
                    "python vae.py sample --checkpoint runs/vae-ce/checkpoints/last.pt --n 8\n```\n")
    assert doc_command_problems(page) == []


@needs_real_sheet
def test_docs_download_commands_run_on_the_shared_sheet(tmp_path):
    ran = 0
    for page in DOC_PAGES:
        for _, argv in doc_commands(page):
            if argv[0] != "download.py" or "--from" not in argv:
                continue  # without --from it downloads: tests stay offline
            args = list(argv[1:])
            args[args.index("--from") + 1] = str(REAL_SHEET)  # <file>: the sheet or the pack zip
            r = run_script("download.py", *args, "--out", str(tmp_path / f"run{ran}"))
            assert r.returncode == 0 and "kept:" in r.stdout, (page.name, argv, r.stderr)
            ran += 1
    assert ran >= 2


WORD_BUDGETS = {"04-diffusion.md": 5000}  # every other tutorial: 4,000 words, about 20 minutes of reading


def test_docs_relative_links_and_images_resolve_and_the_tutorials_keep_their_word_budgets():
    broken = []
    for page in ALL_PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are examples
        for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img[^>]+src="([^"]+)"', text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    counts = {p.name: len(p.read_text().split()) for p in sorted((ROOT / "docs" / "learn").glob("*.md"))}  # as wc -w
    assert len(counts) >= 7, counts
    over = {name: n for name, n in counts.items() if n > WORD_BUDGETS.get(name, 4000)}
    assert not over, f"tutorials over their word budget (move experiment logs to a docs/results/*/README.md): {over}"


def test_docs_ddpm_derivation_in_tutorial_04_holds_on_the_schedule_and_its_quoted_code_is_in_diffusion_py():
    # The code stores its schedule in float32; redo the products in float64 from its beta_t
    # (the code's alpha_bar agrees with them to float32 precision), so that 1 - alpha_bar near
    # t = 1 keeps its digits.
    code = diffusion.linear_schedule(1000, torch.device("cpu"))
    beta_all = code["beta"].double()
    ab_all = torch.cumprod(1 - beta_all, 0)
    assert torch.allclose(code["alpha_bar"].double(), ab_all, rtol=1e-5)
    beta, alpha, ab, ab_prev = beta_all[1:], 1 - beta_all[1:], ab_all[1:], ab_all[:-1]  # t = 2..T
    torch.manual_seed(0)
    x0, eps = torch.randn(2, beta.shape[0], dtype=torch.float64)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Step 1
    # Step 2: the posterior from Bayes' rule (product of the two Gaussians in x_{t-1}) ...
    precision = alpha / beta + 1 / (1 - ab_prev)
    mean = (alpha.sqrt() * xt / beta + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision
    # ... equals Ho et al.'s Eqs. 6-7 as the tutorial writes them
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    mu_tilde = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * xt
    assert torch.allclose(1 / precision, beta_tilde, rtol=1e-4) and torch.allclose(mean, mu_tilde, rtol=1e-4, atol=1e-6)
    # Step 3: the epsilon form of the mean, as sample_ddpm computes it
    assert torch.allclose(alpha.rsqrt() * (xt - beta / (1 - ab).sqrt() * eps), mu_tilde, rtol=1e-4, atol=1e-6)
    # Step 6: q_sigma(x_{t-1} | x_0) keeps the marginal for any sigma_t^2 <= 1 - alpha_bar_{t-1}
    for sigma2 in (torch.zeros_like(beta), beta_tilde, 0.5 * (1 - ab_prev)):
        k = (1 - ab_prev - sigma2).sqrt() / (1 - ab).sqrt()  # coefficient of (x_t - sqrt(ab_t) x_0)
        assert torch.allclose(k ** 2 * (1 - ab) + sigma2, 1 - ab_prev, rtol=1e-4)  # variance 1 - ab_{t-1}
    # Step 7: DDIM's Eq. 16 with eta = 1 over consecutive levels is beta_tilde, and Eq. 12's mean is mu_tilde
    eta, ab_t, ab_next = 1.0, ab, ab_prev  # sample_ddim's names: level t, then the next level s = t - 1
    sigma = eta * ((1 - ab_next) / (1 - ab_t) * (1 - ab_t / ab_next)).sqrt()
    assert torch.allclose(sigma ** 2, beta_tilde, rtol=1e-3)
    ddim_mean = ab_next.sqrt() * x0 + (1 - ab_next - sigma ** 2).clamp(min=0).sqrt() * eps
    assert torch.allclose(ddim_mean, mu_tilde, rtol=1e-3, atol=1e-5)
    assert (beta > beta_tilde).all()  # sample_ddpm's sigma_t^2 = beta_t is the larger choice
    code = {line.split("  #")[0].strip() for line in (ROOT / "diffusion.py").read_text().splitlines()}
    quoted = [line.split("  #")[0].strip() for block in fenced_python(ROOT / "docs/learn/04-diffusion.md")
              for line in block.splitlines() if line.strip()]
    assert len(quoted) >= 10
    missing = [line for line in quoted if line not in code]
    assert not missing, f"tutorial 04 quotes lines diffusion.py no longer has: {missing}"


CODE_LINK = re.compile(r"\[([^\]]*)\]\(((?:\.\./)*)(\w+\.py)#L(\d+)\)")


def symbol_line(lines: list[str], symbol: str) -> int | None:
    """The 1-based line that defines symbol ('name' or 'Class.name'), else None."""
    start = 0
    if "." in symbol:
        owner, symbol = symbol.rsplit(".", 1)
        start = next((i for i, l in enumerate(lines) if re.match(rf"\s*class {owner}\b", l)), 0)
    for i in range(start, len(lines)):
        if re.match(rf"\s*(?:async )?(?:def|class) {symbol}\b", lines[i]) or re.match(rf"{symbol}\s*[:=]", lines[i]):
            return i + 1
    return None


def code_link_problems(page: Path) -> list[str]:
    """Every [text `symbol`](X.py#Lnn) link on page: line nn of X.py defines symbol (or names it)."""
    problems = []
    for text, _, script, no in CODE_LINK.findall(page.read_text()):
        names = re.findall(r"`([\w.]+)`", text)
        if not names:
            problems.append(f"{page.name}: [{text}]({script}#L{no}) names no `symbol` in its text")
            continue
        symbol, lines = names[-1], (ROOT / script).read_text().splitlines()
        bare = symbol.rsplit(".", 1)[-1]
        line = lines[int(no) - 1] if 0 < int(no) <= len(lines) else ""
        if re.search(rf"\b(?:def|class) {bare}\b", line) or (bare in line and symbol_line(lines, symbol) is None):
            continue
        right = symbol_line(lines, symbol)
        where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name
        problems.append(f"{where}: {script}#L{no} should point at `{symbol}`, "
                        f"which is {f'at #L{right}' if right else f'not defined in {script}'}")
    return problems


def test_docs_file_line_links_point_at_the_symbol_they_name_and_the_check_reports_the_right_line(tmp_path):
    links = sum(len(CODE_LINK.findall(p.read_text())) for p in ALL_PAGES)
    assert links >= 10, links  # the tutorials link the code that implements their ideas
    problems = [p for page in ALL_PAGES for p in code_link_problems(page)]
    assert not problems, "\n".join(problems)
    page = tmp_path / "page.md"
    right = symbol_line((ROOT / "diffusion.py").read_text().splitlines(), "q_sample")
    page.write_text(f"[diffusion.py `q_sample`](../../diffusion.py#L{right}) and "
                    f"[diffusion.py `q_sample`](../../diffusion.py#L{right + 3})\n")
    problems = code_link_problems(page)
    assert problems == [f"page.md: diffusion.py#L{right + 3} should point at `q_sample`, which is at #L{right}"]


def test_docs_results_tables_equal_what_compare_report_generates():
    assert any("<!-- results:" in p.read_text() for p in ALL_PAGES), "no generated results table in the docs"
    assert compare.report(ROOT, write=False) == [], "run `python compare.py report` and commit the result"
    results = ROOT / "docs" / "results"
    for metrics in sorted(results.rglob("metrics.json")):  # every run quoted has its command
        assert (metrics.parent / "command.txt").exists(), metrics.parent
    for group in sorted(results.iterdir()):  # a run's folder, or a folder of runs (docs/results/diffusion/<run>)
        assert not group.is_dir() or any(group.rglob("metrics.json")), f"{group} holds no run's metrics.json"


if __name__ == "__main__":
    common.main(TinyStrategy, TinyConfig)

"""compare.py -- the three models side by side: one figure, one honest table.

Trains (or loads) the VAE, the VQ-VAE with its prior and the diffusion model
on the same sprites with the same seed, then draws the same number of sprites
from each, scores them with the shared sprite-quality metrics
(common.sprite_metrics) and puts a row of real sprites next to them, scored
the same way, so every figure has a scale.

    python compare.py                           # train all three with their own defaults
    python compare.py --quick                   # smoke run of the whole pipeline in minutes
    python compare.py --checkpoints runs/compare   # load finished runs instead of training
    python compare.py --checkpoints runs           # the newest runs/<model>/<date-time>/ of each model
    python compare.py --epochs-diffusion 50 --amp  # override a budget; bf16 autocast
    python compare.py report                    # regenerate the results tables in the docs from docs/results/
    python compare.py guidance --checkpoint CKPT --out DIR   # guidance sweep of a conditional checkpoint
    python compare.py bench --models diffusion   # parameters, FLOPs, images/s, seconds for 16 sprites
    python compare.py plot RUN_A RUN_B --metric precision --out curve.png   # time-to-quality curves
    python compare.py plot --schedules --out schedules.png   # linear vs cosine noise schedule
    python compare.py labels --out clusters.png  # the colour and shape-cluster labels (tutorial 06)
    python compare.py --conditional colour --guidance 2   # also a colour-conditioned panel per model that has one

Outputs (in --out, default runs/compare): comparison.png, comparison.md (the
table; the same columns over sampling seeds 1 to 6, with real training sprites
scored the same way; and an equal-budget block: every family at the same training minutes),
time_to_quality.png and compute_to_quality.png (each family's sample quality
during training against wall-clock minutes and against training TFLOP, from
the points each run scores every --eval-every-minutes) and one run folder per model. With MLflow on, a parent run "compare"
holds a nested child run per model; the table and figure are logged on the
parent (the table is also the run's description, which the MLflow UI renders).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit at once (130), no traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # line charts only (comes with mlflow; see the README)
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from PIL import Image, ImageDraw, ImageFont

import common
import diffusion
import vae
import vqvae

# -----------------------------------------------------------------------------
# The registry: one line per model
# -----------------------------------------------------------------------------
# Adding a model is its file plus one line here. Everything else compare.py and
# the tests need is read from the model's module, next to its Config:
#   Config    the dataclass of its flags
#   COMPARE   optional; dict(
#               panels=[(label, Config overrides), ...]  the figure's panels: the
#                   first is the model's own; the others (e.g. vqvae.py's random
#                   codes) follow after every model's first panel (default: the name);
#               budgets={suffix: (Config field, help)}   compare.py's --epochs-<suffix>
#                   flags (default: --epochs-<name> for epochs);
#               quick={field: value}                     the --quick budget (default: {}))
#   TINY      Config values that train in seconds on 2 cores (the tests)

REGISTRY = [
    vae.VAEStrategy,
    vqvae.VQVAEStrategy,
    diffusion.DiffusionStrategy,
]


def module_of(strategy_cls) -> object:
    return sys.modules[strategy_cls.__module__]


def declared(strategy_cls) -> dict:
    """A model's COMPARE declaration, with the defaults above filled in."""
    name = strategy_cls.name
    own = getattr(module_of(strategy_cls), "COMPARE", {})
    return {"panels": own.get("panels", [(name, {})]),
            "budgets": own.get("budgets", {name: ("epochs", f"{name} epochs")}),
            "quick": own.get("quick", {})}


# name -> (Strategy, Config), in registry order
MODELS = {cls.name: (cls, module_of(cls).Config) for cls in REGISTRY}
# (name, label in the figure and table, Config overrides), every model's own panel first
PANELS = ([(name, *declared(cls)["panels"][0]) for name, (cls, _) in MODELS.items()]
          + [(name, *panel) for name, (cls, _) in MODELS.items() for panel in declared(cls)["panels"][1:]])
QUICK = {name: declared(cls)["quick"] for name, (cls, _) in MODELS.items()}
# name -> the label of its own panel: the family's name in the curves and the equal-budget table
FAMILIES = {name: declared(cls)["panels"][0][0] for name, (cls, _) in MODELS.items()}
# compare.py's flag suffix -> (model, Config field, help): --epochs-vae, --epochs-prior, ...
BUDGETS = {suffix: (name, field, text) for name, (cls, _) in MODELS.items()
           for suffix, (field, text) in declared(cls)["budgets"].items()}
METRICS = ["palette_distance", "one_colour_rate", "density_in_range", "precision", "recall", "coverage", "density",
           "near_copy_rate", "unique_rate"]
# One sampling seed is one draw: at 256 samples it moves precision and recall by several hundredths. The spread
# table scores each panel at sampling seeds seed+1 (the main table's) to seed+SPREAD_SEEDS, and as many draws of
# real training sprites, and gives mean ± sd of these columns.
SPREAD_SEEDS = 6
SPREAD_METRICS = ["precision", "recall", "coverage", "one_colour_rate", "near_copy_rate", "palette_distance"]


# -----------------------------------------------------------------------------
# Trained checkpoints of any model of the registry
# -----------------------------------------------------------------------------
# Sampling one model's checkpoint (`python X.py sample`) is common.py's
# (common.load_for_sampling, common.sample_command); what needs the registry is here.


def load_any(checkpoint: str | Path, device: torch.device, overrides: dict | None = None) -> common.Trained:
    """Rebuild a trained model of whichever registry model the checkpoint names."""
    state = common.load_checkpoint(checkpoint)
    name = state.get("strategy")
    if name not in MODELS:
        raise common.UserError(f"{checkpoint} is a {name} checkpoint, not one of {', '.join(MODELS)}")
    return common.load_for_sampling(checkpoint, device, *MODELS[name], overrides, state)


def read_json(path, what: str = "a JSON file", kind: type | None = None):
    """A JSON file as one value (of `kind`, if given); a missing, binary or malformed file is one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise common.UserError(f"{path} not found; it should be {what}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise common.UserError(f"{path} is not valid JSON ({common.printable(common.first_line(e))}); "
                               f"it should be {what}") from None
    if kind is not None and not isinstance(data, kind):
        raise common.UserError(f"{path} holds a JSON {type(data).__name__}, not a {kind.__name__}; "
                               f"it should be {what}")
    return data


# -----------------------------------------------------------------------------
# Train or load
# -----------------------------------------------------------------------------


def checkpoint_of(name: str, configs: dict, out: Path, checkpoints: Path | None) -> Path:
    """A finished run's checkpoint: loaded from --checkpoints, or trained now."""
    if checkpoints is not None:
        path = run_checkpoint(checkpoints, name)
        strategy, _, _, config, state = common.load_for_sampling(path, torch.device("cpu"), *MODELS[name])
        epoch = state["epoch"]
        if epoch < strategy.total_epochs(config):
            raise common.UserError(f"{path} stopped at epoch {epoch}: finish it with "
                                   f"`python {name}.py --resume {path}`")
        return path
    strategy_cls, _ = MODELS[name]
    print(f"\n=== training {name} ===")
    run_dir = common.train(strategy_cls, configs[name])
    return run_dir / "checkpoints" / "last.pt"


def run_checkpoint(checkpoints: Path, name: str) -> Path:
    """The checkpoint of `name` under --checkpoints DIR: DIR/<name>/checkpoints/last.pt
    (what `compare.py --out DIR` writes) or, for runs made by the model scripts
    (runs/<name>/<date-time>/), the newest DIR/<name>/*/checkpoints/last.pt."""
    path = checkpoints / name / "checkpoints" / "last.pt"
    if path.exists():
        return path
    runs = sorted((checkpoints / name).glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise common.UserError(f"no {name} run in {checkpoints} (expected {path} or "
                               f"{checkpoints / name}/<run>/checkpoints/last.pt); train it with "
                               f"`python {name}.py --out {checkpoints / name}` or `python compare.py --out {checkpoints}`")
    print(f"{name}: the newest of {len(runs)} run(s) in {checkpoints / name}: {runs[-1].parent.parent}")
    return runs[-1]


# -----------------------------------------------------------------------------
# Score
# -----------------------------------------------------------------------------


def evaluate(name: str, overrides: dict, ckpt: Path, data: common.Sprites, n_show: int, n_eval: int,
             seed: int, device: torch.device, amp: bool) -> dict:
    """Samples for the figure, sampling time and sprite-quality metrics of one panel."""
    strategy, model, palette, _, state = common.load_for_sampling(ckpt, device, *MODELS[name], overrides)
    show = common.draw_samples(strategy, model, n_show, seed, device, amp)
    common.draw_samples(strategy, model, 2, seed, device, amp)  # warm-up: one-time allocations
    t0 = time.perf_counter()
    common.draw_samples(strategy, model, 64, seed, device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sample_seconds = time.perf_counter() - t0
    samples = common.draw_samples(strategy, model, n_eval, seed + 1, device, amp)
    scores = common.sprite_metrics(samples, data.train, palette)
    # the spread table's other draws: the same checkpoint at the next sampling seeds
    spread = [scores] + [common.sprite_metrics(common.draw_samples(strategy, model, n_eval, s, device, amp),
                                               data.train, palette) for s in range(seed + 2, seed + SPREAD_SEEDS + 1)]
    extra = {}
    if getattr(strategy, "labeller", None) is not None:  # a conditional model: did it draw the classes asked for?
        # the classes draw_samples asked for: requested_classes of each chunk of 256
        y = torch.cat([strategy.requested_classes(min(256, n_eval - s), device) for s in range(0, n_eval, 256)])
        extra["class_accuracy"] = strategy.class_accuracy(samples, y)
    return dict(show=show, params=sum(p.numel() for p in model.parameters()),
                train_seconds=state.get("train_seconds", float("nan")), epochs=state["epoch"],
                scoring_seconds=state.get("scoring_seconds", 0.0),
                sample_seconds=sample_seconds, spread=spread, **scores, **extra)


def real_draws(data: common.Sprites, n: int, draws: int, seed: int) -> list[dict] | None:
    """What new sprites from the training distribution score: `draws` seeded draws of n training sprites from
    outside the n that sprite_metrics scores against (common.reference_index), scored the same way. None when
    the training set has fewer than 2n sprites (no n left outside the reference)."""
    m = data.train.shape[0]
    if m < 2 * n:
        return None
    inside = set(common.reference_index(m, n).tolist())
    outside = torch.tensor([i for i in range(m) if i not in inside])  # (m - n,) indices into data.train
    picks = [outside[torch.randperm(len(outside), generator=torch.Generator().manual_seed(seed + d))[:n]]
             for d in range(1, draws + 1)]
    return [common.sprite_metrics(data.train[p.to(data.train.device)], data.train, data.palette) for p in picks]


# -----------------------------------------------------------------------------
# Figure and table
# -----------------------------------------------------------------------------


def figure(columns: list[tuple[str, torch.Tensor]], palette: torch.Tensor, title: str, per_row: int = 4) -> Image.Image:
    """Labelled panels side by side: each a grid of palette-snapped sprites."""
    grids = [common.make_grid(x, nrow=per_row, scale=4, palette=palette) for _, x in columns]
    font = ImageFont.load_default(size=18)
    pad, head = 16, 64
    width = sum(g.width for g in grids) + pad * (len(grids) + 1)
    fig = Image.new("RGB", (width, max(g.height for g in grids) + head + pad), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 6), title, fill=(0, 0, 0), font=font)
    x = pad
    for (label, _), grid in zip(columns, grids):
        draw.text((x, head - 26), label, fill=(0, 0, 0), font=font)
        fig.paste(grid, (x, head))
        x += grid.width + pad
    return fig


def table(rows: list[tuple[str, dict]]) -> str:
    """The metrics as a markdown table (the real-data row has no model columns)."""
    metrics = METRICS + (["class_accuracy"] if any("class_accuracy" in r for _, r in rows) else [])  # --conditional
    head = ["", "params", "train time", "sample 64", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        model_cols = ["-", "-", "-"] if "params" not in r else [
            f"{r['params'] / 1e6:.2f}M", common.fmt_time(r["train_seconds"]) + f" ({r['epochs']} ep)",
            f"{r['sample_seconds']:.2f} s"]
        lines.append("| " + " | ".join([label, *model_cols, *(f"{r[m]:.3f}" if m in r else "-" for m in metrics)]) + " |")
    return "\n".join(lines)


# The equal-compute view: quality curves on two clocks, and the table at equal budgets
# -----------------------------------------------------------------------------
# The metrics drawn, with their labels and which way is better.
CURVE_METRICS = [("precision", "precision", max), ("recall", "recall", max),
                 ("one_colour_rate", "one-colour rate", max), ("near_copy_rate", "near-copy rate (lower is better)", min)]
CLOCKS = {"minutes": "training minutes (wall clock, this machine)",
          "tflop": "training compute, TFLOP (forward + backward)"}
BUDGET_MINUTES = (2, 5, 10, 15, 30)  # the equal-budget table's rows, besides each run's end


def spread_table(rows: list[tuple[str, dict]], real: list[dict] | None, n_eval: int, seed: int) -> str:
    """mean ± sd of SPREAD_METRICS over each row's draws: sampling seeds seed+1..seed+SPREAD_SEEDS, and the draws
    of real training sprites outside the reference (real_draws)."""
    def cell(draws, m):
        values = [d[m] for d in draws]
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    head = [f"mean ± sd over {SPREAD_SEEDS} draws", *SPREAD_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        lines.append("| " + " | ".join([label, *(cell(r["spread"], m) for m in SPREAD_METRICS)]) + " |")
    if real is not None:
        lines.append("| " + " | ".join([f"real (training, outside the reference, n={n_eval})",
                                        *("-" if m == "near_copy_rate" else cell(real, m) for m in SPREAD_METRICS)]) + " |")
    real_note = (f"The real row: as many seeded draws of {n_eval} training sprites from outside the {n_eval} the "
                 f"metrics score against, i.e. what new sprites from the training distribution score (near copies: "
                 f"1 by construction). " if real is not None else
                 "No real row: the training set has fewer than twice --n-eval sprites. ")
    return (f"\n\n#### Over sampling seeds {seed + 1} to {seed + SPREAD_SEEDS}\n\n" + "\n".join(lines) +
            f"\n\nEach model row: the same checkpoint, {n_eval} samples at each of the sampling seeds {seed + 1} "
            f"(the table above) to {seed + SPREAD_SEEDS}, scored the same way; mean ± sample sd. " + real_note +
            "A difference between two rows smaller than their sd is within one draw's noise.\n")


def figure_image(fig: Figure) -> Image.Image:
    """A matplotlib Figure as a PIL image, so charts are saved like every other picture
    (atomically, by common.save_png)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(buf).convert("RGB")


def quality_curve(ckpt: Path) -> list[dict]:
    """The time-to-quality points of the run that wrote `ckpt` (its folder's
    time_to_quality.json; [] if it was trained without --eval-every-minutes)."""
    path = Path(ckpt).parent.parent / "time_to_quality.json"
    if not path.exists():
        return []
    points = read_json(path, "a time_to_quality.json", list)
    return [p for p in points if isinstance(p, dict) and all(isinstance(p.get(k), (int, float)) for k in CLOCKS)]


def quality_chart(curves: dict[str, list[dict]], real: dict, x: str, title: str) -> Image.Image:
    """Small multiples (matplotlib): one panel per metric of CURVE_METRICS, one
    line per family against clock `x` ("minutes" or "tflop"), and the real
    held-out sprites' value as a dashed horizontal line."""
    fig = Figure(figsize=(9, 6.4), dpi=100)
    axes = fig.subplots(2, 2, sharex=True).flatten()
    for ax, (metric, text, _) in zip(axes, CURVE_METRICS):
        for family, points in curves.items():  # the same order in every panel: the same colours
            xs, ys = zip(*sorted((p[x], p[f"sample/{metric}"]) for p in points if p[x] > 0 or x == "minutes"))
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.5, label=family)
        ax.axhline(real[metric], color="0.35", linestyle="--", linewidth=1, label="real held-out sprites")
        ax.set_title(text, fontsize=10)
        ax.grid(True, alpha=0.3)
        if x == "tflop":  # log scale, ticks at 1, 2, 5 x 10^k written as plain numbers
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes[2:]:
        ax.set_xlabel(CLOCKS[x] + (", log scale" if x == "tflop" else ""))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}\nsample quality during training, against "
                 f"{'wall-clock minutes' if x == 'minutes' else 'training compute'}", fontsize=10)
    return figure_image(fig)


def nearest_point(points: list[dict], minutes: float) -> dict | None:
    """The scored point nearest to `minutes` of training, among those at most 10%
    past it (no family is credited with time it had not trained); None if none."""
    near = [p for p in points if p["minutes"] <= 1.1 * minutes]
    return min(near, key=lambda p: abs(p["minutes"] - minutes)) if near else None


def budget_table(curves: dict[str, list[dict]], scoring_seconds: float) -> str:
    """The equal-budget block of comparison.md: each family at the same training
    minutes (BUDGET_MINUTES) and at its end, from its nearest scored point;
    the best value of each budget in bold."""
    metrics = [m for m, _, _ in CURVE_METRICS]
    lines = ["", "#### At equal training budgets", "",
             "| budget | family | nearest point: minutes | TFLOP | epoch | " + " | ".join(metrics) + " |",
             "|" + "---|" * (5 + len(metrics))]
    for budget in [*BUDGET_MINUTES, "end"]:
        found = {family: points[-1] if budget == "end" else nearest_point(points, budget)
                 for family, points in curves.items()}
        best = {m: better([p[f"sample/{m}"] for p in found.values() if p]) for m, _, better in CURVE_METRICS}
        for family, p in found.items():
            where = "no point yet" if p is None else (f"{p['minutes']:.1f}" + (" (end)" if p.get("final") else ""))
            cells = ["-"] * (2 + len(metrics)) if p is None else [
                f"{p['tflop']:.3g}", f"{p['epoch']:.1f}",
                *(f"**{p[f'sample/{m}']:.3f}**" if p[f"sample/{m}"] == best[m] else f"{p[f'sample/{m}']:.3f}"
                  for m in metrics)]
            lines.append("| " + " | ".join([f"{budget} min" if budget != "end" else "end", family, where, *cells]) + " |")
    lines += ["", "Each family at its scored point nearest to the budget, among those at most 10% past it "
              "(points every --eval-every-minutes of training; \"(end)\" marks the run's last point, for a run "
              "that had stopped before the budget; \"no point yet\": nothing sampled by then, e.g. the VQ-VAE "
              "before its prior trains). Bold: the best of each budget (lowest near-copy rate). TFLOP: forward + "
              f"backward FLOPs of training so far. Scoring these points took {common.fmt_time(scoring_seconds)} off the "
              f"training clocks, on top of the train times above.", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Bench: how fast is each model on this machine, as a fraction of its peak?
# -----------------------------------------------------------------------------
# Here only, not a mode of each model file: it needs the FLOP counter and the
# profiler, which training never does, so common.py (what training needs) keeps none of it.


def best_time(fn: Callable, repeats: int, device: torch.device) -> tuple[float, float]:
    """Best wall time of `repeats` calls after one warm-up call. The best, not
    the mean: on a shared machine the fastest run is the least disturbed one.
    Also returns the CPU share of that run: this process's CPU time over wall
    time x threads (near 1: the CPUs were ours; 0.3: other work had 70%)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(times)
    return wall, cpu / wall / torch.get_num_threads()


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int,
                run_seconds: float) -> tuple[float, float]:
    """GFLOP/s of n x n products in `dtype` (best of `repeats` timed runs of
    about `run_seconds` each) and the CPU share of that run (see best_time).
    The matrices come from a generator of their own, so measuring never moves
    the random stream a seeded run draws from."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    once, _ = best_time(lambda: a @ b, 1, device)
    k = max(1, math.ceil(run_seconds / once))  # products per timed run
    wall, share = best_time(lambda: [a @ b for _ in range(k)], repeats, device)
    return 2 * n ** 3 * k / wall / 1e9, share


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int,
                budget_s: float = 2.0) -> tuple[float, int, float]:
    """This machine's matrix-multiply throughput in GFLOP/s for `dtype`: the
    best of `repeats` square products, at growing sizes until the next product
    would take longer than `budget_s`. Returns (GFLOP/s, the size that gave
    it, the CPU share of that run; see best_time)."""
    best, best_n, best_share = 0.0, 0, 0.0
    for n in (256, 512, 1024, 2048):
        gflops, share = matmul_rate(n, dtype, device, repeats, run_seconds=0.1)  # >= 0.1 s: reliable CPU time
        if gflops > best:
            best, best_n, best_share = gflops, n, share
        if 8 * 2 * n ** 3 / gflops / 1e9 > budget_s:  # the next size costs 8x as much
            break
    return best, best_n, best_share


def time_by_op(fn: Callable, top: int = 5) -> str:
    """One profiled call of fn: the `top` operators by self time, as shares of
    the total, e.g. "convolution 72%, native_group_norm 16%, ..."."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    stderr_fd, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:  # the profiler's C++ side prints start/stop lines straight to file descriptor 2
        sys.stderr.flush()
        os.dup2(devnull, 2)
        with profile(activities=activities) as prof:
            fn()
    finally:
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        os.close(devnull)
    averages = prof.key_averages()
    on_device = any(e.self_device_time_total > 0 for e in averages)
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    # Operators only: leave out annotated ranges such as "Optimizer.step#AdamW.step".
    events = [e for e in averages if getattr(e, key) > 0 and (on_device or e.key.startswith("aten::"))]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return ", ".join(f"{e.key.removeprefix('aten::')} {getattr(e, key) / total:.0%}" for e in events[:top])


def bench_sprites(n: int, palette: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random sprites shaped like the real ones: one palette colour (not black)
    on a black background, ~30% of the pixels. (n, 3, 16, 16) in [0, 1]."""
    colour = palette[1 + torch.randint(len(palette) - 1, (n,), generator=generator)]  # (n, 3)
    mask = (torch.rand(n, 1, 16, 16, generator=generator) < 0.3).float()  # (n, 1, 16, 16)
    return mask * colour[:, :, None, None]


def bench_command(strategy_cls, config_cls, argv: list[str], parents: tuple = ()) -> dict:
    """`python compare.py bench --models X`, for each model: parameters, FLOPs, training images/s and seconds to
    sample, in fp32 and with bf16 autocast (--amp), next to this machine's own
    matmul throughput measured in the same run. Needs no data and no
    checkpoint: a freshly initialised model on random sprites costs the same.
    Prints its figures and returns them (compare.py bench tabulates them):
    {"params", "n", "batch_size", "fp32": {...}, "bf16": {...}}, each precision
    with "peak_gflops", "train_sprites_per_s", "train_of_peak", "sample_s",
    "sample_of_peak" (fractions of the fp32 peak)."""
    from torch.utils.flop_counter import FlopCounterMode

    parser = common.download.OneLineParser(
        prog=f"{Path(sys.argv[0]).name} bench",
        description="Measure this model's speed on this machine: FLOPs (torch.utils.flop_counter, matmul and "
                    "conv only), training images/s and sampling seconds in fp32 and bf16 autocast, each as a "
                    "fraction of the matmul GFLOP/s measured in the same run.", parents=list(parents))
    parser.add_argument("--batch-size", type=int, default=0,
                        help="training batch (default: the model's own --batch-size)")
    parser.add_argument("--n", type=int, default=16, help="sprites per sampling run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each measurement, the best is shown (default: %(default)s)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure with bf16 autocast, as --amp trains (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    own = common.model_fields(config_cls)
    common.add_config_flags(parser.add_argument_group("model flags (default: the model's defaults)"),
                     config_cls, suppress_defaults=True, only=own)
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1 or args.batch_size < 0:
        parser.error("--n and --repeats must be at least 1, --batch-size at least 0")
    device = common.select_device(args.device)
    common.seed_everything(0)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # as training runs
    values = {k: v for k, v in vars(args).items() if k in own}
    values.update(mlflow=False, device=str(device))
    if args.batch_size:
        values["batch_size"] = args.batch_size
    config = common.make_config(config_cls, parser, values)
    batch_size = config.batch_size
    gen = torch.Generator().manual_seed(0)
    palette = torch.cat([torch.zeros(1, 3), torch.rand(config.palette_size - 1, 3, generator=gen)]).to(device)
    data = bench_sprites(max(batch_size, 8), palette.cpu(), gen).to(device)

    where = f"{device}" + (f", {torch.get_num_threads()} threads, CPU capability "
                           f"{torch.backends.cpu.get_cpu_capability()}" if device.type == "cpu" else "")
    print(f"bench: {strategy_cls.name} on {where}, torch {torch.__version__}")
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work on the machine "
              f"slows every figure below)")
    native, found = common.native_bf16(device)
    print(f"bf16 in hardware: {({True: 'yes', False: 'no', None: 'unknown'})[native]} ({found})"
          + ("; --amp trains in fp32 here, --amp-force in bf16" if native is False else ""))
    precisions = ["fp32"] + (["bf16"] if args.bf16 else [])
    peak = {}
    for p in precisions:
        peak[p] = matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, device, args.repeats)
        print(f"matmul peak {p}: {peak[p][0]:.1f} GFLOP/s ({peak[p][1]}x{peak[p][1]} products, best of "
              f"{args.repeats}; CPU share {peak[p][2]:.0%})")

    trainers = {p: common.Trainer(strategy_cls(config, palette), dataclasses.replace(config, amp=(p == "bf16")),
                                  data, data[:8], palette, Path("."), augment=None) for p in precisions}
    base = trainers["fp32"]
    print(f"parameters: {base.n_params():,}")
    for trainer in trainers.values():
        trainer.strategy.on_epoch_start(trainer.model, 1)
        trainer.model.train()
    batch = data[:batch_size]

    # FLOPs, counted on one fp32 training step and one fp32 sampling run.
    with FlopCounterMode(display=False) as counter:
        out = base.strategy.train_step(base.model, batch)
        out["loss"].backward()
    base.model.zero_grad(set_to_none=True)
    train_flops = counter.get_total_flops()
    calls = []
    handle = base.eval_model.register_forward_hook(lambda *a: calls.append(1))
    with FlopCounterMode(display=False) as counter:
        base.eval_model.eval()
        common.draw_samples(base.strategy, base.eval_model, args.n, 0, device)
    handle.remove()
    sample_flops = counter.get_total_flops()
    print(f"FLOPs (matmul and conv, torch.utils.flop_counter): training step {train_flops / batch_size / 1e9:.3g} "
          f"GFLOP per sprite (forward + backward); sampling {args.n} sprites {sample_flops / 1e9:.3g} GFLOP"
          + (f" = {len(calls)} model calls of {sample_flops / len(calls) / args.n / 1e9:.3g} GFLOP per sprite"
             if calls else ""))

    rows = {}
    for p, trainer in trainers.items():
        step = iter(range(10 ** 9))
        train_s, train_share = best_time(lambda: trainer.optimizer_step(batch, 1, next(step)), args.repeats, device)
        trainer.eval_model.eval()
        sample_s, sample_share = best_time(lambda: common.draw_samples(trainer.strategy, trainer.eval_model, args.n, 0,
                                                                 device, amp=(p == "bf16")), args.repeats, device)
        rows[p] = (train_s, sample_s, train_share, sample_share)

    def fraction(flops, seconds, p, share):
        rate = flops / seconds / 1e9
        text = f"{rate:.3g} GFLOP/s = {rate / peak[p][0]:.0%} of {p} matmul peak"
        return text + (f", {rate / peak['fp32'][0]:.0%} of fp32" if p != "fp32" else "") + f"; CPU share {share:.0%}"

    for p, (train_s, sample_s, train_share, sample_share) in rows.items():
        name = "fp32" if p == "fp32" else "bf16 autocast (--amp)"
        print(f"{name}: training {batch_size / train_s:.1f} sprites/s ({train_s * 1e3:.0f} ms per step of "
              f"{batch_size}; {fraction(train_flops, train_s, p, train_share)})")
        print(f"{name}: sampling {args.n} sprites {sample_s:.3g} s "
              f"({fraction(sample_flops, sample_s, p, sample_share)})")
    if "bf16" in rows:
        print(f"bf16 autocast vs fp32: training {rows['fp32'][0] / rows['bf16'][0]:.2f}x as fast, "
              f"sampling {rows['fp32'][1] / rows['bf16'][1]:.2f}x as fast")
    # What limits the fractions above: the FLOP count covers matmuls and convolutions only, so time
    # spent in normalisation, activations and additions (memory-bound, no FLOPs counted) lowers them.
    step = iter(range(10 ** 9))
    for what, fn in (("training step", lambda: base.optimizer_step(batch, 1, next(step))),
                     (f"sampling {args.n} sprites",
                      lambda: common.draw_samples(base.strategy, base.eval_model, args.n, 0, device))):
        base.eval_model.eval()
        print(f"fp32 {what}, where the time goes (torch.profiler, self time): {time_by_op(fn)}")
    figures = {"params": base.n_params(), "n": args.n, "batch_size": batch_size, "bf16_native": native}
    for p, (train_s, sample_s, _, _) in rows.items():
        figures[p] = dict(peak_gflops=peak[p][0], train_sprites_per_s=batch_size / train_s,
                          train_of_peak=train_flops / train_s / 1e9 / peak["fp32"][0], sample_s=sample_s,
                          sample_of_peak=sample_flops / sample_s / 1e9 / peak["fp32"][0])
    if hasattr(os, "getloadavg"):
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return figures


def bench_models(argv: list[str]) -> None:
    """`python compare.py bench [--models NAME ...] [bench flags]`: each model's
    bench, then one table of them all."""
    pick = common.download.OneLineParser(prog="compare.py bench", add_help=False)
    add_models_flag(pick)
    chosen, _ = pick.parse_known_args(argv)  # the other flags are each model's bench flags, parsed there
    figures = {}
    for name in chosen.models:
        print(f"\n=== {name} ===")
        figures[name] = bench_command(*MODELS[name], argv, parents=(pick,))
    print("\n" + bench_table(figures))


def bench_table(figures: dict) -> str:
    """`compare.py bench`: each model's bench figures (bench_command) in
    one markdown table; percentages are of the fp32 matmul peak measured in the
    same model's run."""
    precisions = [p for p in ("fp32", "bf16") if all(p in f for f in figures.values())]
    head = ["model", "params"]
    for p in precisions:
        tag = "fp32" if p == "fp32" else "--amp"
        head += [f"{tag} train sprites/s (% of peak)", f"{tag} sample s (% of peak)"]
    if "bf16" in precisions:
        head.append("--amp speed-up vs fp32 (train, sample)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, f in figures.items():
        cells = [name, f"{f['params'] / 1e6:.2f}M"]
        for p in precisions:
            cells += [f"{f[p]['train_sprites_per_s']:.1f} ({f[p]['train_of_peak']:.0%})",
                      f"{f[p]['sample_s']:.3g} ({f[p]['sample_of_peak']:.0%})"]
        if "bf16" in precisions:
            cells.append(f"{f['bf16']['train_sprites_per_s'] / f['fp32']['train_sprites_per_s']:.2f}x, "
                         f"{f['fp32']['sample_s'] / f['bf16']['sample_s']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    n = next(iter(figures.values()))["n"]
    peaks = " / ".join(f"{f['fp32']['peak_gflops']:.0f}" for f in figures.values())
    return ("\n".join(lines) + f"\n\nTraining: batches of each model's --batch-size; sampling: {n} sprites. "
            f"% of peak: achieved GFLOP/s (matmul and conv FLOPs) over the fp32 matmul GFLOP/s measured in the "
            f"same run (fp32 peak {peaks} GFLOP/s in the {' / '.join(figures)} runs).")


# -----------------------------------------------------------------------------
# The whole comparison
# -----------------------------------------------------------------------------


def compare(configs: dict, data_path: str, out: Path, seed: int = 0, n_show: int = 32, n_eval: int = 256,
            device: str = "auto", amp: bool = False, checkpoints: Path | None = None, quick: bool = False,
            use_mlflow: bool = True, models: list[str] | None = None, conditional: str = "",
            guidance: float = 2.0) -> tuple[Path, str]:
    """Train or load every model, then write comparison.png and comparison.md
    into `out`; returns (figure path, table markdown). `models`: the registry
    names to compare (default: all)."""
    started = time.time()
    models = list(MODELS) if models is None else models
    dev = common.select_device(device)
    data = common.load_sprites(data_path, dev, seed=seed)
    if not len(data.val):
        raise common.UserError(f"{data_path} has no validation sprites, which the comparison's real row needs; "
                               f"use a dataset from `python download.py`")
    # `out` is not created here: the runs and files written into it create it, so a run that fails first leaves none.
    label = "SMOKE RUN (--quick: a few epochs each, not a result)" if quick else "comparison"
    parent = common.Tracker(use_mlflow, experiment="compare", run_name=("compare-quick" if quick else "compare"))
    try:
        ckpts = {name: checkpoint_of(name, configs, out, checkpoints) for name in models}
        print("\n=== sampling and scoring ===")
        rows, columns = [], [("real (validation)", data.val[:n_show])]
        for name, panel_label, overrides in [panel for panel in PANELS if panel[0] in models]:
            r = evaluate(name, overrides, ckpts[name], data, n_show, n_eval, seed, dev, amp)
            rows.append((panel_label, r))
            columns.append((panel_label, r.pop("show")))
            print(f"{panel_label}: " + " ".join(f"{m} {r[m]:.3f}" for m in METRICS))
        chosen = {name: configs[name] for name in models if name in configs}
        for name, ckpt in (conditional_checkpoints(chosen, out, checkpoints, conditional) if conditional else {}).items():
            panel_label = f"{name} | {conditional}, w={guidance:g}"
            r = evaluate(name, {"guidance": guidance}, ckpt, data, n_show, n_eval, seed, dev, amp)
            rows.append((panel_label, r))
            columns.append((panel_label, r.pop("show")))
            print(f"{panel_label}: " + " ".join(f"{m} {r[m]:.3f}" for m in METRICS + ["class_accuracy"]))
        spread = spread_table(rows, real_draws(data, n_eval, SPREAD_SEEDS, seed), n_eval, seed)
        real = common.sprite_metrics(data.val, data.train, data.palette)
        rows.append((f"real (validation, n={data.val.shape[0]})", real))

        title = f"{label} | seed {seed}"
        # Quality against training time and training compute: the points each run scored while it
        # trained (--eval-every-minutes: time_to_quality.json beside its checkpoint), one curve per family.
        curves = {FAMILIES[name]: quality_curve(ckpts[name]) for name in models}
        curves = {family: points for family, points in curves.items() if points}
        for x, file in (("minutes", "time_to_quality.png"), ("tflop", "compute_to_quality.png")):
            if curves:
                chart = quality_chart(curves, real, x, title)
                common.save_png(chart, out / file)
                parent.log_image(file.removesuffix(".png"), chart, step=0)
        if not curves:
            print("no time_to_quality.json beside the checkpoints (they were trained without "
                  "--eval-every-minutes): no quality curves and no equal-budget table")
        fig = figure(columns, data.palette, title)
        fig_path = common.save_png(fig, out / "comparison.png")
        md = (f"### {label}\n\n" + table(rows) +
              (f"\n\nConditional rows (--conditional {conditional}): classes asked for one per row of 8 "
               f"(cycling), at guidance w = {guidance:g}; class_accuracy = the fraction of samples "
               f"of the class asked for." if conditional else "") +
              f"\n\nEach model row: {n_eval} samples (seed {seed + 1}), scored against the "
              f"{data.train.shape[0]} training sprites; the real row scores the {data.val.shape[0]} validation "
              f"sprites the same way. Sample time: 64 sprites on {dev}{' with bf16 autocast' if amp else ''}. "
              f"Train time: the run's own wall time (from its checkpoint).\n" + spread +
              (budget_table(curves, sum(r["scoring_seconds"] for lab, r in rows if lab in curves)) if curves else ""))
        common.atomic_write_bytes(out / "comparison.md", md.encode())
        print("\n" + md)
        parent.log_image("comparison", fig, step=0)
        parent.log_artifact(out / "comparison.md")
        parent.set_description(md)
        print(f"wrote {fig_path}, {out / 'comparison.md'}"
              + (f", {out / 'time_to_quality.png'} and {out / 'compute_to_quality.png'}" if curves else ""))
        print(f"compare.py took {common.fmt_time(time.time() - started)} in all")
        parent.end("FINISHED")
        if parent.run_id:
            print(parent.how_to_view())
    except BaseException:
        parent.end("FAILED")
        raise
    return fig_path, md


def conditional_checkpoints(configs: dict, out: Path, checkpoints: Path | None, kind: str) -> dict[str, Path]:
    """--conditional KIND: a class-conditioned run of every model whose Config has a
    `condition` field, trained into OUT/<model>-<KIND> (or loaded from
    --checkpoints DIR/<model>-<KIND>/checkpoints/last.pt)."""
    found = {}
    for name, (strategy_cls, config_cls) in MODELS.items():
        if "condition" not in config_cls.__dataclass_fields__ or name not in configs:
            continue
        folder = f"{name}-{kind}"
        if checkpoints is not None:
            path = checkpoints / folder / "checkpoints" / "last.pt"
            if not path.exists():
                raise common.UserError(f"--conditional {kind}: no {path}; train it with `python {name}.py "
                                       f"--condition {kind} --out {checkpoints / folder}` or drop --checkpoints")
            found[name] = path
            continue
        print(f"\n=== training {name}, conditioned on {kind} ===")
        config = dataclasses.replace(configs[name], condition=kind, out=str(out / folder))
        found[name] = common.train(strategy_cls, config) / "checkpoints" / "last.pt"
    return found


# -----------------------------------------------------------------------------
# Guidance: what classifier-free guidance buys and costs, for any conditional model
# -----------------------------------------------------------------------------


def guidance_command(argv: list[str]) -> None:
    """`python compare.py guidance`: the
    classifier-free guidance sweep of a conditional checkpoint of any model (diffusion,
    or the VQ-VAE's prior). At each w: --n samples with balanced classes (sample i asks for class
    i mod n_classes; the same seed, so the same x_T, at every w), scored with the shared
    sprite metrics, the class accuracy and the within-class variety (class_stats),
    into OUT/w<w>/metrics.json; a chart of the fractions against w (OUT/sweep.png) and a
    grid of one class, one row per w, the same 8 noise draws in every row (OUT/grid-<class>.png).
    OUT/real.json holds the same figures measured on the real training sprites."""
    parser = common.download.OneLineParser(prog=f"{Path(sys.argv[0]).name} guidance", description=guidance_command.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint trained with --condition colour or cluster")
    parser.add_argument("--w", default="0,1,2,3,5,8", help="guidance scales to sweep (default: %(default)s)")
    parser.add_argument("--n", type=int, default=256, help="samples per w (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=2, help="sampling seed (default: %(default)s, as the run's own scores)")
    parser.add_argument("--grid-class", default="0", help="class shown in the grid, name or index (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for the results")
    args = parser.parse_args(argv)
    ws = number_list(parser, "--w", args.w, float)
    if args.n < 8 or min(ws) < 0:
        parser.error("--n must be at least 8 and every w at least 0")
    for w in ws:
        common.check_range("--w", w, 0, common.BOUNDS["guidance"][1])
    common.check_range("--n", args.n, 8, common.SPRITES_MAX)
    common.check_range("--seed", args.seed, 0, common.SEED_MAX)
    device = common.select_device(args.device)
    strategy, model, palette, config, state = load_any(args.checkpoint, device)
    model_name = strategy.name
    labeller = getattr(strategy, "labeller", None)  # models with a --condition flag have one
    if labeller is None:
        raise common.UserError(f"{args.checkpoint} was trained without classes; train with --condition colour or cluster")
    show = labeller.parse(args.grid_class)
    train = common.load_sprites(config.data, device, config.palette_size, config.seed).train
    out = Path(args.out)

    y_real = labeller(train)
    real = {"n_classes": labeller.n_classes, "class_sizes": torch.bincount(y_real, minlength=labeller.n_classes).tolist(),
            # the ceiling: how often a real sprite, mirrored as in training, keeps its class
            # (colour: always; cluster: a mirrored mask can fall nearer another centre)
            "class_accuracy_mirrored": float((labeller(train.flip(-1)) == y_real).float().mean()),
            "chance": 1 / labeller.n_classes, **class_stats(train, y_real, labeller)}
    everything = torch.zeros_like(y_real)  # all sprites as one class: the variety without a label
    real.update({f"unlabelled_{k}": v for k, v in class_stats(train, everything, labeller).items()})
    common.atomic_write_bytes(out / "real.json", json.dumps(real, indent=1).encode())
    print(f"real training sprites: {json.dumps(real)}")

    # what made these files, and on what: next to every metrics.json (the docs' results convention)
    load = f", load average {os.getloadavg()[0]:.2f} at the start" if hasattr(os, "getloadavg") else ""
    sampling = " ".join(f"--{k.replace('_', '-')} {getattr(config, k)}" for k in ("sampler", "steps", "temperature", "top_k")
                        if hasattr(config, k))
    command = (f"python compare.py guidance {' '.join(argv)}\n# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
               f"device {device}, {torch.get_num_threads()} torch thread(s){load}; checkpoint: {model_name}, "
               f"--condition {config.condition}, epoch {state['epoch']}, {sampling}\n")
    y = torch.arange(args.n, device=device) % labeller.n_classes
    rows, series = [], {"precision": [], "recall": [], "class accuracy": [], "one-colour rate": []}
    print(f"{'w':>5} {'class_acc':>9} {'precision':>9} {'recall':>6} {'one_col':>7} {'pal_dist':>8} "
          f"{'shape_var':>9} {'col_ent':>7} {'seconds':>7}")
    for w in ws:
        strategy.config.guidance = w
        t0 = time.perf_counter()
        x = strategy.sample_classes(model, y, torch.Generator(device).manual_seed(args.seed))
        seconds = time.perf_counter() - t0
        m = {f"sample/{k}": v for k, v in common.sprite_metrics(x, train, palette).items()}
        m["sample/class_accuracy"] = strategy.class_accuracy(x, y)
        hit = (labeller(x) == y).float()  # (n,)
        per_class = {labeller.names[c]: float(hit[y == c].mean()) for c in range(labeller.n_classes)}
        m["sample/worst_class_accuracy"] = min(per_class.values())
        m["per_class_accuracy"] = per_class
        m.update({f"sample/{k}": v for k, v in class_stats(x, y, labeller).items()})
        m.update({"guidance": w, "n": args.n, "sample_seconds": seconds})
        common.atomic_write_bytes(out / f"w{w:g}" / "metrics.json", json.dumps(m, indent=1).encode())
        common.atomic_write_bytes(out / f"w{w:g}" / "command.txt", command.encode())
        row = x[y == show][:8]  # the first 8 samples of the grid's class; black where there are fewer
        rows.append(torch.cat([row, row.new_zeros(8 - len(row), 3, 16, 16)]))
        for key, name in (("precision", "precision"), ("recall", "recall"), ("class accuracy", "class_accuracy"),
                          ("one-colour rate", "one_colour_rate")):
            series[key].append((w, m[f"sample/{name}"]))
        print(f"{w:>5g} {m['sample/class_accuracy']:>9.3f} {m['sample/precision']:>9.3f} {m['sample/recall']:>6.3f} "
              f"{m['sample/one_colour_rate']:>7.3f} {m['sample/palette_distance']:>8.2f} "
              f"{m['sample/shape_variety']:>9.3f} {m['sample/colour_entropy']:>7.3f} {seconds:>7.1f}", flush=True)
    title = f"guidance sweep, {model_name}, --condition {config.condition}, {args.n} samples per w"
    common.save_png(line_chart(series, title, "guidance w", "fraction"), out / "sweep.png")
    grid = common.make_grid(torch.cat(rows), nrow=8, scale=4, palette=palette)
    common.save_png(grid, out / f"grid-{labeller.names[show]}.png")
    print(f"wrote {out}/w*/metrics.json, real.json, sweep.png and grid-{labeller.names[show]}.png "
          f"(rows: w = {', '.join(f'{w:g}' for w in ws)})")



# -----------------------------------------------------------------------------
# Tools: within-class variety, line charts, `plot` and `labels`
# -----------------------------------------------------------------------------


def class_stats(images: torch.Tensor, labels: torch.Tensor, labeller: common.Labeller) -> dict[str, float]:
    """What a class leaves free, measured on sprites (real or sampled) that carry
    class `labels` (N,): the within-class variety, a stand-in for H(X|Y).
    shape_variety   the mean fraction of the 256 mask pixels on which two sprites of
                    one class differ (0 = one shape per class)
    colour_entropy  the entropy, in bits, of the sprites' colour within a class
                    (0 = one colour per class; log2(7) = 2.81 for 7 equally common colours)
    Each is a class's figure averaged over the classes weighted by their share of
    the sprites, as H(X|Y) = sum_y p(y) H(X | Y = y). Classes of one sprite are left out."""
    masks = common.foreground_masks(images, labeller.palette)  # (N, 256)
    colour = common.Labeller("colour", labeller.palette)(images)  # (N,)
    shape, entropy, weight = [], [], []
    for c in labels.unique():
        m, col = masks[labels == c], colour[labels == c]
        if len(m) < 2:
            continue
        diff = torch.cdist(m, m, p=1) / m.shape[1]  # (n, n) fraction of differing pixels
        shape.append(float(diff.sum() / (len(m) * (len(m) - 1))))
        p = torch.bincount(col + 1).float() / len(col)  # +1: the "no colour" class -1 counts too
        entropy.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
        weight.append(len(m))
    if not weight:
        return dict(shape_variety=float("nan"), colour_entropy=float("nan"))
    return dict(shape_variety=float(np.average(shape, weights=weight)),
                colour_entropy=float(np.average(entropy, weights=weight)))


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (640, 400)) -> Image.Image:
    """A line chart (matplotlib, no screen needed): one line with dots per named
    series of (x, y) points, ticks at round values, a grid and the legend inside
    the axes. Returned as a PIL image, so it is saved like every other picture
    (atomically, by common.save_png). Sprite grids stay PIL: nearest-neighbour pixels."""
    fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)  # a Figure of its own: no pyplot global state
    ax = fig.add_subplot()
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts)) if pts else ((), ())
        ax.plot(xs, ys, marker="o" if len(pts) <= 50 else None, markersize=3, linewidth=1.5, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return figure_image(fig)


def plot_command(argv: list[str]) -> None:
    """`python compare.py plot`: line charts (PNG, matplotlib) of time-to-quality
    curves (the time_to_quality.json of runs trained with --eval-every-minutes)
    or, with --schedules, of the signal share sqrt(alpha_bar_t) of both noise schedules."""
    parser = common.download.OneLineParser(prog="compare.py plot", description=plot_command.__doc__)
    parser.add_argument("runs", nargs="*", help="run folders or time_to_quality.json files; LABEL=PATH names a line")
    parser.add_argument("--metric", default="precision", help="sprite metric on the y axis (default: precision)")
    parser.add_argument("--x", default="minutes", choices=["minutes", "tflop", "epoch", "step"],
                        help="x axis (default: minutes)")
    parser.add_argument("--schedules", action="store_true", help="plot sqrt(alpha_bar_t) of linear and cosine instead")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    common.check_suffix("--out", args.out, (".png",))
    if args.schedules:
        T = diffusion.Config.timesteps
        series = {name: [(t, float(v)) for t, v in enumerate(make(T, torch.device("cpu"))["sqrt_alpha_bar"])][::10]
                  for name, make in (("linear (Ho et al. 2020)", diffusion.linear_schedule),
                                     ("cosine (Nichol & Dhariwal 2021)", diffusion.cosine_schedule))}
        img = line_chart(series, f"signal share sqrt(alpha_bar_t), T = {T}", "t", "sqrt(alpha_bar_t)")
    else:
        if not args.runs:
            parser.error("give run folders or time_to_quality.json files, or --schedules")
        series = {}
        for item in args.runs:
            label, _, path = item.rpartition("=")
            path = Path(path)
            path = path / "time_to_quality.json" if path.is_dir() else path
            if not path.exists():
                raise common.UserError(f"{path} not found; train with --eval-every-minutes to write it")
            points, key = read_json(path, "a time_to_quality.json", list), f"sample/{args.metric}"
            if points and all(isinstance(p, dict) for p in points) and key not in points[0]:
                raise common.UserError(f"{path} has no {key}; metrics there: {sorted(points[0])}")
            if not points or not all(isinstance(p, dict) and isinstance(p.get(key), (int, float))
                                     and isinstance(p.get(args.x), (int, float)) for p in points):
                raise common.UserError(f"{path} holds no points of numbers {key} and {args.x}; give a time_to_quality.json")
            series[label or path.parent.name] = [(p[args.x], p[key]) for p in points]
        xlabel = {**CLOCKS, "epoch": "epochs", "step": "optimizer steps"}[args.x]
        img = line_chart(series, f"time to quality: {args.metric} of EMA samples", xlabel, args.metric)
    common.save_png(img, args.out)
    print(f"wrote {args.out}")


def number_list(parser, flag: str, text: str, cast) -> list:
    """'0,1,2.5' -> [0.0, 1.0, 2.5] (cast each item); anything else is the user's one-line error."""
    try:
        return [cast(item) for item in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be {'integers' if cast is int else 'numbers'} separated by commas, got {text!r}")


def labels_command(argv: list[str]) -> None:
    """`python compare.py labels`: the class labels of the training sprites. Prints, for
    each k, the shape clusters' sizes and within-class variety (class_stats), and
    the colour classes' too; writes a preview: one row per class, its first --per-class sprites."""
    parser = common.download.OneLineParser(prog="compare.py labels", description=labels_command.__doc__)
    parser.add_argument("--kind", default="cluster", choices=["colour", "cluster"], help="labels to preview")
    parser.add_argument("--k", default="2,4,8,16", help="cluster counts to compare (default: %(default)s)")
    parser.add_argument("--preview-k", type=int, default=diffusion.Config.clusters, help="k of the preview (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=12, help="sprites per row of the preview (default: %(default)s)")
    parser.add_argument("--data", default=diffusion.Config.data, help="dataset (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the preview PNG to write")
    args = parser.parse_args(argv)
    ks = number_list(parser, "--k", args.k, int)
    for flag, value, least in (*(("--k", k, 2) for k in ks), ("--preview-k", args.preview_k, 2), ("--per-class", args.per_class, 1)):
        common.check_range(flag, value, least, 256)
    common.check_range("--seed", args.seed, 0, common.SEED_MAX)
    data = common.load_sprites(args.data, torch.device("cpu"), diffusion.Config.palette_size, args.seed)
    colour = common.Labeller("colour", data.palette)
    everything = torch.zeros(len(data.train), dtype=torch.long)
    print(f"no label : {class_stats(data.train, everything, colour)}")
    y = colour(data.train)
    print(f"colour   : sizes {torch.bincount(y).tolist()} {class_stats(data.train, y, colour)} "
          f"({', '.join(colour.names)})")
    for k in ks:
        cl = common.Labeller("cluster", data.palette, common.fit_shape_clusters(data.train, data.palette, k, args.seed))
        yk = cl(data.train)
        print(f"cluster {k:<2}: sizes {torch.bincount(yk, minlength=k).tolist()} {class_stats(data.train, yk, cl)}"
              f" mirrored sprites keeping their cluster {(cl(data.train.flip(-1)) == yk).float().mean():.3f}")
    labeller = colour if args.kind == "colour" else common.Labeller(
        "cluster", data.palette, common.fit_shape_clusters(data.train, data.palette, args.preview_k, args.seed))
    y = labeller(data.train)
    blank = torch.zeros(1, 3, 16, 16)
    rows = [torch.cat([data.train[y == c][:args.per_class], blank.expand(args.per_class, -1, -1, -1)])[:args.per_class]
            for c in range(labeller.n_classes)]  # (per_class, 3, 16, 16) each, padded with black
    common.save_png(common.make_grid(torch.cat(rows), nrow=args.per_class, scale=4, palette=data.palette), args.out)
    print(f"wrote {args.out}: one row per class ({', '.join(labeller.names)}), its first {args.per_class} training sprites")


# -----------------------------------------------------------------------------
# Report: the results tables in README.md and docs/, regenerated from docs/results/
# -----------------------------------------------------------------------------
# Every run a page quotes has a folder docs/results/<run>/ holding command.txt
# (what was run, on which machine), the run's metrics.json, the tail of its log
# and any further measurement of it as <name>.json. A table in a page is
# written between two HTML comments that say what it shows:
#     <!-- results: runs=vae-ce,vae-kl1 metrics=val/kl,latent/active_units -->
#     ...generated table...
#     <!-- /results -->
# and `python compare.py report` rewrites it from those files, so a number in
# the docs cannot drift from its source (a test checks they agree).

ROOT = Path(__file__).resolve().parent
RESULTS_TABLE = re.compile(r"(<!-- results: (.*?) -->\n)(.*?)(<!-- /results -->)", re.S)


def run_results(run: Path) -> dict:
    """One run's figures: metrics.json as it is, plus every other <name>.json that holds one
    object as <name>/<key> (a list, such as time_to_quality.json's points, is not a figure)."""
    figures = {}
    for path in sorted(run.glob("*.json")):
        data = read_json(path, "a run's figures")
        if not isinstance(data, dict):
            continue
        figures.update(data if path.stem == "metrics" else {f"{path.stem}/{k}": v for k, v in data.items()})
    return figures


def results_table(spec: str, page: Path, results: Path) -> str:
    """The markdown table a `<!-- results: runs=... metrics=... [rows=metrics] -->` comment asks
    for: one row per run (linked to its folder) and one column per metric, or the other way round."""
    fields = dict(part.split("=", 1) for part in spec.split())
    runs, metrics = fields["runs"].split(","), fields["metrics"].split(",")
    cells = {}  # (run, metric) -> the figure as written
    for run in runs:
        if not (results / run).is_dir():
            raise common.UserError(f"{page.name} asks for run {run!r}, which has no folder in {results}")
        figures = run_results(results / run)
        for m in metrics:
            if m not in figures:
                raise common.UserError(f"{page.name}: run {run} has no figure {m!r} in {results / run}")
            v = figures[m]
            cells[run, m] = common.fmt_time(v) if m == "train_seconds" else f"{v:.4g}" if isinstance(v, float) else str(v)
    links = {run: f"[{run}]({Path(os.path.relpath(results / run, page.parent)).as_posix()}/)" for run in runs}
    if fields.get("rows") == "metrics":
        lines = ["| | " + " | ".join(links[r] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        lines += [f"| `{m}` | " + " | ".join(cells[r, m] for r in runs) + " |" for m in metrics]
    else:
        lines = ["| run | " + " | ".join(f"`{m}`" for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        lines += [f"| {links[r]} | " + " | ".join(cells[r, m] for m in metrics) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def report(root: Path = ROOT, write: bool = True) -> list[str]:
    """Regenerate every results table in README.md and docs/**/*.md from root/docs/results;
    returns the pages whose tables changed (written unless write is False)."""
    changed = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        text = page.read_text()
        new = RESULTS_TABLE.sub(lambda m: m.group(1) + results_table(m.group(2), page, root / "docs" / "results")
                                + m.group(4), text)
        if new != text:
            changed.append(str(page.relative_to(root)))
            if write:
                common.atomic_write_bytes(page, new.encode())
    return changed


def report_command(argv: list[str]) -> None:
    p = common.download.OneLineParser(prog="compare.py report",
                                description="Rewrite the results tables in README.md and docs/ from the run "
                                            "files in docs/results/ (see the <!-- results: ... --> comments).")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = p.parse_args(argv)
    changed = report(write=not args.check)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(changed)}" if changed else "every results table is up to date")
    if args.check and changed:
        sys.exit(1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = common.download.OneLineParser(description=__doc__.split("\n\n")[0],
                                      epilog="`python compare.py bench [--models NAME ...]` prints each model's bench "
                                             "figures in one table; `python compare.py report` regenerates the docs' "
                                             "results tables")
    for suffix, (name, field, text) in BUDGETS.items():
        p.add_argument(f"--epochs-{suffix}", type=int, help=f"{text} (default: {getattr(MODELS[name][1], field)})")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training and sampling")
    p.add_argument("--seed", type=int, default=0, help="one seed for every model (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few epochs each, labelled as such")
    p.add_argument("--checkpoints", type=Path, help="load finished runs instead of training: DIR/<model>/checkpoints/last.pt, or the newest "
                        "DIR/<model>/<run>/checkpoints/last.pt (e.g. DIR = runs, as the model scripts write)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: %(default)s)")
    p.add_argument("--n-show", type=int, default=32, help="sprites per panel in the figure (default: %(default)s)")
    p.add_argument("--n-eval", type=int, help="samples scored per model (default: 256; 64 with --quick)")
    p.add_argument("--eval-every-minutes", type=float, help="score each model's samples every this many minutes of "
                   "its training, for the quality curves and the equal-budget table (default: 1; 0.05 with --quick; "
                   "0 = no curves)")
    p.add_argument("--data", default=common.TrainConfig.data, help="dataset (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--no-mlflow", action="store_true", help="do not track with MLflow")
    add_models_flag(p)
    p.add_argument("--conditional", choices=["colour", "cluster"],
                   help="also a panel and row per model that supports conditioning (diffusion.py --condition), "
                        "conditioned on these labels, sampled at --guidance; trained into OUT/<model>-<labels>")
    p.add_argument("--guidance", type=float, default=diffusion.Config.guidance,
                   help="classifier-free guidance w of the conditional panels (default: %(default)s)")
    args = p.parse_args(argv)
    for suffix in BUDGETS:
        value = getattr(args, f"epochs_{suffix.replace('-', '_')}")
        if value is not None and value < 1:
            p.error(f"--epochs-{suffix} must be at least 1")
    args.n_eval = args.n_eval if args.n_eval is not None else (64 if args.quick else 256)
    if args.eval_every_minutes is None:
        args.eval_every_minutes = 0.05 if args.quick else 1.0
    if not 0 <= args.eval_every_minutes < float("inf"):
        p.error(f"--eval-every-minutes must be a number of minutes, 0 or more, got {args.eval_every_minutes}")
    if args.n_show < 1 or args.n_eval < 2:
        p.error("--n-show must be at least 1 and --n-eval at least 2")
    if not (1 <= args.n_show <= common.SPRITES_MAX and args.n_eval <= common.SPRITES_MAX):
        p.error(f"--n-show and --n-eval must be at most {common.SPRITES_MAX}")
    if not 0 <= args.guidance <= common.BOUNDS["guidance"][1]:
        p.error(f"--guidance must be between 0 and {common.BOUNDS['guidance'][1]}, got {args.guidance}")
    if not 0 <= args.seed <= common.SEED_MAX:
        p.error(f"--seed must be between 0 and {common.SEED_MAX}, got {args.seed}")
    try:
        common.select_device(args.device)  # an unknown or unavailable device: refused before anything runs
    except common.UserError as e:
        p.error(str(e))
    return args


def add_models_flag(parser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                        help=f"which models of the registry, by name (default: all: {' '.join(MODELS)})")


def configs_from(args: argparse.Namespace) -> dict:
    """Each model's own defaults, with the budgets and shared settings given here."""
    budgets = {name: {} for name in MODELS}
    for suffix, (name, field, _) in BUDGETS.items():
        budgets[name][field] = getattr(args, f"epochs_{suffix.replace('-', '_')}")
    configs = {}
    for name, (_, config_cls) in MODELS.items():
        if name not in args.models:
            continue
        values = QUICK[name] if args.quick else {}
        values = {**values, **{k: v for k, v in budgets[name].items() if v is not None}}
        configs[name] = config_cls(**values, seed=args.seed, amp=args.amp, data=args.data, device=args.device,
                                   out=str(args.out / name), mlflow=not args.no_mlflow,
                                   eval_every_minutes=args.eval_every_minutes,
                                   **(dict(n_eval=64, sample_every=0) if args.quick else {}))
    return configs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        if argv[:1] == ["report"]:
            return report_command(argv[1:])
        if argv[:1] == ["bench"]:
            return bench_models(argv[1:])
        if argv[:1] == ["guidance"]:
            return guidance_command(argv[1:])
        if argv[:1] == ["plot"]:
            return plot_command(argv[1:])
        if argv[:1] == ["labels"]:
            return labels_command(argv[1:])
        args = parse_args(argv)
        if args.amp:  # sampling gets training's decision: no emulated bf16 where it is slower (common.amp_worth_it)
            args.amp = common.amp_worth_it(common.select_device(args.device), force=False)
        compare(configs_from(args), args.data, args.out, args.seed, args.n_show, args.n_eval, args.device,
                args.amp, args.checkpoints, args.quick, not args.no_mlflow, args.models, args.conditional or "",
                args.guidance)
    common.download.guarded(run, user_errors=(common.UserError,))  # one line and exit 2 for what the user can fix


if __name__ == "__main__":
    main()

"""Quality and time against sampler steps, DDIM vs DPM-Solver++(2M), on one checkpoint.

    python docs/results/diffusion/quality_vs_steps.py CHECKPOINT OUT_PREFIX [--n-eval 256] [--grid ddim:50,dpm++:15] [--replot]

For each sampler:steps in --grid: 256 samples (seed 0) scored with common.sprite_metrics
against the training sprites, and the best of 3 timings of 16 sprites, all in this one
process (so the timings compare). Writes OUT_PREFIX.json and OUT_PREFIX.png (precision and
palette distance against steps). Evidence for tutorial 04, not part of the library.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import compare  # noqa: E402
import diffusion  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("checkpoint")
p.add_argument("out")
p.add_argument("--n-eval", type=int, default=256)
p.add_argument("--grid", default="ddim:50,ddim:20,ddim:10,dpm++:10,dpm++:15,dpm++:20")
p.add_argument("--replot", action="store_true", help="only redraw the PNGs from OUT_PREFIX.json")
args = p.parse_args()
device = torch.device("cpu")
torch.use_deterministic_algorithms(True, warn_only=True)
if not args.replot:  # --replot redraws the figures from OUT_PREFIX.json alone, without the checkpoint
    state = common.load_checkpoint(args.checkpoint)
    data = common.load_sprites(state["config"]["data"], device, state["config"]["palette_size"], state["config"]["seed"])
rows = json.loads(Path(args.out + ".json").read_text()) if args.replot else []
print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
for item in [] if args.replot else args.grid.split(","):
    sampler, steps = item.split(":")
    strategy, model, palette, _, _ = common.load_for_sampling(
        args.checkpoint, device, diffusion.DiffusionStrategy, diffusion.Config, dict(sampler=sampler, steps=int(steps)))
    x = common.draw_samples(strategy, model, args.n_eval, 0, device)
    metrics = common.sprite_metrics(x, data.train, palette)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        common.draw_samples(strategy, model, 16, 0, device)
        times.append(time.perf_counter() - t0)
    rows.append(dict(sampler=sampler, steps=int(steps), seconds_16=min(times), **metrics))
    print(json.dumps(rows[-1]), flush=True)
Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
for metric in ("precision", "palette_distance", "one_colour_rate"):
    series = {s: [(r["steps"], r[metric]) for r in rows if r["sampler"] == s] for s in dict.fromkeys(r["sampler"] for r in rows)}
    img = compare.line_chart(series, f"{metric} of {args.n_eval} samples vs sampler steps ({Path(args.checkpoint).parent.parent.name})",
                            "sampler steps (U-Net calls)", metric)
    common.save_png(img, f"{args.out}_{metric}.png")
print(f"wrote {args.out}.json and PNGs; load average {os.getloadavg()[0]:.2f}")

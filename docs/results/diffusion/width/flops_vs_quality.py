"""U-Net width against quality at (about) equal training minutes, from committed files only.

    python docs/results/diffusion/width/flops_vs_quality.py

x: training GFLOP per sprite of each width (torch.utils.flop_counter, from the quiet-window benches
bench_idle2_*.txt); y: the end-of-run (or 20-minute) sprite metrics of one run per width, each scored
on 256 samples with that run's own sampler. Evidence for tutorial 04, not part of the library.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import compare  # noqa: E402

RESULTS = ROOT / "docs" / "results"
RUNS = [  # (label, bench file, run folder)
    ("width 64 (reference)", "diffusion/bench_idle2_reference.txt", "diffusion/reference-20min"),
    ("width 32", "diffusion/bench_idle2_b32.txt", "compare/diffusion"),
    ("width 24 (default)", "diffusion/bench_idle2_default.txt", "diffusion/default-b24"),
]
series = {"precision": [], "one-colour rate": [], "recall": []}
print(f"{'run':22} {'GFLOP/sprite':>12} {'minutes':>7} {'epochs':>6} {'palette':>7} {'one-col':>7} {'precision':>9} {'recall':>6}")
for label, bench, run in RUNS:
    gflop = float(re.search(r"training step ([\d.]+) GFLOP per sprite", (RESULTS / bench).read_text()).group(1))
    m = json.loads((RESULTS / run / "metrics.json").read_text())
    print(f"{label:22} {gflop:>12.3f} {m['train_seconds'] / 60:>7.1f} {m['epoch']:>6.0f} {m['sample/palette_distance']:>7.2f} "
          f"{m['sample/one_colour_rate']:>7.3f} {m['sample/precision']:>9.3f} {m['sample/recall']:>6.3f}")
    for key, name in (("precision", "precision"), ("one-colour rate", "one_colour_rate"), ("recall", "recall")):
        series[key].append((gflop, m[f"sample/{name}"]))
out = ROOT / "docs" / "images" / "diffusion_flops_vs_quality.png"
common.save_png(compare.line_chart(series, "quality after 16-20 training minutes against U-Net cost",
                                  "training GFLOP per sprite", "fraction"), out)
print(f"wrote {out}")

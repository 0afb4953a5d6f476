"""Redraw every committed guidance sweep chart (sweep.png) from its w*/metrics.json with
compare.line_chart (matplotlib), as `python compare.py guidance` draws it today; no checkpoint
needed. Run from the repository root: python docs/results/cfg-default/redraw_sweeps.py"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, ".")
import common  # noqa: E402
import compare  # noqa: E402

KEYS = (("precision", "precision"), ("recall", "recall"), ("class accuracy", "class_accuracy"),
        ("one-colour rate", "one_colour_rate"))
for chart in sorted(Path("docs/results").glob("*/*/sweep.png")):
    runs = sorted(chart.parent.glob("w*/metrics.json"), key=lambda p: float(p.parent.name[1:]))
    points = [json.loads(p.read_text()) for p in runs]
    command = (runs[0].parent / "command.txt").read_text()
    model = re.search(r"checkpoint: (?:(\w+), )?--condition (\w+)", command)
    title = (f"guidance sweep, {model.group(1) or 'diffusion'}, --condition {model.group(2)}, "
             f"{points[0]['n']} samples per w")
    series = {label: [(m["guidance"], m[f"sample/{key}"]) for m in points] for label, key in KEYS}
    common.save_png(compare.line_chart(series, title, "guidance w", "fraction"), chart)
    print(f"redrew {chart} from {len(points)} metrics.json")

"""Redraw this run's two charts from the committed curves (<model>/time_to_quality.json) with
compare.quality_chart, exactly as `python compare.py` draws them; the real row is rescored from
the dataset (needs data/, from download.py). Run from the repository root:
    python docs/results/compare-curves/redraw.py"""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, ".")
import torch  # noqa: E402

import common  # noqa: E402
import compare  # noqa: E402

here = Path(__file__).parent
data = common.load_sprites(common.TrainConfig.data, torch.device("cpu"))
real = common.sprite_metrics(data.val, data.train, data.palette)
# quality_curve reads <run>/time_to_quality.json for <run>/checkpoints/last.pt (which is not committed)
curves = {compare.FAMILIES[n]: compare.quality_curve(here / n / "checkpoints" / "last.pt") for n in compare.MODELS}
for x, name in (("minutes", "time_to_quality.png"), ("tflop", "compute_to_quality.png")):
    common.save_png(compare.quality_chart(curves, real, x, "comparison | seed 0"), here / name)
    shutil.copyfile(here / name, Path("docs/images") / name)
    print(f"wrote {here / name} and docs/images/{name}")

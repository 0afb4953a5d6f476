"""Autoguidance sweep (issue 23, lever 1) on one default diffusion checkpoint: at each w, the same
256 samples (seed 1) and 32-sprite grid (seed 0) that compare.py's table and figure draw, scored
by common.sprite_metrics, with the time for 64 sprites. Run from the repository root:
    python docs/results/diffusion/autoguidance/sweep.py runs/ag/checkpoints/last.pt 1,1.5,2,2.5,3 [OUT]
(OUT: the folder for the w*.json and grids, default this script's folder)"""
import json
import sys
from pathlib import Path

sys.path.insert(0, ".")
import torch  # noqa: E402

import common  # noqa: E402
import compare  # noqa: E402

ckpt, ws = Path(sys.argv[1]), [float(w) for w in sys.argv[2].split(",")]
here = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parent
device = torch.device("cpu")
torch.use_deterministic_algorithms(True, warn_only=True)
data = common.load_sprites(common.TrainConfig.data, device)
keys = ["palette_distance", "one_colour_rate", "density_in_range", "precision", "recall", "near_copy_rate"]
print("| w | " + " | ".join(keys) + " | sample 64 (s) |\n|" + "---|" * (len(keys) + 2))
for w in ws:
    r = compare.evaluate("diffusion", {"autoguidance": w}, ckpt, data, n_show=32, n_eval=256, seed=0,
                         device=device, amp=False)
    show = r.pop("show")
    common.save_png(common.make_grid(show, nrow=8, scale=4, palette=data.palette), here / f"grid-w{w:g}.png")
    common.atomic_write_bytes(here / f"w{w:g}.json", json.dumps({"autoguidance": w, **r}, indent=1).encode())
    print(f"| {w:g} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {r['sample_seconds']:.2f} |", flush=True)

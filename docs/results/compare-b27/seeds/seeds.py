"""The comparison table over sample seeds 1..S (256 samples each) for every panel of a compare.py run folder,
and what real sprites score on the same metrics: R draws of 256 training sprites from outside the metric's own
reference subset (sprite_metrics scores against 256 training sprites drawn with its seed 0). Writes seeds.json
beside itself. Usage: python docs/results/compare-b27/seeds/seeds.py RUN_DIR S R"""
import json, sys, statistics as st
from pathlib import Path
sys.path.insert(0, ".")
import torch, common, compare
device = torch.device("cpu")
run, n_seeds, n_real = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = common.load_sprites(common.TrainConfig.data, device, seed=0)
keys = ["palette_distance", "one_colour_rate", "precision", "recall", "near_copy_rate"]
out = {}
for name, label, overrides in compare.PANELS:
    strategy, model, palette, _, _ = common.load_for_sampling(compare.run_checkpoint(run, name), device,
                                                              *compare.MODELS[name], overrides)
    out[label] = [common.sprite_metrics(common.draw_samples(strategy, model, 256, s, device), data.train, palette)
                  for s in range(1, n_seeds + 1)]
# draws 1..R of 256 training sprites from outside the 256 that sprite_metrics scores against
out["real (training, outside the reference)"] = compare.real_draws(data, 256, n_real, seed=0)
print("| rows: mean ± sd over draws | " + " | ".join(keys) + " | seed 1's precision, recall |")
for label, rows in out.items():
    print(f"| {label} ({len(rows)}) | " + " | ".join(f"{st.mean(r[k] for r in rows):.3f} ± {st.stdev(r[k] for r in rows):.3f}"
          for k in keys) + f" | {rows[0]['precision']:.3f}, {rows[0]['recall']:.3f} |", flush=True)
json.dump(out, open(Path(sys.argv[0]).with_suffix(".json"), "w"), indent=1)

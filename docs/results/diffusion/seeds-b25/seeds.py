"""Seed-to-seed spread of the sprite metrics: 256 samples per seed, seeds 1..S, per checkpoint/setting."""
import json, sys, statistics as st
sys.path.insert(0, ".")
import torch, common, compare
device = torch.device("cpu")
data = common.load_sprites(common.TrainConfig.data, device)
keys = ["palette_distance", "one_colour_rate", "precision", "recall", "near_copy_rate"]
seeds = range(1, int(sys.argv[1]) + 1)
out = {}
for spec in sys.argv[2:]:
    name, ckpt, *ov = spec.split("@")
    over = json.loads(ov[0]) if ov else {}
    strategy, model, palette, _, _ = common.load_for_sampling(ckpt, device, *compare.MODELS["diffusion"], over)
    rows = [common.sprite_metrics(common.draw_samples(strategy, model, 256, s, device), data.train, palette) for s in seeds]
    out[name] = rows
    print(f"| {name} | " + " | ".join(f"{st.mean(r[k] for r in rows):.3f} ± {st.stdev(r[k] for r in rows):.3f}" for k in keys) + " |", flush=True)
json.dump(out, open(sys.argv[0].replace('.py', '.json'), 'w'), indent=1)

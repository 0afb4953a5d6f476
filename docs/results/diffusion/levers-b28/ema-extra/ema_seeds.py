"""Each EMA length an --ema-extra checkpoint keeps, over sampling seeds 1..S (256 samples each), scored as compare.py
scores: the run's own EMA (--ema-decay) and every extra average. Usage: python ema_seeds.py CHECKPOINT S"""
import sys, statistics as st
sys.path.insert(0, ".")
import torch, common, compare
device = torch.device("cpu")
ckpt, n_seeds = sys.argv[1], int(sys.argv[2])
data = common.load_sprites(common.TrainConfig.data, device)
strategy, model, palette, config, _ = common.load_for_sampling(ckpt, device, *compare.MODELS["diffusion"])
keys = ["palette_distance", "one_colour_rate", "precision", "recall", "near_copy_rate"]
nets = {f"{config.ema_decay:g} (the run's)": model, **{f"{d:g}": strategy.net_of(avg).eval() for d, avg in strategy.emas.items()}}
print("| EMA decay | " + " | ".join(keys) + " | seed 1's precision, recall |")
for name, net in nets.items():
    rows = [common.sprite_metrics(common.draw_samples(strategy, net, 256, s, device), data.train, palette)
            for s in range(1, n_seeds + 1)]
    print(f"| {name} | " + " | ".join(f"{st.mean(r[k] for r in rows):.3f} ± {st.stdev(r[k] for r in rows):.3f}"
          for k in keys) + f" | {rows[0]['precision']:.3f}, {rows[0]['recall']:.3f} |", flush=True)

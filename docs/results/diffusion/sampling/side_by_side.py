"""Sampler side by side (issue 23's sampling target) on one diffusion checkpoint: for each sampler setting, the
time for 16 sprites (fp32, best of 5 after a warm-up, this process's threads) and the table's 256 samples (seed 1)
scored by common.sprite_metrics, with the figure's 32-sprite grid (seed 0). Run from the repository root:
    python docs/results/diffusion/sampling/side_by_side.py CKPT "dpm++:20:1,ddim:50:1,dpm++:20:2" [OUT]
Each setting is sampler:steps:autoguidance-w[:lo-hi], lo-hi the --guide-interval (default 0-1). OUT (default: this script's folder) gets grid-<setting>.png and
<setting>.json. The fp32 matmul peak of this machine is printed first, measured in the same run."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
import torch  # noqa: E402

import common  # noqa: E402
import compare  # noqa: E402
import diffusion  # noqa: E402

ckpt, specs = Path(sys.argv[1]), [s.split(":") for s in sys.argv[2].split(",")]
here = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parent
here.mkdir(parents=True, exist_ok=True)
device = torch.device("cpu")
torch.use_deterministic_algorithms(True, warn_only=True)
peak, n, share = compare.matmul_peak(torch.float32, device, 5)
print(f"fp32 matmul peak {peak:.1f} GFLOP/s ({n}x{n}, {torch.get_num_threads()} threads, CPU share {share:.0%})")
data = common.load_sprites(common.TrainConfig.data, device)
keys = ["palette_distance", "one_colour_rate", "density_in_range", "precision", "recall", "near_copy_rate"]
print("| sampler | steps | w | interval | U-Net calls | 16 sprites (s) | CPU share | " + " | ".join(keys) + " |\n|"
      + "---|" * (len(keys) + 7))
for sampler, steps, w, *interval in specs:
    lo, hi = (float(v) for v in (interval[0] if interval else "0-1").split("-"))
    over = {"sampler": sampler, "steps": int(steps), "autoguidance": float(w), "guide_interval": f"{lo:g},{hi:g}"}
    strategy, model, palette, _, _ = common.load_for_sampling(ckpt, device, *compare.MODELS["diffusion"], over)
    seconds, cpu_share = compare.best_time(lambda: common.draw_samples(strategy, model, 16, 0, device), 5, device)
    r = compare.evaluate("diffusion", over, ckpt, data, n_show=32, n_eval=256, seed=0, device=device, amp=False)
    tag = f"{sampler}-{steps}-w{float(w):g}" + (f"-{lo:g}-{hi:g}" if interval else "")
    common.save_png(common.make_grid(r.pop("show"), nrow=8, scale=4, palette=data.palette), here / f"grid-{tag}.png")
    if sampler in diffusion.FLOW_SAMPLERS:  # the Euler/Heun levels t_i (T - 1), i < steps (Heun: also t_{i+1})
        if strategy.config.schedule == "edm":
            sigma = diffusion.edm_sigmas(int(steps), device)
            ts = (torch.cat([sigma / (1 + sigma), sigma.new_zeros(1)]) * (strategy.T - 1)).tolist()
        else:
            ts = torch.linspace(strategy.T - 1, 0, int(steps) + 1).tolist()
        levels = ts[:-1] + (ts[1:] if sampler == "heun" else [])
    elif strategy.config.schedule == "edm":  # dpm++ on EDM's levels
        sigma = diffusion.edm_sigmas(int(steps), device)
        levels = (sigma / (1 + sigma) * (strategy.T - 1)).tolist()
    else:
        levels = range(strategy.T) if sampler == "ddpm" else diffusion.ddim_timesteps(strategy.T, int(steps)).tolist()
    calls = len(levels) + (0 if float(w) == 1 else sum(lo * (strategy.T - 1) <= t <= hi * (strategy.T - 1) for t in levels))
    r.update(over, sample16_seconds=seconds, cpu_share=cpu_share, unet_calls=calls, matmul_peak_gflops=peak)
    common.atomic_write_bytes(here / f"{tag}.json", json.dumps(r, indent=1).encode())
    print(f"| {sampler} | {steps} | {float(w):g} | {lo:g}-{hi:g} | {calls} | {seconds:.3f} | {cpu_share:.0%} | "
          + " | ".join(f"{r[k]:.3f}" for k in keys) + " |", flush=True)

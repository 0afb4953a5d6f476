"""Flow checkpoint sampled on EDM's rho-levels (t = sigma / (1 + sigma)) instead of uniform t, Euler or Heun."""
import sys, json, time, statistics as st
sys.path.insert(0, ".")
import torch, common, compare, diffusion
device = torch.device("cpu")
data = common.load_sprites(common.TrainConfig.data, device)
ckpt = sys.argv[1]
keys = ["palette_distance", "one_colour_rate", "precision", "recall", "near_copy_rate"]
def sampler(strategy, model, n, gen, steps, heun, rho_grid, smax):
    T = strategy.T
    if rho_grid:
        lo, hi = 0.002 ** (1 / 7), smax ** (1 / 7)
        i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
        sigma = ((hi + i * (lo - hi)) ** 7).float()
        ts = torch.cat([sigma / (1 + sigma), torch.zeros(1)]) * (T - 1)
    else:
        ts = torch.linspace(T - 1, 0, steps + 1)
    u_theta = lambda x, t: strategy.model_output(model, x, t.expand(n)).float()
    with torch.inference_mode(), strategy.conditioned(None):
        x = torch.randn(n, 3, 16, 16, generator=gen) * (ts[0] / (T - 1))
        for k in range(steps):
            h = (ts[k] - ts[k + 1]) / (T - 1)
            u = u_theta(x, ts[k])
            xn = x - h * u
            if heun and k < steps - 1:
                xn = x - h / 2 * (u + u_theta(xn, ts[k + 1]))
            x = xn
    return common.from_model_range(x)
for spec in sys.argv[2:]:
    steps, heun, rho, smax, w = spec.split(":")
    strategy, model, palette, _, _ = common.load_for_sampling(ckpt, device, *compare.MODELS["diffusion"], {"autoguidance": float(w)})
    f = lambda n, s: sampler(strategy, model, n, torch.Generator().manual_seed(s), int(steps), heun == "heun", rho == "rho", float(smax))
    f(2, 0); t0 = time.perf_counter(); f(16, 0); sec = time.perf_counter() - t0
    rows = [common.sprite_metrics(f(256, s), data.train, palette) for s in (1, 2, 3)]
    print(f"| {spec} | {sec:.3f} | " + " | ".join(f"{st.mean(r[k] for r in rows):.3f}" for k in keys) + " |", flush=True)

"""Sampler step spacing on one checkpoint (issue 11): which timesteps DPM-Solver++ and DDIM visit.

uniform: ddim_timesteps (evenly spaced in t, the default); logsnr: evenly spaced in log-SNR lambda_t
(Lu et al. recommend it for low-resolution images); quad: t = (T-1) u^2 (dense at low noise); pP:
t = (T-1) (1 - (1-u)^P) (dense at high noise). 256 samples, seed 1 (compare.py's), scored with
common.sprite_metrics; one thread, timings on a shared machine (not comparable to the idle ones).
Evidence for tutorial 04, not part of the library. Run from the repository root:
    PYTHONPATH=. python docs/results/diffusion/spacing/spacing.py SAMPLER:STEPS:SPACING ...
"""
import sys, time, torch, common, compare, diffusion
torch.set_num_threads(1)
dev = torch.device("cpu")
ck = "runs/compare/diffusion/checkpoints/last.pt"
strategy, model, palette, config, _ = common.load_for_sampling(ck, dev, diffusion.DiffusionStrategy, diffusion.Config)
data = common.load_sprites(config.data, dev, config.palette_size, config.seed)
orig = diffusion.ddim_timesteps
s = strategy.schedule
def logsnr_steps(T, steps):
    lam = s["log_snr"].double().cpu()
    target = torch.linspace(float(lam[T - 1]), float(lam[0]), steps, dtype=torch.float64)
    t = torch.tensor([int((lam - v).abs().argmin()) for v in target])
    t[0], t[-1] = T - 1, 0
    for i in range(1, steps):  # strictly decreasing
        if t[i] >= t[i - 1]: t[i] = t[i - 1] - 1
    return t
def quad_steps(T, steps):
    u = torch.linspace(1, 0, steps, dtype=torch.float64) ** 2
    t = (u * (T - 1)).round().long()
    for i in range(1, steps):
        if t[i] >= t[i - 1]: t[i] = t[i - 1] - 1
    return t
def power_steps(p):
    def f(T, steps):
        u = torch.linspace(1, 0, steps, dtype=torch.float64)
        t = ((1 - (1 - u) ** p) * (T - 1)).round().long()
        for i in range(1, steps):
            if t[i] >= t[i - 1]: t[i] = t[i - 1] - 1
        return t
    return f
variants = [a.split(":") for a in sys.argv[1:]]
for sampler, steps, spacing in variants:
    diffusion.ddim_timesteps = {"uniform": orig, "logsnr": logsnr_steps, "quad": quad_steps}.get(spacing) or power_steps(float(spacing[1:]))
    strategy.config.sampler, strategy.config.steps = sampler, int(steps)
    t0 = time.perf_counter()
    x = common.draw_samples(strategy, model, 256, 1, dev, False)
    sec = time.perf_counter() - t0
    m = common.sprite_metrics(x, data.train, palette)
    print(f"{sampler:6} {steps:>3} {spacing:8} " + " ".join(f"{k} {v:.3f}" for k, v in m.items()) + f" | {sec:.1f}s", flush=True)

"""Two sampler levers tried on the default checkpoint (compare-b27's diffusion run), not adopted (tutorial 04):

  eta > 0   stochastic DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Sec. 5, the SDE solver): each step keeps
            e^{-eta h} of the ODE's x-term and adds fresh noise to make up the variance,
              x_i = sigma_i / sigma_{i-1} e^{-eta h} x_{i-1} + alpha_i (1 - e^{-(1 + eta) h}) D_i
                    + sigma_i sqrt(1 - e^{-2 eta h}) z,        z ~ N(0, I);   eta = 0 is diffusion.py's ODE step
            (the second-order D_i kept as the ODE's: an approximation of the paper's 2M SDE coefficients);
  pg > 0    particle guidance (Corso et al. 2024, arXiv 2310.13102): the batch's samples repel each other. Here on
            the data prediction x0 at the levels t >= pg_lo (a departure: the paper moves x_t), with an RBF
            kernel k_ij = exp(-|x0_i - x0_j|^2 / h), h = median |x0_i - x0_j|^2 / ln n (their choice), and
              x0_i <- x0_i + pg / n sum_j k_ij 2 (x0_i - x0_j) / h       (minus the kernel's gradient: downhill in
                                                                          the batch's total similarity)
Every other line is diffusion.py's sample_dpm_pp on the EDM path (the default).

Run from the repository root:  python docs/results/diffusion/levers-b29/samplers.py SEEDS NAME@OVERRIDES@LEVERS ...
e.g. python docs/results/diffusion/levers-b29/samplers.py 1-6 'pg200@{}@{"pg": 200, "pg_lo": 0.5}'
Prints mean ± sd over the seeds of each metric, and writes samplers-SEEDS.json beside itself (every row).
"""
import json
import statistics as st
import sys
import types
from pathlib import Path

sys.path.insert(0, ".")
import torch  # noqa: E402

import common  # noqa: E402
import compare  # noqa: E402
import diffusion  # noqa: E402

CHECKPOINT = "runs/c27/diffusion/checkpoints/last.pt"  # compare-b27's --out runs/c27
KEYS = ["precision", "recall", "coverage", "density", "one_colour_rate", "near_copy_rate", "palette_distance"]


def sampler(eta: float = 0.0, pg: float = 0.0, pg_lo: float = 0.0):
    @torch.inference_mode()
    def sample_dpm_pp(self, model, n, generator, steps, frames=None):
        device = generator.device
        sig = diffusion.edm_sigmas(steps, device)  # (steps,) 80 ... 0.002
        tau, alpha, sigma, lam = sig / (1 + sig) * (self.T - 1), 1 / (1 + sig), sig / (1 + sig), -sig.log()
        x = torch.randn(n, 3, 16, 16, generator=generator, device=device) * sigma[0]
        x0_prev = h_prev = None
        for i in range(steps):
            x0 = self.x0_from_eps(x, tau[i].expand(n), self.eps_theta(model, x, tau[i].expand(n)), clip=False)
            if pg > 0 and float(tau[i]) / (self.T - 1) >= pg_lo:
                f = x0.flatten(1)  # (n, 768)
                d2 = torch.cdist(f, f) ** 2  # (n, n)
                h_bw = d2.median() / max(1.0, float(torch.log(torch.tensor(float(n)))))
                k = torch.exp(-d2 / h_bw)  # (n, n)
                x0 = (f + pg / n * (k[:, :, None] * (f[:, None] - f[None])).sum(1) * 2 / h_bw).view_as(x0)
            if i == steps - 1:
                return x0
            h = lam[i + 1] - lam[i]
            d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            x = sigma[i + 1] / sigma[i] * torch.exp(-eta * h) * x - alpha[i + 1] * torch.expm1(-(1 + eta) * h) * d
            if eta > 0:
                z = torch.randn(x.shape, generator=generator, device=device)
                x = x + sigma[i + 1] * (-torch.expm1(-2 * eta * h)).sqrt() * z
            x0_prev, h_prev = x0, h
    return sample_dpm_pp


def main() -> None:
    device = torch.device("cpu")
    data = common.load_sprites(common.TrainConfig.data, device)
    lo, hi = (int(v) for v in sys.argv[1].split("-"))
    out = {}
    for spec in sys.argv[2:]:
        name, overrides, levers = spec.split("@")
        strategy, model, palette, _, _ = common.load_for_sampling(CHECKPOINT, device, *compare.MODELS["diffusion"],
                                                                  json.loads(overrides))
        if json.loads(levers):
            strategy.sample_dpm_pp = types.MethodType(sampler(**json.loads(levers)), strategy)
        rows = [common.sprite_metrics(common.draw_samples(strategy, model, 256, s, device), data.train, palette)
                for s in range(lo, hi + 1)]
        out[name] = rows
        print(f"| {name} | " + " | ".join(f"{st.mean(r[k] for r in rows):.3f} ± {st.stdev(r[k] for r in rows):.3f}"
                                          for k in KEYS) + " |", flush=True)
    path = Path(__file__).with_name(f"samplers-{sys.argv[1]}.json")
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Training cost per sprite of the default U-Net against four variants, interleaved in one process, so only the
ratios mean anything. Run from the repository root:  python docs/results/diffusion/levers-b30/speed.py
Each variant's epoch count for a run in the default's time is 520 x (its speed against the default)."""
import statistics
import sys
import time

sys.path.insert(0, ".")
import torch  # noqa: E402

import common  # noqa: E402
import diffusion  # noqa: E402

VARIANTS = {"default": {}, "batch64": dict(batch_size=64), "mult122": dict(channel_mult="1,2,2"),
            "selfcond": dict(self_cond=True), "base32": dict(base_channels=32)}


def main() -> None:
    torch.set_num_threads(2)
    data = common.load_sprites(common.TrainConfig.data, torch.device("cpu"))
    setups = {}
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        cfg = diffusion.Config(**kw)
        strategy = diffusion.DiffusionStrategy(cfg, data.palette)
        model = strategy.build_model(cfg)
        setups[name] = (strategy, model, torch.optim.AdamW(model.parameters(), lr=1e-3), cfg.batch_size,
                        sum(p.numel() for p in model.parameters()))
    times = {name: [] for name in setups}
    for rep in range(13):  # round 0 warms up and is dropped
        for name, (strategy, model, opt, bs, _) in setups.items():
            batch = data.train[:bs]
            t0 = time.perf_counter()
            for _ in range(64 // bs * 3):  # the same 192 sprites per round for every variant
                loss = strategy.train_step(model, batch)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            if rep:
                times[name].append((time.perf_counter() - t0) / 192)
    # The median round, not the fastest: --self-cond adds its extra forward pass to a random half of the steps, and the
    # fastest round would be one where few of them happened.
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in med.items():
        print(f"{name:8} params {setups[name][4]:>9,}  {m * 1e3:.2f} ms per sprite  speed {med['default'] / m:.2f}x"
              f"  -> {520 * med['default'] / m:.0f} epochs in the default's time")


if __name__ == "__main__":
    main()

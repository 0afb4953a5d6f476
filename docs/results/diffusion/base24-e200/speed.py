"""Training cost per sprite of U-Net variants, interleaved in one process (ratios only; the machine was shared).
    PYTHONPATH=. python docs/results/diffusion/base24-e200/speed.py THREADS
The probe behind base24-e200 ran with 1 thread and more variants (channel_mult 1,2,2, res_blocks 1, batch 64):
default 1.00x, mult122 1.11x, rb1 1.62x, b64 1.01x, mult122rb1 1.92x, base24 1.83x (load average ~8)."""
import sys, time, torch, common, diffusion, dataclasses
torch.set_num_threads(int(sys.argv[1]))
dev = torch.device("cpu")
data = common.load_sprites("data/sprites-colored.npz", dev)
variants = {"default": {}, "base24": dict(base_channels=24)}
setups = {}
for name, kw in variants.items():
    torch.manual_seed(0)
    cfg = diffusion.Config(**kw)
    st = diffusion.DiffusionStrategy(cfg, data.palette)
    m = st.build_model(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    setups[name] = (st, m, opt, cfg.batch_size, sum(p.numel() for p in m.parameters()))
times = {k: [] for k in setups}
for rep in range(6):
    for name, (st, m, opt, bs, _) in setups.items():
        batch = data.train[:bs]
        t0 = time.perf_counter()
        for _ in range(3):
            loss = st.train_step(m, batch)["loss"]; opt.zero_grad(); loss.backward(); opt.step()
        if rep: times[name].append((time.perf_counter() - t0) / (3 * bs))
base = min(times["default"])
for name, ts in times.items():
    print(f"{name:12} params {setups[name][4]:>9,} s/img {min(ts)*1e3:.2f} ms  speed vs default {base/min(ts):.2f}x")

"""Score checkpoints with one protocol: 256 samples, seed 1 (compare.py's), the checkpoint's own sampler, common.sprite_metrics."""
import sys, torch, common, compare, diffusion, json
torch.set_num_threads(int(sys.argv[1]))
dev = torch.device("cpu")
for ck in sys.argv[2:]:
    st, m, pal, cfg, _ = common.load_for_sampling(ck, dev, diffusion.DiffusionStrategy, diffusion.Config)
    data = common.load_sprites(cfg.data, dev, cfg.palette_size, cfg.seed)
    x = common.draw_samples(st, m, 256, 1, dev, False)
    met = common.sprite_metrics(x, data.train, pal)
    state = common.load_checkpoint(ck)
    print(json.dumps({"checkpoint": ck, "epoch": state["epoch"], "base_channels": cfg.base_channels, "sampler": f"{cfg.sampler}:{cfg.steps}",
                      **{k: round(v, 4) for k, v in met.items()}}), flush=True)

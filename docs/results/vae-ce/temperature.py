"""The VAE's samples at decoding temperatures 0 (argmax, the default), 0.5 and 1, scored with
common.sprite_metrics on 256 samples (seed 2, as the run's own end-of-run scores).

    OMP_NUM_THREADS=1 python docs/results/vae-ce/temperature.py runs/vae-ce/checkpoints/last.pt

Prints one JSON line per temperature. Evidence for tutorial 02, not part of the library."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import compare  # noqa: E402
import vae  # noqa: E402

device = torch.device("cpu")
for t in (0.0, 0.5, 1.0):
    strategy, model, palette, config, _ = common.load_for_sampling(sys.argv[1], device, vae.VAEStrategy, vae.Config, {"temperature": t})
    data = common.load_sprites(config.data, device, config.palette_size, config.seed)
    x = common.draw_samples(strategy, model, 256, 2, device)
    print(json.dumps({"temperature": t, **{k: round(v, 4) for k, v in common.sprite_metrics(x, data.train, palette).items()}}))

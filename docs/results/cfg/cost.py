"""What conditioning costs per training step: the unconditional and the colour-conditioned
U-Net of the sweep runs (same flags), one optimizer step each on the same batch of 32 real
sprites, interleaved (u, c, u, c, ...) so that other processes slow both alike; the median
of each. Run from the repository root: python docs/results/cfg/cost.py
(the label's cost, computing y from the batch, is inside the conditional step)."""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch

import common
import diffusion

FLAGS = dict(base_channels=16, channel_mult="1,2,4", res_blocks=1, schedule="cosine", prediction="v",
             device="cpu", mlflow=False)
data = common.load_sprites("data/sprites-colored.npz", torch.device("cpu"))
batch = data.train[:32]
steps = {}
for condition in ("none", "colour"):
    torch.manual_seed(0)
    config = diffusion.Config(**FLAGS, condition=condition)
    strategy = diffusion.DiffusionStrategy(config, data.palette)
    model = strategy.build_model(config)
    steps[condition] = (strategy, model, torch.optim.AdamW(model.parameters(), lr=1e-3))


def step(strategy, model, optimizer):
    t0 = time.perf_counter()
    loss = strategy.train_step(model, batch)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


times = {k: [] for k in steps}
for _ in range(3):  # warm-up
    for k in steps:
        step(*steps[k])
for _ in range(40):
    for k in steps:
        times[k].append(step(*steps[k]))
u, c = statistics.median(times["none"]), statistics.median(times["colour"])
print(f"threads {torch.get_num_threads()}, 40 interleaved steps each, batch 32")
print(f"unconditional median {u * 1000:.1f} ms/step, colour-conditioned median {c * 1000:.1f} ms/step, ratio {c / u:.3f}")

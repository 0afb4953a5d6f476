"""Every sprite metric of one checkpoint over sampling seeds LO-HI, 256 samples each, mean ± sd and per seed.
Run from the repository root:  python docs/results/diffusion/levers-b29/batch16-e460/score.py CKPT FAMILY LO-HI OUT.json [OVERRIDES]"""
import json
import statistics as st
import sys

sys.path.insert(0, ".")
import torch  # noqa: E402

import common  # noqa: E402
import compare  # noqa: E402

KEYS = ["precision", "recall", "coverage", "density", "one_colour_rate", "near_copy_rate", "palette_distance"]


def main() -> None:
    ckpt, family, seeds, out = sys.argv[1:5]
    overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    lo, hi = (int(v) for v in seeds.split("-"))
    device = torch.device("cpu")
    data = common.load_sprites(common.TrainConfig.data, device)
    strategy, model, palette, _, _ = common.load_for_sampling(ckpt, device, *compare.MODELS[family], overrides)
    rows = [common.sprite_metrics(common.draw_samples(strategy, model, 256, s, device), data.train, palette)
            for s in range(lo, hi + 1)]
    print(f"| {family} {overrides} seeds {seeds} | "
          + " | ".join(f"{st.mean(r[k] for r in rows):.3f} ± {st.stdev(r[k] for r in rows):.3f}" for k in KEYS) + " |")
    print("per seed:", {k: [round(r[k], 3) for r in rows] for k in KEYS})
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

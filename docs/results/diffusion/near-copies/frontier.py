"""Precision against near-copy rate for every diffusion setting scored over 6 sampling seeds (../seeds-b25/*.json):
issue 23 asks for precision >= 0.75 and near copies <= 0.02 at once. Writes frontier.png beside itself."""
import json, os, statistics as st, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
sys.path.insert(0, ".")
import torch, common

here = Path(__file__).parent
data = common.load_sprites(common.TrainConfig.data, torch.device("cpu"))
real = common.sprite_metrics(data.val, data.train, data.palette)["near_copy_rate"]  # the comparison table's real row
family = lambda name: "cosine (earlier default)" if name.startswith("default") and "b26" not in name else \
    "rectified flow" if name.startswith("flow") else "EDM, --res-blocks 1" if name.startswith("rb1") else "EDM"
colours = {"cosine (earlier default)": "tab:grey", "rectified flow": "tab:orange", "EDM": "tab:blue",
           "EDM, --res-blocks 1": "tab:green"}
NAMED = {"default-b26": "the two-block default (compare-b26)", "default": "the cosine default before it", "flow-w2": "flow 200 ep, w 2", "flow300-w1.5": "flow 300 ep, w 1.5",
         "rb1-e450": "--res-blocks 1, 450 ep, w 2.5", "rb1-e520": "--res-blocks 1, 520 ep (the new default)",
         "drop0.2-w2.5": "--dropout 0.2", "default-w1": "cosine, w 1"}
fig, ax = plt.subplots(figsize=(8, 5.5))
print("| setting (file) | precision | near_copy_rate |")
for f in sorted((here.parent / "seeds-b25").glob("seeds*.json")):
    for name, rows in json.load(open(f)).items():
        p, c = [r["precision"] for r in rows], [r["near_copy_rate"] for r in rows]
        fam = family(name)
        ax.errorbar(st.mean(c), st.mean(p), xerr=st.stdev(c), yerr=st.stdev(p), fmt="o", color=colours[fam],
                    alpha=0.8, capsize=2, label=fam)
        if name in NAMED:
            ax.annotate(NAMED[name], (st.mean(c), st.mean(p)), fontsize=7, textcoords="offset points",
                        xytext=(4, 6) if name == "rb1-e520" else (-118, -12) if name.startswith("rb1") else (4, -10))
        print(f"| {name} ({f.name}) | {st.mean(p):.3f} ± {st.stdev(p):.3f} | {st.mean(c):.3f} ± {st.stdev(c):.3f} |")
ax.axhline(0.75, color="k", lw=0.8, ls="--")
ax.axvline(0.02, color="k", lw=0.8, ls="--")
ax.axvspan(-0.005, 0.02, ymin=0, ymax=1, color="tab:green", alpha=0.05)
ax.axvline(real, color="tab:red", lw=0.8)
ax.text(real, 0.70, f" the held-out\n validation sprites:\n {real:.3f} are within\n 3 pixels of a\n training sprite", color="tab:red",
        fontsize=7)
ax.text(0.0205, 0.835, "targets: precision >= 0.75,\nnear copies <= 0.02 (upper left)", fontsize=7)
handles, labels = ax.get_legend_handles_labels()
keep = dict(zip(labels, handles))
ax.legend(keep.values(), keep.keys(), fontsize=8, loc="lower center")
ax.set_xlabel("near_copy_rate (mean over sampling seeds 1-6, bars: sd)")
ax.set_ylabel("precision (mean over sampling seeds 1-6, bars: sd)")
ax.set_title("Diffusion on 16x16 sprites: precision rises with near copies", fontsize=10)
ax.set_xlim(-0.005, max(0.06, real + 0.01)); ax.set_ylim(0.5, 0.86)
fig.tight_layout()
fig.savefig(here / "frontier.png", dpi=120)
print(f"real validation sprites' near_copy_rate: {real:.3f}; wrote {os.path.relpath(here / 'frontier.png')}")

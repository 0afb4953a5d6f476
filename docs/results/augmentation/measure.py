"""What common augmentations do to pixel-art sprites (tutorial 01, "Augmentation").

Run from the repository root after `python download.py`:
    python docs/results/augmentation/measure.py > docs/results/augmentation/log.txt
Prints one line per transform and writes metrics.json next to this file:
    <transform>/off_palette  fraction of pixels more than 8 RGB units from every palette colour
    <transform>/pieces       8-connected foreground pieces per sprite (lines that break or merge change it)
and the share of sprites drawn in each colour, for what a palette swap would change.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

x = np.load("data/sprites-colored.npz")["images"]  # (873, 16, 16, 3) uint8
palette = np.unique(x.reshape(-1, 3), axis=0).astype(int)  # (8, 3): black and the 7 sheet colours


def off_palette(y):
    return float((np.abs(y.reshape(-1, 1, 3).astype(int) - palette[None]).max(-1).min(-1) > 8).mean())


def pieces(y):
    total = 0
    for fg in y.max(-1) > 0:
        seen = np.zeros_like(fg)
        for i, j in zip(*np.nonzero(fg)):
            if seen[i, j]:
                continue
            total, stack, seen[i, j] = total + 1, [(i, j)], True
            while stack:
                a, b = stack.pop()
                for u in (a - 1, a, a + 1):
                    for v in (b - 1, b, b + 1):
                        if 0 <= u < 16 and 0 <= v < 16 and fg[u, v] and not seen[u, v]:
                            seen[u, v] = True
                            stack.append((u, v))
    return total / len(y)


TRANSFORMS = {
    "none": lambda im: im,
    "mirror": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    "rotate90": lambda im: im.transpose(Image.ROTATE_90),
    "rotate15_bilinear": lambda im: im.rotate(15, Image.BILINEAR),
    "rotate15_nearest": lambda im: im.rotate(15, Image.NEAREST),
    "crop14_resize16": lambda im: im.crop((1, 1, 15, 15)).resize((16, 16), Image.BILINEAR),
    "blur0.5": lambda im: im.filter(ImageFilter.GaussianBlur(0.5)),
    "brightness1.1": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
}
figures = {}
for name, op in TRANSFORMS.items():
    y = np.stack([np.asarray(op(Image.fromarray(s))) for s in x])
    figures[f"{name}/off_palette"], figures[f"{name}/pieces"] = off_palette(y), pieces(y)
    print(f"{name:18s} off-palette pixels {figures[f'{name}/off_palette']:.3f}  pieces per sprite {figures[f'{name}/pieces']:.2f}")
figures["mirror_symmetric"] = float(np.mean([(s == s[:, ::-1]).all() for s in x]))
for c in palette[1:]:
    figures[f"sprites_in/{tuple(int(v) for v in c)}".replace(" ", "")] = float(np.mean([(s == c).all(-1).any() for s in x]))
print(" ".join(f"{k} {v:.3f}" for k, v in figures.items() if not k.split("/")[-1] in ("off_palette", "pieces")))
(Path(__file__).parent / "metrics.json").write_text(json.dumps(figures, indent=2) + "\n")

"""Width 32 with GroupNorm at 8 groups instead of gcd(32, channels), for one experiment: diffusion.group_norm is
replaced before any U-Net is built, in training and in scoring alike (the checkpoint's weights have the same shapes
either way, so scoring it without this patch would silently use the wrong groups). Run from the repository root:
    python docs/results/diffusion/levers-b30/base32-groups8-e365/groups8.py train DIFFUSION_FLAGS...
    python docs/results/diffusion/levers-b30/base32-groups8-e365/groups8.py score CKPT diffusion LO-HI OUT.json [OVERRIDES]"""
import math
import runpy
import sys

sys.path.insert(0, ".")
import torch.nn as nn  # noqa: E402

import diffusion  # noqa: E402

SCORE = "docs/results/diffusion/levers-b29/batch16-e460/score.py"
# width 32: 8 groups of 4 channels at 16x16, 8 of 8 at 8x8, 8 of 16 at 4x4 (today: 32 groups of 1, of 2, of 4)
diffusion.group_norm = lambda channels: nn.GroupNorm(math.gcd(8, channels), channels)

if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "train":
        diffusion.main(rest)
    else:
        sys.argv = [SCORE, *rest]
        runpy.run_path(SCORE, run_name="__main__")

"""The per-epoch history of a vqvae.py run, from its checkpoint, as the files
tutorial 03 quotes (run from the repository root):

    python docs/results/vqvae/history.py runs/<run> docs/results/<run>

writes docs/results/<run>/history.json (one object per epoch: the validation
figures of stage 1 and the prior's NLL of stage 2) and curve.json (the figures
the tutorial reads off that history, so `python compare.py report` can put
them in its tables). The history is the one the Trainer keeps in every
checkpoint (`history`), so this reads nothing that the run did not record.
"""
import json
import sys
from pathlib import Path

import torch

KEYS = ("val/pixel_acc", "val/codebook_usage", "val/perplexity", "val/dead_codes", "val/restarted",
        "val/bits_per_code", "train/bits_per_code")
USAGE_AT = (1, 25, 50, 100, 120, 200, 300, 500)  # the epochs tutorial 03's usage table shows


def main(run: str, out: str) -> None:
    state = torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=True)
    stage1 = state["config"]["epochs"]  # epochs 1..stage1 train the VQ-VAE, the rest the prior
    history = [{"epoch": h["epoch"], **{k: h[k] for k in KEYS if k in h}} for h in state["history"]]
    short = [{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in h.items()} for h in history]
    by_epoch = {h["epoch"]: h for h in history}
    s1 = [h for h in history if h["epoch"] <= stage1]
    s2 = [h for h in history if h["epoch"] > stage1 and "val/bits_per_code" in h]
    curve = {"stage1_epochs": stage1, "prior_epochs": len(s2)}
    curve.update({f"usage_at_{e}": by_epoch[e]["val/codebook_usage"] for e in USAGE_AT if e <= stage1 and e in by_epoch})
    for e in sorted({120, 200, stage1}):
        if e <= stage1 and e in by_epoch:
            curve.update({f"pixel_acc_at_{e}": by_epoch[e]["val/pixel_acc"],
                          f"perplexity_at_{e}": by_epoch[e]["val/perplexity"]})
    best = max(s1, key=lambda h: h["val/pixel_acc"])
    curve.update(pixel_acc_max=best["val/pixel_acc"], pixel_acc_max_epoch=best["epoch"],
                 perplexity_at_end=s1[-1]["val/perplexity"], usage_at_end=s1[-1]["val/codebook_usage"])
    restarted = [h for h in s1 if h.get("val/restarted", 0) > 0]
    curve.update(restarts_total=int(sum(h["val/restarted"] for h in restarted)),
                 last_restart_epoch=restarted[-1]["epoch"] if restarted else 0)
    if s2:
        low = min(s2, key=lambda h: h["val/bits_per_code"])
        curve.update(prior_bits_min=low["val/bits_per_code"], prior_bits_min_prior_epoch=low["epoch"] - stage1,
                     prior_bits_end=s2[-1]["val/bits_per_code"], prior_train_bits_end=s2[-1]["train/bits_per_code"])
    curve["train_seconds"] = state["train_seconds"]
    Path(out).mkdir(parents=True, exist_ok=True)
    # one epoch per line, 6 significant digits: readable in a diff, and small
    (Path(out) / "history.json").write_text("[\n" + ",\n".join(json.dumps(h) for h in short) + "\n]\n")
    (Path(out) / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    print(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

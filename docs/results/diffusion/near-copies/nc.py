"""Which training sprites do the default's near copies copy, and are those sprites duplicated in the data?
Also writes copies.png beside itself: each near copy (left) beside the training sprite it copies (right), 8 pairs a row."""
import sys, collections
sys.path.insert(0, ".")
import torch, common, compare
device = torch.device("cpu")
data = common.load_sprites(common.TrainConfig.data, device)
ckpt = sys.argv[1]
strategy, model, palette, _, _ = common.load_for_sampling(ckpt, device, *compare.MODELS["diffusion"], {})
q = lambda t: (t * 255).round().to(torch.int16).flatten(1).view(t.shape[0], 3, 256)
ref = common.snap_to_palette(data.train.float(), palette)
val = common.snap_to_palette(data.val.float(), palette)
R = q(ref)
def diffs(x):  # (n, M) pixels differing from each training sprite
    X = q(x)
    return torch.stack([(X[i][None] != R).any(1).sum(1) for i in range(len(X))])
dref = diffs(ref); dref.fill_diagonal_(999)
has_dup = (dref <= 3).any(1)
print(f"training sprites with another training sprite within 3 pixels: {int(has_dup.sum())} of {len(ref)} ({has_dup.float().mean():.3f})")
dval = diffs(val)
print(f"validation sprites within 3 pixels of a training sprite: {int((dval.min(1).values <= 3).sum())} of {len(val)}")
fg = lambda x: ((x - palette[common.background_index(palette)][None, :, None, None]).abs().sum(1) > 1e-6).float().mean((1, 2))
copies, hit, pairs = 0, collections.Counter(), []
N = 0
for seed in range(1, 7):
    x = common.snap_to_palette(common.draw_samples(strategy, model, 256, seed, device), palette)
    d = diffs(x); m, j = d.min(1)
    for i, jj in zip((m <= 3).nonzero().flatten().tolist(), j[m <= 3].tolist()):
        hit[jj] += 1
        pairs += [x[i], ref[jj]]
    copies += int((m <= 3).sum()); N += len(x)
js = list(hit)
print(f"near copies: {copies} of {N} ({copies / N:.3f}); distinct training sprites copied: {len(js)}")
print(f"of the copied sprites, with a near-duplicate in the training set: {int(has_dup[js].sum())} of {len(js)} "
      f"(training set overall {has_dup.float().mean():.3f})")
print(f"foreground share, copied sprites: {fg(ref[js]).mean():.3f}, all training sprites: {fg(ref).mean():.3f}")
print("most copied:", hit.most_common(8))
path = common.save_png(common.make_grid(torch.stack(pairs), nrow=16), __file__.replace("nc.py", "copies.png"))
print(f"wrote {len(pairs) // 2} pairs (sample, training sprite) to copies.png")

# Run at commit 91248c3 only (its x0_from_eps had no clip argument): side_by_side.py with sample_dpm_pp's clipping off.
# run side_by_side.py with dpm++'s x0 clipping off (an experiment, not committed)
import sys, runpy
sys.path.insert(0, ".")
import diffusion
def x0_from_eps(self, x_t, t, eps):
    a, b = self._coef(t)
    return (x_t - b * eps) / a
diffusion.DiffusionStrategy.x0_from_eps = x0_from_eps
sys.argv = ["side_by_side.py"] + sys.argv[1:]
runpy.run_path("docs/results/diffusion/sampling/side_by_side.py", run_name="__main__")

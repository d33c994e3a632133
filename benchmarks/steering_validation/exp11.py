"""Session 4: the artifact with the detector gate (runs/steer-gate2), SafeFlow over the whole
generation (first_n >= max_new_tokens) at 48 new tokens, harmful and benign validation requests."""
from common import *
from strict import strict, broken
import numpy as np
from sapguard.steer.generate import generate
from sapguard.steer.artifact import load_steering
t0 = time.time()
gate = load_steering(sys.argv[1])
H_va = pool("validation", False, 24)
B_va = pool("validation", True, 24)
base_b = [g.response for g in generate(lm, B_va, gate, "detect", max_new_tokens=48, batch_size=24)]
out = {}
for spec in sys.argv[2:]:
    mode, val, fn = spec.split(":")
    opts = {"margin": float(val)} if mode == "safeflow" else {"alpha": float(val)}
    gens = generate(lm, H_va, gate, mode, max_new_tokens=48, batch_size=24, first_n=int(fn), mode_options=opts)
    ho = [g.response for g in gens]
    gb = generate(lm, B_va, gate, mode, max_new_tokens=48, batch_size=24, first_n=int(fn), mode_options=opts)
    out[spec] = {"harmful": ho, "benign": [g.response for g in gb]}
    print(spec, "judge", round(sum(map(judge, ho)) / 24, 3), "strict", round(sum(map(strict, ho)) / 24, 3), "coherent strict", round(sum(strict(o) and not broken(o) for o in ho) / 24, 3), "broken", round(sum(map(broken, ho)) / 24, 3),
          "fired", sum(g.summary.prompt_fired or g.summary.fired_steered > 0 for g in gens),
          "benign fired", sum(g.summary.prompt_fired or g.summary.fired_steered > 0 for g in gb),
          "benign identical", sum(a == b.response for a, b in zip(base_b, gb)),
          "edit norm", round(float(np.mean([g.summary.mean_edit_norm for g in gens if g.summary.edited_tokens] or [0])), 1), round(time.time() - t0), flush=True)
json.dump(out, open(f"exp11-{int(time.time())}.json", "w"), indent=1)

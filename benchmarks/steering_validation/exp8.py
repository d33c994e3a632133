from common import *
from strict import strict, broken
import numpy as np
from sapguard.steer.generate import generate
from sapguard.steer.artifact import load_steering
t0 = time.time()
art = sys.argv[1]
gate = load_steering(art)
H_va, B_va = pool("validation", False, 24), pool("validation", True, 24)
out = {}
for mode in [None] + sys.argv[2:]:
    gens = generate(lm, H_va + B_va, gate if mode else None, mode, max_new_tokens=24, batch_size=24)
    h, b = gens[:24], gens[24:]
    ho = [g.response for g in h]
    out[mode or "base"] = [g.response for g in gens]
    fired_b = sum(g.summary.prompt_fired or g.summary.fired_steered > 0 for g in b) if mode else 0
    fired_h = sum(g.summary.prompt_fired or g.summary.fired_steered > 0 for g in h) if mode else 0
    same_b = sum(g.response == r for g, r in zip(b, out["base"][24:]))
    print(mode or "base", "harm judge", round(sum(map(judge, ho)) / 24, 3), "strict", round(sum(map(strict, ho)) / 24, 3), "coherent strict", round(sum(strict(o) and not broken(o) for o in ho) / 24, 3),
          "fired harm", fired_h, "fired benign", fired_b, "benign identical", same_b, "benign refusals", sum(judge(g.response) for g in b),
          "edit norm", round(float(np.mean([g.summary.mean_edit_norm for g in h if g.summary.edited_tokens] or [0])), 1),
          "cos", round(float(np.mean([g.summary.mean_edit_cosine for g in h if g.summary.edited_tokens] or [0])), 3), round(time.time() - t0), flush=True)
json.dump(out, open("exp8.json", "w"), indent=1)

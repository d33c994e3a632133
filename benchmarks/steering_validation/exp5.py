from common import *
import numpy as np
from sapguard.polytope.artifact import load_polytope
from sapguard.steer.generate import generate
from sapguard.steer.modes import SafeFlow
from sapguard.bench.judges import DegenerationJudge
deg = DegenerationJudge()
t0 = time.time()
L = 16
d2 = torch.load("dirs2.pt")
tnb = load_polytope("target4_nb_L16"); tb = load_polytope("target3_L16")
u = d2["dirs"][("traj", L)]; un = u / u.norm()
H_va = pool("validation", False, 24)
out = {}
for tname, T, eps, N in (("b", tb, 2.0, 8), ("nb", tnb, 2.0, 16), ("nb", tnb, 3.0, 8), ("b", tb, 3.0, 8), ("b", tb, 2.0, 16)):
    mode = SafeFlow(margin=eps, max_steps=50, basis=un[None])
    gens = generate(lm, H_va, T, mode, tokens="first_n", first_n=N, threshold=-1e9, gate="prompt", max_new_tokens=24, batch_size=24)
    outs = [x.response for x in gens]
    out[f"{tname}-{eps}-{N}"] = outs
    norms = [x.summary.mean_edit_norm for x in gens]
    rate = sum(map(judge, outs)) / len(outs); dg = sum(deg(o) for o in outs) / len(outs)
    print(tname, "eps", eps, "first_n", N, "refusal", round(rate, 3), "degen", round(dg, 3), "edit norm", round(float(np.mean(norms)), 1), "edited", sum(x.summary.edited_tokens for x in gens), round(time.time() - t0), flush=True)
json.dump(out, open("exp5.json", "w"), indent=1)

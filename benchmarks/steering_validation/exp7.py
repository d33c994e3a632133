from common import *
from strict import strict, broken
import numpy as np
from sapguard.polytope.artifact import load_polytope
from sapguard.steer.generate import generate
from sapguard.steer.modes import SafeFlow
t0 = time.time()
L = 16
d2 = torch.load("dirs2.pt")
tnb = load_polytope("target4_nb_L16")
u = d2["dirs"][("traj", L)]; un = u / u.norm()
H_va = pool("validation", False, 24)
out = {}
def report(name, outs, extra=""):
    out[name] = outs
    print(name, "judge", round(sum(map(judge, outs)) / 24, 3), "strict", round(sum(map(strict, outs)) / 24, 3), "strict&!broken", round(sum(strict(o) and not broken(o) for o in outs) / 24, 3), "broken", round(sum(map(broken, outs)) / 24, 3), extra, round(time.time() - t0), flush=True)
for eps, N in [tuple(map(float, a.split(":"))) for a in sys.argv[1:]]:
    N = int(N)
    gens = generate(lm, H_va, tnb, SafeFlow(margin=eps, max_steps=50, basis=un[None]), tokens="first_n", first_n=N, threshold=-1e9, gate="prompt", max_new_tokens=24, batch_size=24)
    report(f"sf-{eps}-{N}", [x.response for x in gens], f"norm {np.mean([x.summary.mean_edit_norm for x in gens]):.1f}")
json.dump(out, open("exp7.json", "w"), indent=1)

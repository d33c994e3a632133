from common import *
import numpy as np, itertools
from sapguard.polytope.train import TrainConfig, train_polytope
from sapguard.polytope.artifact import save_polytope, load_polytope
from sapguard.steer.generate import generate
from sapguard.steer.modes import SafeFlow
from sapguard.bench.judges import DegenerationJudge
deg = DegenerationJudge()
t0 = time.time()
L = 16; N = 8
d = torch.load("states1.pt"); d2 = torch.load("dirs2.pt")
own = d["own"]
sr, jr, sc, jc = d2["sr"][L], d2["jr"], d2["sc"][L], d2["jc"]
own_ref = [judge(o) for o in own]
X = torch.cat([sr[torch.tensor([j >= 1 for _, j in jr])], sc[torch.tensor([not own_ref[i] for i, _ in jc])]])
g = np.array([i for i, j in jr if j >= 1] + [i for i, _ in jc if not own_ref[i]])
y = np.array([0] * int(sum(j >= 1 for _, j in jr)) + [1] * (len(g) - int(sum(j >= 1 for _, j in jr))))
va = (g % 6) == 0
meta = {"layer": L, "policy": "last_prompt", "template": template, "base_model": lm.identity()}
res = train_polytope(X[torch.from_numpy(~va)], y[~va], X[torch.from_numpy(va)], y[va], TrainConfig(), meta=meta)
tnb = res.polytope
save_polytope(tnb, "target4_nb_L16")
print("no-benign target", res.polytope.meta.get("history", [{}])[-1], time.time() - t0, flush=True)
tb = load_polytope("target3_L16")
u = d2["dirs"][("traj", L)]; un = u / u.norm()
H_va = pool("validation", False, 24)
for name, target in (("nb", tnb), ("b", tb)):
    for eps in (0.5, 1.0, 2.0, 4.0):
        mode = SafeFlow(margin=eps, max_steps=50, basis=un[None])
        gens = generate(lm, H_va, target, mode, tokens="first_n", first_n=N, threshold=-1e9, gate="prompt", max_new_tokens=24, batch_size=24)
        outs = [x.response for x in gens]
        norms = [x.summary.mean_edit_norm for x in gens]
        rate = sum(map(judge, outs)) / len(outs); dg = sum(deg(o) for o in outs) / len(outs)
        print("target", name, "eps", eps, "refusal", round(rate, 3), "degen", round(dg, 3), "edit norm", round(float(np.mean(norms)), 1), "edited", sum(x.summary.edited_tokens for x in gens), "|", outs[0][:70].replace("\n", " "), "|", outs[1][:70].replace("\n", " "), round(time.time() - t0), flush=True)

from common import *
import numpy as np, itertools
from sapguard.polytope.train import TrainConfig, train_polytope
from sapguard.steer.generate import generate
from sapguard.steer.modes import SafeFlow
t0 = time.time()
L = int(sys.argv[1]) if len(sys.argv) > 1 else 16
N = 8
d = torch.load("states1.pt"); d2 = torch.load("dirs2.pt")
H_tr, own = d["H_tr"], d["own"]
B_tr = pool("train", True, 48)
encb = [encode_prompt(tok, p, template) for p in B_tr]
bown = gen(B_tr)
sb, jb = states_at([e + tok.encode(o, add_special_tokens=False) for e, o in zip(encb, bown)], [len(e) for e in encb], N, [L])
sr, jr, sc, jc = d2["sr"][L], d2["jr"], d2["sc"][L], d2["jc"]
own_ref = [judge(o) for o in own]
def rows(states, js, safe_fn):
    X, y, g = [], [], []
    for x, (i, j) in zip(states, js):
        lab = safe_fn(i, j)
        if lab is None: continue
        X.append(x); y.append(0 if lab else 1); g.append(i)
    return X, y, g
Xr, yr, gr = rows(sr, jr, lambda i, j: True if j >= 1 else None)
Xc, yc, gc = rows(sc, jc, lambda i, j: own_ref[i])
Xb, yb, gb = rows(sb[L], jb, lambda i, j: True)
X = torch.stack(Xr + Xc + Xb); y = np.array(yr + yc + yb); g = np.array(gr + gc + [1000 + i for i in gb])
va = (g % 6) == 0
meta = {"layer": L, "policy": "last_prompt", "template": template, "base_model": lm.identity()}
res = train_polytope(X[torch.from_numpy(~va)], y[~va], X[torch.from_numpy(va)], y[va], TrainConfig(), meta=meta)
target = res.polytope
print("target trained", time.time() - t0, "val auroc", res.polytope.meta.get("history", [{}])[-1], flush=True)
u = d2["dirs"][("traj", L)]; un = u / u.norm()
torch.save({"target_state": target.state_dict(), "u": u}, f"target3_L{L}.pt")
from sapguard.polytope.artifact import save_polytope
save_polytope(target, f"target3_L{L}")
H_va = pool("validation", False, 24)
with torch.no_grad():
    m = target.margins(X).max(-1).values
print("margins: safe mean", m[torch.from_numpy(y == 0)].mean().item(), "unsafe mean", m[torch.from_numpy(y == 1)].mean().item())
for basis, eps in itertools.product(["u", None], [1.0, 5.0, 20.0]):
    mode = SafeFlow(margin=eps, max_steps=50, basis=un[None] if basis else None)
    gens = generate(lm, H_va, target, mode, tokens="first_n", first_n=N, threshold=0.0, gate="position", max_new_tokens=24, batch_size=24)
    outs = [x.response for x in gens]
    norms = [x.summary.mean_edit_norm for x in gens]
    rate = sum(map(judge, outs)) / len(outs)
    print("basis", basis, "eps", eps, "refusal", round(rate, 3), "edit norm", round(float(np.mean(norms)), 1), "edited", sum(x.summary.edited_tokens for x in gens), "|", outs[0][:70].replace("\n", " "), "|", outs[1][:70].replace("\n", " "), round(time.time() - t0), flush=True)

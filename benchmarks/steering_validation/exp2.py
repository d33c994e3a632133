from common import *
import itertools
t0 = time.time()
d = torch.load("states1.pt")
H_tr, own = d["H_tr"], d["own"]
layers = [8, 12, 16, 20, 24]
ench = [encode_prompt(tok, p, template) for p in H_tr]
rng = random.Random(0)
ref_seqs = [e + tok.encode(rng.choice(REFUSALS), add_special_tokens=False) for e in ench]
own_ids = [e + tok.encode(o, add_special_tokens=False) for e, o in zip(ench, own)]
N = 8
sr, jr = states_at(ref_seqs, [len(e) for e in ench], N, layers)
sc, jc = states_at(own_ids, [len(e) for e in ench], N, layers)
mr = torch.tensor([j >= 1 for _, j in jr]); mc = torch.tensor([j >= 1 for _, j in jc])
dirs = {}
for L in layers:
    dirs[("arditi", L)] = d["g0h"][L].mean(0) - d["g0b"][L].mean(0)
    dirs[("traj", L)] = sr[L][mr].mean(0) - sc[L][mc].mean(0)
    print(L, "norm state", d["g0h"][L].norm(dim=-1).mean().item(), "arditi", dirs[("arditi", L)].norm().item(), "traj", dirs[("traj", L)].norm().item(),
          "cos", torch.nn.functional.cosine_similarity(dirs[("arditi", L)], dirs[("traj", L)], dim=0).item(), flush=True)
torch.save({"dirs": dirs, "sr": sr, "sc": sc, "jr": jr, "jc": jc}, "dirs2.pt")
H_va = pool("validation", False, 24)
base = gen(H_va)
print("base val refusal", sum(map(judge, base)) / 24, time.time() - t0, flush=True)
res = []
for kind, L, alpha, fn in itertools.product(["traj", "arditi"], [8, 12, 16, 20], [1.0, 2.0, 4.0], [8]):
    a = Adder({L: alpha * dirs[(kind, L)]}, fn)
    try:
        outs = gen(H_va)
    finally:
        a.remove()
    rate = sum(map(judge, outs)) / len(outs)
    res.append((kind, L, alpha, fn, rate, outs[:3]))
    print(kind, L, alpha, fn, "refusal", round(rate, 3), "|", outs[0][:80].replace("\n", " "), "|", outs[1][:80].replace("\n", " "), round(time.time() - t0), flush=True)
json.dump(res, open("exp2.json", "w"))

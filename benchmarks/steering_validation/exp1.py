from common import *
t0 = time.time()
H_tr, B_tr = pool("train", False, 48), pool("train", True, 48)
H_va, B_va = pool("validation", False, 24), pool("validation", True, 24)
layers = list(range(4, 29, 2))
# states: gen0 of harmful/benign train; teacher-forced refusal vs own compliance at j=1..7
ench = [encode_prompt(tok, p, template) for p in H_tr]
encb = [encode_prompt(tok, p, template) for p in B_tr]
g0h = states_at(ench, [len(e) for e in ench], 1, layers)
g0b = states_at(encb, [len(e) for e in encb], 1, layers)
own = gen(H_tr)
print("base train harmful refusal rate", sum(map(judge, own)) / len(own), time.time()-t0, flush=True)
rng = random.Random(0)
ref_seqs = [e + tok.encode(rng.choice(REFUSALS), add_special_tokens=False) for e in ench]
own_ids = [e + tok.encode(o, add_special_tokens=False) for e, o in zip(ench, own)]
N = 8
sr = states_at(ref_seqs, [len(e) for e in ench], N, layers)
sc = states_at(own_ids, [len(e) for e in ench], N, layers)
dirs = {}
for L in layers:
    # refusal states at j>=1 (skip j=0 shared) vs compliance at j>=1
    mr = sr[L].view(len(ench), -1, 576)[:, 1:].reshape(-1, 576).mean(0) if sr[L].shape[0] == len(ench)*N else None
    dirs[L] = {"arditi": g0h[L].mean(0) - g0b[L].mean(0)}
torch.save({"g0h": g0h, "g0b": g0b, "sr": sr, "sc": sc, "own": own, "H_tr": H_tr}, "/work/main/runs/exp8/states1.pt")
print("saved", time.time()-t0, flush=True)

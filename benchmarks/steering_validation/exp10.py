from common import *
from strict import strict, broken
import numpy as np
from sapguard.steer.generate import generate
from sapguard.steer.artifact import load_steering, attach_target
from sapguard.polytope.artifact import load_polytope
gate = load_steering("../steer-L16")
H_va = pool("validation", False, 24)
for name in sys.argv[1:]:
    tgt, margin = name.split(":")
    if tgt == "exp":
        attach_target(gate, load_polytope("target4_nb_L16"))
    gens = generate(lm, H_va, gate, "safeflow", max_new_tokens=24, batch_size=24, mode_options={"margin": float(margin)})
    per = {}
    for g in gens:
        for t in g.trace:
            if t.edited: per.setdefault(t.index, []).append(t.edit_norm)
    ho = [g.response for g in gens]
    print(name, "strict", round(sum(map(strict, ho)) / 24, 3), "judge", round(sum(map(judge, ho)) / 24, 3), {k: (len(v), round(float(np.mean(v)), 1)) for k, v in sorted(per.items())}, flush=True)
    for o in ho[:5]: print("   ", o[:90].replace("\n", " "))

"""Profile the steering hook when it never fires: how much of a generate call is the hook's own work.

    OMP_NUM_THREADS=1 python benchmarks/profile_idle_hook.py

Complements ``bench_steering.py perf`` (tokens per CPU-second, which on a shared machine moves by
several percent between rounds): cProfile attributes the time to the hook and the trace directly.
"""

from __future__ import annotations

import cProfile
import json
import pstats

import torch

from sapguard.demo import STEERING_ASSET
from sapguard.models.loading import load_model
from sapguard.steer.artifact import load_steering
from sapguard.steer.generate import generate

PROMPTS = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Tell me a story about a cat.",
    "How do plants grow?",
] * 2


def main() -> None:
    torch.set_num_threads(1)
    lm = load_model("default")
    gate = load_steering(STEERING_ASSET)
    generate(lm, PROMPTS[:2], None, None, max_new_tokens=4)  # warm-up
    profile = cProfile.Profile()
    profile.enable()
    generate(lm, PROMPTS, gate, "safeflow", threshold=1e9, max_new_tokens=32, batch_size=8)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
    own = {
        f"{path.rsplit('/', 1)[-1]}:{name}": cum
        for (path, _, name), (_, _, _, cum, _) in stats.items()
        if path.endswith(("steer/hook.py", "steer/trace.py"))
        and name in ("_hook", "row_trace", "_capture_inputs")
    }
    print(
        json.dumps(
            {
                "total_s": round(total, 3),
                "hook_and_trace_s": {k: round(v, 4) for k, v in own.items()},
                "share": round(sum(own.values()) / total, 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

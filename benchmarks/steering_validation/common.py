import os, random, json, time, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
from sapguard.models.loading import load_model
from sapguard.data.default_corpus import build_default_corpus
from sapguard.models.chat import encode_prompt, resolve_template
from sapguard.features.hooks import left_pad
from sapguard.bench.judges import RefusalJudge
from sapguard.steer.dataset import REFUSALS

lm = load_model("default", device="cpu")
tok = lm.tokenizer
template = resolve_template(tok, "auto")
corpus = build_default_corpus()

def pool(split, safe, n, max_chars=300, seed=0):
    rs = sorted({r.prompt for r in corpus if r.split == split and r.wrapper is None and r.is_safe == safe and len(r.prompt) <= max_chars})
    random.Random(seed).shuffle(rs)
    return rs[:n]

judge = RefusalJudge()
blocks = lm.model.model.layers

def states_at(seqs, prompt_lens, n_idx, layers):
    """hidden_states[L] at generated indices 0..n_idx-1 (pos = len(prompt)-1+j); returns {L: [rows, d]}, rows ordered (seq, j)."""
    out = {L: [] for L in layers}
    js = []
    for s in range(0, len(seqs), 8):
        batch = seqs[s:s+8]
        inp = left_pad(batch, tok.pad_token_id, lm.device)
        inp.pop("position_ids", None)
        with torch.no_grad():
            hs = lm.model(**inp, output_hidden_states=True).hidden_states
        W = inp["input_ids"].shape[1]
        for r, seq in enumerate(batch):
            off = W - len(seq)
            pl = prompt_lens[s + r]
            for j in range(n_idx):
                p = off + pl - 1 + j
                if p >= W: break
                js.append((s + r, j))
                for L in layers:
                    out[L].append(hs[L][r, p].float())
    return {L: torch.stack(v) for L, v in out.items()}, js

class Adder:
    """add vec[L] at layers (hidden_states index L = output of block L-1), generated indices < first_n."""
    def __init__(self, vecs, first_n):
        self.vecs, self.first_n, self.handles, self.step = vecs, first_n, [], 0
        for L in vecs:
            self.handles.append(blocks[L - 1].register_forward_hook(self.make(L)))
    def make(self, L):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.shape[1] > 1:  # prefill: last position is gen 0
                if L == min(self.vecs): self.step = 0
                g = 0; sl = slice(h.shape[1]-1, h.shape[1])
            else:
                g = self.step; sl = slice(0, 1)
            if L == max(self.vecs): self.step += 1 if h.shape[1] == 1 else 1
            if g < self.first_n:
                h = h.clone(); h[:, sl] += self.vecs[L].to(h.dtype)
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return None
        return hook
    def remove(self):
        for h in self.handles: h.remove()

def gen(prompts, max_new=24, bs=24, system=None):
    enc = [encode_prompt(tok, p, template, system) for p in prompts]
    outs = []
    for s in range(0, len(enc), bs):
        inp = left_pad(enc[s:s+bs], tok.pad_token_id, lm.device); inp.pop("position_ids", None)
        with torch.no_grad():
            o = lm.model.generate(**inp, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        W = inp["input_ids"].shape[1]
        for row in o[:, W:].tolist():
            cut = next((j for j, t in enumerate(row) if t == tok.eos_token_id), len(row))
            outs.append(tok.decode(row[:cut], skip_special_tokens=True))
    return outs

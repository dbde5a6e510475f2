"""GPU checks of the trust work (issue 11) that a CPU cannot make: the exactness check's TF32 tolerance on cuDNN
convolutions and TF32 matmuls, bfloat16 autocast, the GPU random state left alone by the check, Hugging Face
gradient checkpointing on CUDA, and compiled steps. Prints one line per case (ok or ERROR with the message).

    python -m benchmarks.device_check      # on a machine with a CUDA device; from the repository root
"""
import sys, time
import torch, torch.nn as nn, torch.nn.functional as F
if not torch.cuda.is_available():
    sys.exit("benchmarks.device_check needs a CUDA device.")
sys.path.insert(0, ".")
import fninfluence as fi
import fninfluence.precision
from torch.utils.data import TensorDataset
dev = torch.device("cuda")
print("torch", torch.__version__, torch.cuda.get_device_name(0), "cudnn tf32", torch.backends.cudnn.allow_tf32,
      "matmul tf32", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
Q = dict(progress=False)
results = {}
def case(name):
    def wrap(fn):
        t = time.time()
        try:
            out = fn(); results[name] = ("ok", out)
        except Exception as e:
            results[name] = ("ERROR", f"{type(e).__name__}: {str(e)[:300]}")
        print(f"{name}: {results[name]} [{time.time()-t:.1f}s]", flush=True)
    return wrap

class CE(fi.Task):
    def __init__(self, t=None): self.t = t
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch; out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
    def compute_measurement(self, batch, model): return self.compute_train_loss(batch, model)
    def tracked_modules(self): return self.t

class CNN(nn.Module):
    def __init__(self):
        super().__init__(); self.c1 = nn.Conv2d(3, 16, 3, padding=1); self.c2 = nn.Conv2d(16, 32, 3, stride=2, groups=2)
        self.head = nn.Linear(32, 10)
    def forward(self, x): return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

g = torch.Generator().manual_seed(0)
imgs = TensorDataset(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))

@case("cnn float32 (TF32 convs) accepted, ekfac finite")
def _():
    torch.manual_seed(0); m = CNN().to(dev).eval()
    f = fi.fit_factors(m, fi.classification_task(), imgs, strategy="ekfac", batch_size=32, **Q)
    s = fi.pairwise_scores(m, fi.classification_task(), f, imgs, imgs, batch_size=32, **Q)
    return bool(torch.isfinite(s).all()), float(s.abs().max())

@case("cnn float32 with bf16 autocast accepted")
def _():
    torch.manual_seed(0); m = CNN().to(dev).eval()
    f = fi.fit_factors(m, fi.classification_task(), imgs, strategy="kfac", batch_size=32, precision=fi.precision.Precision(amp_dtype=torch.bfloat16), **Q)
    return "fit"

@case("cnn bfloat16 model accepted")
def _():
    torch.manual_seed(0); m = CNN().to(dev).to(torch.bfloat16).eval()
    d = TensorDataset(imgs.tensors[0].bfloat16(), imgs.tensors[1])
    f = fi.fit_factors(m, fi.classification_task(), d, strategy="identity", batch_size=32, **Q)
    return "fit"

class Beside(nn.Module):
    def __init__(self):
        super().__init__(); self.fc = nn.Linear(5, 4); self.head = nn.Linear(4, 3)
    def forward(self, x): return self.head(torch.tanh(self.fc(x) + torch.mm(x, self.fc.weight.T)))
class Escape(nn.Module):
    def __init__(self):
        super().__init__(); self.fc = nn.Linear(5, 4); self.head = nn.Linear(4, 3)
    def forward(self, x):
        with torch._C.DisableTorchFunction(): h = torch.mm(x, self.fc.weight.t())
        return self.head(torch.tanh(self.fc(x) + h))
vec = TensorDataset(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
for name, M in [("beside .T refused", Beside), ("escape refused by exactness check (float32, cuda)", Escape)]:
    @case(name)
    def _(M=M):
        try:
            fi.fit_factors(M().to(dev), CE(["fc"]), vec, strategy="identity", **Q); return "ACCEPTED (bad)"
        except fi.InfluenceError as e: return "refused: " + str(e)[:90]

@case("dropout train refused on cuda")
def _():
    m = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.2), nn.Linear(4, 3)).to(dev).train()
    try: fi.fit_factors(m, fi.classification_task(), vec, **Q); return "ACCEPTED (bad)"
    except fi.InfluenceError as e: return "refused: " + str(e)[:80]

@case("cuda rng unchanged by the exactness check")
def _():
    from fninfluence.capture import ModelTap
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dev).eval()
    batch = tuple(t.to(dev) for t in vec.tensors); task = fi.classification_task()
    torch.manual_seed(3)
    with torch.no_grad(): task.compute_train_loss(batch, m, sample=True)
    want = (torch.random.get_rng_state(), torch.cuda.get_rng_state())
    torch.manual_seed(3); ModelTap(m, task).probes_for("train_sampled", batch)
    return torch.equal(want[0], torch.random.get_rng_state()) and torch.equal(want[1], torch.cuda.get_rng_state())

import transformers
V = 97
def gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    c = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(c).to(dev, dtype)
class LM(fi.Task):
    def __init__(self, t=None): self.t = t
    def compute_train_loss(self, batch, model, sample=False):
        ids = batch[0]; logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="sum")
    def compute_measurement(self, batch, model): return self.compute_train_loss(batch, model)
    def tracked_modules(self): return self.t
seqs = TensorDataset(torch.randint(0, V, (32, 24), generator=g))
conv1d = ["transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]

def lm_scores(m, strategy="ekfac", **kw):
    f = fi.fit_factors(m, LM(conv1d), seqs, strategy=strategy, batch_size=16, use_empirical_fisher=True, **Q, **kw)
    return fi.pairwise_scores(m, LM(conv1d), f, seqs, seqs, batch_size=16, **Q, **kw)

@case("gpt2 float32 sdpa accepted; checkpointing (train, no dropout) vs plain eval: rel max diff")
def _():
    ref = lm_scores(gpt2().eval())
    m = gpt2(); m.gradient_checkpointing_enable(); m.train()
    got = lm_scores(m)
    e = gpt2(); e.gradient_checkpointing_enable(); e.eval()
    got_eval = lm_scores(e)
    return float((got - ref).abs().max() / ref.abs().max()), float((got_eval - ref).abs().max() / ref.abs().max())

@case("gpt2 bf16 autocast accepted")
def _():
    s = lm_scores(gpt2().eval(), strategy="kfac", precision=fi.precision.Precision(amp_dtype=torch.bfloat16)); return bool(torch.isfinite(s).all())

@case("gpt2 embedding tracked float32 (tied head) refused, wte.weight named accepted")
def _():
    m = gpt2().eval()
    try:
        fi.fit_factors(m, LM(["transformer.wte"]), seqs, strategy="identity", batch_size=16, **Q); r = "ACCEPTED (bad)"
    except fi.InfluenceError as e: r = "refused: " + str(e)[:60]
    return r

@case("gpt2 compile=True (no checkpointing) still compiles & matches eager")
def _():
    m = gpt2().eval()
    a = lm_scores(m, strategy="identity"); b = lm_scores(m, strategy="identity", compile=True)
    return float((a - b).abs().max() / a.abs().max())

print("SUMMARY")
for k, v in results.items(): print(("OK  " if v[0] == "ok" and "bad" not in str(v[1]) else "FAIL"), k, v[1])

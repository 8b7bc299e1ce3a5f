# Non-negative linear softmax regression (no bias) on MNIST, x in [0,1]: ceiling of the synced F2.
import torch, torch.nn.functional as F, sys
from laperm.data.load import load_dataset
torch.set_num_threads(1); torch.manual_seed(0)
CLAMP = len(sys.argv) < 3
ds = load_dataset("mnist")
X = ds.train_x.reshape(len(ds.train_x), -1).float() / 255; Y = ds.train_y.long()
Xt = ds.test_x.reshape(len(ds.test_x), -1).float() / 255; Yt = ds.test_y.long()
for T in (1.0,):
    W = torch.full((784, 10), 0.01, requires_grad=True)
    opt = torch.optim.Adam([W], lr=float(sys.argv[1]) if len(sys.argv) > 1 else 1e-3)
    for ep in range(15):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 128):
            idx = perm[i:i+128]
            loss = F.cross_entropy(X[idx] @ W, Y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
            if CLAMP:
                with torch.no_grad(): W.clamp_(min=0)
        with torch.no_grad():
            acc = ((Xt @ W).argmax(1) == Yt).float().mean().item()
            tr = ((X @ W).argmax(1) == Y).float().mean().item()
        print(ep, f"train {tr:.4f} test {acc:.4f}", flush=True)

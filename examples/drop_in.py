"""LaPerm as a drop-in optimizer wrapper in your own training loop.

Trains a small MLP on a synthetic task with LaPerm(Adam), then checks that
every trained weight row is a permutation of its initial values.

    python examples/drop_in.py
"""

import torch
from torch import nn

from laperm import LaPerm, laperm_param_groups
from laperm.reconnect import is_row_permutation

torch.manual_seed(0)
x = torch.randn(2048, 20)
y = (x[:, :10].sum(1) > x[:, 10:].sum(1)).long()  # a learnable rule

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

# Build the inner optimizer as usual; wrap it.  Weights (2-D) are permuted,
# biases train freely.  Create the wrapper after any custom init or pruning.
optimizer = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=20)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)

for _ in range(300):
    idx = torch.randint(0, len(x), (64,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()

optimizer.sync()  # always end in a synced state
with torch.no_grad():
    acc = (model(x).argmax(1) == y).float().mean().item()
print(f"accuracy {acc:.1%} after 300 steps (chance 50%)")
for name, p in model.named_parameters():
    if p.dim() >= 2:
        assert is_row_permutation(p, theta0[name])
        print(f"{name}: every row is a permutation of its initial values")

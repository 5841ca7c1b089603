"""The reference `bench_gradinv` sets its speed against: a PyTorch eager Geiping loop on ResNet-18 (cosine + TV,
Adam on the signed gradient, double backward). torch is not a dependency: without it there is no such row."""

from __future__ import annotations

import time

import numpy as np


def torch_row(model_name: str, x0, y0, iterations: int, target_seed: int = 0) -> tuple[dict | None, str]:
    """(its row: a PyTorch eager Geiping loop on the same shape, timed over about iterations / 2 iterations, or
    None; a note on it, or the reason there is none: torch missing, or a model other than ResNet-18)."""
    try:
        import torch  # noqa: PLC0415 (optional: not a dependency)
        import torch.nn as tnn  # noqa: PLC0415
    except ImportError:
        return None, "torch is not importable here: no PyTorch reference row (pip install torch to add it)."
    if model_name != "resnet18":
        return None, "the PyTorch reference row is written for ResNet-18 only."
    torch.manual_seed(target_seed)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.sc = None
            if stride != 1 or cin != cout:
                self.sc = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.sc is None else self.sc(x)))

    layers = [tnn.Conv2d(3, 64, 3, 1, 1, bias=False), tnn.BatchNorm2d(64), tnn.ReLU()]
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(512, 10)]
    net = tnn.Sequential(*layers).eval()
    params = list(net.parameters())
    xt = torch.tensor(np.asarray(x0)).permute(0, 3, 1, 2).contiguous()
    yt = torch.tensor(np.asarray(y0), dtype=torch.long)
    target = [g.detach() for g in torch.autograd.grad(tnn.functional.cross_entropy(net(xt), yt), params)]
    dummy = torch.randn_like(xt, requires_grad=True)
    opt = torch.optim.Adam([dummy], lr=0.1)

    def iteration():
        opt.zero_grad()
        grads = torch.autograd.grad(tnn.functional.cross_entropy(net(dummy), yt), params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        na = sum((g * g).sum() for g in grads)
        nb = sum((t * t).sum() for t in target)
        tv = (dummy[:, :, 1:] - dummy[:, :, :-1]).abs().mean() + (dummy[:, :, :, 1:] - dummy[:, :, :, :-1]).abs().mean()
        loss = 1 - dot / (na.sqrt() * nb.sqrt()) + 1e-4 * tv
        loss.backward()
        dummy.grad.sign_()
        opt.step()

    for _ in range(3):
        iteration()
    n = max(10, iterations // 2)
    t0 = time.perf_counter()
    for _ in range(n):
        iteration()
    its = n / (time.perf_counter() - t0)
    return dict(objective="observed (PyTorch eager)", dtype="float32", width=1, devices=1, its=its, agg=its), (
        f"PyTorch {torch.__version__} eager, {torch.get_num_threads()} threads."
    )

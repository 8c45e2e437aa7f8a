"""What one DP-SGD step costs per model, against a plain SGD step: Opacus hooks vs ghost clipping.

For each model in ``veil.models`` (and batch size), one run times, interleaved so machine load
hits every column alike:

* plain: forward, backward, SGD step, no privacy;
* hooks: Opacus per-sample gradients (``grad_sample_mode="hooks"``), clipped, noised;
* ghost: Opacus ghost clipping (``"ghost"``): per-sample gradient *norms* in a first backward,
  the clipped sum in a second; the same noise and the same mechanism.

Each DP step is exactly what ``client.training.train_dp_sgd`` runs (secure-mode noise from a
seeded generator, Poisson-sampling engine), on a fixed batch so that every column does the same
work. Median over ``--steps`` steps after a warm-up, on ``--threads`` CPU threads, reported as
ratios to the plain step (the machine is shared: read the ratios, not the milliseconds).

    python benchmarks/dp_step.py [--batch 32 128] [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.training import grad_sample_mode_for
from veil.models import MODELS, build_model

Step = Callable[[], None]


def plain_step(arch: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    model = build_model(arch, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def dp_step(arch: str, mode: str, x: torch.Tensor, y: torch.Tensor, n: int) -> Step:
    from opacus import PrivacyEngine

    model = build_model(arch, seed=0)
    data = TensorDataset(x.repeat(-(-n // len(x)), *[1] * (x.dim() - 1))[:n], y.repeat(-(-n // len(y)))[:n])
    loader = DataLoader(data, batch_size=len(x), generator=torch.Generator().manual_seed(1))
    noise = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), data_loader=loader,
            criterion=nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True,
            noise_generator=noise, grad_sample_mode=mode)
    if mode == "ghost":
        private, opt, criterion, _ = made
    else:
        (private, opt, _), criterion = made, nn.CrossEntropyLoss()
    opt.secure_mode = True

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        criterion(private(x), y).backward()
        opt.step()

    return step


def measure(steps: dict[str, Step], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(5):  # warm-up
        for fn in steps.values():
            fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    g = torch.Generator().manual_seed(0)
    print(f"One DP-SGD step against a plain step (median of {args.steps}, {args.threads} CPU thread(s), "
          f"torch {torch.__version__}); train_dp_sgd uses the mode in the last column")
    print()
    print("| model | batch | plain step | hooks / plain | ghost / plain | ghost / hooks | chosen |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for arch in MODELS:
        for batch in args.batch:
            x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
            t = measure({"plain": plain_step(arch, x, y), "hooks": dp_step(arch, "hooks", x, y, 10 * batch),
                         "ghost": dp_step(arch, "ghost", x, y, 10 * batch)}, args.steps)
            chosen = grad_sample_mode_for(build_model(arch, seed=0))
            print(f"| {arch} | {batch} | {t['plain'] * 1000:.2f} ms | {t['hooks'] / t['plain']:.1f}x "
                  f"| {t['ghost'] / t['plain']:.1f}x | {t['ghost'] / t['hooks']:.2f}x | {chosen} |")


if __name__ == "__main__":
    main()

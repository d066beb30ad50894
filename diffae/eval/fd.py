"""FD-FMNIST: a Frechet distance in the feature space of a small Fashion-MNIST classifier.

This is NOT Inception FID.  It is the same formula (Heusel et al. 2017),
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
applied to the 128-d penultimate features of a small CNN (FMNISTNet below) that diffae trains on
the Fashion-MNIST train split and ships as `fd_fmnist.pt` (test accuracy in `fd_fmnist.json`).
Its numbers compare only with other FD-FMNIST numbers computed with the same weights, the same
number of samples N (FD is biased upwards for small N) and the same reference set.

Retrain the shipped weights (CPU, a few minutes):
    python -m diffae.eval.fd --train [--epochs 5] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, InputError

WEIGHTS = Path(__file__).with_name("fd_fmnist.pt")
META = Path(__file__).with_name("fd_fmnist.json")
FEATURE_DIM = 128


class FMNISTNet(nn.Module):
    """Three conv blocks (3x3 conv, BN, ReLU) of 32, 64 and 128 channels at 28x28, 14x14 and 7x7 (2x2
    max-pooling between them), global average pooling, a 128-d hidden layer whose ReLU output is the
    FD feature, and a 10-way classifier.  Inputs (B, 1, 28, 28) in [-1, 1].  Sized to train on a CPU
    in minutes (110 k parameters)."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.conv = nn.Sequential(block(1, 32), nn.MaxPool2d(2),   # 14x14
                                  block(32, 64), nn.MaxPool2d(2),  # 7x7
                                  block(64, 128))
        self.hidden = nn.Linear(128, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))        # (B, 128)
        return F.relu(self.hidden(h))        # (B, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.dropout(self.features(x), 0.2, self.training))


def load_classifier(device: str | torch.device = "cpu", path: str | Path = WEIGHTS) -> FMNISTNet:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing FD-FMNIST classifier weights {path}; "
                              "train them with `python -m diffae.eval.fd --train`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = FMNISTNet()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.to(device).eval().requires_grad_(False)


def classifier_meta() -> dict:
    return json.loads(META.read_text()) if META.is_file() else {}


def _check(images: torch.Tensor) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise InputError(f"FD-FMNIST needs (N, 1, 28, 28) images in [-1, 1], got {tuple(images.shape)}")


@torch.no_grad()
def features(net: FMNISTNet, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N, 1, 28, 28) in [-1, 1] -> (N, 128) fp64 features on the CPU."""
    _check(images)
    device = next(net.parameters()).device
    out = [net.features(images[i:i + batch_size].to(device).float().clamp(-1, 1)).double().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance in fp64."""
    f = feats.double()
    if f.shape[0] < 2:
        raise InputError("a Frechet distance needs at least 2 samples per set")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """FD between two Gaussians; tr((S1 S2)^(1/2)) via the symmetric S1^(1/2) S2 S1^(1/2), in fp64,
    which stays real and stable for singular covariances (no scipy.linalg.sqrtm needed)."""
    mu1, s1, mu2, s2 = (a.double() for a in (mu1, s1, mu2, s2))
    r = _sqrtm_psd(s1)
    m = r @ s2 @ r
    tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def fd_features(fa: torch.Tensor, fb: torch.Tensor) -> float:
    return frechet_distance(*stats(fa), *stats(fb))


class FDFMNIST:
    """Reference statistics computed once; `score(images)` gives FD-FMNIST of a sample set."""

    def __init__(self, reference_images: torch.Tensor, device: str | torch.device = "cpu"):
        self.net = load_classifier(device)
        self.n_reference = reference_images.shape[0]
        self.ref_mu, self.ref_sigma = stats(features(self.net, reference_images))

    def score(self, images: torch.Tensor) -> float:
        return frechet_distance(*stats(features(self.net, images)), self.ref_mu, self.ref_sigma)


# --- training the shipped classifier ------------------------------------------------------------
def train_classifier(epochs: int = 5, seed: int = 0, batch_size: int = 128, lr: float = 3e-3,
                     device: str = "cpu", out: Path = WEIGHTS, meta: Path = META) -> dict:
    from ..data import fashion_mnist

    torch.manual_seed(seed)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    net = FMNISTNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), batch_size):
            idx = perm[i:i + batch_size]
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            flip = torch.rand(x.shape[0], 1, 1, 1, generator=g).to(device) < 0.5  # FMNIST is mirror-symmetric
            x = torch.where(flip, x.flip(-1), x)
            loss = F.cross_entropy(net(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = test_accuracy(net, test.images, test.labels)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, out)
    info = {"what": "FD-FMNIST feature classifier (not Inception; see diffae/eval/fd.py)",
            "architecture": "FMNISTNet: conv 32, maxpool, conv 64, maxpool, conv 128, GAP, fc 128 (features, ReLU), fc 10",
            "feature_dim": FEATURE_DIM, "test_accuracy": round(acc, 4), "epochs": epochs, "seed": seed,
            "batch_size": batch_size, "lr": lr, "train_seconds": round(time.time() - t0, 1),
            "device": str(device), "torch": torch.__version__,
            "parameters": sum(p.numel() for p in net.parameters()),
            "sha256": hashlib.sha256(Path(out).read_bytes()).hexdigest(),
            "command": f"python -m diffae.eval.fd --train --epochs {epochs} --seed {seed}"}
    Path(meta).write_text(json.dumps(info, indent=1) + "\n")
    return info


@torch.no_grad()
def test_accuracy(net: FMNISTNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = sum(int((net(images[i:i + batch_size].to(device)).argmax(-1).cpu() == labels[i:i + batch_size]).sum())
                  for i in range(0, images.shape[0], batch_size))
    net.train(was)
    return correct / images.shape[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffae.eval.fd", description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="train and overwrite the shipped weights")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.train:
        print(json.dumps(train_classifier(a.epochs, a.seed, device=a.device), indent=1))
    else:
        from ..data import fashion_mnist
        test = fashion_mnist("test")
        print(f"test accuracy {test_accuracy(load_classifier(a.device), test.images, test.labels):.4f}")


if __name__ == "__main__":
    main()

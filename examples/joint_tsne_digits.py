"""ik.JointTSNE (van der Maaten's t-SNE objective) on scikit-learn's digits, beside scikit-learn's TSNE.

The objective is ik.JointTSNE(perplexity=30, dof=1): one KL(P || Q) over all pairs, with P the
symmetrised perplexity-calibrated Gaussian of the pixels, (p_{j|i} + p_{i|j}) / 2N, and Q one
Student-t distribution over all pairs of the 2-D embedding: the objective of scikit-learn's
TSNE(method="exact") (tests/test_joint_normalization.py checks loss and gradient against it).
It is minimised twice:

(a) parametric: an MLP 64 -> 256 -> 256 -> 2 maps the pixels to 2-D, full-batch Adam;
(b) free embedding: the N x 2 embedding itself is the parameter, optimised the way scikit-learn's
    exact method does: PCA initialisation scaled to std 1e-4, early exaggeration 12 for 250
    steps, momentum 0.5 then 0.8, learning rate max(N / 12 / 4, 50), per-coordinate gains
    (+0.2 / x0.8, at least 0.01), 1000 steps in all. Early exaggeration multiplies P by e in the
    gradient (q - e p); with the joint loss L that is e * L - (e - 1) * log Z, log Z computed
    here from the same Student-t logits.

Reported: sklearn.manifold.trustworthiness (n_neighbors=5) of each embedding, beside scikit-learn's
TSNE(method="exact") and its default Barnes-Hut TSNE on the same points (perplexity 30, init
"pca", the same seed), the final KL of each embedding under the same P, and run times. JointTSNE
runs on the torch backend's column stream by default (--backend; "reference" is the dense N x N
one); by default the script uses the first 400 of the 1797 digits (--n) to stay within 5 minutes
on two cores.

    .venv/bin/python examples/joint_tsne_digits.py      # needs scikit-learn
"""
import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE as SklearnTSNE
from sklearn.manifold import trustworthiness

import icon_kernels as ik

EXAGGERATION, EXPLORATION_STEPS = 12.0, 250      # scikit-learn's early exaggeration and its length


def log_z(emb: torch.Tensor, dof: float) -> torch.Tensor:
    """log of the joint normaliser Z = sum_{i != j} (1 + d_ij^2 / dof)^(-(dof + 1) / 2)."""
    n = emb.shape[0]
    sq = torch.cdist(emb, emb).square()
    logits = -(dof + 1) / 2 * torch.log1p(sq / dof)
    return torch.logsumexp(logits.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf")).flatten(), 0)


def objective(criterion, emb, x, exaggeration):
    """The joint KL, or with exaggeration e the loss whose gradient is that of P -> e P."""
    loss = criterion(emb, x)
    if exaggeration == 1.0:
        return loss
    return exaggeration * loss - (exaggeration - 1) * log_z(emb, criterion.dof)


def free_embedding(x: torch.Tensor, data: np.ndarray, criterion, steps: int, seed: int) -> np.ndarray:
    """scikit-learn's exact-method gradient descent, on the gradient of ik.JointTSNE."""
    n = x.shape[0]
    init = PCA(2, svd_solver="randomized", random_state=seed).fit_transform(data).astype(np.float32)
    init = init / np.std(init[:, 0]) * 1e-4
    emb = torch.tensor(init, dtype=x.dtype, requires_grad=True)
    learning_rate = max(n / EXAGGERATION / 4, 50.0)
    update, gains = torch.zeros_like(emb), torch.ones_like(emb)
    for step in range(steps):
        exploring = step < EXPLORATION_STEPS
        loss = objective(criterion, emb, x, EXAGGERATION if exploring else 1.0)
        grad, = torch.autograd.grad(loss, [emb])
        with torch.no_grad():
            increase = update * grad < 0
            gains = torch.where(increase, gains + 0.2, gains * 0.8).clamp_min(0.01)
            update = (0.5 if exploring else 0.8) * update - learning_rate * gains * grad
            emb += update
    return emb.detach().numpy()


def parametric(x: torch.Tensor, criterion, steps: int, seed: int) -> np.ndarray:
    """An MLP trained full-batch with Adam, the first fifth of the steps with exaggeration."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 2)).to(x.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(steps):
        loss = objective(criterion, net(x), x, EXAGGERATION if step < steps // 5 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(x).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="the first n of the 1797 digits")
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=1000, help="free-embedding steps (scikit-learn's max_iter)")
    parser.add_argument("--mlp-steps", type=int, default=200, help="full-batch Adam steps of the MLP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="ik.JointTSNE's backend: auto (torch), torch or reference")
    args = parser.parse_args()

    digits = load_digits()
    data = (digits.data / 16.0)[:args.n]
    x = torch.tensor(data, dtype=torch.float32)
    criterion = ik.JointTSNE(args.perplexity, backend=args.backend)

    rows = []
    t0 = time.perf_counter()
    rows.append(("ik.JointTSNE free embedding", free_embedding(x, data, criterion, args.steps, args.seed),
                 time.perf_counter() - t0))
    t0 = time.perf_counter()
    rows.append(("ik.JointTSNE parametric MLP", parametric(x, criterion, args.mlp_steps, args.seed),
                 time.perf_counter() - t0))
    for name, method in (("sklearn TSNE exact", "exact"), ("sklearn TSNE Barnes-Hut", "barnes_hut")):
        t0 = time.perf_counter()
        emb = SklearnTSNE(2, perplexity=args.perplexity, init="pca", method=method,
                          random_state=args.seed).fit_transform(data)
        rows.append((name, emb, time.perf_counter() - t0))

    xd = torch.tensor(data)
    print(f"digits: the first {len(data)} of 1797, d = {data.shape[1]}, perplexity {args.perplexity:g}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| embedding | trustworthiness@5 | KL(P||Q) under ik.JointTSNE | time (s) |")
    print(f"|---|---|---|---|")
    for name, emb, secs in rows:
        with torch.no_grad():
            kl = criterion(torch.tensor(emb, dtype=torch.float64), xd).item()
        print(f"| {name} | {trustworthiness(data, emb, n_neighbors=5):.4f} | {kl:.4f} | {secs:.1f} |")


if __name__ == "__main__":
    main()

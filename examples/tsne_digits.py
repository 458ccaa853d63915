"""Parametric t-SNE of scikit-learn's digits through ik.TSNE, beside scikit-learn's own TSNE.

An MLP maps the 64 raw pixels to 2-D and is trained full-batch on ik.TSNE(perplexity=30): the
target is the perplexity-calibrated Gaussian p(j|i) of the pixels (ik.calibrate_sigma, computed
once and cached), q is the Student-t kernel (dof = 1) on the 2-D outputs, and the loss is the mean
conditional KL. Reported: sklearn.manifold.trustworthiness of both embeddings (n_neighbors = 5
and 12) and run times. Writes examples/tsne_digits.png (both embeddings coloured by digit).

    .venv/bin/python examples/tsne_digits.py     # needs scikit-learn and matplotlib
"""
import argparse
import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.manifold import TSNE as SklearnTSNE
from sklearn.manifold import trustworthiness

import icon_kernels as ik

HERE = os.path.dirname(os.path.abspath(__file__))


def parametric_tsne(x: torch.Tensor, perplexity: float, steps: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = ik.TSNE(perplexity)
    for _ in range(steps):
        loss = criterion(net(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(x).numpy()


def plot(embeddings, titles, labels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(embeddings), figsize=(4.2 * len(embeddings), 4.0), dpi=72)
    for ax, emb, title in zip(axes, embeddings, titles):
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=3, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes, ticks=range(10), shrink=0.8, label="digit")
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=600, help="full-batch Adam steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default=os.path.join(HERE, "tsne_digits.png"))
    args = parser.parse_args()

    digits = load_digits()
    data = digits.data / 16.0
    x = torch.tensor(data, dtype=torch.float32)

    t0 = time.perf_counter()
    ours = parametric_tsne(x, args.perplexity, args.steps, args.seed)
    t1 = time.perf_counter()
    theirs = SklearnTSNE(2, perplexity=args.perplexity, init="pca", random_state=args.seed).fit_transform(data)
    t2 = time.perf_counter()

    print(f"digits: N={len(data)}, d={data.shape[1]}, perplexity {args.perplexity}")
    for name, emb, secs in (("ik.TSNE parametric (MLP)", ours, t1 - t0), ("sklearn TSNE (Barnes-Hut)", theirs, t2 - t1)):
        tw = [trustworthiness(data, emb, n_neighbors=k) for k in (5, 12)]
        print(f"{name:28s} trustworthiness@5 {tw[0]:.4f}  @12 {tw[1]:.4f}  time {secs:.1f} s")
    plot([ours, theirs], [f"ik.TSNE, parametric MLP ({args.steps} full-batch steps)", "scikit-learn TSNE"],
         digits.target, args.png)
    print(f"wrote {args.png} ({os.path.getsize(args.png) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()

"""A small run of the `cuda` backend for compute-sanitizer (bench/gpu_check.sh runs it under
``compute-sanitizer --tool memcheck``, and then ``racecheck``): every target type, ragged sizes,
fp32 and bf16, forward and backward, kl and two f-divergences, with a check against the
reference so a silent wrong answer fails too. Exits non-zero on any mismatch."""
import sys

import torch

import icon_kernels as ik


def cases(dev, dtype):
    g = torch.Generator().manual_seed(0)
    n, m, d = 37, 29, 19
    x = torch.randn(n, d, generator=g).to(dev, dtype)
    y = torch.randn(m, d, generator=g).to(dev, dtype)
    labels = torch.randint(0, 5, (n,), generator=g).to(dev)
    yield "labels", x, None, ik.Labels(labels), dict(kernel="dot", temperature=0.5)
    yield "labels-rect-beta", x, y, ik.Labels(labels, torch.randint(0, 5, (m,), generator=g).to(dev)), \
        dict(kernel="cosine", temperature=0.2, alpha=0.1, beta=0.2)
    idx = torch.randint(-1, n, (n, 4), generator=g).to(dev)
    yield "neighbors", x, None, ik.Neighbors(idx), dict(kernel="gaussian", sigma=1.5)
    z = torch.randn(n, 7, generator=g).to(dev, dtype)
    yield "affinity", x, None, ik.Affinity(z, kernel="gaussian", sigma=2.0), dict(kernel="student_t", dof=1.0)
    yield "dense", x, y, ik.Dense(torch.rand(n, m, generator=g).to(dev, dtype)), dict(kernel="dot", temperature=0.7)
    # the f-divergences (their backward's row pre-pass, icon_cuda_f_rows_kernel): the exact log p of
    # an Affinity target with alpha = 0, and a rectangular Labels problem with alpha and beta
    yield "affinity-reverse_kl", x, None, ik.Affinity(z, kernel="gaussian", sigma=2.0), \
        dict(kernel="gaussian", sigma=1.5, divergence="reverse_kl")
    yield "labels-rect-tv", x, y, ik.Labels(labels, torch.randint(0, 5, (m,), generator=g).to(dev)), \
        dict(kernel="dot", temperature=0.5, alpha=0.1, beta=0.2, divergence="tv")


def main():
    if "cuda" not in ik.available_backends():
        print("cuda backend unavailable:", ik.available_backends())
        return 1
    failures = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for name, x, y, target, kw in cases("cuda", dtype):
            losses = []
            for backend in ("cuda", "reference"):
                xs = x.detach().float().clone().requires_grad_() if backend == "reference" else x.detach().clone().requires_grad_()
                ys = None if y is None else (y.detach().float() if backend == "reference" else y.detach())
                loss = ik.icon_loss(xs, ys, target=target, backend=backend, **kw)
                loss.backward()
                losses.append((loss.detach().float(), xs.grad.float()))
            torch.cuda.synchronize()
            (l_c, g_c), (l_r, g_r) = losses
            err = max(abs(l_c - l_r).item() / max(abs(l_r).item(), 1e-6),
                      ((g_c - g_r).norm() / g_r.norm().clamp_min(1e-12)).item())
            ok = err <= tol
            failures += not ok
            print(f"{name:18s} {str(dtype):15s} rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

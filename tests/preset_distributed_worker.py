"""One rank of tests/test_presets_distributed.py: every preset with distributed=True on this
rank's shard against the same preset in one process on the whole batch. Loss equal, local input
gradients equal the slices of the global ones, and gradients of replicated parameters
(logit_scale, prototypes) summed over ranks equal the global ones; all to 1e-9. Results go to a
file per rank."""
import os
import traceback

import torch
import torch.distributed as dist

import icon_kernels as ik
from worker_exit import skip_native_teardown

TOL = 1e-9


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def cases(gen):
    """(name, make the preset (**placement kwargs), the global tensors, how many of them (from the
    front) are differentiable inputs, call(preset, tensors))."""
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    n = 11
    x = r(n, 4)
    knn_idx = ik.knn(x, 3)
    return [
        ("InfoNCE", lambda **p: ik.InfoNCE(0.3, **p), [r(7, 5), r(7, 5)], 2, lambda c, t: c(*t)),
        ("TSimCLR", lambda **p: ik.TSimCLR(2.0, alpha=0.1, **p), [r(7, 3), r(7, 3)], 2, lambda c, t: c(*t)),
        ("SupCon", lambda **p: ik.SupCon(0.2, beta=0.1, **p), [r(n, 5), torch.randint(0, 3, (n,), generator=gen)],
         1, lambda c, t: c(*t)),
        ("CLIPLoss", lambda **p: ik.CLIPLoss(**p).double(), [r(8, 5), r(8, 5)], 2, lambda c, t: c(*t)),
        ("PrototypeCrossEntropy", lambda **p: _seeded(lambda: ik.PrototypeCrossEntropy(3, 5, **p).double()),
         [r(n, 5), torch.randint(0, 3, (n,), generator=gen)], 1, lambda c, t: c(*t)),
        ("HarmonicLoss", lambda **p: _seeded(lambda: ik.HarmonicLoss(3, 5, 2.0, **p).double()),
         [r(n, 5), torch.randint(0, 3, (n,), generator=gen)], 1, lambda c, t: c(*t)),
        ("SNE", lambda **p: ik.SNE(3.0, **p), [r(n, 2), x], 1, lambda c, t: c(*t)),
        ("TSNE", lambda **p: ik.TSNE(3.0, **p), [r(n, 2), x], 1, lambda c, t: c(*t)),
        ("JointTSNE", lambda **p: ik.JointTSNE(3.0, **p), [r(n, 2), x], 1, lambda c, t: c(*t)),
        ("UniformKNN", lambda **p: ik.UniformKNN(3, steps=2, **p), [r(n, 2), x], 1, lambda c, t: c(*t)),
        ("InfoNCEClustering", lambda **p: ik.InfoNCEClustering(4, alpha=0.2, **p),
         [r(n, 4), torch.arange(n) % 6, knn_idx], 1,
         lambda c, t: c(t[0], sample_ids=t[1], neighbors=t[2])),
        # a neighbour list that holds each row itself: the preset drops it by its global row index
        ("InfoNCEClustering-knn", lambda **p: ik.InfoNCEClustering(4, **p),
         [r(n, 4), torch.cat([torch.arange(n)[:, None], knn_idx], 1)], 1, lambda c, t: c(t[0], neighbors=t[1])),
    ]


def _seeded(make):
    torch.manual_seed(123)
    return make()


def run(rank, world, init_file, out_dir, backend):
    lines = []
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        gen = torch.Generator().manual_seed(7)
        for name, make, tensors, n_grad, call in cases(gen):
            for mode in ("gather", "ring"):
                rows = tensors[0].shape[0]
                cut = [0, rows // 2, rows][rank:rank + 2] if world == 2 else [0, rows]
                sl = slice(cut[0], cut[1])
                full = [t.clone().requires_grad_(i < n_grad) for i, t in enumerate(tensors)]
                local = [t[sl].clone().requires_grad_(i < n_grad) for i, t in enumerate(tensors)]
                single, sharded = make(backend=backend), make(backend=backend, distributed=True, dist_mode=mode)
                loss_local = call(sharded, local)
                loss_full = call(single, full)
                loss_local.backward()
                loss_full.backward()
                errors = [rel(loss_local.detach(), loss_full.detach())]
                for a, b in zip(local[:n_grad], full[:n_grad]):
                    errors.append(rel(a.grad, b.grad[sl]))
                for (pname, pa), (_, pb) in zip(sharded.named_parameters(), single.named_parameters()):
                    g = pa.grad.clone()
                    dist.all_reduce(g)
                    errors.append(rel(g, pb.grad))
                worst = max(errors)
                lines.append(f"{name} {mode} {worst:.3g} " + ("ok" if worst <= TOL else "FAIL"))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported through the file
        lines.append("ERROR " + traceback.format_exc().replace("\n", " | "))
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    skip_native_teardown()

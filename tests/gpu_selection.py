"""The tests bench/gpu_check.sh runs on the GPU: a representative subset, sized for one 600 s run.

CI runs the full matrix under the Triton interpreter; on the device every Triton variant is a cold
JIT compile of seconds, so the selection covers every kernel x target x dtype once, the options
matrix on two targets, and the files that only mean something on a GPU (the CUDA extension, the
torch backend on CUDA, the ops' opcheck and torch.compile, large N). tests/conftest.py applies it
when ICON_KERNELS_GPU_SELECTION=1; tests/compile_keys.py counts its compiles.
"""
from __future__ import annotations

ENV = "ICON_KERNELS_GPU_SELECTION"

# whole files
FILES = ("test_cuda_build.py", "test_cuda_shared_memory.py", "test_torch_backend_cuda.py",
         "test_triton_gpu.py", "test_ops.py")
SUITE = "test_backends_vs_reference.py"     # ids start with the backend: "triton-dot-labels-..."
OPTION_TARGETS = ("triton-dot-labels-", "triton-student_t-affinity-")
F_DIVERGENCES = "test_f_divergences_backends.py"   # ids hold the backend: "cuda-tv-dot-labels-...", "tv-cuda"


def triton(predicate=None):
    """The suite's Triton cases, those for which ``predicate(ident)`` holds (all for None)."""
    return lambda ident: ident.startswith("triton-") and (predicate is None or predicate(ident))


# (file, test function or None for every function, predicate on the parametrisation id or None
# for every case)
CASES = (
    # every cuda-backend case of the suite (no Triton compile)
    (SUITE, None, lambda ident: ident.startswith("cuda-")),
    # every kernel x target in fp32 (self-kl-mean), and the four option settings on two targets
    (SUITE, "test_every_kernel_target_and_option",
     triton(lambda ident: "-self-kl-mean-" in ident or ident.startswith(OPTION_TARGETS))),
    # ... and in fp16 and bf16
    (SUITE, "test_half_precision_error_within_twice_pytorchs_own", triton()),
    (SUITE, "test_affinity_target_gradients", triton(lambda ident: "-self-kl-mean-" in ident)),
    (SUITE, "test_wide_feature_dim", triton()),                 # d = 300: chunks of d
    (SUITE, "test_low_temperature_and_huge_logits", triton()),
    (SUITE, "test_learnable_kernel_parameter", triton(lambda ident: "rows" in ident.split("-"))),
    # the CUDA extension's parts of the cross-backend files (no Triton compile)
    ("test_left_out_rows.py", "test_single_row_without_columns_is_left_out", lambda ident: "cuda" in ident),
    ("test_target_weight_grads.py", "test_weights_gradient", lambda ident: ident.startswith("cuda")),
    ("test_target_weight_grads.py", "test_weights_gradient_triton", lambda ident: "self-kl-mean" in ident),
    # the f-divergences in the CUDA kernels (no Triton compile): the float64 matrix on one kernel
    # (every divergence x target x option setting), and every cuda case of the other tests
    (F_DIVERGENCES, "test_every_kernel_target_and_option",
     lambda ident: ident.startswith("cuda-") and "-student_t-" in ident),
    *((F_DIVERGENCES, function, lambda ident: "cuda" in ident.split("-")) for function in (
        "test_gradients_are_the_closed_forms", "test_fp32_within_tolerance", "test_gradcheck", "test_opcheck",
        "test_extreme_logits_match_the_reference", "test_nan_inputs_give_nan",
        "test_half_precision_error_within_twice_pytorchs_own")),
    (F_DIVERGENCES, "test_an_unknown_divergence_code_is_refused_by_the_ops", None),
    # the f-divergences in the Triton kernels: every divergence x target with every kernel and
    # option setting in fp32 (20 cases), and fp16 / bf16 (native dtypes on the GPU); the Affinity
    # target kernels' chains are kl's code, selected above
    (F_DIVERGENCES, "test_triton_every_divergence_and_target", None),
    (F_DIVERGENCES, "test_half_precision_error_within_twice_pytorchs_own", lambda ident: ident.endswith("-triton")),
    # both directions of icon_loss_bidirectional in one Triton backward (BIDIR): the dot kernel's
    # four shapes (about four compiles), and its ops' opcheck
    ("test_bidirectional.py", "test_triton_one_backward_for_both_directions", lambda ident: ident.endswith("-dot")),
    ("test_bidirectional.py", "test_triton_bidirectional_ops_pass_opcheck_and_leave_rows_out", None),
)


def files() -> list:
    """The test files the selection draws from (pytest then imports only these)."""
    return sorted(set(FILES) | {f for f, _, _ in CASES})


def selected(nodeid: str) -> bool:
    """Is the pytest node ``tests/<file>::<function>[<id>]`` part of the GPU selection?"""
    path, _, rest = nodeid.partition("::")
    name = path.rsplit("/", 1)[-1]
    if name in FILES:
        return True
    function, _, ident = rest.partition("[")
    ident = ident.rstrip("]")
    return any(name == f and fn in (None, function) and (pred is None or pred(ident))
               for f, fn, pred in CASES)


# The compile budget of the test step: at most COMPILE_BUDGET_S of Triton compiles per worker when
# the distinct keys are spread over the pytest workers. The 276 keys this selection triggered on
# 2026-12-02 compiled ahead of time for sm_90, specialised as the GPU's JIT does, in 1.03 s each on
# average (median 0.94, 90th percentile 1.6, max 3.4; triton 3.8, 2 processes on the 2-core
# development VM, tests/triton_aot_compile.py --keys --workers 2). COMPILE_S_PER_KEY allows 2.5 s:
# keys that several workers compile at once, triton 3.6 on the device, and the JIT path's extra
# work (it also loads each cubin). With the power kernel (kernel code 4) the selection triggers
# 319 keys (bench/gpu_check.sh --plan, 2026-12-02, a tree that also held uncommitted divergence
# work), about 100 s on 8 workers: within the budget's 480. With the f-divergences in the Triton
# kernels (test_f_divergences_backends.py's Triton matrix, 20 cases, and its fp16 / bf16 cases,
# 10) it triggers 424 keys (tests/compile_keys.py on the selection as bench/gpu_check.sh --plan
# runs it, 2026-12-02; those tests alone: 106), about 133 s on 8 workers: within the budget's 480.
# With the bidirectional pass's Triton tests (test_bidirectional.py, the dot kernel's 4 shapes
# and the ops' opcheck) it triggers 434 keys (bench/gpu_check.sh --plan, 2026-12-03), about 136 s;
# with the symmetric Triton backward in self mode (no column kernel there) 410, about 128 s; with
# the Affinity target's triangular kernels in self mode too (SNE, t-SNE) 404, about 126 s
# (tests/test_gpu_check.py's plan test).
COMPILE_BUDGET_S = 150
COMPILE_S_PER_KEY = 2.5


def max_compile_keys(workers: int) -> int:
    return int(COMPILE_BUDGET_S * workers / COMPILE_S_PER_KEY)


def budget_line(keys_json: str, workers: int) -> int:
    """Prints the plan's compile line; 1 when the selection is over budget or did not pass."""
    import json

    with open(keys_json) as f:
        recorded = json.load(f)
    keys, limit = len(recorded["keys"]), max_compile_keys(workers)
    seconds = keys * COMPILE_S_PER_KEY / workers
    print(f"  Triton compiles  {keys} distinct keys, about {seconds:.0f} s on {workers} workers "
          f"(budget {COMPILE_BUDGET_S} s: at most {limit} keys; {COMPILE_S_PER_KEY} s per key)")
    if recorded["pytest_exit"] != 0:
        print(f"gpu_check plan: ERROR - the selection failed under the interpreter (pytest exit "
              f"{recorded['pytest_exit']})")
        return 1
    if keys > limit:
        print("gpu_check plan: ERROR - the GPU selection compiles more than its budget")
        return 1
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--files"]:
        print(" ".join(f"tests/{name}" for name in files()))
        sys.exit(0)
    if sys.argv[1:2] != ["--budget-line"] or len(sys.argv) != 4:
        sys.exit("usage: python tests/gpu_selection.py --files | --budget-line KEYS.json WORKERS")
    sys.exit(budget_line(sys.argv[2], int(sys.argv[3])))

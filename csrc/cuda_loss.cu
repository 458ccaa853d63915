// Fused CUDA kernels of the I-Con loss ops icon_kernels::cuda_forward / cuda_backward (schemas
// in icon_kernels/backends/ops.py; math in DESIGN.md §1; per-pair math shared with the CPU kernel through
// tile_math.h).
//
// This first version is the plain, FFMA one: one thread block per row (forward, dX) or per column
// (dY), threads striding over the other side, pair logits as dot products over d from a row held
// in shared memory, online LSE per thread merged across the block, and the second pass over the
// row with the LSE known. No atomics: dX is row-parallel and dY column-parallel, with a shared
// tile of gradient weights turned into the feature sums by all threads. Launched on the current
// stream. Tensor-core (mma/WMMA) paths are not written yet. Every kernel name starts with
// icon_cuda_, the filter bench/gpu_check.sh gives compute-sanitizer (--kernel-name kns=icon_cuda_).
//
// The f-divergences of DESIGN.md §1.1 (op codes 2..6) follow the CPU kernel (cpu_loss.cpp,
// cpu_f_rows.h) with divergence_math.h's f_pair_terms per pair: the forward's second pass sums
// q~ f, Gamma_i = sum_j q g and Phi_i = sum_j p f' in double (stats rows 1 and 3); an Affinity
// target's p is renormalised over the row and, with alpha = 0, log p = t - LSE^p - log(row total)
// is exact where p underflows. The backward first runs icon_cuda_f_rows_kernel, one block per row,
// which renormalises q (and p) over the row and recomputes Gamma_i and Phi_i / sum_j p in double
// from the saved LSEs (as the CPU backward does, rather than trusting the saved fp32 statistics);
// the row and column kernels then form G = g (1 - beta) (q g - q Gamma) and
// G^t = g (1 - alpha) (p f' - p Phi) per pair.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_loss.h"   // ICON_FORWARD_PARAMS
#include "divergence_math.h"
#include "op_checks.h"
#include "op_codes.h"
#include "tile_math.h"

namespace icon {
namespace {

constexpr int kThreads = 256;

// Raw pointers and sizes handed to the kernels (by value).
template <typename T>
struct Dev {
  const T *x, *y, *x_sq, *y_sq, *prm;
  const int64_t *labels, *col_labels, *nbr_idx;
  const T *nbr_w, *dense, *z, *zc, *z_sq, *zc_sq, *t_prm;
  int64_t n, m, d, dz, k_nbr, m_valid;
  int kernel, target, t_kernel, divergence;
  T alpha, beta;
  bool exclude_self, kl, f_div;   // forward KL (entropy term); an f-divergence of DESIGN.md §1.1
};

// Keeps the converted tensors alive while the kernels run.
template <typename T>
struct Holder {
  std::vector<at::Tensor> keep;
  Dev<T> dev{};
  const T* ptr(const at::Tensor& t) { keep.push_back(t); return t.defined() ? t.template data_ptr<T>() : nullptr; }
  const int64_t* iptr(const at::Tensor& t) { keep.push_back(t); return t.defined() ? t.template data_ptr<int64_t>() : nullptr; }
};

template <typename T>
Holder<T> prepare(ICON_FORWARD_PARAMS) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  Holder<T> h;
  Dev<T>& v = h.dev;
  auto xa = x.to(acc).contiguous(), ya = y.to(acc).contiguous();
  v.n = x.size(0); v.m = y.size(0); v.d = x.size(1);
  v.m_valid = v.m - (exclude_self ? 1 : 0);
  v.kernel = kernel_code(kernel); v.target = target_code(target); v.t_kernel = kernel_code(t_kernel);
  v.alpha = T(alpha); v.beta = T(beta); v.exclude_self = exclude_self; v.kl = divergence == kKl;
  v.divergence = static_cast<int>(divergence); v.f_div = is_f_divergence(v.divergence);
  v.x = h.ptr(xa); v.y = h.ptr(ya);
  v.x_sq = h.ptr(xa.square().sum(1)); v.y_sq = h.ptr(ya.square().sum(1));
  v.prm = h.ptr(param.to(acc).expand({v.n}).contiguous());
  v.dz = 0; v.k_nbr = 0;
  if (v.target == kLabels) {
    v.labels = h.iptr(row_labels->to(at::kLong).contiguous());
    v.col_labels = h.iptr(col_labels->to(at::kLong).contiguous());
  } else if (v.target == kNeighbors) {
    auto idx = nbr_index->to(at::kLong).contiguous();
    v.nbr_idx = h.iptr(idx);
    v.k_nbr = idx.size(1);
    v.nbr_w = h.ptr(nbr_weight.has_value() ? nbr_weight->to(acc).contiguous() : at::ones(idx.sizes(), xa.options()));
  } else if (v.target == kDense) {
    v.dense = h.ptr(dense_p->to(acc).contiguous());
  } else {
    auto za = z->to(acc).contiguous(), zca = z_cols->to(acc).contiguous();
    v.z = h.ptr(za); v.zc = h.ptr(zca); v.dz = za.size(1);
    v.z_sq = h.ptr(za.square().sum(1)); v.zc_sq = h.ptr(zca.square().sum(1));
    v.t_prm = h.ptr(t_param->to(acc).expand({v.n}).contiguous());
  }
  return h;
}

template <typename T>
__device__ bool valid(const Dev<T>& p, int64_t i, int64_t j) { return !(p.exclude_self && i == j); }

template <typename T>
__device__ T dot_row(const T* a, const T* b, int64_t d) {
  T acc = 0;
  for (int64_t k = 0; k < d; ++k) acc += a[k] * b[k];
  return acc;
}

// online log-sum-exp state: running max and sum of exp(v - max)
template <typename T>
__device__ void lse_push(T& mx, T& l, T v) {
  if (v == -INFINITY) return;
  if (v > mx) { l = l * exp(mx - v) + T(1); mx = v; }
  else l += exp(v - mx);   // NaN v makes l NaN
}

template <typename T>
__device__ void lse_merge(T& mx, T& l, T mx2, T l2) {
  const T m = mx > mx2 ? mx : mx2;
  if (m == -INFINITY) { l = l + l2; return; }
  l = (mx == -INFINITY ? T(0) : l * exp(mx - m)) + (mx2 == -INFINITY ? T(0) : l2 * exp(mx2 - m));
  mx = m;
}

// Block-wide sum of one value per thread (all threads get the result).
template <typename T>
__device__ T block_sum(T v, T* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const T out = red[0];
  __syncthreads();
  return out;
}

template <typename T>
__device__ T block_lse(T mx, T l, T* red) {
  red[threadIdx.x] = mx;
  red[blockDim.x + threadIdx.x] = l;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      T a = red[threadIdx.x], la = red[blockDim.x + threadIdx.x];
      lse_merge(a, la, red[threadIdx.x + s], red[blockDim.x + threadIdx.x + s]);
      red[threadIdx.x] = a;
      red[blockDim.x + threadIdx.x] = la;
    }
    __syncthreads();
  }
  const T m = red[0], sum = red[blockDim.x];
  __syncthreads();
  if (m == -INFINITY) return sum != sum ? sum : m;   // no finite logit: -inf (or NaN)
  return m + log(sum);
}

// Block-wide sum in double of one value per thread (all threads get the result), for the
// f-divergence row sums. ``red`` is the T reduction buffer (at least 2 * blockDim.x of T, unused
// between the other reductions): its first blockDim.x / 32 doubles, aligned up to 8 bytes, hold
// the warp partials, added in a fixed order (deterministic).
__device__ double block_sum_double(double v, void* red) {
  double* part = reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(red) + 7) & ~uintptr_t(7));
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  double out = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) out += part[w];
  __syncthreads();
  return out;
}

// Per-row normaliser of the target: K_i (labels), the row sum (dense) or the neighbour weight
// total; 1 for Affinity. Computed by the whole block.
template <typename T>
__device__ T row_norm(const Dev<T>& p, int64_t i, T* red) {
  T part = 0;
  if (p.target == kLabels) {
    const int64_t li = p.labels[i];
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) part += (p.col_labels[j] == li && valid(p, i, j)) ? T(1) : T(0);
  } else if (p.target == kDense) {
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) part += valid(p, i, j) ? p.dense[i * p.m + j] : T(0);
  } else if (p.target == kNeighbors) {
    for (int64_t c = threadIdx.x; c < p.k_nbr; c += blockDim.x) {
      const int64_t j = p.nbr_idx[i * p.k_nbr + c];
      part += (j >= 0 && j < p.m && valid(p, i, j)) ? p.nbr_w[i * p.k_nbr + c] : T(0);
    }
  } else {
    return T(1);
  }
  return block_sum(part, red);
}

// p_ij for labels / dense / neighbours given the row normaliser (0 off the valid set).
template <typename T>
__device__ T target_p(const Dev<T>& p, int64_t i, int64_t j, T norm) {
  if (!valid(p, i, j) || norm == T(0)) return T(0);
  if (p.target == kLabels) return p.col_labels[j] == p.labels[i] ? T(1) / norm : T(0);
  if (p.target == kDense) return p.dense[i * p.m + j] / norm;
  T w = 0;
  for (int64_t c = 0; c < p.k_nbr; ++c) w += p.nbr_idx[i * p.k_nbr + c] == j ? p.nbr_w[i * p.k_nbr + c] : T(0);
  return w / norm;
}

// One pair of an f-divergence row (divergence_math.h), with the factors q / q~ and p / p~ that
// turn q~ g into q g and p~ f' into p f' (as cpu_f_rows.h's f_row_impl per pair). ``pj`` is p_ij,
// ``log_q`` log q_ij; when ``exact`` (Affinity, alpha = 0) log p~ is ``log_p_exact``.
template <typename T>
struct FPair {
  PairTerms<T> f;
  T q_ratio, p_ratio;
};

template <typename T>
__device__ FPair<T> f_pair(const Dev<T>& p, T pj, T log_q, bool exact, T log_p_exact, T mv) {
  const T pm = (T(1) - p.alpha) * pj + p.alpha / mv;
  const T lp = exact ? log_p_exact : (pm == T(0) ? T(-INFINITY) : log(pm));
  const T q = exp(log_q);
  T qm = q, lqm = log_q, q_ratio = T(1);
  if (p.beta > T(0)) {
    qm = (T(1) - p.beta) * q + p.beta / mv;
    lqm = log(qm);
    q_ratio = q / qm;
  }
  const T p_ratio = exact ? T(1) : (pm != T(0) ? pj / pm : T(0));
  return {f_pair_terms<T>(p.divergence, pm, qm, lp, lqm), q_ratio, p_ratio};
}

// p_ij of an Affinity target, renormalised by the row total ``p_total`` of exp(t - LSE^p) (the
// fp32 LSE^p leaves sum_j p = 1 only up to its rounding; a total that is not > 0 is not applied).
template <typename T>
__device__ T affinity_p(T t, T lse_p, double p_total) {
  const T pj = exp(t - lse_p);
  return p_total > 0 ? T(double(pj) / p_total) : pj;
}

// log p~ - t of an Affinity target with alpha = 0: -LSE^p - log(row total).
template <typename T>
__device__ T affinity_log_p_shift(T lse_p, double p_total) {
  return T(-double(lse_p) - (p_total > 0 ? log(p_total) : 0.0));
}

// sum over row i's valid columns of exp(t_ij - LSE^p_i) (the Affinity target's row total), in
// double; ``zs`` holds z_i. Block-wide.
template <typename T>
__device__ double affinity_total(const Dev<T>& p, int64_t i, const T* zs, T lse_p, T* red) {
  double part = 0;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    if (!valid(p, i, j)) continue;
    T aux;
    part += exp(logit<T>(p.t_kernel, dot_row(zs, p.zc + j * p.dz, p.dz), p.z_sq[i], p.zc_sq[j], p.t_prm[i], &aux) - lse_p);
  }
  return block_sum_double(part, red);
}

template <typename T>
__global__ void icon_cuda_forward_kernel(Dev<T> p, T* loss, bool* included, T* stats, T* norms) {
  extern __shared__ __align__(16) unsigned char smem_raw[];   // 16: read as double (and T*)
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* zs = xs + p.d;
  T* red = zs + p.dz;
  const int64_t i = blockIdx.x, n = p.n;
  for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) xs[k] = p.x[i * p.d + k];
  for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) xs[p.d + k] = p.z[i * p.dz + k];
  __syncthreads();
  const bool aff = p.target == kAffinity;
  T mx = -INFINITY, l = 0, mp = -INFINITY, lp = 0;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    if (!valid(p, i, j)) continue;
    T aux;
    lse_push(mx, l, logit<T>(p.kernel, dot_row(xs, p.y + j * p.d, p.d), p.x_sq[i], p.y_sq[j], p.prm[i], &aux));
    if (aff) lse_push(mp, lp, logit<T>(p.t_kernel, dot_row(zs, p.zc + j * p.dz, p.dz), p.z_sq[i], p.zc_sq[j], p.t_prm[i], &aux));
  }
  const T lse = block_lse(mx, l, red);
  const T lse_p = aff ? block_lse(mp, lp, red) : T(0);
  const T norm = row_norm(p, i, red);
  const T mv = T(p.m_valid > 0 ? p.m_valid : 1), b = p.alpha / mv;
  if (p.f_div) {   // L_i = sum_j q~ f(p~ / q~); Gamma_i and Phi_i into the R and H rows
    const double p_total = aff ? affinity_total(p, i, zs, lse_p, red) : 1.0;
    const bool exact = aff && p.alpha == T(0);
    const T log_p_shift = aff ? affinity_log_p_shift(lse_p, p_total) : T(0);
    double sum = 0, gamma = 0, phi = 0;
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
      if (!valid(p, i, j)) continue;
      T aux, t = 0;
      const T s = logit<T>(p.kernel, dot_row(xs, p.y + j * p.d, p.d), p.x_sq[i], p.y_sq[j], p.prm[i], &aux);
      if (aff) t = logit<T>(p.t_kernel, dot_row(zs, p.zc + j * p.dz, p.dz), p.z_sq[i], p.zc_sq[j], p.t_prm[i], &aux);
      const T pj = aff ? affinity_p(t, lse_p, p_total) : target_p(p, i, j, norm);
      const FPair<T> fp = f_pair(p, pj, s - lse, exact, t + log_p_shift, mv);
      sum += fp.f.term;
      if (fp.q_ratio != T(0)) gamma += double(fp.q_ratio) * fp.f.q_g;
      if (fp.p_ratio != T(0)) phi += double(fp.p_ratio) * fp.f.p_fp;
    }
    sum = block_sum_double(sum, red);
    gamma = block_sum_double(gamma, red);
    phi = block_sum_double(phi, red);
    if (threadIdx.x == 0) {
      const bool inc = (aff || norm != T(0)) && p.m_valid > 0;
      loss[i] = inc ? T(sum) : T(0);
      included[i] = inc;
      stats[i] = lse;
      stats[n + i] = T(gamma);
      if (aff) { stats[2 * n + i] = lse_p; stats[3 * n + i] = T(phi); }
      norms[i] = norm;
    }
    return;
  }
  T cross = 0, ent = 0, r_stat = 0, h_stat = 0;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    if (!valid(p, i, j)) continue;
    T aux;
    const T s = logit<T>(p.kernel, dot_row(xs, p.y + j * p.d, p.d), p.x_sq[i], p.y_sq[j], p.prm[i], &aux);
    const T pj = aff ? exp(logit<T>(p.t_kernel, dot_row(zs, p.zc + j * p.dz, p.dz), p.z_sq[i], p.zc_sq[j], p.t_prm[i], &aux) - lse_p)
                     : target_p(p, i, j, norm);
    const T pm = (T(1) - p.alpha) * pj + b;
    const T log_q = s - lse;
    T log_qm = log_q;
    if (p.beta > T(0)) {
      const T q = exp(log_q), qm = (T(1) - p.beta) * q + p.beta / mv;
      log_qm = log(qm);
      if (pm != T(0)) r_stat += pm * q / qm;
    }
    if (pm != T(0)) {
      cross += pm * log_qm;
      if (p.kl) ent += pm * log(pm);
    }
    if (aff && pj != T(0)) h_stat += pj * (p.kl ? log(pm) - log_qm : -log_qm);
  }
  cross = block_sum(cross, red);
  ent = block_sum(ent, red);
  r_stat = block_sum(r_stat, red);
  h_stat = block_sum(h_stat, red);
  if (threadIdx.x == 0) {
    const bool inc = (aff || norm != T(0)) && p.m_valid > 0;
    loss[i] = inc ? (p.kl ? ent - cross : -cross) : T(0);
    included[i] = inc;
    stats[i] = lse;
    if (p.beta > T(0)) stats[n + i] = r_stat;
    if (aff) { stats[2 * n + i] = lse_p; stats[3 * n + i] = h_stat; }
    norms[i] = norm;
  }
}

// The rows of an f-divergence's row values (icon_cuda_f_rows_kernel's ``fst``, kFRows x n doubles):
// Gamma_i, Phi_i (normalised by sum_j p), the log of q's renormalising factor, the Affinity
// target's row total and its exact log p shift (log p~ - t).
constexpr int kFGamma = 0, kFPhi = 1, kFLogQScale = 2, kFPTotal = 3, kFLogPShift = 4, kFRows = 5;

// The saved per-row values one pair's gradient needs; for an f-divergence also those of ``fst``
// (nullptr otherwise).
template <typename T>
struct RowState {
  T lse, g, r_stat, lse_p, h_stat, norm, shift, shift_p;
  T log_q_scale, log_p_shift;
  double gamma, phi, p_total;
};

template <typename T>
__device__ RowState<T> row_state(const Dev<T>& p, int64_t i, const T* stats, const T* grad, const T* norms,
                                 const double* fst) {
  RowState<T> r;
  r.lse = stats[i]; r.r_stat = stats[p.n + i]; r.lse_p = stats[2 * p.n + i]; r.h_stat = stats[3 * p.n + i];
  r.g = grad[i]; r.norm = norms[i];
  r.shift = r.lse == -INFINITY ? T(0) : r.lse;
  r.shift_p = r.lse_p == -INFINITY ? T(0) : r.lse_p;
  r.log_q_scale = 0; r.log_p_shift = 0; r.gamma = 0; r.phi = 0; r.p_total = 1;
  if (fst) {
    r.gamma = fst[kFGamma * p.n + i]; r.phi = fst[kFPhi * p.n + i];
    r.log_q_scale = T(fst[kFLogQScale * p.n + i]); r.p_total = fst[kFPTotal * p.n + i];
    r.log_p_shift = T(fst[kFLogPShift * p.n + i]);
  }
  return r;
}

// The backward's row pre-pass of an f-divergence (the CPU backward's, per row): the target
// normaliser into norms, and into fst the row values of RowState, from the saved LSE and LSE^p.
// q = exp(s - LSE) is renormalised over the row (the saved fp32 LSE leaves sum_j q = 1 only up to
// its rounding, an error shared by the whole row that dL/dx would carry times the q-mean of
// y - x_i), and Gamma_i = sum_j q g, Phi_i = sum_j p f' / sum_j p are this very row's, in double
// (G = q (g - Gamma) cancels to the spread of g). Rows with a zero upstream gradient are skipped
// (their gradients are 0, RowState's values unread).
template <typename T>
__global__ void icon_cuda_f_rows_kernel(Dev<T> p, const T* stats, const T* grad, T* norms, double* fst) {
  extern __shared__ __align__(16) unsigned char smem_raw[];   // 16: read as double (and T*)
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* zs = xs + p.d;
  T* red = zs + p.dz;
  const int64_t i = blockIdx.x, n = p.n;
  if (grad[i] == T(0)) return;   // the same for the whole block: no thread reaches a barrier
  for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) xs[k] = p.x[i * p.d + k];
  for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) zs[k] = p.z[i * p.dz + k];
  __syncthreads();
  const bool aff = p.target == kAffinity;
  const T lse = stats[i], lse_p = aff ? stats[2 * n + i] : T(0);
  const T norm = row_norm(p, i, red);
  double q_total = 0;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    if (!valid(p, i, j)) continue;
    T aux;
    q_total += exp(logit<T>(p.kernel, dot_row(xs, p.y + j * p.d, p.d), p.x_sq[i], p.y_sq[j], p.prm[i], &aux) - lse);
  }
  q_total = block_sum_double(q_total, red);
  const T log_q_scale = T(log(q_total > 0 ? 1.0 / q_total : 1.0));
  const double p_total = aff ? affinity_total(p, i, zs, lse_p, red) : 1.0;
  const bool exact = aff && p.alpha == T(0);
  const T log_p_shift = aff ? affinity_log_p_shift(lse_p, p_total) : T(0);
  const T mv = T(p.m_valid > 0 ? p.m_valid : 1);
  double gamma = 0, phi = 0, p_sum = 0;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    if (!valid(p, i, j)) continue;
    T aux, t = 0;
    const T s = logit<T>(p.kernel, dot_row(xs, p.y + j * p.d, p.d), p.x_sq[i], p.y_sq[j], p.prm[i], &aux);
    if (aff) t = logit<T>(p.t_kernel, dot_row(zs, p.zc + j * p.dz, p.dz), p.z_sq[i], p.zc_sq[j], p.t_prm[i], &aux);
    const T pj = aff ? affinity_p(t, lse_p, p_total) : target_p(p, i, j, norm);
    const FPair<T> fp = f_pair(p, pj, (s - lse) + log_q_scale, exact, t + log_p_shift, mv);
    if (fp.q_ratio != T(0)) gamma += double(fp.q_ratio * fp.f.q_g);
    if (fp.p_ratio != T(0)) phi += double(fp.p_ratio * fp.f.p_fp);
    p_sum += pj;
  }
  gamma = block_sum_double(gamma, red);
  phi = block_sum_double(phi, red);
  p_sum = block_sum_double(p_sum, red);
  if (threadIdx.x == 0) {
    norms[i] = norm;
    fst[kFGamma * n + i] = gamma;
    fst[kFPhi * n + i] = p_sum > 0 ? phi / p_sum : 0.0;
    fst[kFLogQScale * n + i] = log_q_scale;
    fst[kFPTotal * n + i] = p_total;
    fst[kFLogPShift * n + i] = log_p_shift;
  }
}

// Gradient weights of pair (i, j): w (learned side), wt (target side), and the parameter terms.
template <typename T>
__device__ void pair_grad(const Dev<T>& p, int64_t i, int64_t j, T ab, T tab, const RowState<T>& r,
                          bool target_grad, T* w, T* dprm, T* wt, T* dtprm) {
  *w = 0; *dprm = 0; *wt = 0; *dtprm = 0;
  if (r.g == T(0)) return;
  T aux, t_aux = 0, t = 0;
  const T s = logit<T>(p.kernel, ab, p.x_sq[i], p.y_sq[j], p.prm[i], &aux);
  const bool aff = p.target == kAffinity;
  if (aff) t = logit<T>(p.t_kernel, tab, p.z_sq[i], p.zc_sq[j], p.t_prm[i], &t_aux);
  T grad = 0, log_qm = 0, pm = 0, pj = 0, pf = 0;
  if (valid(p, i, j) && p.f_div) {   // G = g (1 - beta) (q g - q Gamma); p f' for G^t
    const T mv = T(p.m_valid > 0 ? p.m_valid : 1);
    pj = aff ? affinity_p(t, r.lse_p, r.p_total) : target_p(p, i, j, r.norm);
    const T log_q = (s - r.lse) + r.log_q_scale;
    const FPair<T> fp = f_pair(p, pj, log_q, aff && p.alpha == T(0), t + r.log_p_shift, mv);
    const T qg = fp.q_ratio != T(0) ? fp.q_ratio * fp.f.q_g : T(0);
    grad = T(double(r.g) * (1.0 - double(p.beta)) * (double(qg) - double(exp(log_q)) * r.gamma));
    if (fp.p_ratio != T(0)) pf = fp.p_ratio * fp.f.p_fp;
  } else if (valid(p, i, j)) {
    const T mv = T(p.m_valid > 0 ? p.m_valid : 1);
    pj = aff ? exp(t - r.lse_p) : target_p(p, i, j, r.norm);
    const T log_q = s - r.lse, q = exp(log_q);
    pm = (T(1) - p.alpha) * pj + p.alpha / mv;
    if (p.beta > T(0)) {
      const T qm = (T(1) - p.beta) * q + p.beta / mv;
      grad = r.g * (T(1) - p.beta) * q * (r.r_stat - pm / qm);
      log_qm = log(qm);
    } else {
      grad = r.g * (q - pm);
      log_qm = log_q;
    }
  }
  *dprm = param_term<T>(p.kernel, grad, s, aux, p.prm[i], r.shift);
  *w = grad_weight<T>(p.kernel, grad, aux, p.prm[i]);
  if (target_grad && p.f_div) {
    // an f-divergence's p f' may be nonzero where p underflowed (reverse KL: -q~)
    if (pj != T(0) || pf != T(0)) {
      const T gt = T(double(r.g) * (1.0 - double(p.alpha)) * (double(pf) - double(pj) * r.phi));
      *dtprm = param_term<T>(p.t_kernel, gt, t, t_aux, p.t_prm[i], r.shift_p);
      *wt = grad_weight<T>(p.t_kernel, gt, t_aux, p.t_prm[i]);
    }
  } else if (target_grad && pj != T(0)) {
    const T h = p.kl ? log(pm) - log_qm : -log_qm;
    const T gt = r.g * (T(1) - p.alpha) * pj * (h - r.h_stat);
    *dtprm = param_term<T>(p.t_kernel, gt, t, t_aux, p.t_prm[i], r.shift_p);
    *wt = grad_weight<T>(p.t_kernel, gt, t_aux, p.t_prm[i]);
  }
}

// Row-parallel backward: dX_i, dparam_i (and dZ_i, dtparam_i).
template <typename T>
__global__ void icon_cuda_backward_rows_kernel(Dev<T> p, const T* stats, const T* grad, const T* norms,
                                     const double* fst, bool target_grad, T* dx, T* dprm, T* dz, T* dtprm) {
  extern __shared__ __align__(16) unsigned char smem_raw[];   // 16: read as double (and T*)
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* zs = xs + p.d;
  T* acc = zs + p.dz;          // dX_i accumulator (d), then dZ_i (dz)
  T* ws = acc + p.d + p.dz;    // one tile of w, then of wt
  T* red = ws + 2 * blockDim.x;
  const int64_t i = blockIdx.x;
  for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) { xs[k] = p.x[i * p.d + k]; acc[k] = 0; }
  for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) { zs[k] = p.z[i * p.dz + k]; acc[p.d + k] = 0; }
  __syncthreads();
  const RowState<T> r = row_state(p, i, stats, grad, norms, fst);
  T d_prm = 0, d_tprm = 0, rs = 0, trs = 0;
  for (int64_t j0 = 0; j0 < p.m; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    T w = 0, wt = 0, a = 0, b = 0;
    if (j < p.m) {
      const T tab = p.target == kAffinity ? dot_row(zs, p.zc + j * p.dz, p.dz) : T(0);
      pair_grad(p, i, j, dot_row(xs, p.y + j * p.d, p.d), tab, r, target_grad, &w, &a, &wt, &b);
    }
    d_prm += a; d_tprm += b; rs += w; trs += wt;
    ws[threadIdx.x] = w;
    ws[blockDim.x + threadIdx.x] = wt;
    __syncthreads();
    const int64_t cols = min(static_cast<int64_t>(blockDim.x), p.m - j0);
    for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) {
      T sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += ws[c] * p.y[(j0 + c) * p.d + k];
      acc[k] += sum;
    }
    if (target_grad)
      for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) {
        T sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += ws[blockDim.x + c] * p.zc[(j0 + c) * p.dz + k];
        acc[p.d + k] += sum;
      }
    __syncthreads();
  }
  rs = block_sum(rs, red);
  trs = block_sum(trs, red);
  d_prm = block_sum(d_prm, red);
  d_tprm = block_sum(d_tprm, red);
  const bool dist = is_distance(p.kernel), t_dist = is_distance(p.t_kernel);
  for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) dx[i * p.d + k] = acc[k] - (dist ? rs * xs[k] : T(0));
  if (target_grad)
    for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) dz[i * p.dz + k] = acc[p.d + k] - (t_dist ? trs * zs[k] : T(0));
  if (threadIdx.x == 0) {
    dprm[i] = d_prm;
    if (target_grad) dtprm[i] = d_tprm;
  }
}

// Column-parallel backward: dY_j (and dZ_cols_j).
template <typename T>
__global__ void icon_cuda_backward_cols_kernel(Dev<T> p, const T* stats, const T* grad, const T* norms,
                                     const double* fst, bool target_grad, T* dy, T* dzc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];   // 16: read as double (and T*)
  T* ys = reinterpret_cast<T*>(smem_raw);
  T* zcs = ys + p.d;
  T* acc = zcs + p.dz;
  T* ws = acc + p.d + p.dz;
  T* red = ws + 2 * blockDim.x;
  const int64_t j = blockIdx.x;
  for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) { ys[k] = p.y[j * p.d + k]; acc[k] = 0; }
  for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) { zcs[k] = p.zc[j * p.dz + k]; acc[p.d + k] = 0; }
  __syncthreads();
  T cs = 0, tcs = 0;
  for (int64_t i0 = 0; i0 < p.n; i0 += blockDim.x) {
    const int64_t i = i0 + threadIdx.x;
    T w = 0, wt = 0, a, b;
    if (i < p.n) {
      const RowState<T> r = row_state(p, i, stats, grad, norms, fst);
      const T tab = p.target == kAffinity ? dot_row(p.z + i * p.dz, zcs, p.dz) : T(0);
      pair_grad(p, i, j, dot_row(p.x + i * p.d, ys, p.d), tab, r, target_grad, &w, &a, &wt, &b);
    }
    cs += w; tcs += wt;
    ws[threadIdx.x] = w;
    ws[blockDim.x + threadIdx.x] = wt;
    __syncthreads();
    const int64_t rows = min(static_cast<int64_t>(blockDim.x), p.n - i0);
    for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) {
      T sum = 0;
      for (int64_t c = 0; c < rows; ++c) sum += ws[c] * p.x[(i0 + c) * p.d + k];
      acc[k] += sum;
    }
    if (target_grad)
      for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) {
        T sum = 0;
        for (int64_t c = 0; c < rows; ++c) sum += ws[blockDim.x + c] * p.z[(i0 + c) * p.dz + k];
        acc[p.d + k] += sum;
      }
    __syncthreads();
  }
  cs = block_sum(cs, red);
  tcs = block_sum(tcs, red);
  const bool dist = is_distance(p.kernel), t_dist = is_distance(p.t_kernel);
  for (int64_t k = threadIdx.x; k < p.d; k += blockDim.x) dy[j * p.d + k] = acc[k] - (dist ? cs * ys[k] : T(0));
  if (target_grad)
    for (int64_t k = threadIdx.x; k < p.dz; k += blockDim.x) dzc[j * p.dz + k] = acc[p.d + k] - (t_dist ? tcs * zcs[k] : T(0));
}

template <typename T>
size_t shared_bytes(const Dev<T>& p) { return sizeof(T) * (2 * (p.d + p.dz) + 4 * kThreads); }

// The dynamic shared memory of one launch of `kernel`. Above the default 48 KB a kernel must opt
// in (cudaFuncAttributeMaxDynamicSharedMemorySize), else the launch fails with "invalid argument";
// the opt-in is capped by the device (227 KB on sm_90), beyond which these kernels cannot run.
// Set per launch (cheap, host-side) so it holds on whichever device is current, and to the device
// limit rather than this launch's need, so that concurrent launches with other d never shrink it.
template <typename T, typename Kernel>
size_t launch_shared_bytes(Kernel kernel, const Dev<T>& p) {
  const size_t bytes = shared_bytes(p);
  if (bytes <= 48 * 1024) return bytes;
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "icon_loss backend 'cuda': feature dimensions d = ", p.d,
              " and dz = ", p.dz, " in ", std::is_same<T, double>::value ? "float64" : "float32", " need ", bytes,
              " bytes of shared memory per block, more than this device's limit of ", limit,
              " bytes; use backend 'triton' or 'torch' for such feature dimensions");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  return bytes;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_t(ICON_FORWARD_PARAMS) {
  Holder<T> h = prepare<T>(ICON_FORWARD_ARGS);
  const Dev<T>& p = h.dev;
  auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  auto loss = at::zeros({p.n}, opts), stats = at::zeros({4, p.n}, opts), norms = at::zeros({p.n}, opts);
  auto included = at::zeros({p.n}, opts.dtype(at::kBool));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (p.n == 0) return {loss, included, stats};   // an empty grid is a launch error
  icon_cuda_forward_kernel<T><<<p.n, kThreads, launch_shared_bytes(&icon_cuda_forward_kernel<T>, p), stream>>>(
      p, loss.template data_ptr<T>(), included.template data_ptr<bool>(), stats.template data_ptr<T>(),
      norms.template data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, included, stats};
}

template <typename T>
std::vector<at::Tensor> backward_t(const at::Tensor& grad_rows, ICON_FORWARD_PARAMS,
                                   const at::Tensor& valid_rows, const at::Tensor& stats_in, bool target_grad) {
  Holder<T> h = prepare<T>(ICON_FORWARD_ARGS);
  const Dev<T>& p = h.dev;
  auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto g = at::where(valid_rows, grad_rows.to(opts.dtype()), at::zeros({}, opts)).contiguous();
  auto stats = stats_in.to(opts.dtype()).contiguous();
  // the per-row target normaliser, recomputed by a forward pass into scratch outputs
  auto loss = at::zeros({p.n}, opts), stats2 = at::zeros({4, p.n}, opts), norms = at::zeros({p.n}, opts);
  auto inc = at::zeros({p.n}, opts.dtype(at::kBool));
  auto dx = at::zeros({p.n, p.d}, opts), dy = at::zeros({p.m, p.d}, opts), dprm = at::zeros({p.n}, opts);
  auto dz = at::zeros({p.n, std::max<int64_t>(p.dz, 1)}, opts), dzc = at::zeros({p.m, std::max<int64_t>(p.dz, 1)}, opts);
  auto dtprm = at::zeros({p.n}, opts);
  if (p.n == 0 || p.m == 0) return {dx, dy, dprm, dz, dzc, dtprm};   // nothing to add; no empty grids
  at::Tensor fst;   // an f-divergence's row values (icon_cuda_f_rows_kernel)
  if (p.f_div) {
    fst = at::zeros({kFRows, p.n}, opts.dtype(at::kDouble));
    icon_cuda_f_rows_kernel<T><<<p.n, kThreads, launch_shared_bytes(&icon_cuda_f_rows_kernel<T>, p), stream>>>(
        p, stats.template data_ptr<T>(), g.template data_ptr<T>(), norms.template data_ptr<T>(),
        fst.template data_ptr<double>());
  } else {
    icon_cuda_forward_kernel<T><<<p.n, kThreads, launch_shared_bytes(&icon_cuda_forward_kernel<T>, p), stream>>>(
        p, loss.template data_ptr<T>(), inc.template data_ptr<bool>(), stats2.template data_ptr<T>(),
        norms.template data_ptr<T>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double* fst_p = p.f_div ? fst.template data_ptr<double>() : nullptr;
  icon_cuda_backward_rows_kernel<T><<<p.n, kThreads, launch_shared_bytes(&icon_cuda_backward_rows_kernel<T>, p), stream>>>(
      p, stats.template data_ptr<T>(), g.template data_ptr<T>(), norms.template data_ptr<T>(), fst_p, target_grad,
      dx.template data_ptr<T>(), dprm.template data_ptr<T>(), dz.template data_ptr<T>(), dtprm.template data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  icon_cuda_backward_cols_kernel<T><<<p.m, kThreads, launch_shared_bytes(&icon_cuda_backward_cols_kernel<T>, p), stream>>>(
      p, stats.template data_ptr<T>(), g.template data_ptr<T>(), norms.template data_ptr<T>(), fst_p, target_grad,
      dy.template data_ptr<T>(), dzc.template data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dy, dprm, dz, dzc, dtprm};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_forward(ICON_FORWARD_PARAMS) {
  const NoAutocast no_autocast;
  check_forward_args(ICON_FORWARD_ARGS);
  check_conditional_only("cuda", normalization, symmetrize);
  c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble) return forward_t<double>(ICON_FORWARD_ARGS);
  return forward_t<float>(ICON_FORWARD_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_rows, ICON_FORWARD_PARAMS, const at::Tensor& valid, const at::Tensor& stats,
    bool need_target_grad, bool /*need_param_grad: dparam is always computed here*/,
    bool /*y_is_x: dx and dy are returned apart*/) {
  const NoAutocast no_autocast;
  check_backward_args(grad_rows, ICON_FORWARD_ARGS, valid, stats);
  check_conditional_only("cuda", normalization, symmetrize);
  c10::cuda::CUDAGuard guard(x.device());
  const bool target_grad = need_target_grad && target == "affinity";
  std::vector<at::Tensor> g = x.scalar_type() == at::kDouble
      ? backward_t<double>(grad_rows, ICON_FORWARD_ARGS, valid, stats, target_grad)
      : backward_t<float>(grad_rows, ICON_FORWARD_ARGS, valid, stats, target_grad);
  return backward_outputs(g, ICON_FORWARD_ARGS, target_grad);
}

}  // namespace icon

TORCH_LIBRARY_IMPL(icon_kernels, CUDA, m) {
  m.impl("cuda_forward", &icon::cuda_forward);
  m.impl("cuda_backward", &icon::cuda_backward);
}

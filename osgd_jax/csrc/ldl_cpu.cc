// Gram–Schmidt weights from Gram matrices on the CPU, as XLA FFI handlers.
//
// The same algebra as osgd_jax.orthogonalize.ldl_weights (its docstring has
// the maths): equilibrate M by S = diag(√M_kk), factorise C = L D Lᵀ with
// degenerate pivots (d_j ≤ tol) dropped, then solve Lᵀ w = coeff, with L
// scaled back by S. Why a kernel for O(K³) scalar work: written with XLA
// operations, each pivot's reciprocal feeds many later entries, so XLA:CPU
// cannot fuse the factorisation and launches it as about K + 10 tiny kernels
// (K = 8: 20, ~1.5 µs each), more than the arithmetic costs. Here it is one
// call for every matrix of the batch.
//
// Operands: gram (..., K, K) and tol, with one element or one per matrix.
// Results: weights and residual squared norms ‖ĝ_k‖², both (..., K). The
// attribute `rescale` scales each kept component back to its input's norm.
// Everything runs in double precision, whatever the dtype.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxExitsLdl = 64;
// Matrices are processed in groups, entry by entry across the group, so the
// compiler vectorises over matrices (a network's leaves: tens to hundreds);
// one matrix at a time is a chain of dependent divisions (K = 4, 66
// leaves: 18 µs, 4× XLA's vectorised kernels). The group's scratch stays
// within L1 and L2.
constexpr int64_t kGroupEntries = 1 << 12;  // K² × matrices per group

// The matrices [0, n) of a group, stored entry-major: g[(i * k + j) * n + b]
// is M_ij of matrix b. Writes weights and residual squared norms entry-major
// too: w[i * n + b].
void LdlGroup(const double* g, int64_t k, int64_t n, const double* tol,
              bool rescale, double* scratch, double* w, double* residual) {
  double* scale = scratch;            // k × n
  double* inv_scale = scale + k * n;  // k × n
  double* pivot = inv_scale + k * n;  // k × n
  double* column = pivot + k * n;     // k × n
  double* lower = column + k * n;     // k × k × n, (i, j) at (i * k + j) * n
  for (int64_t i = 0; i < k; ++i) {
    const double* d = g + (i * k + i) * n;
    for (int64_t b = 0; b < n; ++b) {
      const double root = std::sqrt(d[b]);  // NaN stays NaN, as in XLA
      scale[i * n + b] = root;
      // Selects with safe operands on both sides, so that the loops
      // vectorise: the unused side never divides by zero.
      inv_scale[i * n + b] = root > 0 ? 1.0 / (root > 0 ? root : 1.0) : 0.0;
    }
  }
  // Column j of L below the diagonal, and pivot d_j, from the columns before.
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = j; i < k; ++i) {
      const double* m = g + (i * k + j) * n;
      double* c = column + i * n;
      for (int64_t b = 0; b < n; ++b) {
        c[b] = m[b] * inv_scale[i * n + b] * inv_scale[j * n + b];
      }
      for (int64_t q = 0; q < j; ++q) {
        const double* li = lower + (i * k + q) * n;
        const double* lj = lower + (j * k + q) * n;
        const double* p = pivot + q * n;
        for (int64_t b = 0; b < n; ++b) c[b] -= li[b] * lj[b] * p[b];
      }
    }
    const double* cj = column + j * n;
    for (int64_t b = 0; b < n; ++b) {
      pivot[j * n + b] = cj[b] > tol[b] ? cj[b] : 0.0;
    }
    for (int64_t i = j + 1; i < k; ++i) {
      const double* ci = column + i * n;
      double* l = lower + (i * k + j) * n;
      for (int64_t b = 0; b < n; ++b) {
        const bool keep = cj[b] > tol[b];
        l[b] = keep ? ci[b] / (keep ? cj[b] : 1.0) : 0.0;
      }
    }
  }
  // Lᵀ w = coeff with L_ij = L'_ij s_i / s_j: w_j = coeff_j − Σ_{i>j} L_ij w_i.
  for (int64_t j = k - 1; j >= 0; --j) {
    const double* p = pivot + j * n;
    double* wj = w + j * n;
    for (int64_t b = 0; b < n; ++b) {
      const bool keep = p[b] > 0;
      const double root = std::sqrt(keep ? p[b] : 1.0);
      wj[b] = keep ? (rescale ? 1.0 / root : 1.0) : 0.0;
    }
    for (int64_t i = j + 1; i < k; ++i) {
      const double* l = lower + (i * k + j) * n;
      const double* wi = w + i * n;
      for (int64_t b = 0; b < n; ++b) {
        wj[b] -= l[b] * scale[i * n + b] * inv_scale[j * n + b] * wi[b];
      }
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const double* d = g + (i * k + i) * n;
    for (int64_t b = 0; b < n; ++b) {
      residual[i * n + b] = pivot[i * n + b] * d[b];
    }
  }
}

template <ffi::DataType D>
ffi::Error LdlImpl(ffi::Buffer<D> gram, ffi::Buffer<D> tol,
                   ffi::ResultBuffer<D> weights, ffi::ResultBuffer<D> residual,
                   bool rescale) {
  using T = ffi::NativeType<D>;
  auto dims = gram.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 1] != dims[dims.size() - 2]) {
    return ffi::Error::InvalidArgument(
        "osgd ldl: the operand must have shape (..., K, K)");
  }
  const int64_t k = dims[dims.size() - 1];
  if (k < 1 || k > kMaxExitsLdl) {
    return ffi::Error::InvalidArgument("osgd ldl: K must be in 1..64");
  }
  const int64_t batch = int64_t(gram.element_count()) / (k * k);
  const int64_t num_tol = int64_t(tol.element_count());
  if (num_tol != 1 && num_tol != batch) {
    return ffi::Error::InvalidArgument(
        "osgd ldl: tol must have one element or one per matrix");
  }
  if (int64_t(weights->element_count()) != batch * k ||
      int64_t(residual->element_count()) != batch * k) {
    return ffi::Error::InvalidArgument(
        "osgd ldl: the results must have shape (..., K)");
  }
  const T* in = gram.typed_data();
  const T* tols = tol.typed_data();
  T* w_out = weights->typed_data();
  T* r_out = residual->typed_data();
  const int64_t group =
      std::min(batch, std::max<int64_t>(1, kGroupEntries / (k * k)));
  std::vector<double> g(k * k * group), t(group), w(k * group), r(k * group);
  std::vector<double> scratch((4 * k + k * k) * group);
  for (int64_t b0 = 0; b0 < batch; b0 += group) {
    const int64_t n = std::min(group, batch - b0);
    for (int64_t b = 0; b < n; ++b) {
      const T* m = in + (b0 + b) * k * k;
      for (int64_t e = 0; e < k * k; ++e) g[e * n + b] = double(m[e]);
      t[b] = double(tols[num_tol == 1 ? 0 : b0 + b]);
    }
    LdlGroup(g.data(), k, n, t.data(), rescale, scratch.data(), w.data(),
             r.data());
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t i = 0; i < k; ++i) {
        w_out[(b0 + b) * k + i] = T(w[i * n + b]);
        r_out[(b0 + b) * k + i] = T(r[i * n + b]);
      }
    }
  }
  return ffi::Error::Success();
}

// The handlers' signature, per dtype (`template`: the builder's type
// depends on D).
template <ffi::DataType D>
auto LdlBinding() {
  return ffi::Ffi::Bind()
      .template Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>()
      .template Attr<bool>("rescale");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OsgdLdlF32, LdlImpl<ffi::F32>,
                              LdlBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OsgdLdlF64, LdlImpl<ffi::F64>,
                              LdlBinding<ffi::F64>());

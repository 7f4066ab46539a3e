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
// Sums run in double precision, whatever the dtype.

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxExitsLdl = 64;

// One K×K matrix: writes w (K) and the residual squared norms (K);
// `lower` is scratch for the K×K factor.
template <typename T>
void LdlOne(const T* gram, int64_t k, double tol, bool rescale, double* lower,
            T* weights, T* residual) {
  double scale[kMaxExitsLdl], inv_scale[kMaxExitsLdl], pivot[kMaxExitsLdl];
  double w[kMaxExitsLdl];
  for (int64_t i = 0; i < k; ++i) {
    scale[i] = std::sqrt(double(gram[i * k + i]));
    inv_scale[i] = scale[i] > 0 ? 1.0 / scale[i] : 0.0;
  }
  // Column j of L below the diagonal, and pivot d_j, from the columns before.
  for (int64_t j = 0; j < k; ++j) {
    double column[kMaxExitsLdl];
    for (int64_t i = j; i < k; ++i) {
      double entry = double(gram[i * k + j]) * inv_scale[i] * inv_scale[j];
      for (int64_t m = 0; m < j; ++m) {
        entry -= lower[i * k + m] * lower[j * k + m] * pivot[m];
      }
      column[i] = entry;
    }
    const bool keep = column[j] > tol;
    pivot[j] = keep ? column[j] : 0.0;
    for (int64_t i = j + 1; i < k; ++i) {
      lower[i * k + j] = keep ? column[i] / column[j] : 0.0;
    }
  }
  // Lᵀ w = coeff with L_ij = L'_ij s_i / s_j: w_j = coeff_j − Σ_{i>j} L_ij w_i.
  for (int64_t j = k - 1; j >= 0; --j) {
    const bool keep = pivot[j] > 0;
    double value = keep ? (rescale ? 1.0 / std::sqrt(pivot[j]) : 1.0) : 0.0;
    for (int64_t i = j + 1; i < k; ++i) {
      value -= lower[i * k + j] * scale[i] * inv_scale[j] * w[i];
    }
    w[j] = value;
  }
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = T(w[i]);
    residual[i] = T(pivot[i] * double(gram[i * k + i]));
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
  std::vector<double> lower(k * k);
  for (int64_t b = 0; b < batch; ++b) {
    LdlOne<T>(in + b * k * k, k, double(tols[num_tol == 1 ? 0 : b]), rescale,
              lower.data(), weights->typed_data() + b * k, residual->typed_data() + b * k);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    OsgdLdlF32, LdlImpl<ffi::F32>,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<bool>("rescale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    OsgdLdlF64, LdlImpl<ffi::F64>,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F64>>()
        .Arg<ffi::Buffer<ffi::F64>>()
        .Ret<ffi::Buffer<ffi::F64>>()
        .Ret<ffi::Buffer<ffi::F64>>()
        .Attr<bool>("rescale"));

// Gram matrices of stacked per-exit gradients on the CPU, as XLA FFI handlers.
//
// Each operand is a stacked leaf of shape (K, *s), row-major: K rows of n
// contiguous values. The handler writes the (L, K, K) Gram matrices of its L
// operands, M_l = G_l G_lᵀ, in one call. Why a kernel of our own
// (benchmarks/bench_transform.py has the numbers):
//
// * XLA:CPU hands M = G Gᵀ to a matrix-multiply library tuned for large
//   square products. Here the output is tiny (K ≤ 16) and the contraction
//   long, and the library streams it well below memory speed, on one thread;
// * a network has tens to hundreds of small parameter tensors, and XLA:CPU
//   pays a fixed launch cost per kernel. One call here serves every leaf.
//
// The work: for each tile of columns (K rows of it stay in L1), every pair of
// row blocks (≤ 4 rows each) accumulates its block of the upper triangle in
// SIMD registers: each loaded vector serves up to four multiply-adds, and a
// diagonal block forms only its upper half. osgd_jax.native compiles this
// file for the CPU it runs on, and the blocks are sized to that CPU's SIMD
// registers (an off-diagonal block that would not fit runs in two passes).
// Tiles are summed in double precision, so the result does not drift with n.
// Large inputs are split into chunks of columns run on XLA's intra-op thread
// pool (parallel.h).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxExits = 64;
constexpr int kMaxBlock = 4;          // rows per register block
constexpr int64_t kTileBytes = 16 << 10;    // K rows of a tile: half of L1
constexpr int64_t kChunkColumns = 1 << 13;  // columns per thread-pool task
// How far ahead of the columns in use each row is prefetched. With the
// hardware prefetcher alone a core waits on memory between its bursts of
// multiply-adds. AVX2, 2 threads, medians of interleaved runs: K=8, 10⁶
// columns 1.64-1.89 -> 1.39-1.60 ms; K=4, 5·10⁶ 2.70 -> 2.48 ms (2 KiB ahead
// was as good, 4 KiB worse, and columns in L2 are unaffected).
constexpr int64_t kPrefetchBytes = 1 << 10;
// Below this many multiply-adds (columns × K(K+1)/2) one thread runs the
// call: waking the pool costs more, and inside a training step the pool's
// threads are often busy with the step's other kernels...
constexpr int64_t kParallelMin = 1 << 20;
// ...unless the update's second pass, Σ_k w_k g_k over a leaf (K rows read,
// one written), moves this many bytes: XLA:CPU then splits that pass over
// its pool (256 KiB per task, at least two tasks), so the pool is woken in
// this update anyway, and a Gram split over it costs no wake-up of its own.
// 2 cores, medians of interleaved runs of the whole update: K=2, 10⁵ columns
// 50-78 -> 29-44 µs; K=2, 3·10⁵ 143-178 -> 64-73 µs; K=8, 10⁴ unchanged.
constexpr int64_t kXlaParallelPassBytes = 512 << 10;

using osgd_jax::kSimdRegisters;
using osgd_jax::Load;
using osgd_jax::Simd;

// acc[a][b] += Σ_c rows_i[a][c] · rows_j[b][c] over columns [begin, end).
// On a diagonal block (rows_j == rows_i) only b ≥ a is formed, from one set
// of loads. A block of fewer than 8 sums keeps two sets of them, for two
// vectors of columns at a time: a multiply-add waits ~4 cycles for the last
// one into the same register, and two can start per cycle (K = 2: 1.7× faster).
template <typename T, int BI, int BJ, bool kDiagonal>
OSGD_NOINLINE void Block(const T* const* rows_i, const T* const* rows_j,
                         int64_t begin, int64_t end, double* acc, int64_t ld) {
  using V = typename Simd<T>::Vec;
  constexpr int W = Simd<T>::kWidth;
  static_assert(!kDiagonal || BI == BJ, "a diagonal block is square");
  constexpr int kSums = kDiagonal ? BI * (BI + 1) / 2 : BI * BJ;
  constexpr int U = kSums < 8 ? 2 : 1;  // sets of sums
  V sum[U][BI][BJ];
  for (int u = 0; u < U; ++u)
    for (int a = 0; a < BI; ++a)
      for (int b = 0; b < BJ; ++b) sum[u][a][b] = V{};
  // One vector of columns from c into sum set u.
  auto step = [&](int64_t c, int u) __attribute__((always_inline)) {
    V x[BI], y[BJ];
    // The diagonal blocks together visit every row once per tile: they
    // prefetch, one cache line at a time.
    if constexpr (kDiagonal) {
      if (c % (64 / sizeof(T)) == 0) {
        for (int a = 0; a < BI; ++a) {
          __builtin_prefetch(rows_i[a] + c + kPrefetchBytes / sizeof(T));
        }
      }
    }
    for (int a = 0; a < BI; ++a) x[a] = Load(rows_i[a] + c);
    for (int b = 0; b < BJ; ++b) y[b] = kDiagonal ? x[b] : Load(rows_j[b] + c);
    for (int a = 0; a < BI; ++a)
      for (int b = kDiagonal ? a : 0; b < BJ; ++b) sum[u][a][b] += x[a] * y[b];
  };
  int64_t c = begin;
  for (; c + U * W <= end; c += U * W)
    for (int u = 0; u < U; ++u) step(c + u * W, u);
  for (; c + W <= end; c += W) step(c, 0);
  for (int a = 0; a < BI; ++a)
    for (int b = kDiagonal ? a : 0; b < BJ; ++b) {
      double total = 0.0;
      for (int u = 0; u < U; ++u)
        for (int w = 0; w < W; ++w) total += sum[u][a][b][w];
      for (int64_t t = c; t < end; ++t)
        total += double(rows_i[a][t]) * double(rows_j[b][t]);
      acc[a * ld + b] += total;
    }
}

// An off-diagonal block whose sums and loaded rows would not fit in the SIMD
// registers is done as two passes over halves of its rows. With AVX2's 16, a
// 4×4 block in one pass spilled: K = 8, 10⁵ columns took 171 µs on one
// thread, against 124 µs in two 2×4 passes (the extra loads hit L1).
template <typename T, int BI, int BJ>
OSGD_INLINE void OffDiagonal(const T* const* ri, const T* const* rj,
                             int64_t begin, int64_t end, double* acc,
                             int64_t ld) {
  if constexpr (BI * BJ + BI + BJ > kSimdRegisters) {
    constexpr int kHalf = BI / 2;
    Block<T, kHalf, BJ, false>(ri, rj, begin, end, acc, ld);
    Block<T, BI - kHalf, BJ, false>(ri + kHalf, rj, begin, end,
                                    acc + kHalf * ld, ld);
  } else {
    Block<T, BI, BJ, false>(ri, rj, begin, end, acc, ld);
  }
}

template <typename T, int BI>
OSGD_INLINE void BlockRow(int bj, bool diagonal, const T* const* ri,
                          const T* const* rj, int64_t begin, int64_t end,
                          double* acc, int64_t ld) {
  if (diagonal) return Block<T, BI, BI, true>(ri, rj, begin, end, acc, ld);
  switch (bj) {
    case 1: return OffDiagonal<T, BI, 1>(ri, rj, begin, end, acc, ld);
    case 2: return OffDiagonal<T, BI, 2>(ri, rj, begin, end, acc, ld);
    case 3: return OffDiagonal<T, BI, 3>(ri, rj, begin, end, acc, ld);
    default: return OffDiagonal<T, BI, 4>(ri, rj, begin, end, acc, ld);
  }
}

// The upper triangle of Σ_c rows[i][c] rows[j][c] over [begin, end), added
// to acc (k × k, row-major).
template <typename T>
OSGD_INLINE void GramColumns(const T* const* rows, int64_t k, int64_t begin,
                             int64_t end, double* acc) {
  // Row blocks of near-equal size ≤ kMaxBlock: K=8 → 4+4, K=6 → 3+3.
  const int64_t num_blocks = (k + kMaxBlock - 1) / kMaxBlock;
  int64_t starts[kMaxExits + 1];
  for (int64_t b = 0; b <= num_blocks; ++b) starts[b] = b * k / num_blocks;
  const int64_t tile =
      std::max<int64_t>(64, kTileBytes / (k * int64_t(sizeof(T))) / 64 * 64);
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile);
    for (int64_t bi = 0; bi < num_blocks; ++bi) {
      const int64_t i0 = starts[bi], ni = starts[bi + 1] - i0;
      for (int64_t bj = bi; bj < num_blocks; ++bj) {
        const int64_t j0 = starts[bj], nj = starts[bj + 1] - j0;
        double* out = acc + i0 * k + j0;
        const T* const* ri = rows + i0;
        const T* const* rj = rows + j0;
        const bool diagonal = bi == bj;
        switch (ni) {
          case 1: BlockRow<T, 1>(nj, diagonal, ri, rj, t0, t1, out, k); break;
          case 2: BlockRow<T, 2>(nj, diagonal, ri, rj, t0, t1, out, k); break;
          case 3: BlockRow<T, 3>(nj, diagonal, ri, rj, t0, t1, out, k); break;
          default: BlockRow<T, 4>(nj, diagonal, ri, rj, t0, t1, out, k); break;
        }
      }
    }
  }
}

// A range of columns of one operand; its partial Gram goes to `partial`.
struct WorkItem {
  int64_t leaf, begin, end;
};

template <ffi::DataType D>
ffi::Error GramsImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                     ffi::ResultBuffer<D> out) {
  using T = ffi::NativeType<D>;
  const int64_t num_leaves = int64_t(args.size());
  auto out_dims = out->dimensions();
  if (out_dims.size() != 3 || out_dims[0] != num_leaves ||
      out_dims[1] != out_dims[2]) {
    return ffi::Error::InvalidArgument(
        "osgd gram: the result must have shape (L, K, K) for L operands");
  }
  const int64_t k = out_dims[1];
  if (k < 1 || k > kMaxExits) {
    return ffi::Error::InvalidArgument("osgd gram: K must be in 1..64");
  }
  // Row pointers of every operand, and the work split into column ranges.
  std::vector<const T*> rows(num_leaves * k);
  std::vector<WorkItem> items;
  int64_t total = 0;           // multiply-adds
  int64_t widest_pass = 0;     // bytes of the largest leaf's weighted sum
  for (int64_t l = 0; l < num_leaves; ++l) {
    auto leaf = args.get<ffi::Buffer<D>>(l);
    if (leaf.has_error()) return leaf.error();
    auto dims = leaf->dimensions();
    if (dims.size() < 1 || dims[0] != k) {
      return ffi::Error::InvalidArgument(
          "osgd gram: every operand must be a stacked leaf (K, ...)");
    }
    const int64_t n = int64_t(leaf->element_count()) / k;
    for (int64_t i = 0; i < k; ++i) rows[l * k + i] = leaf->typed_data() + i * n;
    for (int64_t b = 0; b < n; b += kChunkColumns) {
      items.push_back({l, b, std::min(n, b + kChunkColumns)});
    }
    total += n * k * (k + 1) / 2;
    widest_pass = std::max<int64_t>(widest_pass,
                                    (k + 1) * n * int64_t(sizeof(T)));
  }
  const int64_t num_items = int64_t(items.size());
  std::vector<double> partial(num_items * k * k, 0.0);
  auto run = [&](int64_t item) {
    const WorkItem& w = items[item];
    GramColumns<T>(rows.data() + w.leaf * k, k, w.begin, w.end,
                   partial.data() + item * k * k);
  };

  // The calling thread is one of the workers: with as many threads as the
  // pool has (one per core), a third thread on two cores only adds context
  // switches (K=8, 10⁵ columns: 92 µs on one thread, 74 µs with the caller
  // and two pool threads, 55 µs with the caller and one).
  const bool parallel =
      total >= kParallelMin || widest_pass >= kXlaParallelPassBytes;
  osgd_jax::ParallelItems(pool, num_items,
                          parallel ? pool.num_threads() : 1,
                          [&](int64_t, int64_t item) { run(item); });

  T* result = out->typed_data();
  std::vector<double> sum(k * k);
  int64_t item = 0;
  for (int64_t l = 0; l < num_leaves; ++l) {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (; item < num_items && items[item].leaf == l; ++item) {
      for (int64_t e = 0; e < k * k; ++e) sum[e] += partial[item * k * k + e];
    }
    T* m = result + l * k * k;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = i; j < k; ++j) m[i * k + j] = m[j * k + i] = T(sum[i * k + j]);
    }
  }
  return ffi::Error::Success();
}

// The handlers' signature, per dtype (`template`: the builder's type
// depends on D).
template <ffi::DataType D>
auto GramsBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .RemainingArgs()
      .template Ret<ffi::Buffer<D>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OsgdGramsF32, GramsImpl<ffi::F32>,
                              GramsBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OsgdGramsF64, GramsImpl<ffi::F64>,
                              GramsBinding<ffi::F64>());

// The weight gradient of a 2-D convolution on the CPU, as XLA FFI handlers.
//
// For y = conv(x, w) with x (N, H, W, Ci) (NHWC), w (KH, KW, Ci, Co) (HWIO),
// strides (sh, sw) and top/left padding (pt, pl), the gradient of w from the
// cotangent dy (N, OH, OW, Co) is
//
//   dw[a, b, c, o] = Σ_{n, i, j} x[n, i·sh + a − pt, j·sw + b − pl, c] · dy[n, i, j, o]
//
// (terms that fall in the padding are zero). Why a kernel of our own:
// XLA:CPU runs this as a "backward filter" convolution far below the
// machine's speed (a 3×3 conv, 64×32×32×16: 12–25 ms on 2 AVX2 cores, where
// PyTorch takes 8 ms; benchmarks/README.md), and the weight gradients are
// most of a ResNet step's backward. It is a matrix product with a tiny
// output (KH·KW·Ci × Co) and a long contraction (N·OH·OW), which the code
// below runs near the multiply-add units' peak (the conv above: 2.2 ms, 69
// G multiply-adds/s of the 2 cores' 95; 64 channels: 93): for each chunk of
// output rows of an image, which with its input rows stays in L1, and each
// kernel tap (a, b), a block of ≤ kRows input channels × 2 vectors of
// output channels is accumulated in SIMD registers over the chunk's
// positions. Images are spread over XLA's intra-op thread pool
// (parallel.h), each worker summing into its own copy of dw, and the copies
// are added at the end.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using osgd_jax::Broadcast;
using osgd_jax::kSimdRegisters;
using osgd_jax::Load;
using osgd_jax::Simd;
using osgd_jax::Store;

constexpr int kVectors = 2;  // vectors of output channels per block
// Input channels per block: its kRows × kVectors sums, the kVectors loaded
// cotangents and one broadcast input fit in the registers (AVX2: 6).
constexpr int kRows = (kSimdRegisters - kVectors - 1) / kVectors;
// Below this many multiply-adds one thread runs the call: waking the pool
// costs more, and inside a training step its threads are often busy.
constexpr int64_t kParallelMin = 1 << 21;
// Output positions per register block call (see ImageWeightGrad).
constexpr int64_t kChunkPositions = 128;

// The output positions a block sums over: `rows` output rows of `cols`
// positions each, and how far apart they are in x and in dy.
struct Positions {
  int64_t rows, cols, x_row, x_col, dy_row, dy_col;
};

// acc[r, v·W .. v·W+W) += Σ_t x_t[r] · dy_t[v·W ..] over the positions t,
// for R rows (input channels) and V vectors (output channels); acc rows are
// `ld` apart.
template <typename T, int R, int V>
OSGD_NOINLINE void Block(const T* x, const T* dy, const Positions& p, T* acc,
                         int64_t ld) {
  using Vec = typename Simd<T>::Vec;
  constexpr int W = Simd<T>::kWidth;
  Vec sum[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) sum[r][v] = Load(acc + r * ld + v * W);
  // One loop over all positions, stepping to the next row after `cols`:
  // with two nested loops GCC stored every sum to the stack at each step.
  const int64_t cols = p.cols, x_col = p.x_col, dy_col = p.dy_col;
  const int64_t x_wrap = p.x_row - cols * x_col;
  const int64_t dy_wrap = p.dy_row - cols * dy_col;
  const T* xp = x;
  const T* dp = dy;
  int64_t t = 0;
  for (int64_t left = p.rows * cols; left > 0; --left) {
    Vec d[V];
    for (int v = 0; v < V; ++v) d[v] = Load(dp + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec xr = Broadcast(xp + r);
      for (int v = 0; v < V; ++v) sum[r][v] += xr * d[v];
    }
    xp += x_col;
    dp += dy_col;
    if (++t == cols) {
      t = 0;
      xp += x_wrap;
      dp += dy_wrap;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Store(acc + r * ld + v * W, sum[r][v]);
}

// The same for `rows` rows and the last `cols` (< one vector) output
// channels.
template <typename T>
void Tail(const T* x, const T* dy, const Positions& p, T* acc, int64_t ld,
          int rows, int cols) {
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < cols; ++o) {
      T total = acc[r * ld + o];
      for (int64_t i = 0; i < p.rows; ++i)
        for (int64_t t = 0; t < p.cols; ++t)
          total += x[i * p.x_row + t * p.x_col + r] *
                   dy[i * p.dy_row + t * p.dy_col + o];
      acc[r * ld + o] = total;
    }
}

template <typename T, int V>
inline void Rows(int rows, const T* x, const T* dy, const Positions& p,
                 T* acc, int64_t ld) {
  static_assert(kRows <= 14, "add cases");
  switch (rows) {
#define OSGD_ROWS_CASE(n)                            \
  case n:                                            \
    if constexpr (n <= kRows)                        \
      return Block<T, n, V>(x, dy, p, acc, ld);      \
    break;
    OSGD_ROWS_CASE(1) OSGD_ROWS_CASE(2) OSGD_ROWS_CASE(3) OSGD_ROWS_CASE(4)
    OSGD_ROWS_CASE(5) OSGD_ROWS_CASE(6) OSGD_ROWS_CASE(7) OSGD_ROWS_CASE(8)
    OSGD_ROWS_CASE(9) OSGD_ROWS_CASE(10) OSGD_ROWS_CASE(11)
    OSGD_ROWS_CASE(12) OSGD_ROWS_CASE(13) OSGD_ROWS_CASE(14)
#undef OSGD_ROWS_CASE
  }
}

struct Geometry {
  int64_t n, h, w, ci, oh, ow, co, kh, kw, sh, sw, pt, pl;
};

// Adds image `image`'s terms of dw to acc (KH, KW, Ci, Co).
template <typename T>
void ImageWeightGrad(const Geometry& g, const T* x, const T* dy,
                     int64_t image, T* acc) {
  constexpr int W = Simd<T>::kWidth;
  const int64_t full = g.co / (kVectors * W) * (kVectors * W);
  const int64_t single = g.co / W * W;
  // Input channels in near-equal blocks of ≤ kRows (16 → 6 + 5 + 5).
  const int64_t num_blocks = (g.ci + kRows - 1) / kRows;
  const T* x_image = x + image * g.h * g.w * g.ci;
  const T* dy_image = dy + image * g.oh * g.ow * g.co;
  // Output rows per block call: ~kChunkPositions positions, so that a
  // call's fixed cost (its sums loaded and stored) is small, while its rows
  // of x and dy stay in L1 for the next tap and channel block.
  const int64_t chunk = std::max<int64_t>(1, kChunkPositions / g.ow);
  for (int64_t i0 = 0; i0 < g.oh; i0 += chunk) {
    const int64_t i_end = std::min(g.oh, i0 + chunk);
    for (int64_t a = 0; a < g.kh; ++a) {
      // Output rows i whose input row i·sh + a − pt is inside.
      const int64_t row_shift = a - g.pt;
      const int64_t i1 = std::max(
          i0, row_shift >= 0 ? 0 : (-row_shift + g.sh - 1) / g.sh);
      const int64_t last_row = g.h - 1 - row_shift;  // i·sh ≤ last_row
      const int64_t i2 =
          last_row < 0 ? 0 : std::min(i_end, last_row / g.sh + 1);
      if (i2 <= i1) continue;
      for (int64_t b = 0; b < g.kw; ++b) {
        // Output columns j whose input column j·sw + b − pl is inside.
        const int64_t shift = b - g.pl;
        const int64_t j0 = shift >= 0 ? 0 : (-shift + g.sw - 1) / g.sw;
        const int64_t last = g.w - 1 - shift;  // j·sw ≤ last
        const int64_t j1 = last < 0 ? 0 : std::min(g.ow, last / g.sw + 1);
        if (j1 <= j0) continue;
        const Positions p{i2 - i1,        j1 - j0,   g.sh * g.w * g.ci,
                          g.sw * g.ci,    g.ow * g.co, g.co};
        const T* xs =
            x_image + ((i1 * g.sh + row_shift) * g.w + j0 * g.sw + shift) * g.ci;
        const T* ds = dy_image + (i1 * g.ow + j0) * g.co;
        T* tap = acc + (a * g.kw + b) * g.ci * g.co;
        for (int64_t blk = 0; blk < num_blocks; ++blk) {
          const int64_t c = blk * g.ci / num_blocks;
          const int rows = int((blk + 1) * g.ci / num_blocks - c);
          T* ac = tap + c * g.co;
          int64_t o = 0;
          for (; o < full; o += kVectors * W)
            Rows<T, kVectors>(rows, xs + c, ds + o, p, ac + o, g.co);
          for (; o < single; o += W)
            Rows<T, 1>(rows, xs + c, ds + o, p, ac + o, g.co);
          if (o < g.co)
            Tail<T>(xs + c, ds + o, p, ac + o, g.co, rows, int(g.co - o));
        }
      }
    }
  }
}

template <ffi::DataType D>
ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<D> x,
                          ffi::Buffer<D> dy, ffi::ResultBuffer<D> dw,
                          int64_t stride_h, int64_t stride_w, int64_t pad_top,
                          int64_t pad_left) {
  using T = ffi::NativeType<D>;
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || dd.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "osgd conv: x (N, H, W, Ci), dy (N, OH, OW, Co) and dw (KH, KW, Ci,"
        " Co) must all be 4-D");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], dd[1], dd[2], dd[3], wd[0], wd[1],
             stride_h, stride_w, pad_top, pad_left};
  if (dd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || g.sh < 1 ||
      g.sw < 1 || g.pt < 0 || g.pl < 0) {
    return ffi::Error::InvalidArgument(
        "osgd conv: x, dy and dw disagree on N, Ci or Co, or a stride < 1 or"
        " a padding < 0");
  }
  const int64_t size = g.kh * g.kw * g.ci * g.co;
  T* out = dw->typed_data();
  std::fill(out, out + size, T(0));
  if (g.n == 0 || g.oh == 0 || g.ow == 0) return ffi::Error::Success();
  const int64_t work = g.n * g.oh * g.ow * size;
  const int64_t workers =
      work < kParallelMin ? 1 : std::min<int64_t>(g.n, pool.num_threads());
  // Worker 0 may be any thread; every worker sums into its own copy.
  std::vector<T> copies(std::max<int64_t>(0, workers - 1) * size, T(0));
  osgd_jax::ParallelItems(pool, g.n, workers, [&](int64_t worker,
                                                  int64_t image) {
    T* acc = worker == 0 ? out : copies.data() + (worker - 1) * size;
    ImageWeightGrad<T>(g, x.typed_data(), dy.typed_data(), image, acc);
  });
  for (int64_t w = 0; w + 1 < workers; ++w) {
    const T* copy = copies.data() + w * size;
    for (int64_t e = 0; e < size; ++e) out[e] += copy[e];
  }
  return ffi::Error::Success();
}

// The handlers' signature, per dtype (`template`: the builder's type
// depends on D).
template <ffi::DataType D>
auto WeightGradBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<D>>()
      .template Arg<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>()
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OsgdConvWeightGradF32, WeightGradImpl<ffi::F32>,
                              WeightGradBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OsgdConvWeightGradF64, WeightGradImpl<ffi::F64>,
                              WeightGradBinding<ffi::F64>());

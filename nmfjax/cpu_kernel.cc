// The fused NMF forward pass on a CPU: all N multiplicative updates of a tile of positions while the
// tile stays in the core's caches (arXiv 2503.20398, eq. 3, or eq. 6 with epsilon). nmfjax.cpu_kernel
// compiles this file with the machine's C++ compiler (-O3 -march=native) and registers it with XLA
// as the FFI target "nmfjax_nmf_forward".
//
// x: (P, S) float32, w: (S, I) float32  ->  h: (P, I) float32, h = 1/I updated N times:
//   R = h W^T + 1e-20,  f = (x / R) W,  h <- h * f  (or h * (1 + epsilon f)),  h <- h / (sum_i h + 1e-19)
// XLA's loop materialises R and x / R for all P positions in every update; here each tile's x, R and
// h stay in L1/L2, and the two products run as register-blocked outer products over 16-float vectors.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register
constexpr int kLanes = 16;
constexpr float kReconstructionEps = 1e-20f;  // nmfjax.numerics.RECONSTRUCTION_EPS
constexpr float kNormalizeEps = 1e-19f;       // nmfjax.numerics.NORMALIZE_EPS

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec Splat(float a) { return Vec{} + a; }

// a / b. With AVX-512: the 14-bit reciprocal and one Newton step (within 2 ulp of the quotient, a
// third of the division's cost); it is the most frequent operation after the products' FMAs.
inline Vec Divide(Vec a, Vec b) {
#if defined(__AVX512F__)
  __m512 bm;
  std::memcpy(&bm, &b, sizeof bm);
  __m512 rm = _mm512_maskz_rcp14_ps(0xFFFF, bm);  // (the unmasked form trips GCC 12's -Wuninitialized)
  Vec r;
  std::memcpy(&r, &rm, sizeof r);
  r = r * (Splat(2.0f) - b * r);
  return a * r;
#else
  return a / b;
#endif
}

// acc[MR][NV] = A[MR x K] B[K x 16 NV]; rows of A lda apart, rows of B ldb apart.
template <int MR, int NV>
inline void Product(const float* a, int lda, const float* b, int ldb, int k, Vec (&acc)[MR][NV]) {
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int p = 0; p < k; ++p) {
    Vec column[NV];
    for (int v = 0; v < NV; ++v) column[v] = Load(b + static_cast<size_t>(p) * ldb + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const Vec broadcast = Splat(a[static_cast<size_t>(r) * lda + p]);
      for (int v = 0; v < NV; ++v) acc[r][v] += broadcast * column[v];
    }
  }
}

// ratio = x / (h W^T + eps) for MR rows and 16 NV columns.
template <int MR, int NV>
void RatioBlock(const float* h, int ldh, const float* wt, int ldwt, int hidden, const float* x, float* ratio, int ld) {
  Vec acc[MR][NV];
  Product<MR, NV>(h, ldh, wt, ldwt, hidden, acc);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      const size_t at = static_cast<size_t>(r) * ld + v * kLanes;
      Store(ratio + at, Divide(Load(x + at), acc[r][v] + Splat(kReconstructionEps)));
    }
}

// h *= ratio W (pure) or h *= 1 + epsilon ratio W, for MR rows and 16 NV hidden units.
template <int MR, int NV, bool kPure>
void FactorBlock(const float* ratio, int ldr, const float* w, int ldw, int features, float* h, int ldh, float epsilon) {
  Vec acc[MR][NV];
  Product<MR, NV>(ratio, ldr, w, ldw, features, acc);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      const size_t at = static_cast<size_t>(r) * ldh + v * kLanes;
      const Vec factor = kPure ? acc[r][v] : Splat(1.0f) + Splat(epsilon) * acc[r][v];
      Store(h + at, Load(h + at) * factor);
    }
}

// MR x NV register blocks: at most 24 accumulators of the 32 registers.
template <int NV>
constexpr int kRows = NV == 1 ? 12 : NV == 2 ? 12 : NV == 3 ? 8 : 6;

template <int NV>
void RatioRows(int rows, const float* h, int ldh, const float* wt, int ldwt, int hidden, const float* x, float* ratio,
               int ld) {
  constexpr int MR = kRows<NV>;
  int r = 0;
  for (; r + MR <= rows; r += MR)
    RatioBlock<MR, NV>(h + static_cast<size_t>(r) * ldh, ldh, wt, ldwt, hidden, x + static_cast<size_t>(r) * ld,
                       ratio + static_cast<size_t>(r) * ld, ld);
  for (; r < rows; ++r)
    RatioBlock<1, NV>(h + static_cast<size_t>(r) * ldh, ldh, wt, ldwt, hidden, x + static_cast<size_t>(r) * ld,
                      ratio + static_cast<size_t>(r) * ld, ld);
}

template <int NV, bool kPure>
void FactorRows(int rows, const float* ratio, int ldr, const float* w, int ldw, int features, float* h, int ldh,
                float epsilon) {
  constexpr int MR = kRows<NV>;
  int r = 0;
  for (; r + MR <= rows; r += MR)
    FactorBlock<MR, NV, kPure>(ratio + static_cast<size_t>(r) * ldr, ldr, w, ldw, features,
                               h + static_cast<size_t>(r) * ldh, ldh, epsilon);
  for (; r < rows; ++r)
    FactorBlock<1, NV, kPure>(ratio + static_cast<size_t>(r) * ldr, ldr, w, ldw, features,
                              h + static_cast<size_t>(r) * ldh, ldh, epsilon);
}

// A column chunk of nv (1 to 4) vectors.
void RatioChunk(int nv, int rows, const float* h, int ldh, const float* wt, int ldwt, int hidden, const float* x,
                float* ratio, int ld) {
  switch (nv) {
    case 1: return RatioRows<1>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
    case 2: return RatioRows<2>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
    case 3: return RatioRows<3>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
    default: return RatioRows<4>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
  }
}

template <bool kPure>
void FactorChunk(int nv, int rows, const float* ratio, int ldr, const float* w, int ldw, int features, float* h,
                 int ldh, float epsilon) {
  switch (nv) {
    case 1: return FactorRows<1, kPure>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
    case 2: return FactorRows<2, kPure>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
    case 3: return FactorRows<3, kPure>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
    default: return FactorRows<4, kPure>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
  }
}

int RoundUp(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// One call's shapes, its weight in the two layouts the products read, padded to whole vectors
// (padded features have x = 0 and W = 0, padded hidden units start at h = 0 and stay there).
struct Problem {
  const float* x;
  float* h;
  int64_t positions;
  int features, hidden, padded_features, padded_hidden, tile;
  int64_t iterations;
  float epsilon;
  bool pure;
  std::vector<float> w_transposed, w_padded;

  Problem(const float* x_, const float* w, float* h_, int64_t positions_, int features_, int hidden_,
          int64_t iterations_, float epsilon_, bool pure_)
      : x(x_), h(h_), positions(positions_), features(features_), hidden(hidden_),
        padded_features(RoundUp(features_)), padded_hidden(RoundUp(hidden_)), iterations(iterations_),
        epsilon(epsilon_), pure(pure_) {
    w_transposed.assign(static_cast<size_t>(hidden) * padded_features, 0.0f);
    w_padded.assign(static_cast<size_t>(features) * padded_hidden, 0.0f);
    for (int s = 0; s < features; ++s)
      for (int i = 0; i < hidden; ++i) {
        const float value = w[static_cast<size_t>(s) * hidden + i];
        w_transposed[static_cast<size_t>(i) * padded_features + s] = value;
        w_padded[static_cast<size_t>(s) * padded_hidden + i] = value;
      }
    // Positions per tile: x and the ratio of a tile within ~512 KiB (an L2 share), whole register blocks.
    tile = std::clamp(65536 / padded_features / 24 * 24, 24, 120);
  }

  int64_t tiles() const { return (positions + tile - 1) / tile; }

  // All N updates of tile `index`, in buffers of the calling thread.
  void Run(int64_t index, std::vector<float>& x_tile, std::vector<float>& ratio, std::vector<float>& h_tile) const {
    const int64_t first = index * tile;
    const int rows = static_cast<int>(std::min<int64_t>(tile, positions - first));
    const int ldx = padded_features, ldh = padded_hidden;
    for (int r = 0; r < rows; ++r) {
      std::memcpy(&x_tile[static_cast<size_t>(r) * ldx], x + static_cast<size_t>(first + r) * features,
                  sizeof(float) * features);
      for (int i = 0; i < ldh; ++i) h_tile[static_cast<size_t>(r) * ldh + i] = i < hidden ? 1.0f / hidden : 0.0f;
    }
    for (int64_t step = 0; step < iterations; ++step) {
      for (int c = 0; c < padded_features; c += 4 * kLanes)
        RatioChunk(std::min(4, (padded_features - c) / kLanes), rows, h_tile.data(), ldh, w_transposed.data() + c,
                   padded_features, hidden, x_tile.data() + c, ratio.data() + c, ldx);
      for (int c = 0; c < padded_hidden; c += 4 * kLanes) {
        const int nv = std::min(4, (padded_hidden - c) / kLanes);
        if (pure)
          FactorChunk<true>(nv, rows, ratio.data(), ldx, w_padded.data() + c, ldh, features, h_tile.data() + c, ldh,
                            epsilon);
        else
          FactorChunk<false>(nv, rows, ratio.data(), ldx, w_padded.data() + c, ldh, features, h_tile.data() + c, ldh,
                             epsilon);
      }
      for (int r = 0; r < rows; ++r) {
        float* row = &h_tile[static_cast<size_t>(r) * ldh];
        float sum = 0.0f;
        for (int i = 0; i < hidden; ++i) sum += row[i];
        const float denominator = sum + kNormalizeEps;
        for (int i = 0; i < hidden; ++i) row[i] = row[i] / denominator;
      }
    }
    for (int r = 0; r < rows; ++r)
      std::memcpy(h + static_cast<size_t>(first + r) * hidden, &h_tile[static_cast<size_t>(r) * ldh],
                  sizeof(float) * hidden);
  }
};

// Tiles handed out one at a time to the calling thread and to helpers on XLA's thread pool. The caller
// works too and waits only for tiles that a running helper has taken, so the call finishes even when
// no helper ever gets a thread (the other devices' programs may hold them all); a helper that starts
// late finds no tile left and touches nothing but this shared state.
struct Work {
  std::shared_ptr<const Problem> problem;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Drain() {
    const Problem& p = *problem;
    std::vector<float> x_tile(static_cast<size_t>(p.tile) * p.padded_features, 0.0f);
    std::vector<float> ratio(x_tile.size(), 0.0f);
    std::vector<float> h_tile(static_cast<size_t>(p.tile) * p.padded_hidden, 0.0f);
    const int64_t total = p.tiles();
    for (int64_t index = next.fetch_add(1); index < total; index = next.fetch_add(1)) {
      p.Run(index, x_tile, ratio, h_tile);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

ffi::Error NmfForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> h, int64_t iterations, float epsilon, bool pure) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[0]) {
    return ffi::Error::InvalidArgument("nmfjax_nmf_forward takes x of shape (P, S) and w of shape (S, I)");
  }
  auto problem = std::make_shared<const Problem>(x.typed_data(), w.typed_data(), h->typed_data(), x_dims[0],
                                                 static_cast<int>(x_dims[1]), static_cast<int>(w_dims[1]),
                                                 iterations, epsilon, pure);
  const int64_t total = problem->tiles();
  if (total == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  work->problem = problem;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t helper = 0; helper < helpers; ++helper) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NmfjaxNmfForward, NmfForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("iterations")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("pure"));

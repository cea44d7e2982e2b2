// The fused NMF forward pass on a CPU: all N multiplicative updates of a tile of positions while the
// tile stays in the core's caches (arXiv 2503.20398, eq. 3, or eq. 6 with epsilon). nmfjax.cpu_kernel
// compiles this file with the machine's C++ compiler (-O3 -march=native) and registers it with XLA
// as the FFI target "nmfjax_nmf_forward".
//
// x: (P, S) float32, w: (S, I) float32  ->  h: (P, I) float32, h = 1/I updated N times:
//   R = h W^T + 1e-20,  f = (x / R) W,  h <- h * f  (or h * (1 + epsilon f)),  h <- h / (sum_i h + 1e-19)
// XLA's loop materialises R and x / R for all P positions in every update; here each tile's x, R and
// h stay in L1/L2, and the two products run as register-blocked outer products over 16-float vectors.
//
// With `bfloat16`, the products take their operands (h, x / R and W) rounded to bfloat16 (to nearest
// even) and sum in float32, as nmfjax.ops.matmul's precision "bfloat16" does; the elementwise update
// stays float32. Where the compiler targets AVX512-BF16 the products run on its dot-product instruction
// (vdpbf16ps: 32 multiply-adds per instruction, twice the float32 FMA's 16); elsewhere the same pairs
// are widened to float32 and multiplied with FMAs (the same products, as slow as float32).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
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

// The sum of v's 16 lanes, as a tree: halves added until four lanes are left.
inline float Sum(Vec v) {
  typedef float Half __attribute__((vector_size(32)));
  typedef float Quarter __attribute__((vector_size(16)));
  Half low, high;
  std::memcpy(&low, &v, sizeof low);
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
  const Half eight = low + high;
  Quarter first, second;
  std::memcpy(&first, &eight, sizeof first);
  std::memcpy(&second, reinterpret_cast<const char*>(&eight) + sizeof first, sizeof second);
  const Quarter four = first + second;
  return (four[0] + four[2]) + (four[1] + four[3]);
}

// A bfloat16 number: the upper half of a float32.
typedef uint16_t Bf16;
typedef int32_t Words __attribute__((vector_size(64)));  // 16 pairs of bfloat16

Bf16 ToBfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<Bf16>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);                                                  // to nearest even
  return static_cast<Bf16>(bits >> 16);
}

// 16 floats rounded to bfloat16, stored at p.
inline void Store(Bf16* p, Vec v) {
#if defined(__AVX512BF16__)
  __m512 vm;
  std::memcpy(&vm, &v, sizeof vm);
  const __m256bh rounded = _mm512_cvtneps_pbh(vm);
  std::memcpy(p, &rounded, sizeof rounded);
#else
  for (int lane = 0; lane < kLanes; ++lane) p[lane] = ToBfloat16(v[lane]);
#endif
}

// acc + a.even * b.even + a.odd * b.odd, each Words lane a pair of bfloat16 (the even one in the low half).
inline Vec DotPairs(Vec acc, Words a, Words b) {
#if defined(__AVX512BF16__)
  __m512 accm;
  __m512bh am, bm;
  std::memcpy(&accm, &acc, sizeof accm);
  std::memcpy(&am, &a, sizeof am);
  std::memcpy(&bm, &b, sizeof bm);
  accm = _mm512_dpbf16_ps(accm, am, bm);
  std::memcpy(&acc, &accm, sizeof acc);
  return acc;
#else
  const Words high = Words{} + static_cast<int32_t>(0xFFFF0000u);
  const Vec a_odd = reinterpret_cast<Vec>(a & high), b_odd = reinterpret_cast<Vec>(b & high);
  const Vec a_even = reinterpret_cast<Vec>(a << 16), b_even = reinterpret_cast<Vec>(b << 16);
  return acc + a_odd * b_odd + a_even * b_even;
#endif
}

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

// The same with bfloat16 operands: A's rows hold K bfloat16 (K even); B holds K / 2 rows of pairs,
// row q interleaving B's rows 2q and 2q + 1 (ldb bfloat16 apart, 32 per vector of 16 columns).
template <int MR, int NV>
inline void Product(const Bf16* a, int lda, const Bf16* b, int ldb, int k, Vec (&acc)[MR][NV]) {
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int p = 0; p < k; p += 2) {
    Words column[NV];
    for (int v = 0; v < NV; ++v)
      std::memcpy(&column[v], b + static_cast<size_t>(p / 2) * ldb + v * 2 * kLanes, sizeof(Words));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + static_cast<size_t>(r) * lda + p, sizeof pair);
      const Words broadcast = Words{} + pair;
      for (int v = 0; v < NV; ++v) acc[r][v] = DotPairs(acc[r][v], broadcast, column[v]);
    }
  }
}

// Operands of type T (float, or bfloat16 pairs): B's columns c.. start at b + c * kPack<T>.
template <typename T>
constexpr int kPack = std::is_same_v<T, float> ? 1 : 2;

// ratio = x / (h W^T + eps) for MR rows and 16 NV columns.
template <int MR, int NV, typename T>
void RatioBlock(const T* h, int ldh, const T* wt, int ldwt, int hidden, const float* x, T* ratio, int ld) {
  Vec acc[MR][NV];
  Product<MR, NV>(h, ldh, wt, ldwt, hidden, acc);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      const size_t at = static_cast<size_t>(r) * ld + v * kLanes;
      Store(ratio + at, Divide(Load(x + at), acc[r][v] + Splat(kReconstructionEps)));
    }
}

// h *= ratio W (pure) or h *= 1 + epsilon ratio W, for MR rows and 16 NV hidden units.
template <int MR, int NV, bool kPure, typename T>
void FactorBlock(const T* ratio, int ldr, const T* w, int ldw, int features, float* h, int ldh, float epsilon) {
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

template <int NV, typename T>
void RatioRows(int rows, const T* h, int ldh, const T* wt, int ldwt, int hidden, const float* x, T* ratio, int ld) {
  constexpr int MR = kRows<NV>;
  int r = 0;
  for (; r + MR <= rows; r += MR)
    RatioBlock<MR, NV, T>(h + static_cast<size_t>(r) * ldh, ldh, wt, ldwt, hidden, x + static_cast<size_t>(r) * ld,
                       ratio + static_cast<size_t>(r) * ld, ld);
  for (; r < rows; ++r)
    RatioBlock<1, NV, T>(h + static_cast<size_t>(r) * ldh, ldh, wt, ldwt, hidden, x + static_cast<size_t>(r) * ld,
                      ratio + static_cast<size_t>(r) * ld, ld);
}

template <int NV, bool kPure, typename T>
void FactorRows(int rows, const T* ratio, int ldr, const T* w, int ldw, int features, float* h, int ldh,
                float epsilon) {
  constexpr int MR = kRows<NV>;
  int r = 0;
  for (; r + MR <= rows; r += MR)
    FactorBlock<MR, NV, kPure, T>(ratio + static_cast<size_t>(r) * ldr, ldr, w, ldw, features,
                               h + static_cast<size_t>(r) * ldh, ldh, epsilon);
  for (; r < rows; ++r)
    FactorBlock<1, NV, kPure, T>(ratio + static_cast<size_t>(r) * ldr, ldr, w, ldw, features,
                              h + static_cast<size_t>(r) * ldh, ldh, epsilon);
}

// A column chunk of nv (1 to 4) vectors.
template <typename T>
void RatioChunk(int nv, int rows, const T* h, int ldh, const T* wt, int ldwt, int hidden, const float* x, T* ratio,
                int ld) {
  switch (nv) {
    case 1: return RatioRows<1, T>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
    case 2: return RatioRows<2, T>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
    case 3: return RatioRows<3, T>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
    default: return RatioRows<4, T>(rows, h, ldh, wt, ldwt, hidden, x, ratio, ld);
  }
}

template <bool kPure, typename T>
void FactorChunk(int nv, int rows, const T* ratio, int ldr, const T* w, int ldw, int features, float* h, int ldh,
                 float epsilon) {
  switch (nv) {
    case 1: return FactorRows<1, kPure, T>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
    case 2: return FactorRows<2, kPure, T>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
    case 3: return FactorRows<3, kPure, T>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
    default: return FactorRows<4, kPure, T>(rows, ratio, ldr, w, ldw, features, h, ldh, epsilon);
  }
}

int RoundUp(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// One call's shapes, its weight in the layouts the products read, padded to whole vectors (padded
// features have x = 0 and W = 0, padded hidden units start at h = 0 and stay there). With `bfloat16`,
// W is rounded once and stored as pairs of rows for Product's bfloat16 form.
struct Problem {
  const float* x;
  float* h;
  int64_t positions;
  int features, hidden, padded_features, padded_hidden, tile;
  int64_t iterations;
  float epsilon;
  bool pure, bfloat16;
  std::vector<float> w_transposed, w_padded;      // (I, S_pad), (S, I_pad)
  std::vector<Bf16> w_transposed_pairs, w_pairs;  // (I_pad / 2, S_pad, 2), (S_pad / 2, I_pad, 2)

  Problem(const float* x_, const float* w, float* h_, int64_t positions_, int features_, int hidden_,
          int64_t iterations_, float epsilon_, bool pure_, bool bfloat16_)
      : x(x_), h(h_), positions(positions_), features(features_), hidden(hidden_),
        padded_features(RoundUp(features_)), padded_hidden(RoundUp(hidden_)), iterations(iterations_),
        epsilon(epsilon_), pure(pure_), bfloat16(bfloat16_) {
    if (bfloat16) {
      w_transposed_pairs.assign(static_cast<size_t>(padded_hidden) * padded_features, 0);
      w_pairs.assign(static_cast<size_t>(padded_features) * padded_hidden, 0);
    } else {
      w_transposed.assign(static_cast<size_t>(hidden) * padded_features, 0.0f);
      w_padded.assign(static_cast<size_t>(features) * padded_hidden, 0.0f);
    }
    for (int s = 0; s < features; ++s)
      for (int i = 0; i < hidden; ++i) {
        const float value = w[static_cast<size_t>(s) * hidden + i];
        if (bfloat16) {
          const Bf16 rounded = ToBfloat16(value);
          w_transposed_pairs[static_cast<size_t>(i / 2) * 2 * padded_features + 2 * s + i % 2] = rounded;
          w_pairs[static_cast<size_t>(s / 2) * 2 * padded_hidden + 2 * i + s % 2] = rounded;
        } else {
          w_transposed[static_cast<size_t>(i) * padded_features + s] = value;
          w_padded[static_cast<size_t>(s) * padded_hidden + i] = value;
        }
      }
    // Positions per tile: x and the ratio of a tile within ~512 KiB (an L2 share), whole register blocks.
    tile = std::clamp(65536 / padded_features / 24 * 24, 24, 120);
  }

  int64_t tiles() const { return (positions + tile - 1) / tile; }

  // All N updates of tile `index`, in buffers of the calling thread; products on operands of type T.
  // h_operand: h rounded to bfloat16 after each update (unused for float).
  template <typename T>
  void Run(int64_t index, float* x_tile, T* ratio, float* h_tile, T* h_operand) const {
    const int64_t first = index * tile;
    const int rows = static_cast<int>(std::min<int64_t>(tile, positions - first));
    const int ldx = padded_features, ldh = padded_hidden;
    const T* wt;
    const T* w;
    const T* operand;
    if constexpr (std::is_same_v<T, float>) {
      wt = w_transposed.data(), w = w_padded.data(), operand = h_tile;
    } else {
      wt = w_transposed_pairs.data(), w = w_pairs.data(), operand = h_operand;
    }
    const auto round_operand = [&] {
      if constexpr (!std::is_same_v<T, float>)
        for (size_t at = 0; at < static_cast<size_t>(rows) * ldh; at += kLanes) Store(h_operand + at, Load(h_tile + at));
    };
    for (int r = 0; r < rows; ++r) {
      std::memcpy(&x_tile[static_cast<size_t>(r) * ldx], x + static_cast<size_t>(first + r) * features,
                  sizeof(float) * features);
      for (int i = 0; i < ldh; ++i) h_tile[static_cast<size_t>(r) * ldh + i] = i < hidden ? 1.0f / hidden : 0.0f;
    }
    round_operand();
    for (int64_t step = 0; step < iterations; ++step) {
      for (int c = 0; c < padded_features; c += 4 * kLanes)
        RatioChunk<T>(std::min(4, (padded_features - c) / kLanes), rows, operand, ldh, wt + c * kPack<T>,
                      padded_features * kPack<T>, hidden, x_tile + c, ratio + c, ldx);
      for (int c = 0; c < padded_hidden; c += 4 * kLanes) {
        const int nv = std::min(4, (padded_hidden - c) / kLanes);
        if (pure)
          FactorChunk<true, T>(nv, rows, ratio, ldx, w + c * kPack<T>, ldh * kPack<T>, features, h_tile + c, ldh,
                               epsilon);
        else
          FactorChunk<false, T>(nv, rows, ratio, ldx, w + c * kPack<T>, ldh * kPack<T>, features, h_tile + c, ldh,
                                epsilon);
      }
      for (int r = 0; r < rows; ++r) {
        // (in vectors: a scalar sum's chain of dependent adds cost as much as block 1's products)
        float* row = &h_tile[static_cast<size_t>(r) * ldh];
        Vec sums{};
        for (int i = 0; i < ldh; i += kLanes) sums += Load(row + i);
        const Vec denominator = Splat(Sum(sums) + kNormalizeEps);
        for (int i = 0; i < ldh; i += kLanes) Store(row + i, Load(row + i) / denominator);
      }
      round_operand();
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
    if (problem->bfloat16)
      DrainWith<Bf16>();
    else
      DrainWith<float>();
  }

  template <typename T>
  void DrainWith() {
    const Problem& p = *problem;
    std::vector<float> x_tile(static_cast<size_t>(p.tile) * p.padded_features, 0.0f);
    std::vector<T> ratio(x_tile.size(), T{});
    std::vector<float> h_tile(static_cast<size_t>(p.tile) * p.padded_hidden, 0.0f);
    std::vector<T> h_operand(std::is_same_v<T, float> ? 0 : h_tile.size(), T{});
    const int64_t total = p.tiles();
    for (int64_t index = next.fetch_add(1); index < total; index = next.fetch_add(1)) {
      p.Run<T>(index, x_tile.data(), ratio.data(), h_tile.data(), h_operand.data());
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

ffi::Error NmfForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> h, int64_t iterations, float epsilon, bool pure, bool bfloat16) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[0]) {
    return ffi::Error::InvalidArgument("nmfjax_nmf_forward takes x of shape (P, S) and w of shape (S, I)");
  }
  auto problem = std::make_shared<const Problem>(x.typed_data(), w.typed_data(), h->typed_data(), x_dims[0],
                                                 static_cast<int>(x_dims[1]), static_cast<int>(w_dims[1]),
                                                 iterations, epsilon, pure, bfloat16);
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
                                  .Attr<bool>("pure")
                                  .Attr<bool>("bfloat16"));

// Whether the bfloat16 products run on the processor's dot-product instruction (AVX512-BF16), not
// widened to float32.
extern "C" bool NmfjaxBfloat16Units() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

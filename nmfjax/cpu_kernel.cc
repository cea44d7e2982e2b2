// The fused NMF forward pass on a CPU: all N multiplicative updates of a tile of positions while the
// tile stays in the core's caches (arXiv 2503.20398, eq. 3, or eq. 6 with epsilon); and the one-step
// backward (eq. 17-19; OneStepBackward below). nmfjax.cpu_kernel compiles this file with the machine's
// C++ compiler (-O3 -march=native) and registers it with XLA as the FFI targets "nmfjax_nmf_forward"
// and "nmfjax_nmf_one_step_backward".
//
// x: (P, S) float32, w: (S, I) float32  ->  h: (P, I) float32, h = 1/I updated N times:
//   R = h W^T + 1e-20,  f = (x / R) W,  h <- h * f  (or h * (1 + epsilon f)),  h <- h / (sum_i h + 1e-19)
// XLA's loop materialises R and x / R for all P positions in every update; here each tile's x, R and
// h stay in L1/L2, and the two products run as register-blocked outer products over vectors of 16 floats
// (AVX-512: 32 registers) or 8 (AVX2 and others: 16 registers), the blocks sized to the register file.
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

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector: one AVX-512 register
constexpr int kRegisters = 32;
#else
constexpr int kLanes = 8;  // one AVX2 register (or two of 128-bit instruction sets)
constexpr int kRegisters = 16;
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));
constexpr float kReconstructionEps = 1e-20f;  // nmfjax.numerics.RECONSTRUCTION_EPS
constexpr float kNormalizeEps = 1e-19f;       // nmfjax.numerics.NORMALIZE_EPS

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec Splat(float a) { return Vec{} + a; }

// The sum of v's lanes, as a tree: halves added until four lanes are left.
inline float Sum(Vec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int half = kLanes / 2; half >= 4; half /= 2)
    for (int lane = 0; lane < half; ++lane) lanes[lane] += lanes[lane + half];
  return (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
}

// A bfloat16 number: the upper half of a float32.
typedef uint16_t Bf16;
typedef int32_t Words __attribute__((vector_size(4 * kLanes)));  // kLanes pairs of bfloat16

Bf16 ToBfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<Bf16>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);                                                  // to nearest even
  return static_cast<Bf16>(bits >> 16);
}

// A vector's floats rounded to bfloat16, stored at p.
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

inline float Negate(float a) { return -a; }
inline Bf16 Negate(Bf16 a) { return static_cast<Bf16>(a ^ 0x8000u); }

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

// acc[MR][NV] = A[MR x K] B[K x kLanes NV]; rows of A lda apart, rows of B ldb apart.
template <int MR, int NV>
[[gnu::always_inline]] inline void Product(const float* a, int lda, const float* b, int ldb, int k,
                                           Vec (&acc)[MR][NV]) {
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
// row q interleaving B's rows 2q and 2q + 1 (ldb bfloat16 apart, 2 kLanes per vector of kLanes columns).
template <int MR, int NV>
[[gnu::always_inline]] inline void Product(const Bf16* a, int lda, const Bf16* b, int ldb, int k,
                                           Vec (&acc)[MR][NV]) {
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

// MR x NV register blocks: at most 24 accumulators of AVX-512's 32 registers, 12 of AVX2's 16 (MR
// divides 24, the tiles' unit of positions).
template <int NV>
constexpr int kRows = kRegisters == 32 ? (NV == 1 ? 12 : NV == 2 ? 12 : NV == 3 ? 8 : 6)
                                       : (NV == 1 ? 12 : NV == 2 ? 6 : NV == 3 ? 4 : 3);

// The product of `rows` rows of A (lda apart) and NV vectors of B's columns, in MR x NV register
// blocks; each vector of the result goes to epilogue(row, vector, value).
template <int NV, typename T, typename Epilogue>
[[gnu::always_inline]] inline void ProductRows(int rows, const T* a, int lda, const T* b, int ldb, int k,
                                               Epilogue& epilogue) {
  constexpr int MR = kRows<NV>;
  int r = 0;
  for (; r + MR <= rows; r += MR) {
    Vec acc[MR][NV];
    Product<MR, NV>(a + static_cast<size_t>(r) * lda, lda, b, ldb, k, acc);
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) epilogue(r + m, v, acc[m][v]);
  }
  for (; r < rows; ++r) {
    Vec acc[1][NV];
    Product<1, NV>(a + static_cast<size_t>(r) * lda, lda, b, ldb, k, acc);
    for (int v = 0; v < NV; ++v) epilogue(r, v, acc[0][v]);
  }
}

// A[rows x k] B[k x columns] (columns a multiple of kLanes), in chunks of at most 4 vectors of columns;
// each vector of the result goes to epilogue(row, first column, value).
template <typename T, typename Epilogue>
[[gnu::flatten]] void ProductColumns(int rows, int columns, const T* a, int lda, const T* b, int ldb, int k,
                                     Epilogue&& epilogue) {
  for (int c = 0; c < columns; c += 4 * kLanes) {
    const T* chunk = b + c * kPack<T>;
    auto at = [&](int row, int v, Vec value) { epilogue(row, c + v * kLanes, value); };
    switch (std::min(4, (columns - c) / kLanes)) {
      case 1: ProductRows<1>(rows, a, lda, chunk, ldb, k, at); break;
      case 2: ProductRows<2>(rows, a, lda, chunk, ldb, k, at); break;
      case 3: ProductRows<3>(rows, a, lda, chunk, ldb, k, at); break;
      default: ProductRows<4>(rows, a, lda, chunk, ldb, k, at); break;
    }
  }
}

int RoundUp(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// A vector's floats rounded to bfloat16 (to nearest even, NaN stays NaN), each in the low half of a lane.
typedef uint32_t Bits __attribute__((vector_size(4 * kLanes)));
inline Bits RoundedBits(Vec v) {
  Bits bits;
  std::memcpy(&bits, &v, sizeof bits);
  const Bits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const Bits nan = reinterpret_cast<Bits>((bits & 0x7FFFFFFFu) > 0x7F800000u);
  return (nan & ((bits >> 16) | 0x40u)) | (~nan & rounded);
}

// Two vectors of a row pair rounded to bfloat16 as the kLanes pairs (even, odd) of Product's bfloat16 B.
inline void StorePairs(Bf16* p, Vec even, Vec odd) {
  const Bits pairs = RoundedBits(even) | (RoundedBits(odd) << 16);
  std::memcpy(p, &pairs, sizeof pairs);
}

// W laid out for the products, padded to whole vectors (padded entries 0): W^T, (I, S_pad), the B of
// h W^T; and W, (S, I_pad), the B of (x / R) W (where asked for). With `bfloat16`, rounded once and
// stored as pairs of rows for Product's bfloat16 form: (I_pad / 2, S_pad, 2) and (S_pad / 2, I_pad, 2).
struct Weight {
  std::vector<float> transposed, plain;
  std::vector<Bf16> transposed_pairs, plain_pairs;

  Weight(const float* w, int features, int hidden, int padded_features, int padded_hidden, bool bfloat16,
         bool with_plain) {
    if (bfloat16) {
      transposed_pairs.assign(static_cast<size_t>(padded_hidden) * padded_features, 0);
      if (with_plain) plain_pairs.assign(static_cast<size_t>(padded_features) * padded_hidden, 0);
    } else {
      transposed.assign(static_cast<size_t>(hidden) * padded_features, 0.0f);
      if (with_plain) plain.assign(static_cast<size_t>(features) * padded_hidden, 0.0f);
    }
    for (int s = 0; s < features; ++s)
      for (int i = 0; i < hidden; ++i) {
        const float value = w[static_cast<size_t>(s) * hidden + i];
        if (bfloat16) {
          const Bf16 rounded = ToBfloat16(value);
          transposed_pairs[static_cast<size_t>(i / 2) * 2 * padded_features + 2 * s + i % 2] = rounded;
          if (with_plain) plain_pairs[static_cast<size_t>(s / 2) * 2 * padded_hidden + 2 * i + s % 2] = rounded;
        } else {
          transposed[static_cast<size_t>(i) * padded_features + s] = value;
          if (with_plain) plain[static_cast<size_t>(s) * padded_hidden + i] = value;
        }
      }
  }

  template <typename T>
  const T* Transposed() const {
    if constexpr (std::is_same_v<T, float>) return transposed.data();
    else return transposed_pairs.data();
  }
  template <typename T>
  const T* Plain() const {
    if constexpr (std::is_same_v<T, float>) return plain.data();
    else return plain_pairs.data();
  }
};

// The forward pass: one call's shapes and its weight (padded features have x = 0 and W = 0, padded
// hidden units start at h = 0 and stay there).
struct Forward {
  const float* x;
  float* h;
  int64_t positions;
  int features, hidden, padded_features, padded_hidden, tile;
  int64_t iterations;
  float epsilon;
  bool pure, bfloat16;
  Weight weight;

  Forward(const float* x_, const float* w, float* h_, int64_t positions_, int features_, int hidden_,
          int64_t iterations_, float epsilon_, bool pure_, bool bfloat16_)
      : x(x_), h(h_), positions(positions_), features(features_), hidden(hidden_),
        padded_features(RoundUp(features_)), padded_hidden(RoundUp(hidden_)),
        // Positions per tile: x and the ratio of a tile within ~512 KiB (an L2 share), whole register blocks.
        tile(std::clamp(65536 / padded_features / 24 * 24, 24, 120)), iterations(iterations_), epsilon(epsilon_),
        pure(pure_), bfloat16(bfloat16_),
        weight(w, features, hidden, padded_features, padded_hidden, bfloat16, /*with_plain=*/true) {}

  // A unit of work: one tile.
  int64_t units() const { return (positions + tile - 1) / tile; }

  // A thread's buffers. h_operand: h rounded to bfloat16 after each update (unused for float).
  template <typename T>
  struct Scratch {
    std::vector<float> x_tile, h_tile;
    std::vector<T> ratio, h_operand;
    explicit Scratch(const Forward& p)
        : x_tile(static_cast<size_t>(p.tile) * p.padded_features, 0.0f),
          h_tile(static_cast<size_t>(p.tile) * p.padded_hidden, 0.0f), ratio(x_tile.size(), T{}),
          h_operand(std::is_same_v<T, float> ? 0 : h_tile.size(), T{}) {}
  };

  // All N updates of tile `index`; products on operands of type T.
  template <typename T>
  void Run(int64_t index, Scratch<T>& scratch) const {
    float* x_tile = scratch.x_tile.data();
    float* h_tile = scratch.h_tile.data();
    T* ratio = scratch.ratio.data();
    T* h_operand = scratch.h_operand.data();
    const int64_t first = index * tile;
    const int rows = static_cast<int>(std::min<int64_t>(tile, positions - first));
    const int ldx = padded_features, ldh = padded_hidden;
    const T* wt = weight.Transposed<T>();
    const T* w = weight.Plain<T>();
    const T* operand;
    if constexpr (std::is_same_v<T, float>) operand = h_tile;
    else operand = h_operand;
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
      // ratio = x / (h W^T + eps)
      ProductColumns(rows, padded_features, operand, ldh, wt, padded_features * kPack<T>, hidden,
                     [&](int r, int s, Vec value) {
                       const size_t at = static_cast<size_t>(r) * ldx + s;
                       Store(ratio + at, Divide(Load(x_tile + at), value + Splat(kReconstructionEps)));
                     });
      // h *= ratio W (pure) or h *= 1 + epsilon ratio W
      if (pure)
        ProductColumns(rows, padded_hidden, static_cast<const T*>(ratio), ldx, w, ldh * kPack<T>, features,
                       [&](int r, int i, Vec factor) {
                         const size_t at = static_cast<size_t>(r) * ldh + i;
                         Store(h_tile + at, Load(h_tile + at) * factor);
                       });
      else
        ProductColumns(rows, padded_hidden, static_cast<const T*>(ratio), ldx, w, ldh * kPack<T>, features,
                       [&](int r, int i, Vec factor) {
                         const size_t at = static_cast<size_t>(r) * ldh + i;
                         Store(h_tile + at, Load(h_tile + at) * (Splat(1.0f) + Splat(epsilon) * factor));
                       });
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

// The paper's one-step VJP at the returned h (eq. 17-19), as nmfjax.ops computes it in XLA:
//   R = h W^T + 1e-20,  dx = (h g) W^T / R,  dW^T = (h g)^T (x / R) - h^T (x / R * dx)  (sums over positions)
// A tile of positions at a time: its two products by W^T as one over the rows [h; h g], then the
// quotients, then its share of dW^T as one product [(h g)^T, -h^T] [x / R; x / R * dx] over twice its
// positions. The tiles are dealt into a fixed number of groups, each summing its tiles' dW^T in order
// into a slice of its own, and the slices are added in order at the end: the same sums whichever
// thread takes a group.
struct OneStepBackward {
  static constexpr int64_t kGroups = 8;
  const float *x, *h, *g;
  float *dx, *dw;
  int64_t positions;
  int features, hidden, padded_features, padded_hidden, tile;
  bool bfloat16;
  Weight weight;
  std::unique_ptr<float[]> partials;  // kGroups x (I, S_pad)

  OneStepBackward(const float* x_, const float* w, const float* h_, const float* g_, float* dx_, float* dw_,
                  int64_t positions_, int features_, int hidden_, bool bfloat16_)
      : x(x_), h(h_), g(g_), dx(dx_), dw(dw_), positions(positions_), features(features_), hidden(hidden_),
        padded_features(RoundUp(features_)), padded_hidden(RoundUp(hidden_)),
        // Positions per tile: its six (tile, S_pad) buffers within ~768 KiB, an even number.
        tile(std::clamp(32768 / padded_features / 12 * 12, 12, 120)), bfloat16(bfloat16_),
        weight(w, features, hidden, padded_features, padded_hidden, bfloat16, /*with_plain=*/false),
        partials(new float[static_cast<size_t>(kGroups) * hidden * padded_features]()) {}

  int64_t tiles() const { return (positions + tile - 1) / tile; }
  // A unit of work: one group of consecutive tiles.
  int64_t units() const { return std::min(kGroups, tiles()); }

  template <typename T>
  struct Scratch {
    std::vector<float> x_tile, rows, products, dx_tile;  // rows: [h; h g], products: [h; h g] W^T
    std::vector<T> operand, quotients, narrow;  // [h; h g] as T (bfloat16 only), [x/R; x/R dx], [hg^T, -h^T]
    explicit Scratch(const OneStepBackward& p)
        : x_tile(static_cast<size_t>(p.tile) * p.padded_features, 0.0f),
          rows(static_cast<size_t>(2 * p.tile) * p.padded_hidden, 0.0f),
          products(static_cast<size_t>(2 * p.tile) * p.padded_features, 0.0f), dx_tile(x_tile.size(), 0.0f),
          operand(std::is_same_v<T, float> ? 0 : rows.size(), T{}), quotients(products.size(), T{}),
          narrow(static_cast<size_t>(p.hidden) * 2 * p.tile, T{}) {}
  };

  template <typename T>
  void Run(int64_t group, Scratch<T>& scratch) const {
    const int64_t total = tiles(), groups = units();
    float* dwt = partials.get() + static_cast<size_t>(group) * hidden * padded_features;
    for (int64_t index = group * total / groups; index < (group + 1) * total / groups; ++index)
      RunTile<T>(index, scratch, dwt);
  }

  template <typename T>
  void RunTile(int64_t index, Scratch<T>& s, float* dwt) const {
    const int64_t first = index * tile;
    const int rows = static_cast<int>(std::min<int64_t>(tile, positions - first));
    const int even = rows + rows % 2;  // positions, with a zero one where rows is odd (bfloat16 pairs)
    const int ldx = padded_features, ldh = padded_hidden, ldn = 2 * tile;
    float* x_tile = s.x_tile.data();
    float* hs = s.rows.data();
    for (int r = 0; r < rows; ++r) {
      const size_t at = static_cast<size_t>(first + r);
      std::memcpy(x_tile + static_cast<size_t>(r) * ldx, x + at * features, sizeof(float) * features);
      float* h_row = hs + static_cast<size_t>(r) * ldh;
      float* weighted = hs + static_cast<size_t>(rows + r) * ldh;
      for (int i = 0; i < hidden; ++i) {
        h_row[i] = h[at * hidden + i];
        weighted[i] = h_row[i] * g[at * hidden + i];
      }
    }
    const T* operand;
    if constexpr (std::is_same_v<T, float>) {
      operand = hs;
    } else {
      for (size_t at = 0; at < static_cast<size_t>(2 * rows) * ldh; at += kLanes)
        Store(s.operand.data() + at, Load(hs + at));
      operand = s.operand.data();
    }
    // [h; h g] W^T
    float* products = s.products.data();
    ProductColumns(2 * rows, padded_features, operand, ldh, weight.Transposed<T>(), padded_features * kPack<T>,
                   hidden,
                   [&](int r, int c, Vec value) { Store(products + static_cast<size_t>(r) * ldx + c, value); });
    // dx = (h g) W^T / R; the quotients x / R (k = p) and x / R dx (k = even + p), as B of the last product
    T* quotients = s.quotients.data();
    for (int pair = 0; pair < even; pair += 2)
      for (int c = 0; c < ldx; c += kLanes) {
        Vec ratio[2], scaled[2];
        for (int j = 0; j < 2; ++j) {
          const int r = pair + j;
          ratio[j] = scaled[j] = Vec{};
          if (r >= rows) continue;
          const Vec reconstruction = Load(products + static_cast<size_t>(r) * ldx + c) + Splat(kReconstructionEps);
          const Vec gradient = Divide(Load(products + static_cast<size_t>(rows + r) * ldx + c), reconstruction);
          Store(s.dx_tile.data() + static_cast<size_t>(r) * ldx + c, gradient);
          ratio[j] = Divide(Load(x_tile + static_cast<size_t>(r) * ldx + c), reconstruction);
          scaled[j] = ratio[j] * gradient;
        }
        if constexpr (std::is_same_v<T, float>) {
          for (int j = 0; j < 2; ++j) {
            Store(quotients + static_cast<size_t>(pair + j) * ldx + c, ratio[j]);
            Store(quotients + static_cast<size_t>(even + pair + j) * ldx + c, scaled[j]);
          }
        } else {
          StorePairs(quotients + static_cast<size_t>(pair / 2) * 2 * ldx + 2 * c, ratio[0], ratio[1]);
          StorePairs(quotients + static_cast<size_t>((even + pair) / 2) * 2 * ldx + 2 * c, scaled[0], scaled[1]);
        }
      }
    for (int r = 0; r < rows; ++r)
      std::memcpy(dx + static_cast<size_t>(first + r) * features, s.dx_tile.data() + static_cast<size_t>(r) * ldx,
                  sizeof(float) * features);
    // [(h g)^T, -h^T], rounded as the product's operands
    T* narrow = s.narrow.data();
    for (int i = 0; i < hidden; ++i) {
      T* row = narrow + static_cast<size_t>(i) * ldn;
      for (int p = 0; p < rows; ++p) {
        row[p] = operand[static_cast<size_t>(rows + p) * ldh + i];
        row[even + p] = Negate(operand[static_cast<size_t>(p) * ldh + i]);
      }
      if (rows < even) row[rows] = row[even + rows] = T{};
    }
    // dW^T += [(h g)^T, -h^T] [x / R; x / R dx]
    ProductColumns(hidden, padded_features, static_cast<const T*>(narrow), ldn, static_cast<const T*>(quotients),
                   ldx * kPack<T>, 2 * even, [&](int i, int c, Vec value) {
                     float* at = dwt + static_cast<size_t>(i) * ldx + c;
                     Store(at, Load(at) + value);
                   });
  }

  // dW: the groups' dW^T added in order (into the first group's), transposed.
  void Finish() const {
    const size_t size = static_cast<size_t>(hidden) * padded_features;
    float* sum = partials.get();
    for (int64_t group = 1; group < units(); ++group)
      for (size_t at = 0; at < size; at += kLanes) Store(sum + at, Load(sum + at) + Load(sum + group * size + at));
    for (int s = 0; s < features; ++s)
      for (int i = 0; i < hidden; ++i)
        dw[static_cast<size_t>(s) * hidden + i] = sum[static_cast<size_t>(i) * padded_features + s];
  }
};

// Units of a Job handed out one at a time to the calling thread and to helpers on XLA's thread pool.
// The caller works too and waits only for units that a running helper has taken, so the call finishes
// even when no helper ever gets a thread (the other devices' programs may hold them all); a helper that
// starts late finds no unit left and touches nothing but this shared state.
template <typename Job>
struct Work {
  std::shared_ptr<const Job> job;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Drain() {
    if (job->bfloat16)
      DrainWith<Bf16>();
    else
      DrainWith<float>();
  }

  template <typename T>
  void DrainWith() {
    typename Job::template Scratch<T> scratch(*job);
    const int64_t total = job->units();
    for (int64_t index = next.fetch_add(1); index < total; index = next.fetch_add(1)) {
      job->template Run<T>(index, scratch);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// Runs all units of `job` on the calling thread and helpers from `pool`; returns when all are done.
template <typename Job>
void RunOnPool(ffi::ThreadPool& pool, std::shared_ptr<const Job> job) {
  const int64_t total = job->units();
  if (total == 0) return;
  auto work = std::make_shared<Work<Job>>();
  work->job = std::move(job);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t helper = 0; helper < helpers; ++helper) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == total; });
}

ffi::Error NmfForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> h, int64_t iterations, float epsilon, bool pure, bool bfloat16) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || x_dims[1] != w_dims[0]) {
    return ffi::Error::InvalidArgument("nmfjax_nmf_forward takes x of shape (P, S) and w of shape (S, I)");
  }
  RunOnPool(pool, std::make_shared<const Forward>(x.typed_data(), w.typed_data(), h->typed_data(), x_dims[0],
                                                  static_cast<int>(x_dims[1]), static_cast<int>(w_dims[1]),
                                                  iterations, epsilon, pure, bfloat16));
  return ffi::Error::Success();
}

ffi::Error NmfOneStepBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                              ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                              ffi::ResultBuffer<ffi::F32> dw, bool bfloat16) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions(), h_dims = h.dimensions(), g_dims = g.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || h_dims.size() != 2 || g_dims.size() != 2 ||
      x_dims[1] != w_dims[0] || h_dims[0] != x_dims[0] || h_dims[1] != w_dims[1] || g_dims[0] != h_dims[0] ||
      g_dims[1] != h_dims[1]) {
    return ffi::Error::InvalidArgument(
        "nmfjax_nmf_one_step_backward takes x (P, S), w (S, I), h (P, I) and g (P, I)");
  }
  auto job = std::make_shared<const OneStepBackward>(x.typed_data(), w.typed_data(), h.typed_data(), g.typed_data(),
                                                     dx->typed_data(), dw->typed_data(), x_dims[0],
                                                     static_cast<int>(x_dims[1]), static_cast<int>(w_dims[1]),
                                                     bfloat16);
  RunOnPool(pool, job);
  job->Finish();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(NmfjaxNmfOneStepBackward, NmfOneStepBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
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

// The width of the vectors the kernel was compiled for, in bits: 512 where the compiler targets
// AVX-512, else 256 (AVX2 and others).
extern "C" int NmfjaxVectorBits() { return 32 * kLanes; }

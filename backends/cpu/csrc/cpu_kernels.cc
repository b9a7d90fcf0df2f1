// Kiln's XLA:CPU custom calls (jax.ffi), built and loaded by models/cpu_kernels.py:
// causal softmax attention with dropout on the attention weights (forward and backward),
// and Philox random words for dropout masks.
//
// Why: XLA:CPU runs attention's small batched dots ([T, H] x [H, T] per batch and head) at
// about a third of its matmul peak and materialises every [T, T] intermediate in memory.
// Here each thread takes whole (batch, head) pairs, keeps a tile of query rows' scores in its
// cache and multiplies on register tiles that skip the keys a tile's rows cannot see.
// Dropout masks come from Philox-4x32-10 (Salmon et al. 2011, the generator of PyTorch's and
// cuRAND's dropout), keyed by a per-call seed and counted by (pair, row, column), so the
// backward pass regenerates exactly the forward pass's masks.
//
// Layout: q, k, v, out and their gradients are token-major [B, T, N, H] (q already scaled
// by 1/sqrt(H)), or q, k and v come packed [B, T, 3, N, H] as the qkv projection wrote them
// (their gradient too), q scaled and q and k turned by rotary tables inside (Operands,
// below); the softmax probabilities, kept from the forward pass for the backward
// pass (which then needs no q k^T and no exp), are [B, N, T, T]. Query i attends keys
// 0..i. A weight is kept when a 16-bit draw is below `threshold` and then scaled by
// 65536 / threshold, the same quantised inverted dropout as models/dropout.py; threshold
// 65536 switches dropout off.

#include <Eigen/Core>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using View = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;
using ConstView = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

// One register of floats and the few operations the vector code needs: AVX-512 (16 floats)
// or AVX2 with FMA (8), whichever the build targets (-march=native, then
// $KILN_CPU_ARCH_FLAGS), else an 8-float struct the compiler vectorises as it can.
// KILN_VECTOR_LANES is 0 in that last case, where the code with no portable form (the
// narrow conv) is left out.
#if defined(__AVX512F__)
#define KILN_VECTOR_LANES 16
using Lane = __m512;
constexpr int64_t kLane = 16;
constexpr int kPanelTileRows = 8;  // 8 rows x 2 lanes: 16 of the 32 vector registers accumulate.
inline Lane LoadLane(const float* p) { return _mm512_loadu_ps(p); }
inline void StoreLane(float* p, Lane v) { _mm512_storeu_ps(p, v); }
inline Lane Broadcast(float x) { return _mm512_set1_ps(x); }
inline Lane ZeroLane() { return _mm512_setzero_ps(); }
inline Lane AddLanes(Lane a, Lane b) { return _mm512_add_ps(a, b); }
inline Lane SubtractLanes(Lane a, Lane b) { return _mm512_sub_ps(a, b); }
inline Lane MultiplyLanes(Lane a, Lane b) { return _mm512_mul_ps(a, b); }
inline Lane MultiplyAdd(Lane a, Lane b, Lane c) { return _mm512_fmadd_ps(a, b, c); }
// The first n < kLane floats (the rest read as 0 / left as they are).
using TailMask = __mmask16;
inline TailMask Tail(int64_t n) { return TailMask((1u << n) - 1); }
inline Lane LoadTail(const float* p, TailMask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void StoreTail(float* p, TailMask m, Lane v) { _mm512_mask_storeu_ps(p, m, v); }
inline void StreamLane(float* p, Lane v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned.
#elif defined(__AVX2__) && defined(__FMA__)
#define KILN_VECTOR_LANES 8
using Lane = __m256;
constexpr int64_t kLane = 8;
constexpr int kPanelTileRows = 6;  // 6 rows x 2 lanes: 12 of the 16 vector registers accumulate.
inline Lane LoadLane(const float* p) { return _mm256_loadu_ps(p); }
inline void StoreLane(float* p, Lane v) { _mm256_storeu_ps(p, v); }
inline Lane Broadcast(float x) { return _mm256_set1_ps(x); }
inline Lane ZeroLane() { return _mm256_setzero_ps(); }
inline Lane AddLanes(Lane a, Lane b) { return _mm256_add_ps(a, b); }
inline Lane SubtractLanes(Lane a, Lane b) { return _mm256_sub_ps(a, b); }
inline Lane MultiplyLanes(Lane a, Lane b) { return _mm256_mul_ps(a, b); }
inline Lane MultiplyAdd(Lane a, Lane b, Lane c) { return _mm256_fmadd_ps(a, b, c); }
using TailMask = __m256i;
inline TailMask Tail(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Lane LoadTail(const float* p, TailMask m) { return _mm256_maskload_ps(p, m); }
inline void StoreTail(float* p, TailMask m, Lane v) { _mm256_maskstore_ps(p, m, v); }
inline void StreamLane(float* p, Lane v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned.
#else
#define KILN_VECTOR_LANES 0
struct Lane {
  float v[8];
};
constexpr int64_t kLane = 8;
constexpr int kPanelTileRows = 4;
inline Lane LoadLane(const float* p) {
  Lane l;
  std::copy(p, p + kLane, l.v);
  return l;
}
inline void StoreLane(float* p, Lane v) { std::copy(v.v, v.v + kLane, p); }
inline Lane Broadcast(float x) {
  Lane l;
  std::fill(l.v, l.v + kLane, x);
  return l;
}
inline Lane ZeroLane() { return Broadcast(0.0f); }
inline Lane MultiplyAdd(Lane a, Lane b, Lane c) {
  for (int64_t i = 0; i < kLane; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline Lane AddLanes(Lane a, Lane b) {
  for (int64_t i = 0; i < kLane; ++i) a.v[i] += b.v[i];
  return a;
}
inline Lane SubtractLanes(Lane a, Lane b) {
  for (int64_t i = 0; i < kLane; ++i) a.v[i] -= b.v[i];
  return a;
}
inline Lane MultiplyLanes(Lane a, Lane b) {
  for (int64_t i = 0; i < kLane; ++i) a.v[i] *= b.v[i];
  return a;
}
using TailMask = int64_t;  // How many leading floats count.
inline TailMask Tail(int64_t n) { return n; }
inline Lane LoadTail(const float* p, TailMask m) {
  Lane l = ZeroLane();
  std::copy(p, p + m, l.v);
  return l;
}
inline void StoreTail(float* p, TailMask m, Lane v) { std::copy(v.v, v.v + m, p); }
#endif

// Columns of one register tile: two vectors.
constexpr int64_t kPanelCols = 2 * kLane;
// Floats per 64-byte cache line: the step between software prefetches along a row.
constexpr int64_t kLineFloats = 16;

// Rows [0, n) in the fewest register tiles of at most R rows, spread evenly: 16 rows on the
// AVX2 build's 6-row tile as 6 + 5 + 5, not 6 + 6 + 4, whose 8 accumulators barely cover the
// FMAs' latency (in the LSTM kernel that 4-row tile took a third of the time for a quarter
// of the work).
struct EvenTiles {
  int64_t count, rows_each, longer;
  EvenTiles(int64_t n, int64_t R)
      : count((n + R - 1) / R), rows_each(count ? n / count : 0), longer(count ? n % count : 0) {}
  int64_t first(int64_t tile) const { return tile * rows_each + std::min(tile, longer); }
  int rows(int64_t tile) const { return int(rows_each + (tile < longer)); }
};

// A whole vector at p, or (partial) only the floats under mask m, the rest 0 / untouched.
inline Lane Load(const float* p, bool partial, TailMask m) {
  return partial ? LoadTail(p, m) : LoadLane(p);
}

inline void Store(float* p, bool partial, TailMask m, Lane v) {
  if (partial) {
    StoreTail(p, m, v);
  } else {
    StoreLane(p, v);
  }
}

inline float SumLanes(Lane v) {
  alignas(64) float lanes[kLane];
  StoreLane(lanes, v);
  float sum = 0.0f;
  for (int64_t i = 0; i < kLane; ++i) sum += lanes[i];
  return sum;
}

constexpr uint32_t kLevels = 1u << 16;

struct Dims {
  int64_t batch, length, heads, dim;
  // Where this shard sits in the global [B, T, N, H] arrays, so dropout counters (and so
  // masks) are the same however the batch and heads are split over devices.
  int64_t batch_offset = 0, head_offset = 0, total_heads = 0;
  uint32_t global_pair(int64_t pair) const {
    return uint32_t((batch_offset + pair / heads) * total_heads + head_offset + pair % heads);
  }
  int64_t pairs() const { return batch * heads; }
  // Offset of (pair, row 0) in a [B, T, N, H] array; rows are heads * dim apart.
  int64_t offset(int64_t pair) const {
    return (pair / heads) * length * heads * dim + (pair % heads) * dim;
  }
  int64_t stride() const { return heads * dim; }
};

// Philox lanes per call: each lane is one counter, giving 4 words = 8 16-bit draws, so a
// call covers 128 columns. Lanes run side by side so the compiler vectorises the rounds.
constexpr int kLanes = 16;
constexpr int64_t kColumnsPerCall = 8 * kLanes;

constexpr uint32_t kPhiloxMultiplier0 = 0xD2511F53u, kPhiloxMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u, kPhiloxWeyl1 = 0xBB67AE85u;

#if defined(__AVX512F__)
// High and low 32-bit halves of the 16 products a[i] * m.
inline void MulHiLo(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  *lo = _mm512_mullo_epi32(a, m);
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#elif defined(__AVX2__)
// High and low 32-bit halves of the 8 products a[i] * m.
inline void MulHiLo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  *lo = _mm256_mullo_epi32(a, m);
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// Philox-4x32-10 of kLanes counters (c0[lane], row, pair, 0) under `seed`, in place.
inline void Philox(const uint32_t* seed, uint32_t* c0, uint32_t* c1, uint32_t* c2,
                   uint32_t* c3) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16, "one AVX-512 register of counters");
  __m512i x0 = _mm512_loadu_si512(c0), x1 = _mm512_loadu_si512(c1);
  __m512i x2 = _mm512_loadu_si512(c2), x3 = _mm512_loadu_si512(c3);
  const __m512i m0 = _mm512_set1_epi32(int(kPhiloxMultiplier0));
  const __m512i m1 = _mm512_set1_epi32(int(kPhiloxMultiplier1));
  uint32_t key0 = seed[0], key1 = seed[1];
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    MulHiLo(x0, m0, &hi0, &lo0);
    MulHiLo(x2, m1, &hi1, &lo1);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), _mm512_set1_epi32(int(key0)));
    x1 = lo1;
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(int(key1)));
    x3 = lo0;
    key0 += kPhiloxWeyl0;
    key1 += kPhiloxWeyl1;
  }
  _mm512_storeu_si512(c0, x0);
  _mm512_storeu_si512(c1, x1);
  _mm512_storeu_si512(c2, x2);
  _mm512_storeu_si512(c3, x3);
#elif defined(__AVX2__)
  static_assert(kLanes == 16, "two AVX2 registers of counters");
  const uint32_t* in[4] = {c0, c1, c2, c3};
  __m256i x[4][2];  // x[word][half]: the two halves' rounds interleave.
  for (int w = 0; w < 4; ++w)
    for (int h = 0; h < 2; ++h)
      x[w][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in[w] + 8 * h));
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxMultiplier0));
  const __m256i m1 = _mm256_set1_epi32(int(kPhiloxMultiplier1));
  uint32_t key0 = seed[0], key1 = seed[1];
  for (int round = 0; round < 10; ++round) {
    const __m256i k0 = _mm256_set1_epi32(int(key0)), k1 = _mm256_set1_epi32(int(key1));
    for (int h = 0; h < 2; ++h) {
      __m256i hi0, lo0, hi1, lo1;
      MulHiLo(x[0][h], m0, &hi0, &lo0);
      MulHiLo(x[2][h], m1, &hi1, &lo1);
      x[0][h] = _mm256_xor_si256(_mm256_xor_si256(hi1, x[1][h]), k0);
      x[1][h] = lo1;
      x[2][h] = _mm256_xor_si256(_mm256_xor_si256(hi0, x[3][h]), k1);
      x[3][h] = lo0;
    }
    key0 += kPhiloxWeyl0;
    key1 += kPhiloxWeyl1;
  }
  uint32_t* out[4] = {c0, c1, c2, c3};
  for (int w = 0; w < 4; ++w)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[w] + 8 * h), x[w][h]);
#else
  for (int lane = 0; lane < kLanes; ++lane) {
    uint32_t key0 = seed[0], key1 = seed[1];
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = uint64_t{kPhiloxMultiplier0} * c0[lane];
      const uint64_t p1 = uint64_t{kPhiloxMultiplier1} * c2[lane];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[lane] ^ key0;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c3[lane] ^ key1;
      c0[lane] = n0;
      c1[lane] = uint32_t(p1);
      c2[lane] = n2;
      c3[lane] = uint32_t(p0);
      key0 += kPhiloxWeyl0;
      key1 += kPhiloxWeyl1;
    }
  }
#endif
}

// scale[j] = 65536 / threshold where column j of `row` is kept, else 0, for j < columns.
// Counter (call * kLanes + lane, row, pair, 0); draw h of a lane's 8 goes to column
// call * 128 + h * kLanes + lane.
void DropoutRow(const uint32_t* seed, uint32_t threshold, uint32_t pair, int64_t row,
                int64_t columns, float* scale) {
  const float kept = float(kLevels) / float(threshold);
  for (int64_t base = 0; base < columns; base += kColumnsPerCall) {
    alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      c0[lane] = uint32_t(base / 8 + lane);
      c1[lane] = uint32_t(row);
      c2[lane] = uint32_t(pair);
      c3[lane] = 0;
    }
    Philox(seed, c0, c1, c2, c3);
    const uint32_t* words[4] = {c0, c1, c2, c3};
    alignas(64) float local[kColumnsPerCall];
    for (int w = 0; w < 4; ++w)
      for (int half = 0; half < 2; ++half)
        for (int lane = 0; lane < kLanes; ++lane)
          local[(2 * w + half) * kLanes + lane] =
              ((words[w][lane] >> (16 * half)) & 0xFFFFu) < threshold ? kept : 0.0f;
    const int64_t n = std::min<int64_t>(kColumnsPerCall, columns - base);
    std::copy(local, local + n, scale + base);
  }
}

// words[i] for i < count: word h of lane l of Philox call c (counter (c * kLanes + l,
// 0xFFFFFFFF, 0, 0)) lands at i = c * 64 + h * kLanes + l. The second counter word keeps
// these streams apart from the attention masks' (whose second word is a row < 2^32 - 1).
void PhiloxWords(const uint32_t* seed, int64_t count, uint32_t* words) {
  constexpr int64_t kWordsPerCall = 4 * kLanes;
  for (int64_t base = 0; base < count; base += kWordsPerCall) {
    alignas(64) uint32_t c[4][kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      c[0][lane] = uint32_t(base / 4 + lane);
      c[1][lane] = 0xFFFFFFFFu;
      c[2][lane] = 0;
      c[3][lane] = 0;
    }
    Philox(seed, c[0], c[1], c[2], c[3]);
    const int64_t n = std::min<int64_t>(kWordsPerCall, count - base);
    std::copy(&c[0][0], &c[0][0] + n, words + base);
  }
}

// Participants for `items` independent pieces of work (attention pairs, conv tiles): as
// many as the pool has threads (the caller is usually one of them), so the cores are
// filled but not oversubscribed.
int64_t Participants(ffi::ThreadPool& pool, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, pool.num_threads()));
}

// Runs work(item, slot) for every item on `participants` threads: the caller and tasks on
// XLA's intra-op pool (no thread start-up per call), each with its own scratch `slot`.
// Counters live on the heap and the caller returns once every item is done, so a task that
// starts late finds no item left and touches nothing of this call's stack.
template <typename Work>
void ForEachItem(ffi::ThreadPool& pool, int64_t items, int64_t participants, Work& work) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0}, slots{1};
  };
  auto progress = std::make_shared<Progress>();
  auto run = [progress, items, &work](int64_t slot) {
    for (int64_t item = progress->next++; item < items; item = progress->next++) {
      work(item, slot);
      progress->done++;
    }
  };
  for (int64_t t = 1; t < participants; ++t)
    pool.Schedule([progress, run] { run(progress->slots++); });
  run(0);
  while (progress->done.load() < items) std::this_thread::yield();
}

// ForEachItem for work that sums items into shared totals: the items in `runs` fixed runs
// of consecutive ones, run r ([r * items / runs, (r + 1) * items / runs)) taken whole, in
// order, by one thread, as work(item, slot, r). A run that sums into a buffer of its own
// then gives the same floats whichever thread takes it, and the runs' buffers add up in a
// fixed order: with items summed per thread, the sums' order followed the scheduling, and two
// calls on the same input differed in the last bits (so did two same-seed training runs).
template <typename Work>
void ForEachRun(ffi::ThreadPool& pool, int64_t items, int64_t runs, Work& work) {
  auto run = [&](int64_t r, int64_t slot) {
    for (int64_t item = r * items / runs; item < (r + 1) * items / runs; ++item)
      work(item, slot, r);
  };
  ForEachItem(pool, runs, runs, run);
}

ffi::Error ReadShard(const ffi::Buffer<ffi::S32>& shard, Dims* dims) {
  if (shard.element_count() != 3)
    return ffi::Error::InvalidArgument("causal attention's shard is [batch offset, head "
                                       "offset, total heads]");
  const int32_t* where = shard.typed_data();
  dims->batch_offset = where[0];
  dims->head_offset = where[1];
  dims->total_heads = where[2];
  return ffi::Error::Success();
}

ffi::Error CheckDims(const ffi::AnyBuffer::Dimensions& q, const ffi::AnyBuffer::Dimensions& k,
                     const ffi::AnyBuffer::Dimensions& v, const ffi::Buffer<ffi::S32>& shard,
                     Dims* dims) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4)
    return ffi::Error::InvalidArgument("causal attention takes [B, T, N, H] q, k and v");
  for (int i = 0; i < 4; ++i)
    if (q[i] != k[i] || q[i] != v[i])
      return ffi::Error::InvalidArgument("causal attention needs q, k, v of one shape");
  *dims = Dims{q[0], q[1], q[2], q[3]};
  return ReadShard(shard, dims);
}

// The packed form: qkv [B, T, 3, N, H] and, with `rotary`, tables [2, T, H/2] (cos, sin).
ffi::Error CheckPackedDims(const ffi::AnyBuffer::Dimensions& qkv,
                           const ffi::AnyBuffer::Dimensions& tables, bool rotary,
                           const ffi::Buffer<ffi::S32>& shard, Dims* dims) {
  if (qkv.size() != 5 || qkv[2] != 3)
    return ffi::Error::InvalidArgument("packed causal attention takes qkv [B, T, 3, N, H]");
  *dims = Dims{qkv[0], qkv[1], qkv[3], qkv[4]};
  if (rotary && (dims->dim % 2 != 0 || tables.size() != 3 || tables[0] != 2 ||
                 tables[1] != dims->length || tables[2] != dims->dim / 2))
    return ffi::Error::InvalidArgument("packed causal attention's rotary tables are [2, T, "
                                       "H/2] (cos, sin) for an even H");
  return ReadShard(shard, dims);
}

// c[R, cols] = a[R, k0:k1] x b[k0:k1, cols] for cols <= kPanelCols, with element (r, k) of
// a at a[r * row_step + k * k_step] (a transposed operand is the same call with the steps
// swapped) and rows of b and c `ldb` and `ldc` apart; columns past `cols` are neither read
// nor written. The result is stored, not added, so no output is zeroed first: Eigen's GEMMs
// zero theirs, and at attention's [64, 32] x [32, 64] shapes that zeroing (a memset per
// row) and the packing took more time than the multiplications.
template <int R, bool kPartial>
void StridedTile(const float* a, int64_t row_step, int64_t k_step, const float* b, int64_t ldb,
                 int64_t k0, int64_t k1, float* c, int64_t ldc, int64_t cols) {
  Lane acc[R][2];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = ZeroLane();
  const TailMask first = Tail(std::min<int64_t>(cols, kLane));
  const TailMask second = Tail(std::max<int64_t>(cols - kLane, 0));
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = b + k * ldb;
    const Lane w0 = Load(row, kPartial, first), w1 = Load(row + kLane, kPartial, second);
    const float* column = a + k * k_step;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const Lane x = Broadcast(column[i * row_step]);
      acc[i][0] = MultiplyAdd(x, w0, acc[i][0]);
      acc[i][1] = MultiplyAdd(x, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    Store(c + i * ldc, kPartial, first, acc[i][0]);
    Store(c + i * ldc + kLane, kPartial, second, acc[i][1]);
  }
}

// StridedTile for `rows` <= R rows (EvenTiles makes the shorter ones).
template <int R>
void StridedTileUpTo(int rows, bool partial, const float* a, int64_t row_step, int64_t k_step,
                     const float* b, int64_t ldb, int64_t k0, int64_t k1, float* c, int64_t ldc,
                     int64_t cols) {
  if (rows == R) {
    if (partial) {
      StridedTile<R, true>(a, row_step, k_step, b, ldb, k0, k1, c, ldc, cols);
    } else {
      StridedTile<R, false>(a, row_step, k_step, b, ldb, k0, k1, c, ldc, cols);
    }
  } else if constexpr (R > 1) {
    StridedTileUpTo<R - 1>(rows, partial, a, row_step, k_step, b, ldb, k0, k1, c, ldc, cols);
  }
}

// c[rows, cols] = a[rows, k0:k1] x b[k0:k1, cols], steps and strides as in StridedTile;
// column panel by column panel, so each panel of b is reused from the cache by every tile.
void StridedProduct(const float* a, int64_t row_step, int64_t k_step, const float* b,
                    int64_t ldb, int64_t k0, int64_t k1, float* c, int64_t ldc, int64_t rows,
                    int64_t cols) {
  const EvenTiles tiles(rows, kPanelTileRows);
  for (int64_t c0 = 0; c0 < cols; c0 += kPanelCols) {
    const int64_t width = std::min(kPanelCols, cols - c0);
    for (int64_t tile = 0; tile < tiles.count; ++tile) {
      const int64_t r0 = tiles.first(tile);
      const int n = tiles.rows(tile);
      StridedTileUpTo<kPanelTileRows>(n, width < kPanelCols, a + r0 * row_step, row_step,
                                      k_step, b + c0, ldb, k0, k1, c + r0 * ldc + c0, ldc,
                                      width);
    }
  }
}

// y[H] = factor * x[H] turned by rotary angles whose cos and sin are c and s [H/2]: halves
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), or as it is where c is null. sign -1
// turns by minus the angles: the rotation's transpose, so its backward pass.
inline void TurnRow(const float* __restrict__ x, int64_t H, const float* __restrict__ c,
                    const float* __restrict__ s, float sign, float factor,
                    float* __restrict__ y) {
  if (c == nullptr) {
    for (int64_t h = 0; h < H; ++h) y[h] = factor * x[h];
    return;
  }
  const int64_t half = H / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half], turn = sign * s[i];
    y[i] = factor * (x1 * c[i] - x2 * turn);
    y[i + half] = factor * (x2 * c[i] + x1 * turn);
  }
}

// TurnRow on each of T rows `stride` apart, with tables [T, H/2] (or none), into rows `ld`
// apart, or (transposed) into the columns of out [H, T].
void TurnRows(const float* in, int64_t stride, int64_t T, int64_t H, const float* cos,
              const float* sin, float sign, float factor, float* out, int64_t ld,
              bool transposed = false) {
  const int64_t half = H / 2;
  std::vector<float> row(transposed ? H : 0);
  for (int64_t t = 0; t < T; ++t) {
    const float *c = cos ? cos + t * half : nullptr, *s = sin ? sin + t * half : nullptr;
    float* y = transposed ? row.data() : out + t * ld;
    TurnRow(in + t * stride, H, c, s, sign, factor, y);
    if (transposed)
      for (int64_t h = 0; h < H; ++h) out[h * T + t] = y[h];
  }
}

// Row i of a pair's scores s[0, T) becomes its softmax over keys 0..i, zeros after. Columns
// i+1 up to the next whole vector read as -inf, so exp runs on whole vectors (Eigen's
// scalar tail of up to 15 expf calls per row cost as much as the rest of the row).
void CausalSoftmaxRow(float* s, int64_t i, int64_t T) {
  const int64_t visible = i + 1;
  const int64_t padded = std::min(T, (visible + kLane - 1) / kLane * kLane);
  std::fill(s + visible, s + padded, -std::numeric_limits<float>::infinity());
  Eigen::Map<Eigen::ArrayXf> weights(s, padded);
  const float top = weights.head(visible).maxCoeff();
  weights = (weights - top).exp();
  weights *= 1.0f / weights.head(visible).sum();
  std::fill(s + padded, s + T, 0.0f);
}

// Rows of query tiles: as many as a register tile has.
constexpr int64_t kQueryRows = kPanelTileRows;

// Where a call's q, k and v rows are (and so their gradients, in the same layout): three
// [B, T, N, H] arrays with q already scaled, or one packed [B, T, 3, N, H] array, a token's
// q, k and v side by side as the qkv projection's matmul writes them, which the kernel scales
// (q) and turns by rotary angles (q and k) as it reads them, turning the gradients back as
// it writes them. Packed, no slices of q, k and v, no rotations of them or their gradients
// and no concatenation of the three gradients run around the kernel.
template <typename T>
struct Operands {
  T *q, *k, *v;
  int64_t stride;  // Between a pair's rows in each.
  bool packed = false;
  const float *cos = nullptr, *sin = nullptr;  // Rotary tables [T, H/2] (packed; or none).
  float scale = 1.0f;                          // q's factor (packed).
  // Offset of (pair, row 0) from q, k and v.
  int64_t at(const Dims& d, int64_t pair) const {
    return packed ? (pair / d.heads) * d.length * 3 * d.heads * d.dim + (pair % d.heads) * d.dim
                  : d.offset(pair);
  }
};

template <typename T>
Operands<T> Packed(T* qkv, const Dims& d, const float* tables, bool rotary, float scale) {
  const int64_t width = d.heads * d.dim, half = d.dim / 2;
  const float* cos = rotary ? tables : nullptr;
  const float* sin = rotary ? tables + d.length * half : nullptr;
  return Operands<T>{qkv, qkv + width, qkv + 2 * width, 3 * width, true, cos, sin, scale};
}

// out and probabilities as the unpacked call's (below) describes them.
void AttentionForward(const Dims& d, const Operands<const float>& in, const uint32_t* key,
                      int32_t threshold, float* out, float* probabilities,
                      ffi::ThreadPool& pool) {
  const int64_t T = d.length, H = d.dim, out_stride = d.stride();
  const bool dropout = threshold < int32_t(kLevels);
  const int64_t threads = Participants(pool, d.pairs());
  // Per thread: k transposed (and turned), q scaled and turned (packed), and the dropped
  // weights of one tile of rows.
  std::vector<std::vector<float>> keys(threads, std::vector<float>(H * T));
  std::vector<std::vector<float>> queries(threads, std::vector<float>(in.packed ? T * H : 0));
  std::vector<std::vector<float>> dropped(threads, std::vector<float>(kQueryRows * T));
  auto work = [&](int64_t pair, int64_t thread) {
    const int64_t at = in.at(d, pair);
    const float *Q = in.q + at, *V = in.v + at;
    int64_t q_stride = in.stride;
    float* O = out + d.offset(pair);
    // This pair's [T, T] probabilities, kept for the backward pass (as XLA keeps its
    // softmax output); row i holds zeros after column i.
    float* S = probabilities + pair * T * T;
    float* kt = keys[thread].data();
    float* W = dropped[thread].data();
    TurnRows(in.k + at, in.stride, T, H, in.cos, in.sin, 1.0f, 1.0f, kt, T, true);
    if (in.packed) {
      float* turned = queries[thread].data();
      TurnRows(Q, in.stride, T, H, in.cos, in.sin, 1.0f, in.scale, turned, H);
      Q = turned;
      q_stride = H;
    }
    const EvenTiles tiles(T, kQueryRows);
    for (int64_t tile = 0; tile < tiles.count; ++tile) {
      // The tile's rows see keys [0, seen) at most.
      const int64_t start = tiles.first(tile), rows = tiles.rows(tile), seen = start + rows;
      StridedProduct(Q + start * q_stride, q_stride, 1, kt, T, 0, H, S + start * T, T, rows,
                     seen);
      for (int64_t i = start; i < seen; ++i) CausalSoftmaxRow(S + i * T, i, T);
      const float* weights = S + start * T;
      if (dropout) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = start + r;
          float* w = W + r * T;
          DropoutRow(key, uint32_t(threshold), d.global_pair(pair), i, i + 1, w);
          for (int64_t j = 0; j <= i; ++j) w[j] *= S[i * T + j];
          std::fill(w + i + 1, w + seen, 0.0f);
        }
        weights = W;
      }
      StridedProduct(weights, T, 1, V, in.stride, 0, seen, O + start * out_stride, out_stride,
                     rows, H);
    }
  };
  ForEachItem(pool, d.pairs(), threads, work);
}

// `grads` in the layout of `in`; out, probabilities and out_grad are [B, T, N, H] and
// [B, N, T, T] whatever the layout.
void AttentionBackward(const Dims& d, const Operands<const float>& in, const uint32_t* key,
                       int32_t threshold, const float* out, const float* probabilities,
                       const float* out_grad, const Operands<float>& grads,
                       ffi::ThreadPool& pool) {
  const int64_t T = d.length, H = d.dim, out_stride = d.stride();
  const bool dropout = threshold < int32_t(kLevels);
  const int64_t threads = Participants(pool, d.pairs());
  // Per thread: v transposed, the score gradients [T, T], the dropped weights [T, T] (with
  // dropout), a row of dropout scales, the softmax backward's row terms, and (packed) q and
  // k as the forward pass multiplied them with their gradients before they are turned back.
  std::vector<std::vector<float>> values(threads, std::vector<float>(H * T));
  std::vector<std::vector<float>> score_grads(threads, std::vector<float>(T * T));
  std::vector<std::vector<float>> dropped(threads, std::vector<float>(dropout ? T * T : 0));
  std::vector<std::vector<float>> scales(threads, std::vector<float>(T));
  std::vector<std::vector<float>> deltas(threads, std::vector<float>(T));
  std::vector<std::vector<float>> turned(threads,
                                         std::vector<float>(in.packed ? 4 * T * H : 0));
  auto work = [&](int64_t pair, int64_t thread) {
    const int64_t at = in.at(d, pair), out_at = d.offset(pair);
    const float *Q = in.q + at, *K = in.k + at;
    const float *O = out + out_at, *dO = out_grad + out_at;
    float *dQ = grads.q + at, *dK = grads.k + at, *dV = grads.v + at;
    int64_t qk_stride = in.stride;
    if (in.packed) {
      float* scratch = turned[thread].data();
      float *q_turned = scratch, *k_turned = scratch + T * H;
      TurnRows(Q, in.stride, T, H, in.cos, in.sin, 1.0f, in.scale, q_turned, H);
      TurnRows(K, in.stride, T, H, in.cos, in.sin, 1.0f, 1.0f, k_turned, H);
      Q = q_turned;
      K = k_turned;
      dQ = scratch + 2 * T * H;
      dK = scratch + 3 * T * H;
      qk_stride = H;
    }
    const float* P = probabilities + pair * T * T;  // Zeros after the diagonal.
    float *vt = values[thread].data(), *dS = score_grads[thread].data();
    float *W = dropped[thread].data(), *scale = scales[thread].data();
    float* delta = deltas[thread].data();
    // delta_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term.
    for (int64_t i = 0; i < T; ++i) {
      Eigen::Map<const Eigen::VectorXf> o(O + i * out_stride, H), g(dO + i * out_stride, H);
      delta[i] = o.dot(g);
    }
    TurnRows(in.v + at, in.stride, T, H, nullptr, nullptr, 1.0f, 1.0f, vt, T, true);
    const EvenTiles tiles(T, kQueryRows);
    for (int64_t tile = 0; tile < tiles.count; ++tile) {
      const int64_t start = tiles.first(tile), rows = tiles.rows(tile), seen = start + rows;
      // dP (the dropped weights' gradient) for the tile's rows, into dS's rows.
      StridedProduct(dO + start * out_stride, out_stride, 1, vt, T, 0, H, dS + start * T, T,
                     rows, seen);
      for (int64_t i = start; i < seen; ++i) {
        float* ds = dS + i * T;
        const float* p = P + i * T;
        if (dropout) {  // Dropped columns hold scale 0, so their gradients are 0 too.
          DropoutRow(key, uint32_t(threshold), d.global_pair(pair), i, i + 1, scale);
          float* w = W + i * T;
          for (int64_t j = 0; j <= i; ++j) {
            w[j] = p[j] * scale[j];
            ds[j] = p[j] * (ds[j] * scale[j] - delta[i]);
          }
          std::fill(w + i + 1, w + T, 0.0f);
        } else {
          for (int64_t j = 0; j <= i; ++j) ds[j] = p[j] * (ds[j] - delta[i]);
        }
        std::fill(ds + i + 1, ds + T, 0.0f);
      }
      StridedProduct(dS + start * T, T, 1, K, qk_stride, 0, seen, dQ + start * qk_stride,
                     qk_stride, rows, H);
    }
    // Key rows [start, start + rows) gather from query rows [start, T), the transposed
    // products reading dS and the weights down their columns.
    const float* weights = dropout ? W : P;
    for (int64_t tile = 0; tile < tiles.count; ++tile) {
      const int64_t start = tiles.first(tile), rows = tiles.rows(tile);
      StridedProduct(weights + start, 1, T, dO, out_stride, start, T, dV + start * in.stride,
                     in.stride, rows, H);
      StridedProduct(dS + start, 1, T, Q, qk_stride, start, T, dK + start * qk_stride,
                     qk_stride, rows, H);
    }
    if (in.packed) {  // Back through the turns (and q's scale) into the packed gradient.
      TurnRows(dQ, H, T, H, in.cos, in.sin, -1.0f, in.scale, grads.q + at, in.stride);
      TurnRows(dK, H, T, H, in.cos, in.sin, -1.0f, 1.0f, grads.k + at, in.stride);
    }
  };
  ForEachItem(pool, d.pairs(), threads, work);
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> shard,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probabilities,
                   int32_t threshold, ffi::ThreadPool pool) {
  Dims d;
  if (ffi::Error error = CheckDims(q.dimensions(), k.dimensions(), v.dimensions(), shard, &d);
      error.failure())
    return error;
  AttentionForward(d, {q.typed_data(), k.typed_data(), v.typed_data(), d.stride()},
                   seed.typed_data(), threshold, out->typed_data(),
                   probabilities->typed_data(), pool);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> shard,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> probabilities,
                    ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> q_grad,
                    ffi::ResultBuffer<ffi::F32> k_grad, ffi::ResultBuffer<ffi::F32> v_grad,
                    int32_t threshold, ffi::ThreadPool pool) {
  Dims d;
  if (ffi::Error error = CheckDims(q.dimensions(), k.dimensions(), v.dimensions(), shard, &d);
      error.failure())
    return error;
  AttentionBackward(d, {q.typed_data(), k.typed_data(), v.typed_data(), d.stride()},
                    seed.typed_data(), threshold, out.typed_data(), probabilities.typed_data(),
                    out_grad.typed_data(),
                    {q_grad->typed_data(), k_grad->typed_data(), v_grad->typed_data(),
                     d.stride()},
                    pool);
  return ffi::Error::Success();
}

// The packed form: qkv [B, T, 3, N, H], tables [2, T, H/2] (cos, sin; read when `rotary`)
// -> out [B, T, N, H] and the probabilities; q is multiplied by `scale` here.
ffi::Error PackedForward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> tables,
                         ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> shard,
                         ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> probabilities, int32_t threshold,
                         float scale, int32_t rotary, ffi::ThreadPool pool) {
  Dims d;
  if (ffi::Error error =
          CheckPackedDims(qkv.dimensions(), tables.dimensions(), rotary != 0, shard, &d);
      error.failure())
    return error;
  const auto in = Packed<const float>(qkv.typed_data(), d, tables.typed_data(), rotary != 0,
                                     scale);
  AttentionForward(d, in, seed.typed_data(), threshold, out->typed_data(),
                   probabilities->typed_data(), pool);
  return ffi::Error::Success();
}

ffi::Error PackedBackward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> tables,
                          ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> shard,
                          ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> probabilities,
                          ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> qkv_grad,
                          int32_t threshold, float scale, int32_t rotary, ffi::ThreadPool pool) {
  Dims d;
  if (ffi::Error error =
          CheckPackedDims(qkv.dimensions(), tables.dimensions(), rotary != 0, shard, &d);
      error.failure())
    return error;
  const float* table = tables.typed_data();
  const auto in = Packed<const float>(qkv.typed_data(), d, table, rotary != 0, scale);
  const auto grads = Packed<float>(qkv_grad->typed_data(), d, table, rotary != 0, scale);
  AttentionBackward(d, in, seed.typed_data(), threshold, out.typed_data(),
                    probabilities.typed_data(), out_grad.typed_data(), grads, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnCausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threshold")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threshold")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnPackedAttentionForward, PackedForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threshold")
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("rotary")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnPackedAttentionBackward, PackedBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threshold")
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("rotary")
                                  .Ctx<ffi::ThreadPool>());

// Uniform 32-bit words of any shape from a 2-word seed (models/dropout.py's masks).
ffi::Error RandomBits(ffi::Buffer<ffi::U32> seed, ffi::ResultBuffer<ffi::U32> words) {
  if (seed.element_count() != 2)
    return ffi::Error::InvalidArgument("random bits take a 2-word seed");
  PhiloxWords(seed.typed_data(), int64_t(words->element_count()), words->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnPhiloxBits, RandomBits,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());

// ---------------------------------------------------------------------------------------
// 2-D convolution, channels-last: x [N, H, W, C] * kernel [KH, KW, C, O] -> [N, OH, OW, O],
// with strides, zero padding and kernel dilation, forward and both gradients.
//
// Why: XLA:CPU's convolution runs ResNet-18's shapes at 25-55% of its matmul peak (worse
// for kernel gradients and small maps), and a GEMM rewrite in XLA builds the whole patch
// matrix in memory first, which costs as much as the matmul. Here each thread takes a tile
// of whole images, gathers their patches (one row per output pixel, columns (ky, kx, c),
// taps that read only padding for every output left out) into a cache-sized buffer and
// multiplies it with single-threaded Eigen GEMMs; the input gradient multiplies the same
// way and scatters the patch gradients back (tiles are whole images, so no two threads
// add into one pixel); the kernel gradient sums each thread's patches^T x output
// gradients, then the threads' sums. On small maps the output rows near the top and bottom
// edges read padding for whole rows of taps (a 3x3 conv on a 4x4 map: 2 of 12 tap rows),
// so a tile's rows are grouped by their live tap rows (RowClass) and each group multiplies
// only its own tap rows.

namespace {

struct ConvDims {
  int64_t batch, height, width, channels;  // Input map.
  int64_t kernel_h, kernel_w, features;    // Kernel taps and output channels.
  int64_t out_h, out_w;                    // Output map.
  int64_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  // Taps that read real input for some output: ky in [ky0, ky1), kx in [kx0, kx1). Taps
  // outside only ever multiply padding (a 3x3 'SAME' conv on a 1x1 map has one live tap).
  int64_t ky0, ky1, kx0, kx1;

  int64_t live_taps_w() const { return kx1 - kx0; }
  int64_t patch_width() const { return (ky1 - ky0) * (kx1 - kx0) * channels; }
  int64_t out_pixels() const { return out_h * out_w; }
  // A 1x1 conv with stride 1 and no padding reads its input as the patch matrix itself.
  bool input_is_patches() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 &&
           pad_top == 0 && pad_left == 0 && out_h == height && out_w == width;
  }
};

// The live tap range [lo, hi) along one dimension.
void LiveTaps(int64_t size, int64_t taps, int64_t out, int64_t stride, int64_t pad,
              int64_t dilation, int64_t* lo, int64_t* hi) {
  *lo = taps;
  *hi = 0;
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t o = 0; o < out; ++o) {
      const int64_t at = o * stride - pad + t * dilation;
      if (at >= 0 && at < size) {
        *lo = std::min(*lo, t);
        *hi = std::max(*hi, t + 1);
        break;
      }
    }
  if (*lo >= *hi) *lo = *hi = 0;  // No tap reads input: the conv is all zeros.
}

ffi::Error MakeConvDims(const ffi::AnyBuffer::Dimensions& input,
                        const ffi::AnyBuffer::Dimensions& kernel,
                        const ffi::AnyBuffer::Dimensions& output,
                        ffi::Span<const int64_t> geometry, ConvDims* d) {
  if (input.size() != 4 || kernel.size() != 4 || output.size() != 4)
    return ffi::Error::InvalidArgument("conv2d takes [N, H, W, C] maps and a [KH, KW, C, O] "
                                       "kernel");
  if (geometry.size() != 6)
    return ffi::Error::InvalidArgument("conv2d's geometry is [stride_h, stride_w, pad_top, "
                                       "pad_left, dilation_h, dilation_w]");
  if (kernel[2] != input[3] || kernel[3] != output[3] || input[0] != output[0])
    return ffi::Error::InvalidArgument("conv2d: input, kernel and output shapes disagree");
  *d = ConvDims{input[0], input[1], input[2], input[3], kernel[0], kernel[1], kernel[3],
                output[1], output[2], geometry[0], geometry[1], geometry[2], geometry[3],
                geometry[4], geometry[5]};
  LiveTaps(d->height, d->kernel_h, d->out_h, d->stride_h, d->pad_top, d->dilation_h, &d->ky0,
           &d->ky1);
  LiveTaps(d->width, d->kernel_w, d->out_w, d->stride_w, d->pad_left, d->dilation_w, &d->kx0,
           &d->kx1);
  return ffi::Error::Success();
}

// Calls segment(patch column, input offset within the image, values) for every run of
// consecutive patch values of output pixel (oy, ox) that read real input; patch values
// that read padding are in no segment. With dilation 1 the live kx taps of one row ky read
// one contiguous run of input.
template <typename Segment>
void ForEachSegment(const ConvDims& d, int64_t oy, int64_t ox, Segment&& segment) {
  const int64_t C = d.channels, taps_w = d.live_taps_w();
  for (int64_t ky = d.ky0; ky < d.ky1; ++ky) {
    const int64_t iy = oy * d.stride_h - d.pad_top + ky * d.dilation_h;
    if (iy < 0 || iy >= d.height) continue;
    const int64_t column = (ky - d.ky0) * taps_w * C;
    const int64_t row_at = iy * d.width * C;
    const int64_t ix_first = ox * d.stride_w - d.pad_left;
    if (d.dilation_w == 1) {
      const int64_t lo = std::max(d.kx0, -ix_first);
      const int64_t hi = std::min(d.kx1, d.width - ix_first);
      if (lo < hi)
        segment(column + (lo - d.kx0) * C, row_at + (ix_first + lo) * C, (hi - lo) * C);
    } else {
      for (int64_t kx = d.kx0; kx < d.kx1; ++kx) {
        const int64_t ix = ix_first + kx * d.dilation_w;
        if (ix >= 0 && ix < d.width)
          segment(column + (kx - d.kx0) * C, row_at + ix * C, C);
      }
    }
  }
}

// Output rows [oy_begin, oy_end) that all read real input through the rows of taps
// [ky_lo, ky_hi) only (empty when they read padding only).
struct RowClass {
  int64_t oy_begin, oy_end, ky_lo, ky_hi;
  bool empty() const { return ky_lo >= ky_hi; }
};

// A tile of `images` images whose patch rows are ordered by output row (oy, image, ox), so
// that each row class is one block of rows; its live tap rows are one block of columns.
struct ClassBlock {
  int64_t row, rows, column, width;
  ClassBlock(const ConvDims& d, const RowClass& c, int64_t images)
      : row(c.oy_begin * images * d.out_w), rows((c.oy_end - c.oy_begin) * images * d.out_w),
        column((c.ky_lo - d.ky0) * d.live_taps_w() * d.channels),
        width((c.ky_hi - c.ky_lo) * d.live_taps_w() * d.channels) {}
};

// Fewest patch rows per tile that a row class of its own needs: smaller classes join a
// neighbour (taking the union of their tap rows), since Eigen's GEMMs on a few dozen rows
// lose more than the padding rows they skip. Measured per pass: 4x4x128 3x3 ~270 -> ~330
// GFLOP/s with classes; the stem's kernel gradient a few % faster at 32 rows than at 48
// (its 2-image tiles then have 32-row edge classes).
constexpr int64_t kClassRows = 32;

// The row classes of `d` for tiles of `images_per_tile` images: output rows grouped by
// their live tap rows, small groups merged into a neighbour. One class (all live taps) when
// `single`.
std::vector<RowClass> RowClasses(const ConvDims& d, int64_t images_per_tile, bool single) {
  if (single) return {RowClass{0, d.out_h, d.ky0, d.ky1}};
  std::vector<RowClass> classes;
  for (int64_t oy = 0; oy < d.out_h; ++oy) {
    int64_t lo = d.ky1, hi = d.ky0;
    for (int64_t ky = d.ky0; ky < d.ky1; ++ky) {
      const int64_t iy = oy * d.stride_h - d.pad_top + ky * d.dilation_h;
      if (iy >= 0 && iy < d.height) lo = std::min(lo, ky), hi = ky + 1;
    }
    if (lo >= hi) lo = hi = d.ky0;
    if (!classes.empty() && classes.back().ky_lo == lo && classes.back().ky_hi == hi)
      classes.back().oy_end = oy + 1;
    else
      classes.push_back({oy, oy + 1, lo, hi});
  }
  auto merged = [](const RowClass& a, const RowClass& b) {
    RowClass c{std::min(a.oy_begin, b.oy_begin), std::max(a.oy_end, b.oy_end), a.ky_lo, a.ky_hi};
    if (a.empty()) c.ky_lo = b.ky_lo, c.ky_hi = b.ky_hi;
    else if (!b.empty()) c.ky_lo = std::min(a.ky_lo, b.ky_lo), c.ky_hi = std::max(a.ky_hi, b.ky_hi);
    return c;
  };
  for (;;) {
    size_t small = classes.size();
    for (size_t i = 0; i < classes.size() && classes.size() > 1; ++i)
      if ((classes[i].oy_end - classes[i].oy_begin) * d.out_w * images_per_tile < kClassRows) {
        small = i;
        break;
      }
    if (small == classes.size()) return classes;
    // Join the neighbour whose union adds the fewest tap rows.
    const auto added = [&](size_t j) {
      const RowClass c = merged(classes[small], classes[j]);
      return (c.ky_hi - c.ky_lo) * (c.oy_end - c.oy_begin) -
             (classes[small].ky_hi - classes[small].ky_lo) *
                 (classes[small].oy_end - classes[small].oy_begin) -
             (classes[j].ky_hi - classes[j].ky_lo) * (classes[j].oy_end - classes[j].oy_begin);
    };
    size_t other = small == 0 ? 1 : small - 1;
    if (small > 0 && small + 1 < classes.size() && added(small + 1) < added(small - 1))
      other = small + 1;
    classes[std::min(small, other)] = merged(classes[small], classes[other]);
    classes.erase(classes.begin() + std::max(small, other));
  }
}

// Copies a tile's rows of O values between image order [images, OH, OW, O] (the maps') and
// output-row order [OH, images, OW, O] (the row classes').
void Reorder(const ConvDims& d, const float* from, float* to, int64_t images, int64_t O,
             bool to_row_order) {
  const int64_t run = d.out_w * O;
  for (int64_t image = 0; image < images; ++image)
    for (int64_t oy = 0; oy < d.out_h; ++oy) {
      const int64_t by_image = (image * d.out_h + oy) * run, by_row = (oy * images + image) * run;
      std::copy_n(from + (to_row_order ? by_image : by_row), run,
                  to + (to_row_order ? by_row : by_image));
    }
}

// A tile's output gradient `g` (image order) in the order of its patch rows: `g` itself,
// or its copy in output-row order in `scratch` when the tile's rows are reordered.
const float* TileOutGrad(const ConvDims& d, bool reordered, const float* g, int64_t images,
                         RowMatrix* scratch) {
  if (!reordered) return g;
  scratch->resize(images * d.out_pixels(), d.features);
  Reorder(d, g, scratch->data(), images, d.features, /*to_row_order=*/true);
  return scratch->data();
}

// Short runs (a patch row is a few runs of KW * C floats) with masked vector tails: plain
// loops spent ~120 cycles per 147-float stem patch row in their scalar tails (AVX-512).
inline void CopyFloats(const float* from, float* to, int64_t n) {
#if KILN_VECTOR_LANES
  int64_t i = 0;
  for (; i + kLane <= n; i += kLane) StoreLane(to + i, LoadLane(from + i));
  if (i < n) {
    const TailMask tail = Tail(n - i);
    StoreTail(to + i, tail, LoadTail(from + i, tail));
  }
#else
  std::copy(from, from + n, to);
#endif
}

// After non-temporal stores (StreamLane: data read again only much later, an LSTM's
// residuals): the writing thread calls it before others may read them.
inline void StreamFence() {
#if KILN_VECTOR_LANES
  _mm_sfence();
#endif
}

inline void ZeroFloats(float* to, int64_t n) {
#if KILN_VECTOR_LANES
  int64_t i = 0;
  for (; i + kLane <= n; i += kLane) StoreLane(to + i, ZeroLane());
  if (i < n) StoreTail(to + i, Tail(n - i), ZeroLane());
#else
  std::fill(to, to + n, 0.0f);
#endif
}

inline void AddFloats(const float* from, float* to, int64_t n) {
#if KILN_VECTOR_LANES
  int64_t i = 0;
  for (; i + kLane <= n; i += kLane)
    StoreLane(to + i, AddLanes(LoadLane(to + i), LoadLane(from + i)));
  if (i < n) {
    const TailMask tail = Tail(n - i);
    StoreTail(to + i, tail, AddLanes(LoadTail(to + i, tail), LoadTail(from + i, tail)));
  }
#else
  for (int64_t i = 0; i < n; ++i) to[i] += from[i];
#endif
}

// Where each patch row's values come from, worked out once per call for one image (every
// image reads the same offsets from its own base): per output pixel its runs of input.
// Walking this table instead of recomputing bounds per run made the stem's gather ~3x
// faster (its runs are 21 floats: 7 taps x 3 channels).
struct PatchMap {
  struct Run {
    int64_t column, at, n;
  };
  std::vector<Run> runs;
  std::vector<int64_t> row_start;  // Runs of output pixel p: [row_start[p], row_start[p + 1]).
  // Columns [span[p].first, span[p].second) of pixel p's patch row are read (its row
  // class's tap rows): Gather writes those only.
  std::vector<std::pair<int64_t, int64_t>> span;
  int64_t width, image_size, out_w;
  bool row_order;  // Tiles ordered by output row (several row classes), else by image.

  PatchMap(const ConvDims& d, const std::vector<RowClass>& classes)
      : width(d.patch_width()), image_size(d.height * d.width * d.channels), out_w(d.out_w),
        row_order(classes.size() > 1) {
    row_start.reserve(d.out_pixels() + 1);
    for (const RowClass& c : classes) {
      const ClassBlock block(d, c, 1);
      for (int64_t oy = c.oy_begin; oy < c.oy_end; ++oy)
        for (int64_t ox = 0; ox < d.out_w; ++ox) {
          row_start.push_back(int64_t(runs.size()));
          span.push_back({block.column, block.column + block.width});
          ForEachSegment(d, oy, ox, [&](int64_t column, int64_t at, int64_t n) {
            runs.push_back({column, at, n});
          });
        }
    }
    row_start.push_back(int64_t(runs.size()));
  }
  int64_t pixels() const { return int64_t(row_start.size()) - 1; }

  // Calls visit(pixel, patch row) for every pixel of image `image` of a tile of `images`.
  template <typename Visit>
  void ForEachRow(int64_t image, int64_t images, Visit&& visit) const {
    const int64_t out_h = pixels() / out_w;
    for (int64_t oy = 0; oy < out_h; ++oy) {
      const int64_t first =
          row_order ? (oy * images + image) * out_w : image * pixels() + oy * out_w;
      for (int64_t ox = 0; ox < out_w; ++ox) visit(oy * out_w + ox, first + ox);
    }
  }

  // Rows of images [image0, image0 + images) of the patch matrix, into `patches`.
  void Gather(const float* x, int64_t image0, int64_t images, float* patches) const {
    for (int64_t image = 0; image < images; ++image) {
      const float* base = x + (image0 + image) * image_size;
      ForEachRow(image, images, [&](int64_t p, int64_t patch_row) {
        float* row = patches + patch_row * width;
        // Zeros only where padding is read: each value written once.
        int64_t written = span[p].first;
        for (int64_t r = row_start[p]; r < row_start[p + 1]; ++r) {
          const Run& run = runs[r];
          ZeroFloats(row + written, run.column - written);
          CopyFloats(base + run.at, row + run.column, run.n);
          written = run.column + run.n;
        }
        ZeroFloats(row + written, span[p].second - written);
      });
    }
  }

  // The transpose of Gather: adds each patch value into the input pixel it came from.
  void Scatter(const float* patches, int64_t image0, int64_t images, float* x) const {
    for (int64_t image = 0; image < images; ++image) {
      float* base = x + (image0 + image) * image_size;
      ForEachRow(image, images, [&](int64_t p, int64_t patch_row) {
        const float* row = patches + patch_row * width;
        for (int64_t r = row_start[p]; r < row_start[p + 1]; ++r)
          AddFloats(row + runs[r].column, base + runs[r].at, runs[r].n);
      });
    }
  }
};

// How a conv call splits over threads. Tiled: each thread takes tiles of whole images, of
// at least kTileRows patch rows (Eigen's GEMMs lose ~15% at a few dozen rows: 4x4x128
// 3x3/2 at 56-row tiles ran at 55% of the matmul peak, at 128 rows 66%; with row classes
// splitting tiles further, 512-row tiles beat 256-row ones by 3-8% on the 8x8 and 4x4
// shapes) and at most kTileBytes of patches (about a core's L2 plus its share of L3), and at
// least 2 tiles per thread so that the threads finish together. Shared, when the whole batch has
// at most kSharedRows output pixels per thread (ResNet-18's last stages: 128 rows in all):
// the patches are gathered once and each thread multiplies all rows by its block of
// columns, since splitting 128 rows would leave every thread's GEMM packing the whole
// kernel for little work (1x1x512 3x3: 52 -> 58-72%; 2x2x256 3x3/2: 59 -> 68%; at 2,048
// rows it lost: 8x8x64 1x1/2 73 -> 35%).
constexpr int64_t kTileBytes = 2 << 20, kTileRows = 512;
constexpr int64_t kSharedRows = 128;
// Column blocks per thread in the shared split: a thread that wakes late still finds work
// (1x1x512 3x3 forward 352 -> 373 GFLOP/s at 4 than at 1; noisy, never worse).
constexpr int64_t kBlocksPerThread = 4;

struct ConvSplit {
  int64_t threads, images_per_tile, tiles, blocks;
  bool shared;
  std::vector<RowClass> classes;  // One (all live taps) in the shared split.
  ConvSplit(const ConvDims& d, ffi::ThreadPool& pool) {
    threads = Participants(pool, d.batch);
    shared = threads > 1 && d.batch * d.out_pixels() <= kSharedRows * threads;
    blocks = threads * kBlocksPerThread;
    const int64_t image_bytes = std::max<int64_t>(1, d.out_pixels() * d.patch_width() * 4);
    const int64_t for_rows = (kTileRows + d.out_pixels() - 1) / d.out_pixels();
    images_per_tile = std::min({kTileBytes / image_bytes, for_rows, d.batch / (2 * threads)});
    images_per_tile = std::max<int64_t>(1, images_per_tile);
    // Whole rounds of tiles, so that no thread takes one more tile than the others (4x4x128
    // 3x3 at 28-image tiles made 5 tiles for 2 threads, and ran ~10% slower than at 32).
    tiles = (d.batch + images_per_tile - 1) / images_per_tile;
    tiles = (tiles + threads - 1) / threads * threads;
    images_per_tile = (d.batch + tiles - 1) / tiles;
    tiles = (d.batch + images_per_tile - 1) / images_per_tile;
    classes = RowClasses(d, images_per_tile, shared || d.input_is_patches());
  }
  // A tile's rows are in output-row order, not the maps' image order.
  bool reordered(int64_t images) const { return classes.size() > 1 && images > 1; }
  int64_t first(int64_t tile) const { return tile * images_per_tile; }
  int64_t count(int64_t tile, int64_t batch) const {
    return std::min(images_per_tile, batch - first(tile));
  }
};

// Column block `block` of `blocks` over `total` columns, in whole 16-float vectors.
void ColumnBlock(int64_t total, int64_t blocks, int64_t block, int64_t* start, int64_t* width) {
  const int64_t step = ((total + blocks - 1) / blocks + 15) / 16 * 16;
  *start = std::min(total, block * step);
  *width = std::min(total, *start + step) - *start;
}

// Offset of the live taps' rows in a [KH * KW * C, O] kernel when they are one contiguous
// block (every kx tap live, or one row of taps: a 3x3 conv on a 1x1 map), else -1.
int64_t LiveRowsAt(const ConvDims& d) {
  if ((d.kx0 == 0 && d.kx1 == d.kernel_w) || d.ky1 - d.ky0 == 1)
    return (d.ky0 * d.kernel_w + d.kx0) * d.channels * d.features;
  return -1;
}

// The kernel's live taps as a [patch width, O] matrix: a view of the kernel where they are
// contiguous, else copied out.
const float* LiveKernel(const ConvDims& d, const float* kernel, std::vector<float>* copy) {
  if (const int64_t at = LiveRowsAt(d); at >= 0) return kernel + at;
  const int64_t span = d.live_taps_w() * d.channels * d.features;
  copy->resize(d.patch_width() * d.features);
  for (int64_t ky = d.ky0; ky < d.ky1; ++ky) {
    const float* from = kernel + ((ky * d.kernel_w + d.kx0) * d.channels) * d.features;
    std::copy(from, from + span, copy->data() + (ky - d.ky0) * span);
  }
  return copy->data();
}

// The whole patch matrix [N * OH * OW, patch width], gathered by image tiles in parallel
// (or the input itself when it is one).
const float* AllPatches(const ConvDims& d, const ConvSplit& split, const PatchMap& map,
                        const float* x, ffi::ThreadPool& pool, RowMatrix* buffer) {
  if (d.input_is_patches()) return x;
  buffer->resize(d.batch * d.out_pixels(), d.patch_width());
  auto gather = [&](int64_t tile, int64_t) {
    const int64_t image0 = split.first(tile);
    map.Gather(x, image0, split.count(tile, d.batch),
               buffer->data() + image0 * d.out_pixels() * d.patch_width());
  };
  ForEachItem(pool, split.tiles, split.threads, gather);
  return buffer->data();
}

// Convs on maps of few channels (an RGB or gray image's first conv: the 7x7/2 stem on
// 3 channels) as implicit GEMMs: register tiles of outputs accumulated straight from a
// zero-padded copy of the image, one broadcast input value times a row of the kernel per
// tap. Gathering their patches cost as much as the GEMM's packing: 147-float patch rows
// made of 7 runs of 21 floats, each a short scattered copy, then packed again by Eigen.
// Single-thread C++ benchmark of the stem (batch 64, taps on padding not counted): forward
// 201-207 GFLOP/s and kernel gradient 183-190, where the gathered GEMMs ran ~135-140 per
// thread. Padding taps are multiplied (12% of the stem's), taps are in the kernel's own
// (ky, kx, c) order, and the input gradient keeps the gathered path (training never asks
// for a first conv's input gradient).
#if KILN_VECTOR_LANES
constexpr int64_t kNarrowChannels = 4;
// A tile's accumulators (pixels or taps x vectors), its row of kernel or gradient vectors
// and one broadcast value fill most of the vector registers: 24 + 4 + 1 of AVX-512's 32,
// 12 + 2 + 1 of AVX2's 16.
constexpr int kPixelsPerTile = 6, kTapsPerTile = 6;
constexpr int kVectorsPerTile = KILN_VECTOR_LANES == 16 ? 4 : 2;
// Output pixels per kernel-gradient sweep: 1,024 x 64 features of gradient is 256 KB.
constexpr int64_t kPixelChunk = 1024;

bool NarrowInput(const ConvDims& d) {
  return d.channels <= kNarrowChannels && d.features % kLane == 0 && !d.input_is_patches();
}

// outputs[j][o0 + kLane * v ...] = sum over taps k of base[j][offsets[k]] *
// kernel[k][o0 + ...], for NP output pixels whose windows start at base[j] in the padded image.
template <int NP, int NV>
void NarrowForwardTile(const float* const* base, const int32_t* offsets, int64_t taps,
                       const float* kernel, int64_t features, float* out) {
  Lane acc[NP][NV];
  for (int j = 0; j < NP; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = ZeroLane();
  for (int64_t k = 0; k < taps; ++k) {
    Lane w[NV];
    for (int v = 0; v < NV; ++v) w[v] = LoadLane(kernel + k * features + kLane * v);
    const int32_t at = offsets[k];
    for (int j = 0; j < NP; ++j) {
      const Lane value = Broadcast(base[j][at]);
      for (int v = 0; v < NV; ++v) acc[j][v] = MultiplyAdd(value, w[v], acc[j][v]);
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int v = 0; v < NV; ++v) StoreLane(out + j * features + kLane * v, acc[j][v]);
}

// kernel_grad[i][o0 + kLane * v ...] += sum over `pixels` of base[p][offsets[i]] *
// out_grad[p][...] for NK taps.
template <int NK, int NV>
void NarrowKernelGradTile(const float* const* base, int64_t pixels, const int32_t* offsets,
                          const float* out_grad, int64_t features, float* kernel_grad) {
  Lane acc[NK][NV];
  int32_t at[NK];
  for (int i = 0; i < NK; ++i) {
    at[i] = offsets[i];
    for (int v = 0; v < NV; ++v)
      acc[i][v] = LoadLane(kernel_grad + i * features + kLane * v);
  }
  for (int64_t p = 0; p < pixels; ++p) {
    Lane g[NV];
    for (int v = 0; v < NV; ++v) g[v] = LoadLane(out_grad + p * features + kLane * v);
    const float* window = base[p];
    for (int i = 0; i < NK; ++i) {
      const Lane value = Broadcast(window[at[i]]);
      for (int v = 0; v < NV; ++v) acc[i][v] = MultiplyAdd(value, g[v], acc[i][v]);
    }
  }
  for (int i = 0; i < NK; ++i)
    for (int v = 0; v < NV; ++v)
      StoreLane(kernel_grad + i * features + kLane * v, acc[i][v]);
}

// Tile<rows, vectors>(...) for run-time sizes up to 6 rows and kVectorsPerTile vectors.
template <template <int, int> class Tile, int NR, typename... Args>
void WithVectors(int64_t vectors, Args... args) {
  switch (vectors) {
    case 1: return Tile<NR, 1>::Run(args...);
    case 2: return Tile<NR, std::min(2, kVectorsPerTile)>::Run(args...);
    case 3: return Tile<NR, std::min(3, kVectorsPerTile)>::Run(args...);
    default: return Tile<NR, kVectorsPerTile>::Run(args...);
  }
}
template <template <int, int> class Tile, typename... Args>
void WithSizes(int64_t rows, int64_t vectors, Args... args) {
  switch (rows) {
    case 1: return WithVectors<Tile, 1>(vectors, args...);
    case 2: return WithVectors<Tile, 2>(vectors, args...);
    case 3: return WithVectors<Tile, 3>(vectors, args...);
    case 4: return WithVectors<Tile, 4>(vectors, args...);
    case 5: return WithVectors<Tile, 5>(vectors, args...);
    default: return WithVectors<Tile, 6>(vectors, args...);
  }
}
template <int NP, int NV>
struct ForwardTile {
  template <typename... Args>
  static void Run(Args... args) { NarrowForwardTile<NP, NV>(args...); }
};
template <int NK, int NV>
struct KernelGradTile {
  template <typename... Args>
  static void Run(Args... args) { NarrowKernelGradTile<NK, NV>(args...); }
};

// One image zero-padded to the extent its outputs' windows read, and where each output
// pixel's window starts in it; offsets[k] is tap k's (ky, kx, c) place within a window.
struct PaddedImage {
  int64_t rows, columns;  // Padded extent.
  std::vector<int32_t> offsets;
  std::vector<float> values;
  std::vector<const float*> windows;

  explicit PaddedImage(const ConvDims& d)
      : rows((d.out_h - 1) * d.stride_h + (d.kernel_h - 1) * d.dilation_h + 1),
        columns((d.out_w - 1) * d.stride_w + (d.kernel_w - 1) * d.dilation_w + 1),
        values(rows * columns * d.channels), windows(d.out_pixels()) {
    for (int64_t ky = 0; ky < d.kernel_h; ++ky)
      for (int64_t kx = 0; kx < d.kernel_w; ++kx)
        for (int64_t c = 0; c < d.channels; ++c)
          offsets.push_back(
              int32_t((ky * d.dilation_h * columns + kx * d.dilation_w) * d.channels + c));
    for (int64_t oy = 0; oy < d.out_h; ++oy)
      for (int64_t ox = 0; ox < d.out_w; ++ox)
        windows[oy * d.out_w + ox] =
            values.data() + (oy * d.stride_h * columns + ox * d.stride_w) * d.channels;
  }
  PaddedImage(const PaddedImage&) = delete;  // `windows` point into this one's `values`.

  // One per thread.
  static std::vector<std::unique_ptr<PaddedImage>> PerThread(const ConvDims& d,
                                                              int64_t threads) {
    std::vector<std::unique_ptr<PaddedImage>> images;
    for (int64_t t = 0; t < threads; ++t) images.push_back(std::make_unique<PaddedImage>(d));
    return images;
  }

  void Load(const ConvDims& d, const float* image) {
    std::fill(values.begin(), values.end(), 0.0f);
    const int64_t x0 = std::max<int64_t>(0, -d.pad_left);
    const int64_t x1 = std::min(d.width, columns - d.pad_left);
    if (x1 <= x0) return;
    for (int64_t py = 0; py < rows; ++py) {
      const int64_t iy = py - d.pad_top;
      if (iy < 0 || iy >= d.height) continue;
      std::copy(image + (iy * d.width + x0) * d.channels, image + (iy * d.width + x1) * d.channels,
                values.data() + (py * columns + x0 + d.pad_left) * d.channels);
    }
  }
};

void NarrowForward(const ConvDims& d, const float* x, const float* kernel, float* out,
                   ffi::ThreadPool& pool) {
  const int64_t threads = Participants(pool, d.batch), O = d.features, P = d.out_pixels();
  const int64_t taps = d.kernel_h * d.kernel_w * d.channels;
  const int64_t image_size = d.height * d.width * d.channels;
  const auto padded = PaddedImage::PerThread(d, threads);
  auto work = [&](int64_t image, int64_t thread) {
    PaddedImage& pad = *padded[thread];
    pad.Load(d, x + image * image_size);
    float* y = out + image * P * O;
    for (int64_t o0 = 0; o0 < O; o0 += kLane * kVectorsPerTile)
      for (int64_t p = 0; p < P; p += kPixelsPerTile)
        WithSizes<ForwardTile>(std::min<int64_t>(kPixelsPerTile, P - p),
                               std::min<int64_t>(kVectorsPerTile, (O - o0) / kLane),
                               pad.windows.data() + p, pad.offsets.data(), taps, kernel + o0,
                               O, y + p * O + o0);
  };
  ForEachItem(pool, d.batch, threads, work);
}

void NarrowKernelGrad(const ConvDims& d, const float* x, const float* out_grad,
                      float* kernel_grad, ffi::ThreadPool& pool) {
  const int64_t threads = Participants(pool, d.batch), O = d.features, P = d.out_pixels();
  const int64_t taps = d.kernel_h * d.kernel_w * d.channels;
  const int64_t image_size = d.height * d.width * d.channels;
  const auto padded = PaddedImage::PerThread(d, threads);
  // Each run of images sums into its own [taps, O]; run 0's is the result itself.
  std::fill(kernel_grad, kernel_grad + taps * O, 0.0f);
  std::vector<std::vector<float>> sums(threads - 1, std::vector<float>(taps * O));
  auto work = [&](int64_t image, int64_t thread, int64_t run) {
    PaddedImage& pad = *padded[thread];
    pad.Load(d, x + image * image_size);
    float* sum = run ? sums[run - 1].data() : kernel_grad;
    const float* g = out_grad + image * P * O;
    // Every tap block sweeps the chunk's output gradients again: chunks keep them in L2.
    for (int64_t p0 = 0; p0 < P; p0 += kPixelChunk) {
      const int64_t pixels = std::min(kPixelChunk, P - p0);
      for (int64_t o0 = 0; o0 < O; o0 += kLane * kVectorsPerTile)
        for (int64_t k = 0; k < taps; k += kTapsPerTile)
          WithSizes<KernelGradTile>(std::min<int64_t>(kTapsPerTile, taps - k),
                                    std::min<int64_t>(kVectorsPerTile, (O - o0) / kLane),
                                    pad.windows.data() + p0, pixels, pad.offsets.data() + k,
                                    g + p0 * O + o0, O, sum + k * O + o0);
    }
  };
  ForEachRun(pool, d.batch, threads, work);
  for (const std::vector<float>& partial : sums)
    for (int64_t i = 0; i < taps * O; ++i) kernel_grad[i] += partial[i];
}
#else
bool NarrowInput(const ConvDims&) { return false; }
void NarrowForward(const ConvDims&, const float*, const float*, float*, ffi::ThreadPool&) {}
void NarrowKernelGrad(const ConvDims&, const float*, const float*, float*, ffi::ThreadPool&) {}
#endif

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> geometry,
                       ffi::ThreadPool pool) {
  ConvDims d;
  if (ffi::Error error = MakeConvDims(x.dimensions(), kernel.dimensions(), out->dimensions(),
                                      geometry, &d);
      error.failure())
    return error;
  const int64_t K = d.patch_width(), O = d.features, P = d.out_pixels();
  if (K == 0) {
    std::fill(out->typed_data(), out->typed_data() + out->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  if (NarrowInput(d)) {
    NarrowForward(d, x.typed_data(), kernel.typed_data(), out->typed_data(), pool);
    return ffi::Error::Success();
  }
  std::vector<float> live;
  ConstView W(LiveKernel(d, kernel.typed_data(), &live), K, O, Eigen::OuterStride<>(O));
  const ConvSplit split(d, pool);
  const PatchMap map(d, split.classes);
  if (split.shared) {
    RowMatrix buffer;
    const int64_t rows = d.batch * P;
    ConstView X(AllPatches(d, split, map, x.typed_data(), pool, &buffer), rows, K,
                Eigen::OuterStride<>(K));
    View Y(out->typed_data(), rows, O, Eigen::OuterStride<>(O));
    auto multiply = [&](int64_t block, int64_t) {
      int64_t start, width;
      ColumnBlock(O, split.blocks, block, &start, &width);
      if (width) Y.middleCols(start, width).noalias() = X * W.middleCols(start, width);
    };
    ForEachItem(pool, split.blocks, split.threads, multiply);
    return ffi::Error::Success();
  }
  std::vector<RowMatrix> scratch(split.threads), reordered(split.threads);
  auto work = [&](int64_t tile, int64_t thread) {
    const int64_t image0 = split.first(tile), images = split.count(tile, d.batch);
    const int64_t rows = images * P;
    float* y = out->typed_data() + image0 * P * O;
    if (d.input_is_patches()) {
      View(y, rows, O, Eigen::OuterStride<>(O)).noalias() =
          ConstView(x.typed_data() + image0 * P * K, rows, K, Eigen::OuterStride<>(K)) * W;
      return;
    }
    RowMatrix& patches = scratch[thread];
    patches.resize(rows, K);
    map.Gather(x.typed_data(), image0, images, patches.data());
    const bool reorder = split.reordered(images);
    if (reorder) reordered[thread].resize(rows, O);
    View Y(reorder ? reordered[thread].data() : y, rows, O, Eigen::OuterStride<>(O));
    for (const RowClass& c : split.classes) {
      const ClassBlock b(d, c, images);
      if (b.width)
        Y.middleRows(b.row, b.rows).noalias() =
            patches.block(b.row, b.column, b.rows, b.width) * W.middleRows(b.column, b.width);
      else
        Y.middleRows(b.row, b.rows).setZero();
    }
    if (reorder) Reorder(d, Y.data(), y, images, O, /*to_row_order=*/false);
  };
  ForEachItem(pool, split.tiles, split.threads, work);
  return ffi::Error::Success();
}

ffi::Error ConvInputGrad(ffi::Buffer<ffi::F32> out_grad, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> x_grad, ffi::Span<const int64_t> geometry,
                         ffi::ThreadPool pool) {
  ConvDims d;
  if (ffi::Error error = MakeConvDims(x_grad->dimensions(), kernel.dimensions(),
                                      out_grad.dimensions(), geometry, &d);
      error.failure())
    return error;
  const int64_t K = d.patch_width(), O = d.features, P = d.out_pixels();
  const int64_t image_size = d.height * d.width * d.channels;
  float* dx = x_grad->typed_data();
  if (K == 0) {
    std::fill(dx, dx + x_grad->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  std::vector<float> live;
  ConstView W(LiveKernel(d, kernel.typed_data(), &live), K, O, Eigen::OuterStride<>(O));
  const ConvSplit split(d, pool);
  const PatchMap map(d, split.classes);
  auto scatter = [&](const float* patch_grads, int64_t image0, int64_t images) {
    std::fill(dx + image0 * image_size, dx + (image0 + images) * image_size, 0.0f);
    map.Scatter(patch_grads, image0, images, dx);
  };
  if (split.shared) {
    const int64_t rows = d.batch * P;
    RowMatrix buffer;
    if (!d.input_is_patches()) buffer.resize(rows, K);
    View dP(d.input_is_patches() ? dx : buffer.data(), rows, K, Eigen::OuterStride<>(K));
    ConstView G(out_grad.typed_data(), rows, O, Eigen::OuterStride<>(O));
    auto multiply = [&](int64_t block, int64_t) {
      int64_t start, width;
      ColumnBlock(K, split.blocks, block, &start, &width);
      if (width)
        dP.middleCols(start, width).noalias() = G * W.middleRows(start, width).transpose();
    };
    ForEachItem(pool, split.blocks, split.threads, multiply);
    if (d.input_is_patches()) return ffi::Error::Success();
    auto scatter_tile = [&](int64_t tile, int64_t) {
      const int64_t image0 = split.first(tile);
      scatter(buffer.data() + image0 * P * K, image0, split.count(tile, d.batch));
    };
    ForEachItem(pool, split.tiles, split.threads, scatter_tile);
    return ffi::Error::Success();
  }
  std::vector<RowMatrix> scratch(split.threads), reordered(split.threads);
  auto work = [&](int64_t tile, int64_t thread) {
    const int64_t image0 = split.first(tile), images = split.count(tile, d.batch);
    const int64_t rows = images * P;
    const float* g = out_grad.typed_data() + image0 * P * O;
    if (d.input_is_patches()) {
      View(dx + image0 * image_size, rows, K, Eigen::OuterStride<>(K)).noalias() =
          ConstView(g, rows, O, Eigen::OuterStride<>(O)) * W.transpose();
      return;
    }
    ConstView G(TileOutGrad(d, split.reordered(images), g, images, &reordered[thread]), rows,
                O, Eigen::OuterStride<>(O));
    RowMatrix& patch_grads = scratch[thread];
    patch_grads.resize(rows, K);
    for (const RowClass& c : split.classes) {  // Scatter reads each class's tap rows only.
      const ClassBlock b(d, c, images);
      if (b.width)
        patch_grads.block(b.row, b.column, b.rows, b.width).noalias() =
            G.middleRows(b.row, b.rows) * W.middleRows(b.column, b.width).transpose();
    }
    scatter(patch_grads.data(), image0, images);
  };
  ForEachItem(pool, split.tiles, split.threads, work);
  return ffi::Error::Success();
}

ffi::Error ConvKernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> out_grad,
                          ffi::ResultBuffer<ffi::F32> kernel_grad,
                          ffi::Span<const int64_t> geometry, ffi::ThreadPool pool) {
  ConvDims d;
  if (ffi::Error error = MakeConvDims(x.dimensions(), kernel_grad->dimensions(),
                                      out_grad.dimensions(), geometry, &d);
      error.failure())
    return error;
  const int64_t K = d.patch_width(), O = d.features, P = d.out_pixels();
  float* dk = kernel_grad->typed_data();
  const int64_t total = int64_t(kernel_grad->element_count());
  if (K == 0) {
    std::fill(dk, dk + total, 0.0f);
    return ffi::Error::Success();
  }
  if (NarrowInput(d)) {
    NarrowKernelGrad(d, x.typed_data(), out_grad.typed_data(), dk, pool);
    return ffi::Error::Success();
  }
  const ConvSplit split(d, pool);
  const PatchMap map(d, split.classes);
  if (split.shared) {
    // Work items: (row of live taps ky, column block), each writing its product straight
    // into the kernel gradient's rows for that ky, and zeroing its share of the dead taps'
    // rows (a 3x3 conv on 1x1 maps has 8 of 9: 8 MB at 512 channels, ~0.3-0.6 ms to write).
    const int64_t rows = d.batch * P, tap_rows = d.live_taps_w() * d.channels;
    const int64_t ky_count = d.ky1 - d.ky0, items = ky_count * split.blocks;
    std::vector<std::pair<int64_t, int64_t>> dead;  // [begin, end) in dk, between live rows.
    int64_t covered = 0;
    for (int64_t ky = d.ky0; ky < d.ky1; ++ky) {
      const int64_t at = (ky * d.kernel_w + d.kx0) * d.channels * O;
      if (at > covered) dead.push_back({covered, at});
      covered = at + tap_rows * O;
    }
    if (total > covered) dead.push_back({covered, total});
    RowMatrix buffer;
    ConstView X(AllPatches(d, split, map, x.typed_data(), pool, &buffer), rows, K,
                Eigen::OuterStride<>(K));
    ConstView G(out_grad.typed_data(), rows, O, Eigen::OuterStride<>(O));
    auto multiply = [&](int64_t item, int64_t) {
      const int64_t r = item / split.blocks;
      int64_t start, width;
      ColumnBlock(O, split.blocks, item % split.blocks, &start, &width);
      View dK(dk + ((d.ky0 + r) * d.kernel_w + d.kx0) * d.channels * O, tap_rows, O,
              Eigen::OuterStride<>(O));
      if (width)
        dK.middleCols(start, width).noalias() =
            X.middleCols(r * tap_rows, tap_rows).transpose() * G.middleCols(start, width);
      for (auto [begin, end] : dead) {
        const int64_t step = (end - begin + items - 1) / items;
        const int64_t from = std::min(end, begin + item * step);
        std::fill(dk + from, dk + std::min(end, from + step), 0.0f);
      }
    };
    ForEachItem(pool, items, split.threads, multiply);
    return ffi::Error::Success();
  }
  // The live taps' gradient [patch width, O]: summed in place where those rows of the
  // kernel are contiguous, else in `live` and copied back; dead taps' rows are zeroed.
  const int64_t live_at = LiveRowsAt(d);
  RowMatrix live;
  if (live_at < 0) live = RowMatrix::Zero(K, O);
  // Dead rows, and live ones that slot 0 adds into. Plain stores, which leave the lines
  // cached for those sums and for the optimizer that reads the gradient next (streaming
  // stores made 4x4x128 3x3/2's kernel gradient 15% slower: 275-283 vs 315-323 GFLOP/s).
  std::fill(dk, dk + total, 0.0f);
  View dK(live_at >= 0 ? dk + live_at : live.data(), K, O, Eigen::OuterStride<>(O));
  // Run 0 of tiles sums into dK itself, the others into their own matrices, added at the end.
  std::vector<RowMatrix> sums(split.threads - 1, RowMatrix::Zero(K, O));
  std::vector<RowMatrix> scratch(split.threads), reordered(split.threads);
  auto work = [&](int64_t tile, int64_t thread, int64_t run) {
    const int64_t image0 = split.first(tile), images = split.count(tile, d.batch);
    const int64_t rows = images * P;
    const float* g = out_grad.typed_data() + image0 * P * O;
    View sum = run ? View(sums[run - 1].data(), K, O, Eigen::OuterStride<>(O)) : dK;
    if (d.input_is_patches()) {
      sum.noalias() += ConstView(x.typed_data() + image0 * P * K, rows, K,
                                 Eigen::OuterStride<>(K)).transpose() *
                       ConstView(g, rows, O, Eigen::OuterStride<>(O));
      return;
    }
    ConstView G(TileOutGrad(d, split.reordered(images), g, images, &reordered[thread]), rows,
                O, Eigen::OuterStride<>(O));
    RowMatrix& patches = scratch[thread];
    patches.resize(rows, K);
    map.Gather(x.typed_data(), image0, images, patches.data());
    for (const RowClass& c : split.classes) {
      const ClassBlock b(d, c, images);
      if (b.width)
        sum.middleRows(b.column, b.width).noalias() +=
            patches.block(b.row, b.column, b.rows, b.width).transpose() *
            G.middleRows(b.row, b.rows);
    }
  };
  ForEachRun(pool, split.tiles, split.threads, work);
  for (const RowMatrix& sum : sums) dK += sum;
  if (live_at < 0) {  // Back into the full kernel's layout; dead taps keep zero gradient.
    const int64_t span = d.live_taps_w() * d.channels * O;
    for (int64_t ky = d.ky0; ky < d.ky1; ++ky)
      std::copy(live.data() + (ky - d.ky0) * span, live.data() + (ky - d.ky0 + 1) * span,
                dk + ((ky * d.kernel_w + d.kx0) * d.channels) * O);
  }
  return ffi::Error::Success();
}

// Every conv pass: two float32 operands, one result, the geometry, XLA's intra-op pool.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("geometry")
      .Ctx<ffi::ThreadPool>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnConvForward, ConvForward, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnConvInputGrad, ConvInputGrad, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnConvKernelGrad, ConvKernelGrad, ConvBinding());

// ---------------------------------------------------------------------------------------
// Weight gradient of a dense layer: out[d] = x_d^T g_d, summed over the N rows, for D
// directions side by side (x [N, D * I], g [N, D * O], out [D, I, O]; direction d's
// columns at d * I and d * O).
//
// Why: XLA:CPU sends a dot that contracts both operands' first dimension to Eigen (YNNPACK
// takes only row-major operands contracted on the left one's last dimension), and Eigen
// packs both operands on every call: the GPT steps' and the LSTM's weight gradients ran at
// ~85 GFLOP/s per core against YNNPACK's ~110 for the same FLOPs the other way round.
// Here neither operand is packed whole: a tile of R rows of out by one panel of 2 vectors of
// columns is accumulated from rows of x (R consecutive floats broadcast; below 16-float
// vectors from a copy of the chunk laid out tile by tile) and rows of g (2 vector loads), N
// rows at a time in chunks that keep the panel of g in L1 and the chunk of x in L2. Each
// thread owns whole panels of columns, so no two threads add into one float.

namespace {

// Bytes of x's rows per chunk, about a core's L2, where the chunk stays while every panel of
// the item reads it. Fewer, longer chunks load and store the accumulators less often: at
// [3200, 256] x [3200, 1024], 128 KB chunks ran at 195 GFLOP/s on 2 AVX-512 cores, 1 MB at
// 203 (32 KB: 150; XLA's dot 127-182).
constexpr int64_t kWeightGradChunkBytes = 1 << 20;
// Below 16-float vectors (AVX2), x's chunk is first copied tile by tile ([rows, R] for each
// tile of out's R rows), so that a tile's broadcasts read one contiguous stream. Read in
// place, each row of x is a cache line that a tile touches for R floats. On a Zen 3 core
// (512 KB of L2) the tiles waited on those lines, even in the 256-row slices that this copy
// replaces (slices kept a tile's block of g in L1; the copy is what frees room there).
// Issue 28's second layer, [1600, 256 | 256]^T x [1600, 1024] on one Zen 3 core, old and new
// builds alternating: 38-51 -> 52-65 GFLOP/s (medians of 9; the recurrence's matmul in the
// same runs, the reference, 57-80). The copy is at most about kWeightGradPackedBytes, and a chunk
// is cut to fit it. The 16-float build keeps x in place: on Zen 4 a copy of the whole chunk
// was slower (107 -> 93 GFLOP/s), and a tile there does twice the FMAs per byte of x.
constexpr bool kWeightGradPackX = KILN_VECTOR_LANES != 16;
constexpr int64_t kWeightGradPackedBytes = 1 << 20;
// Items per thread: a thread that starts late (XLA runs other work on the same pool) still
// finds some; each item reads x once more.
constexpr int64_t kWeightGradItemsPerThread = 2;

// c[R, kPanelCols] = (c if accumulate, else 0) + x[rows, R]^T g[rows, kPanelCols]; rows of
// x, g and c `ldx`, `ldg` and `ldc` apart.
template <int R>
void WeightGradTile(const float* x, int64_t ldx, const float* g, int64_t ldg, int64_t rows,
                    bool accumulate, float* c, int64_t ldc) {
  Lane acc[R][2];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    acc[i][0] = accumulate ? LoadLane(c + i * ldc) : ZeroLane();
    acc[i][1] = accumulate ? LoadLane(c + i * ldc + kLane) : ZeroLane();
  }
  for (int64_t n = 0; n < rows; ++n) {
    const Lane w0 = LoadLane(g + n * ldg), w1 = LoadLane(g + n * ldg + kLane);
    const float* xs = x + n * ldx;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const Lane value = Broadcast(xs[i]);
      acc[i][0] = MultiplyAdd(value, w0, acc[i][0]);
      acc[i][1] = MultiplyAdd(value, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    StoreLane(c + i * ldc, acc[i][0]);
    StoreLane(c + i * ldc + kLane, acc[i][1]);
  }
}

// WeightGradTile for a tile of `count` <= R rows of out (EvenTiles makes the shorter ones).
template <int R>
void WeightGradTileUpTo(int count, const float* x, int64_t ldx, const float* g, int64_t ldg,
                        int64_t rows, bool accumulate, float* c, int64_t ldc) {
  if (count == R) {
    WeightGradTile<R>(x, ldx, g, ldg, rows, accumulate, c, ldc);
  } else if constexpr (R > 1) {
    WeightGradTileUpTo<R - 1>(count, x, ldx, g, ldg, rows, accumulate, c, ldc);
  }
}

// to[0, count) = from[0, count), count <= R: fixed-length copies the compiler turns into
// moves (std::copy of a tile's few floats was a memmove call, 137,000 per LSTM backward).
template <int R>
inline void CopyFew(int count, const float* from, float* to) {
  if (count == R) {
    for (int k = 0; k < R; ++k) to[k] = from[k];
  } else if constexpr (R > 1) {
    CopyFew<R - 1>(count, from, to);
  }
}

// One x operand of a weight gradient and where its rows of out go: out[width, O] (rows
// `ldo` apart) = x[N, width]^T g[N, O] (rows of x `ldx` apart), for out's row tiles
// [tile_first, tile_last) of EvenTiles(width, kPanelTileRows) (-1: to the last).
struct WeightGradPart {
  const float* x;
  int64_t ldx, width;
  float* out;
  int64_t ldo;
  int64_t tile_first = 0, tile_last = -1;
};

// How WeightGradPanels reads the parts' x: the rows of out each part's tiles cover, and the
// chunks of x's rows, with kWeightGradPackX copied tile by tile (chunks cut to fit
// kWeightGradPackedBytes). A chunk starting at row r of x sits at r * packed_width in a copy
// of all of x, since each chunk's copy is its rows times packed_width floats.
struct WeightGradLayout {
  struct Rows {  // A part's rows of out [row_first, row_last), its tiles [tile_first, tile_last).
    EvenTiles tiles;
    int64_t tile_first, tile_last, row_first, row_last;
  };
  std::vector<Rows> spans;
  int64_t packed_width = 0;  // Columns of x the parts' tiles read.
  int64_t chunk;

  WeightGradLayout(const WeightGradPart* parts, int64_t part_count, int64_t most_rows)
      : chunk(most_rows) {
    for (int64_t part = 0; part < part_count; ++part) {
      const WeightGradPart& w = parts[part];
      const EvenTiles tiles(w.width, kPanelTileRows);
      const int64_t last = w.tile_last < 0 ? tiles.count : w.tile_last;
      // first(count) is width.
      spans.push_back({tiles, w.tile_first, last, tiles.first(w.tile_first), tiles.first(last)});
      packed_width += spans.back().row_last - spans.back().row_first;
    }
    if (kWeightGradPackX)
      chunk = std::min(chunk, std::max<int64_t>(
                                  kPanelTileRows, kWeightGradPackedBytes / (4 * packed_width)));
  }

  // Rows [row, row + rows) of the parts' x into `to`, tile after tile, each [rows, R]; x is
  // read row by row.
  void Pack(const WeightGradPart* parts, int64_t row, int64_t rows, float* to) const {
    for (int64_t n = 0; n < rows; ++n) {
      float* tile_start = to;
      for (size_t part = 0; part < spans.size(); ++part) {
        const Rows& span = spans[part];
        const float* source = parts[part].x + (row + n) * parts[part].ldx;
        for (int64_t tile = span.tile_first; tile < span.tile_last; ++tile) {
          const int64_t i = span.tiles.first(tile), r = span.tiles.rows(tile);
          CopyFew<kPanelTileRows>(r, source + i, tile_start + n * r);
          tile_start += rows * r;
        }
      }
    }
  }

  // All N rows, chunk after chunk, into `to` [N, packed_width].
  void PackAll(const WeightGradPart* parts, int64_t N, float* to) const {
    for (int64_t row = 0; row < N; row += chunk)
      Pack(parts, row, std::min(chunk, N - row), to + row * packed_width);
  }
};

// Every part's out = x^T g over g's N rows (`ldg` floats apart), in g's column panels
// [panel_first, panel_last) of O columns, on the calling thread. Chunks of at most
// `most_rows` rows outermost, so x's chunk is read from memory once (with kWeightGradPackX,
// into a copy tile by tile, unless `packed_x` is one of all of x, from
// WeightGradLayout::PackAll with the same parts and most_rows); each panel's rows of g are
// copied into one contiguous zero-padded block (rows of g are often kilobytes apart:
// strides that the prefetchers follow badly) that every part's tiles then read, and a panel
// narrower than kPanelCols accumulates into a padded copy of its columns of out. A panel's
// sums run in the same order whatever the panel range, so its floats do not depend on how
// the panels are shared out.
void WeightGradPanels(const WeightGradPart* parts, int64_t part_count, const float* g,
                      int64_t ldg, int64_t N, int64_t O, int64_t panel_first,
                      int64_t panel_last, int64_t most_rows, const float* packed_x = nullptr) {
  const WeightGradLayout layout(parts, part_count, most_rows);
  const int64_t chunk = layout.chunk;
  // Uninitialised: only a narrow panel's padding columns are read before written.
  std::unique_ptr<float[]> block(new float[std::min(chunk, N) * kPanelCols]);
  std::unique_ptr<float[]> packed(kWeightGradPackX && !packed_x
                                      ? new float[std::min(chunk, N) * layout.packed_width]
                                      : nullptr);
  std::vector<float> edge;
  for (int64_t row = 0; row < N; row += chunk) {
    const int64_t rows = std::min(chunk, N - row);
    if (kWeightGradPackX && !packed_x) layout.Pack(parts, row, rows, packed.get());
    for (int64_t p = panel_first; p < panel_last; ++p) {
      const int64_t col = p * kPanelCols, cols = std::min(kPanelCols, O - col);
      const float* source = g + row * ldg + col;
      if (cols == kPanelCols) {  // In registers: a memmove call per 64-byte row (AVX2) cost
        for (int64_t n = 0; n < rows; ++n) {  // ~6% of the kernel's time.
          StoreLane(block.get() + n * kPanelCols, LoadLane(source + n * ldg));
          StoreLane(block.get() + n * kPanelCols + kLane, LoadLane(source + n * ldg + kLane));
        }
      } else {
        for (int64_t n = 0; n < rows; ++n) {
          std::copy(source + n * ldg, source + n * ldg + cols, block.get() + n * kPanelCols);
          std::fill(block.get() + n * kPanelCols + cols, block.get() + (n + 1) * kPanelCols,
                    0.0f);
        }
      }
      // The packed tiles' rows, when packed.
      const float* tile_x = packed_x ? packed_x + row * layout.packed_width : packed.get();
      for (int64_t part = 0; part < part_count; ++part) {
        const WeightGradPart& w = parts[part];
        const WeightGradLayout::Rows& span = layout.spans[part];
        const EvenTiles& tiles = span.tiles;
        float* c = w.out + col;
        int64_t ldc = w.ldo;
        if (cols < kPanelCols) {
          edge.assign(w.width * kPanelCols, 0.0f);
          if (row > 0)
            for (int64_t i = span.row_first; i < span.row_last; ++i)
              std::copy(c + i * w.ldo, c + i * w.ldo + cols, edge.data() + i * kPanelCols);
          c = edge.data();
          ldc = kPanelCols;
        }
        for (int64_t tile = span.tile_first; tile < span.tile_last; ++tile) {
          const int64_t i = tiles.first(tile), r = tiles.rows(tile);
          if (kWeightGradPackX) {
            WeightGradTileUpTo<kPanelTileRows>(r, tile_x, r, block.get(), kPanelCols, rows,
                                               row > 0, c + i * ldc, ldc);
            tile_x += rows * r;
          } else {
            WeightGradTileUpTo<kPanelTileRows>(r, w.x + row * w.ldx + i, w.ldx, block.get(),
                                               kPanelCols, rows, row > 0, c + i * ldc, ldc);
          }
        }
        if (cols < kPanelCols)
          for (int64_t i = span.row_first; i < span.row_last; ++i)
            std::copy(edge.data() + i * kPanelCols, edge.data() + i * kPanelCols + cols,
                      w.out + col + i * w.ldo);
      }
    }
  }
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), gd = g.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || gd.size() != 2 || od.size() != 3 || xd[0] != gd[0] ||
      xd[1] != od[0] * od[1] || gd[1] != od[0] * od[2])
    return ffi::Error::InvalidArgument("weight_grad needs x [N, D*I], g [N, D*O], out [D, I, O]");
  const int64_t N = xd[0], D = od[0], I = od[1], O = od[2];
  const int64_t ldx = D * I, ldg = D * O;
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  float* result = out->typed_data();
  const int64_t panels = (O + kPanelCols - 1) / kPanelCols, total = D * panels;
  if (N == 0 || I == 0 || O == 0) {
    std::fill(result, result + D * I * O, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t chunk = std::clamp<int64_t>(kWeightGradChunkBytes / (4 * I), 32, 4096);
  const EvenTiles out_tiles(I, kPanelTileRows);
  const int64_t threads = kWeightGradItemsPerThread * pool.num_threads();
  // Items split whichever of x and dy is wider, so that one is read once per chunk: item k
  // takes panels [k * total / items, (k + 1) * total / items) of all directions and every
  // row of out, or (x wider, by_rows) every panel of one direction and a share of its tiles
  // of out rows. Split by panels, the baby GPT's [512, 1536]^T x [512, 384] had 4 items
  // each read all of x (3 MB), the step 2-4% slower (benchmarks/README.md).
  const bool by_rows = I > O && out_tiles.count > 1;
  const int64_t shares = by_rows ? std::min(out_tiles.count, (threads + D - 1) / D) : 1;
  const int64_t items = by_rows ? D * shares : std::min(total, threads);
  auto work = [&](int64_t item, int64_t) {
    int64_t first = item * total / items, last = (item + 1) * total / items;
    int64_t tile_first = 0, tile_last = out_tiles.count;
    if (by_rows) {
      const int64_t share = item % shares;
      first = item / shares * panels;
      last = first + panels;
      tile_first = share * out_tiles.count / shares;
      tile_last = (share + 1) * out_tiles.count / shares;
    }
    // Direction by direction, each its own columns of x, g and out.
    for (int64_t d = first / panels; d * panels < last; ++d) {
      const WeightGradPart part{xs + d * I, ldx, I, result + d * I * O, O, tile_first,
                                tile_last};
      WeightGradPanels(&part, 1, gs + d * O, ldg, N, O, std::max(first - d * panels, int64_t(0)),
                       std::min(last - d * panels, panels), chunk);
    }
  };
  ForEachItem(pool, items, Participants(pool, items), work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

// ---------------------------------------------------------------------------------------
// LSTM recurrence (models/recurrent.py's cell: gates ordered input, forget, cell, output),
// forward and backward, for one or more directions of one layer at once.
//
// Why: XLA:CPU runs a recurrence as a while loop of a dozen small kernels and buffer copies
// per step, forward and backward. Batch rows are independent in the recurrence, so each
// thread takes a (direction, block of batch rows) and runs all its steps alone: no
// synchronisation between steps, the block's state stays in its cache, and the gates of a
// step are computed while they are still there. The forward pass's step is one matmul,
// [x_t | h] x [input kernel; hidden kernel], on kernels packed once per call into column
// panels that a register-tiled matmul streams every step (Eigen's GEMM packs both operands
// again on every call: a third of its time at these shapes). The input projection used to
// be one big matmul before the call, its [B * T, D * 4H] result read back here: in the step
// issue 28 times, a 3-6 ms YNNPACK dot for the first layer's 80 features (K = 80 runs
// slowly) and 13 MB written and read again per layer; folded in, the step ran 90.3 instead
// of 92.7 ms, old and new interleaved in one process (benchmarks/README.md).
//
// Layout: the inputs x are [B * T, F], frame t of utterance b in row b * T + t; the input
// kernel [F, D * 4H] has direction d's columns at d * 4H, the hidden kernels are [D, H, 4H],
// the bias [D * 4H] (added here, and its gradient summed by the backward pass: as XLA's add
// and reduction, each read the whole gates once more), the mask [B, T]. Outputs and the
// state residuals are [B, T, D * H] (direction d at d * H), so a bidirectional layer's
// output is its two directions side by side with no transposes or flips. Direction d runs
// from the last frame when bit d of `reverse` is set. A masked (padded) step leaves the state
// as it was and outputs 0. The forward pass for training keeps, per step, the gate
// activations ([B * T, D * 4H]), the state before the step (h and c) and tanh of the new
// cell; the backward pass returns the gradient of the pre-activation gates, of the bias and
// of the kernels (sum_t x_t^T dgates_t and h_{t-1}^T dgates_t). x's (dgates W_x^T) is a big
// matmul left to kernels.py, so that XLA drops it where nothing uses it (a first layer's).

namespace {

// A [K, N] matrix in panels of kPanelCols columns, each panel [K, kPanelCols] contiguous
// and zero-padded past N, so a tile's loop over K reads one stream of whole registers.
struct PanelMatrix {
  int64_t K = 0, N = 0;
  std::vector<float> data;
  // From row-major `source`: the matrix itself ([K, N], row stride N), or its transpose
  // (`source` [N, K], row stride K). The pool's threads take a panel each, reading a
  // transposed source one row (a column of the panel) at a time: packed on the calling thread
  // column by column, the LSTM's [1024, 256] kernel took ~4% of each call (strided reads a
  // page apart, with the other core idle).
  void Pack(const float* source, int64_t rows, int64_t cols, bool transpose,
            ffi::ThreadPool& pool) {
    if (!transpose) return PackStacked({{source, rows, cols}}, cols, pool);
    const int64_t panels = Resize(rows, cols);
    auto pack = [&](int64_t p, int64_t) {
      float* panel = data.data() + p * K * kPanelCols;
      const int64_t first = p * kPanelCols, width = std::min(kPanelCols, N - first);
      for (int64_t j = 0; j < width; ++j) {
        const float* column = source + (first + j) * K;
        for (int64_t k = 0; k < K; ++k) panel[k * kPanelCols + j] = column[k];
      }
      if (width < kPanelCols)
        for (int64_t k = 0; k < K; ++k)
          std::fill(panel + k * kPanelCols + width, panel + (k + 1) * kPanelCols, 0.0f);
    };
    ForEachItem(pool, panels, Participants(pool, panels), pack);
  }
  // Blocks of rows [rows, N] from row-major memory (`ld` floats per row), stacked in order.
  struct Rows {
    const float* source;
    int64_t rows, ld;
  };
  void PackStacked(const std::vector<Rows>& parts, int64_t cols, ffi::ThreadPool& pool) {
    int64_t rows = 0;
    for (const Rows& part : parts) rows += part.rows;
    const int64_t panels = Resize(rows, cols);
    auto pack = [&](int64_t p, int64_t) {
      float* row = data.data() + p * K * kPanelCols;
      const int64_t first = p * kPanelCols, width = std::min(kPanelCols, N - first);
      for (const Rows& part : parts)
        for (int64_t k = 0; k < part.rows; ++k, row += kPanelCols) {
          const float* source = part.source + k * part.ld + first;
          std::copy(source, source + width, row);
          std::fill(row + width, row + kPanelCols, 0.0f);
        }
    };
    ForEachItem(pool, panels, Participants(pool, panels), pack);
  }
  const float* panel(int64_t p) const { return data.data() + p * K * kPanelCols; }

 private:
  // Room for a [rows, cols] matrix's panels; how many panels that is.
  int64_t Resize(int64_t rows, int64_t cols) {
    K = rows;
    N = cols;
    const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
    data.resize(panels * K * kPanelCols);
    return panels;
  }
};

// c[R, kPanelCols] = (bias or 0) + a[R, K] x panel[K, kPanelCols], rows of a and c `lda`
// and `ldc` apart, the one row of bias added to each. Loops over rows are unrolled, so the
// accumulators live in registers (GCC otherwise kept the array on the stack: 45 instead of
// 150+ GFLOP/s).
template <int R>
void PanelTile(const float* a, int64_t lda, const float* panel, int64_t K, const float* bias,
               float* c, int64_t ldc) {
  const Lane bias0 = bias ? LoadLane(bias) : ZeroLane();
  const Lane bias1 = bias ? LoadLane(bias + kLane) : ZeroLane();
  Lane acc[R][2];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    acc[i][0] = bias0;
    acc[i][1] = bias1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const Lane w0 = LoadLane(panel + k * kPanelCols);
    const Lane w1 = LoadLane(panel + k * kPanelCols + kLane);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const Lane x = Broadcast(a[i * lda + k]);
      acc[i][0] = MultiplyAdd(x, w0, acc[i][0]);
      acc[i][1] = MultiplyAdd(x, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    StoreLane(c + i * ldc, acc[i][0]);
    StoreLane(c + i * ldc + kLane, acc[i][1]);
  }
}

// PanelTile for a tile of `rows` <= R rows (EvenTiles makes the shorter ones).
template <int R>
void PanelTileUpTo(int rows, const float* a, int64_t lda, const float* panel, int64_t K,
                   const float* bias, float* c, int64_t ldc) {
  if (rows == R) {
    PanelTile<R>(a, lda, panel, K, bias, c, ldc);
  } else if constexpr (R > 1) {
    PanelTileUpTo<R - 1>(rows, a, lda, panel, K, bias, c, ldc);
  }
}

// c[n, N] = (bias or 0) + a[n, depth] x b's first `depth` (<= K) rows, with b packed and the
// one row of bias [N] added to each; panel by panel, so each panel is read from memory once
// and reused from the cache by every tile of rows. A last panel narrower than kPanelCols
// goes through a zero-padded copy of its columns.
void PanelMatmul(const float* a, int64_t lda, int64_t n, const PanelMatrix& b,
                 const float* bias, float* c, int64_t ldc, int64_t depth) {
  alignas(64) float edge_out[kPanelTileRows * kPanelCols];
  alignas(64) float edge_bias[kPanelCols] = {};
  const EvenTiles tiles(n, kPanelTileRows);
  for (int64_t col = 0, p = 0; col < b.N; col += kPanelCols, ++p) {
    const int64_t cols = std::min(kPanelCols, b.N - col);
    const float* panel_bias = bias ? bias + col : nullptr;
    for (int64_t tile = 0; tile < tiles.count; ++tile) {
      const int64_t row = tiles.first(tile);
      const int rows = tiles.rows(tile);
      if (cols == kPanelCols) {
        PanelTileUpTo<kPanelTileRows>(rows, a + row * lda, lda, b.panel(p), depth, panel_bias,
                                      c + row * ldc + col, ldc);
        continue;
      }
      if (panel_bias) std::copy(panel_bias, panel_bias + cols, edge_bias);
      PanelTileUpTo<kPanelTileRows>(rows, a + row * lda, lda, b.panel(p), depth,
                                    panel_bias ? edge_bias : nullptr, edge_out, kPanelCols);
      for (int i = 0; i < rows; ++i)
        std::copy(edge_out + i * kPanelCols, edge_out + i * kPanelCols + cols,
                  c + (row + i) * ldc + col);
    }
  }
}

struct LstmDims {
  int64_t batch, length, directions, hidden, features;
  int64_t gate_stride() const { return directions * 4 * hidden; }
  int64_t state_stride() const { return directions * hidden; }
};

// The dimensions of a call whose gates (or their gradients) are [rows, gate_width] and
// whose inputs have `features` columns.
ffi::Error MakeLstmDims(int64_t rows, int64_t gate_width, int64_t features,
                        const ffi::AnyBuffer::Dimensions& mask,
                        const ffi::AnyBuffer::Dimensions& kernels, LstmDims* d) {
  if (mask.size() != 2 || kernels.size() != 3)
    return ffi::Error::InvalidArgument("lstm takes a [B, T] mask and [D, H, 4H] kernels");
  *d = LstmDims{mask[0], mask[1], kernels[0], kernels[1], features};
  if (kernels[2] != 4 * d->hidden || gate_width != d->gate_stride() || rows != mask[0] * mask[1])
    return ffi::Error::InvalidArgument("lstm: input, mask and kernel shapes disagree");
  return ffi::Error::Success();
}

// Fewest batch rows a thread's block takes: a block of fewer rows streams the whole
// hidden kernel every step for too little arithmetic, so one thread doing more rows beats
// two doing few.
constexpr int64_t kLstmMinRows = 8;

// Most rows per chunk of the backward pass's kernel gradients (WeightGradPanels): a chunk's
// block of dgates is 128 (AVX-512) or 64 bytes a row. In one chunk, each tile's accumulators
// stay in registers over all the rows (issue 28's second layer on one Zen 4 core: 1 MB
// chunks of x, 512 rows, 101-105 GFLOP/s; one chunk of its 1,600 rows, 106-108). Below
// 16-float vectors WeightGradLayout cuts the chunk to fit its tile-by-tile copy of x (512
// rows).
constexpr int64_t kLstmWeightGradRows = 4096;
// Column panels per task of the backward pass's kernel gradients, which threads share out:
// issue 28's layers have 64 (AVX2) or 32 panels, a task ~1 ms on a Zen 3 core.
constexpr int64_t kLstmPanelsPerTask = 2;

// Work items: (direction, block of batch rows), direction-major.
struct LstmSplit {
  int64_t threads, blocks, rows;
  LstmSplit(const LstmDims& d, ffi::ThreadPool& pool) {
    const int64_t pool_threads = std::max<int64_t>(1, pool.num_threads());
    const int64_t wanted = (pool_threads + d.directions - 1) / d.directions;
    blocks = std::max<int64_t>(1, std::min(wanted, d.batch / kLstmMinRows));
    rows = (d.batch + blocks - 1) / blocks;
    blocks = (d.batch + rows - 1) / rows;
    threads = Participants(pool, d.directions * blocks);
  }
  int64_t items(const LstmDims& d) const { return d.directions * blocks; }
};

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;

// Residuals are null for inference (the forward pass without a backward pass).
struct LstmResiduals {
  float *activations, *h_before, *c_before, *tanh_cell;
};

// The gates' activations on a vector of floats: Eigen's own packet functions (those its
// array expressions ran), so one pass over a row can apply them chunk by chunk.
#if KILN_VECTOR_LANES
inline Lane Logistic(Lane x) { return Eigen::internal::scalar_logistic_op<float>().packetOp(x); }
inline Lane Tanh(Lane x) { return Eigen::internal::ptanh(x); }
// A residual, read only by the backward pass: where `p` starts a whole aligned vector it
// bypasses the cache, so its line is not first read from memory (StreamFence after).
inline void StoreResidual(float* p, bool partial, TailMask m, Lane v) {
  if (!partial && reinterpret_cast<uintptr_t>(p) % (kLane * sizeof(float)) == 0)
    StreamLane(p, v);
  else
    Store(p, partial, m, v);
}
#else
inline Lane Logistic(Lane x) {
  for (float& v : x.v) v = 1.0f / (1.0f + std::exp(-v));
  return x;
}
inline Lane Tanh(Lane x) {
  for (float& v : x.v) v = std::tanh(v);
  return x;
}
inline void StoreResidual(float* p, bool partial, TailMask m, Lane v) { Store(p, partial, m, v); }
#endif

// `count` floats from `source` (in cache) to a residual at `target`, whole lines of it one
// after the other: a line written in pieces across a loop over several streams may leave
// the write-combining buffers half-full (8-float vectors write half a line at a time).
inline void StreamResidual(float* target, const float* source, int64_t count) {
  const TailMask m = Tail(count % kLane);  // Read only by the last, partial vector.
  for (int64_t j = 0; j < count; j += kLane) {
    const bool partial = j + kLane > count;
    StoreResidual(target + j, partial, m, Load(source + j, partial, m));
  }
}

// Where a training step keeps one row's state residuals (all null for inference).
struct LstmRowResiduals {
  float *activations = nullptr, *h_before = nullptr, *c_before = nullptr, *tanh_cell = nullptr;
};

// One row's step after its matmul, in one pass over the hidden units: the pre-activations
// `act` [4H] become activations (in place, then copied to the residual when training), the
// state (h, c) advances unless the frame is padding, and `h_out` gets h' or 0. As ten Eigen
// expressions, each a pass over the row, the gate arithmetic of issue 28's layer took 0.65
// ms more of the training forward kernel's ~11 (AVX2 build 0.17) and 0.44 more of the
// backward's (0.26).
void LstmCellForward(float* act, float* h, float* c, float* h_out, bool valid,
                     const LstmRowResiduals& keep, int64_t H) {
  const bool train = keep.h_before != nullptr;
  const TailMask m = Tail(H % kLane);  // Read only by the last, partial vector.
  for (int64_t j = 0; j < H; j += kLane) {
    const bool partial = j + kLane > H;
    const Lane i = Logistic(Load(act + j, partial, m));
    const Lane f = Logistic(Load(act + H + j, partial, m));
    const Lane g = Tanh(Load(act + 2 * H + j, partial, m));
    const Lane o = Logistic(Load(act + 3 * H + j, partial, m));
    const Lane h_old = Load(h + j, partial, m), c_old = Load(c + j, partial, m);
    const Lane cell = MultiplyAdd(f, c_old, MultiplyLanes(i, g));
    const Lane tanh_cell = Tanh(cell);
    const Lane h_new = MultiplyLanes(o, tanh_cell);
    if (train) {
      Store(act + j, partial, m, i);
      Store(act + H + j, partial, m, f);
      Store(act + 2 * H + j, partial, m, g);
      Store(act + 3 * H + j, partial, m, o);
      StoreResidual(keep.h_before + j, partial, m, h_old);
      StoreResidual(keep.c_before + j, partial, m, c_old);
      StoreResidual(keep.tanh_cell + j, partial, m, tanh_cell);
    }
    Store(h_out + j, partial, m, valid ? h_new : ZeroLane());
    if (valid) {
      Store(h + j, partial, m, h_new);
      Store(c + j, partial, m, cell);
    }
  }
  if (train) StreamResidual(keep.activations, act, 4 * H);
}

// Where the backward pass reads (and writes) one row at one frame: its gate gradients (the
// activations, read first) [4H] and its residuals and d out [H] each.
struct LstmBackwardRow {
  float* gates;
  const float *tanh_cell, *c_before, *out_grad;
};

// Asks for a row's lines of LstmBackwardRow from `j` on, one cache line of each [H] vector
// and of each quarter of the gates: a frame's rows are T frames apart in memory, more
// streams than the hardware prefetchers follow. Spread over the gate pass of the frame
// before them, not asked for all at once: a step waited on ~1800 prefetches queued together
// (the backward kernel 3-4% slower at issue 28's shape).
inline void PrefetchBackwardRow(const LstmBackwardRow& row, int64_t j, int64_t H) {
  for (int q = 0; q < 4; ++q) __builtin_prefetch(row.gates + q * H + j, 1, 2);
  for (const float* residual : {row.tanh_cell, row.c_before, row.out_grad})
    __builtin_prefetch(residual + j, 0, 2);
}

// One valid row's gate gradients `dpre` [4H] (may be `act` itself: each chunk is read before
// it is written) from its activations, residuals and d out; carries d c in place, adds d h's
// share from the frame after (`dh`, read), and adds the gate gradients to `bias_sum`. Asks
// for the row's data at the frame processed next, `next`, if any.
void LstmCellBackward(float* dpre, const float* act, const float* tanh_cell, const float* c_before,
                      const float* out_grad, const float* dh, float* dc, float* bias_sum,
                      int64_t H, const LstmBackwardRow* next) {
  const Lane one = Broadcast(1.0f);
  const TailMask m = Tail(H % kLane);  // Read only by the last, partial vector.
  for (int64_t j = 0; j < H; j += kLane) {
    const bool partial = j + kLane > H;
    if (next && j % kLineFloats == 0) PrefetchBackwardRow(*next, j, H);
    const Lane i = Load(act + j, partial, m), f = Load(act + H + j, partial, m);
    const Lane g = Load(act + 2 * H + j, partial, m), o = Load(act + 3 * H + j, partial, m);
    const Lane tc = Load(tanh_cell + j, partial, m);
    const Lane dh_new = AddLanes(Load(dh + j, partial, m), Load(out_grad + j, partial, m));
    const Lane dc_total = MultiplyAdd(MultiplyLanes(dh_new, o),
                                      SubtractLanes(one, MultiplyLanes(tc, tc)),
                                      Load(dc + j, partial, m));
    Store(dc + j, partial, m, MultiplyLanes(dc_total, f));
    const Lane gates[4] = {
        MultiplyLanes(MultiplyLanes(dc_total, g), MultiplyLanes(i, SubtractLanes(one, i))),
        MultiplyLanes(MultiplyLanes(dc_total, Load(c_before + j, partial, m)),
                      MultiplyLanes(f, SubtractLanes(one, f))),
        MultiplyLanes(MultiplyLanes(dc_total, i), SubtractLanes(one, MultiplyLanes(g, g))),
        MultiplyLanes(MultiplyLanes(dh_new, tc), MultiplyLanes(o, SubtractLanes(one, o)))};
    for (int q = 0; q < 4; ++q) {
      Store(dpre + q * H + j, partial, m, gates[q]);
      float* sum = bias_sum + q * H + j;
      Store(sum, partial, m, AddLanes(Load(sum, partial, m), gates[q]));
    }
  }
}

// Asks for `floats` of each of `rows` rows `ld` apart (the block's rows at the next
// frame) while this step computes: they are T frames apart in memory, more streams than
// the hardware prefetchers follow, and without this every step waited on them (a
// replica of the forward loop: 11.0 -> 10.3 ms per thread at issue 28's shape). `write`:
// the step will store there.
void PrefetchRows(const float* first, int64_t rows, int64_t ld, int64_t floats, bool write) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < floats; j += kLineFloats) {
      if (write)
        __builtin_prefetch(first + r * ld + j, 1, 2);
      else
        __builtin_prefetch(first + r * ld + j, 0, 2);
    }
}

ffi::Error LstmRun(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& input_kernel,
                   ffi::Buffer<ffi::PRED>& mask, ffi::Buffer<ffi::F32>& kernels,
                   ffi::Buffer<ffi::F32>& bias, float* out, const LstmResiduals& keep,
                   int32_t reverse, ffi::ThreadPool& pool) {
  const auto xd = x.dimensions(), wd = input_kernel.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[0] != xd[1])
    return ffi::Error::InvalidArgument("lstm takes inputs [B * T, F] and an input kernel "
                                       "[F, D*4H]");
  LstmDims d;
  if (ffi::Error error = MakeLstmDims(xd[0], wd[1], xd[1], mask.dimensions(),
                                      kernels.dimensions(), &d);
      error.failure())
    return error;
  if (bias.element_count() != d.gate_stride())
    return ffi::Error::InvalidArgument("lstm: bias must be [D * 4H]");
  const int64_t T = d.length, H = d.hidden, gs = d.gate_stride(), ss = d.state_stride();
  const int64_t F = d.features, width = F + H;  // A step's operand: [x_t | h].
  const LstmSplit split(d, pool);
  std::vector<PanelMatrix> packed(d.directions);  // [input kernel; hidden kernel] [F + H, 4H].
  for (int64_t dir = 0; dir < d.directions; ++dir)
    packed[dir].PackStacked({{input_kernel.typed_data() + dir * 4 * H, F, gs},
                             {kernels.typed_data() + dir * H * 4 * H, H, 4 * H}},
                            4 * H, pool);
  struct Scratch {
    RowMatrix a, c, pre;
  };
  std::vector<Scratch> scratch(split.threads);
  const float* xs = x.typed_data();
  const bool* valid = mask.typed_data();
  const bool train = keep.activations != nullptr;
  auto work = [&](int64_t item, int64_t slot) {
    const int64_t dir = item / split.blocks, b0 = (item % split.blocks) * split.rows;
    const int64_t n = std::min(split.rows, d.batch - b0);
    if (n <= 0) return;
    const bool backwards = (reverse >> dir) & 1;
    Scratch& s = scratch[slot];
    s.a.setZero(n, width);  // Row r: the frame's inputs, then the row's hidden state h.
    s.c.setZero(n, H);
    s.pre.resize(n, 4 * H);
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = backwards ? T - 1 - step : step;
      for (int64_t r = 0; r < n; ++r) {
        const float* frame = xs + ((b0 + r) * T + t) * F;
        std::copy(frame, frame + F, s.a.data() + r * width);
      }
      if (step + 1 < T) {
        const int64_t next = backwards ? t - 1 : t + 1;
        PrefetchRows(xs + (b0 * T + next) * F, n, T * F, F, false);
        PrefetchRows(out + (b0 * T + next) * ss + dir * H, n, T * ss, H, true);
      }
      // Pre-activations of the block's rows at frame t: bias + [x_t | h] [W_x; W_h], the
      // first step's h (zeros) left out. Into scratch, whence the activation residuals are
      // streamed: written in place (rows T * gs apart), each of their lines was first read
      // from memory, and the prefetches that hid it took ~2% of the kernel.
      PanelMatmul(s.a.data(), width, n, packed[dir], bias.typed_data() + dir * 4 * H,
                  s.pre.data(), 4 * H, step == 0 ? F : width);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = (b0 + r) * T + t, at_state = row * ss + dir * H;
        LstmRowResiduals residuals;
        if (train)
          residuals = {keep.activations + row * gs + dir * 4 * H, keep.h_before + at_state,
                       keep.c_before + at_state, keep.tanh_cell + at_state};
        LstmCellForward(s.pre.data() + r * 4 * H, s.a.data() + r * width + F,
                        s.c.data() + r * H, out + at_state, valid[row], residuals, H);
      }
    }
    StreamFence();  // Before ForEachItem counts the item done.
  };
  ForEachItem(pool, split.items(d), split.threads, work);
  return ffi::Error::Success();
}

ffi::Error LstmInference(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> input_kernel,
                         ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> kernels,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                         int32_t reverse, ffi::ThreadPool pool) {
  return LstmRun(x, input_kernel, mask, kernels, bias, out->typed_data(),
                 {nullptr, nullptr, nullptr, nullptr}, reverse, pool);
}

ffi::Error LstmForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> input_kernel,
                       ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> kernels,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> activations,
                       ffi::ResultBuffer<ffi::F32> h_before, ffi::ResultBuffer<ffi::F32> c_before,
                       ffi::ResultBuffer<ffi::F32> tanh_cell, int32_t reverse,
                       ffi::ThreadPool pool) {
  return LstmRun(x, input_kernel, mask, kernels, bias, out->typed_data(),
                 {activations->typed_data(), h_before->typed_data(), c_before->typed_data(),
                  tanh_cell->typed_data()},
                 reverse, pool);
}

// d loss / d gates from d loss / d out and the forward pass's residuals; steps run in the
// opposite order to the forward pass's, carrying d h and d c of the state. Then the
// kernels' gradients, sum over frames of x_t^T dgates_t (input kernel, [F, D * 4H]) and of
// h_{t-1}^T dgates_t (hidden kernels, [D, H, 4H]): each item's rows' share, once their gate
// gradients are done, as one weight gradient over [x | h_{t-1}] whose every panel of dgates
// is copied once for both, its panels shared out between the threads. Left to XLA, these
// were three big matmuls per layer run two at a time, one thread each, at 76-100 GFLOP/s
// per core (issue 28's step).
ffi::Error LstmBackward(ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> kernels,
                        ffi::Buffer<ffi::F32> activations,
                        ffi::Buffer<ffi::F32> c_before, ffi::Buffer<ffi::F32> tanh_cell,
                        ffi::Buffer<ffi::F32> out_grad, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> h_before, ffi::ResultBuffer<ffi::F32> gates_grad,
                        ffi::ResultBuffer<ffi::F32> bias_grad,
                        ffi::ResultBuffer<ffi::F32> input_kernel_grad,
                        ffi::ResultBuffer<ffi::F32> kernels_grad, int32_t reverse,
                        ffi::ThreadPool pool) {
  LstmDims d;
  const auto ad = activations.dimensions(), xd = x.dimensions();
  if (ad.size() != 2 || xd.size() != 2 || xd[0] != ad[0])
    return ffi::Error::InvalidArgument("lstm: the activations must be [B * T, D*4H] and the "
                                       "inputs [B * T, F]");
  if (ffi::Error error = MakeLstmDims(ad[0], ad[1], xd[1], mask.dimensions(),
                                      kernels.dimensions(), &d);
      error.failure())
    return error;
  if (bias_grad->element_count() != d.gate_stride() ||
      input_kernel_grad->element_count() != d.features * d.gate_stride() ||
      kernels_grad->element_count() != kernels.element_count() ||
      h_before.element_count() != ad[0] * d.state_stride())
    return ffi::Error::InvalidArgument("lstm: the bias, input kernel, kernel and state shapes "
                                       "of the backward pass disagree");
  if (ad[0] == 0) {  // No rows: zero gradients (the kernels' would be left unwritten).
    for (ffi::ResultBuffer<ffi::F32>* result : {&bias_grad, &input_kernel_grad, &kernels_grad})
      std::fill((*result)->typed_data(), (*result)->typed_data() + (*result)->element_count(),
                0.0f);
    return ffi::Error::Success();
  }
  const int64_t T = d.length, H = d.hidden, gs = d.gate_stride(), ss = d.state_stride();
  const LstmSplit split(d, pool);
  std::vector<PanelMatrix> packed(d.directions);  // W^T [4H, H]: d h_{t-1} = dgates_t W^T.
  for (int64_t dir = 0; dir < d.directions; ++dir)
    packed[dir].Pack(kernels.typed_data() + dir * H * 4 * H, 4 * H, H, /*transpose=*/true,
                     pool);
  struct Scratch {
    RowMatrix dh, dc, carried;
  };
  std::vector<Scratch> scratch(split.threads);
  // Per item: its rows' gate gradients summed over frames, the bias gradient's share (summed
  // here while each row is in cache, instead of by XLA reading all of them once more).
  std::vector<Eigen::ArrayXf> bias_sums(split.items(d), Eigen::ArrayXf::Zero(4 * H));
  // Kernel gradients [F + H, 4H] of the items past their direction's first block, left
  // uninitialised: LstmSplit gives every block rows, and WeightGradPanels' first chunk stores
  // every float (zeroing 2 MB per call for issue 28's second layer was wasted).
  const int64_t F = d.features;
  std::vector<std::unique_ptr<float[]>> partials(split.items(d));
  for (int64_t item = 0; item < split.items(d); ++item)
    if (item % split.blocks) partials[item].reset(new float[(F + H) * 4 * H]);
  const bool* valid = mask.typed_data();
  float* dgates = gates_grad->typed_data();
  // An item's share of the kernels' gradients: its rows of x and h_{t-1} against its rows'
  // gate gradients, the first block's straight into the results, the others' into buffers
  // added after.
  const int64_t panels = (4 * H + kPanelCols - 1) / kPanelCols;
  struct Share {
    WeightGradPart parts[2];
    const float* g;
    int64_t rows;
  };
  auto share_of = [&](int64_t item) {
    const int64_t dir = item / split.blocks, block = item % split.blocks;
    const int64_t b0 = block * split.rows, first_row = b0 * T;
    float* in_grad = block ? partials[item].get() : input_kernel_grad->typed_data() + dir * 4 * H;
    float* h_grad = block ? in_grad + F * 4 * H : kernels_grad->typed_data() + dir * H * 4 * H;
    return Share{{{x.typed_data() + first_row * F, F, F, in_grad, block ? 4 * H : gs},
                  {h_before.typed_data() + first_row * ss + dir * H, ss, H, h_grad, 4 * H}},
                 dgates + first_row * gs + dir * 4 * H,
                 std::max<int64_t>(0, std::min(split.rows, d.batch - b0)) * T};
  };
  // The shares are cut into tasks of kLstmPanelsPerTask column panels, which any thread
  // takes once the item's gate gradients are done (`ready`): a thread whose own rows'
  // recurrence finished first then takes panels of the other items' instead of idling.
  // Each thread used to run its own rows' share alone, and on a 2-core Zen 3 host the faster
  // thread idled a median 3.7-5.0 ms of each ~40-50 ms call (the host slows one core at a
  // time); shared, the call got faster in most runs of old and new builds side by side
  // (paired ratios up to 1.17), level on calm stretches (benchmarks/README.md, "LSTM: the
  // kernels' gradients shared out by panels"). With kWeightGradPackX the item's x is copied once,
  // whole, for all its tasks: WeightGradPanels' own copy would be made again by every task.
  // A thread waits for an item that another has started (`claimed`), never for one that
  // none has: that item's thread may be this one, later.
  struct Tasks {
    std::atomic<bool> claimed{false}, ready{false};
    std::atomic<int64_t> next{0};
    std::unique_ptr<float[]> packed_x;
  };
  const int64_t task_count = (panels + kLstmPanelsPerTask - 1) / kLstmPanelsPerTask;
  std::unique_ptr<Tasks[]> tasks(new Tasks[split.items(d)]);
  auto run_tasks = [&](int64_t item) {
    const Share share = share_of(item);
    for (int64_t task = tasks[item].next++; task < task_count; task = tasks[item].next++)
      WeightGradPanels(share.parts, 2, share.g, gs, share.rows, 4 * H, task * kLstmPanelsPerTask,
                       std::min(panels, (task + 1) * kLstmPanelsPerTask), kLstmWeightGradRows,
                       tasks[item].packed_x.get());
  };
  auto work = [&](int64_t item, int64_t slot) {
    tasks[item].claimed = true;
    const int64_t dir = item / split.blocks, b0 = (item % split.blocks) * split.rows;
    const int64_t n = std::min(split.rows, d.batch - b0);
    if (n <= 0) {
      tasks[item].next = task_count;
      tasks[item].ready = true;
      return;
    }
    const bool backwards = (reverse >> dir) & 1;
    Scratch& s = scratch[slot];
    s.dh.setZero(n, H);
    s.dc.setZero(n, H);
    s.carried.resize(n, H);
    for (int64_t step = T - 1; step >= 0; --step) {
      const int64_t t = backwards ? T - 1 - step : step;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = (b0 + r) * T + t;
        const int64_t at_gate = row * gs + dir * 4 * H, at_state = row * ss + dir * H;
        float* dpre = dgates + at_gate;
        // The row at the frame processed next (step - 1); its gate gradients go over its
        // activations (kernels.py aliases them), so those are what is asked for.
        const int64_t next_row = step > 0 ? row + (backwards ? 1 : -1) : row;
        const LstmBackwardRow next{activations.typed_data() + next_row * gs + dir * 4 * H,
                                   tanh_cell.typed_data() + next_row * ss + dir * H,
                                   c_before.typed_data() + next_row * ss + dir * H,
                                   out_grad.typed_data() + next_row * ss + dir * H};
        if (!valid[row]) {
          std::fill(dpre, dpre + 4 * H, 0.0f);
          if (step > 0)
            for (int64_t j = 0; j < H; j += kLineFloats) PrefetchBackwardRow(next, j, H);
          continue;
        }
        LstmCellBackward(dpre, activations.typed_data() + at_gate,
                         tanh_cell.typed_data() + at_state, c_before.typed_data() + at_state,
                         out_grad.typed_data() + at_state, s.dh.data() + r * H,
                         s.dc.data() + r * H, bias_sums[item].data(), H,
                         step > 0 ? &next : nullptr);
      }
      // d h_{t-1} = dgates_t W^T for the block's rows at once (rows T * gs apart); none
      // before the first frame.
      if (step == 0) break;
      const int64_t first = (b0 * T + t) * gs + dir * 4 * H;
      PanelMatmul(dgates + first, T * gs, n, packed[dir], nullptr, s.carried.data(), H,
                  packed[dir].K);
      for (int64_t r = 0; r < n; ++r)
        if (valid[(b0 + r) * T + t]) s.dh.row(r) = s.carried.row(r);
    }
    // The rows' share of the kernels' gradients (a padded frame's gate gradients are 0).
    if (kWeightGradPackX) {
      const Share share = share_of(item);
      const WeightGradLayout layout(share.parts, 2, kLstmWeightGradRows);
      tasks[item].packed_x.reset(new float[share.rows * layout.packed_width]);
      layout.PackAll(share.parts, share.rows, tasks[item].packed_x.get());
    }
    tasks[item].ready = true;
    run_tasks(item);
    for (int64_t other = 0; other < split.items(d); ++other) {
      Tasks& them = tasks[other];
      if (other == item || them.next.load() >= task_count) continue;
      if (!them.ready.load()) {
        if (!them.claimed.load()) continue;
        while (!them.ready.load()) std::this_thread::yield();
      }
      run_tasks(other);
    }
  };
  ForEachItem(pool, split.items(d), split.threads, work);
  ArrayMap sums(bias_grad->typed_data(), d.gate_stride());
  sums.setZero();
  for (int64_t item = 0; item < split.items(d); ++item)
    sums.segment(item / split.blocks * 4 * H, 4 * H) += bias_sums[item];
  // The other blocks' shares, added in block order (the same sums whichever thread ran
  // what); one work item per row of the results.
  if (split.blocks > 1) {
    auto add = [&](int64_t row, int64_t) {
      const int64_t dir = row / (F + H), r = row % (F + H);
      float* target = r < F ? input_kernel_grad->typed_data() + r * gs + dir * 4 * H
                            : kernels_grad->typed_data() + (dir * H + r - F) * 4 * H;
      ArrayMap total(target, 4 * H);
      for (int64_t block = 1; block < split.blocks; ++block)
        total += ArrayMap(partials[dir * split.blocks + block].get() + r * 4 * H, 4 * H);
    };
    const int64_t rows = d.directions * (F + H);
    ForEachItem(pool, rows, Participants(pool, rows), add);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnLstmInference, LstmInference,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("reverse")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnLstmForward, LstmForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("reverse")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnLstmBackward, LstmBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("reverse")
                                  .Ctx<ffi::ThreadPool>());

// Floats per vector register the kernels were compiled for (16 AVX-512, 8 AVX2 with FMA, 0
// for the portable fallback), so tests can tell which paths a build runs.
extern "C" int KilnVectorLanes() { return KILN_VECTOR_LANES; }

// ---------------------------------------------------------------------------------------
// LayerNorm over the last axis of x [R, D]: y = (x - mean) * rstd * scale + bias with
// rstd = 1 / sqrt(var + epsilon) (biased variance, two passes over the row), forward (which
// also returns mean and rstd per row) and backward.
//
// Why: XLA:CPU runs a LayerNorm as seven thunks forward (two row reductions, a broadcast
// rstd written out, the normalisation) and six backward, ~70 and ~200 us per [768, 128]
// norm in the GPT CPU config's step, mostly per-thunk overhead; here each pass is one call,
// threads taking blocks of rows.

namespace {

constexpr int64_t kNormRows = 32;  // Rows per work item.

// The sum of every lane of row(d, partial, mask) over a row's vectors d = 0, kLane, ...
// (the last one partial, under `mask`, when kLane does not divide D).
template <typename Row>
float RowSum(int64_t D, Row row) {
  Lane acc = ZeroLane();
  int64_t d = 0;
  for (; d + kLane <= D; d += kLane) acc = AddLanes(acc, row(d, false, Tail(0)));
  if (d < D) acc = AddLanes(acc, row(d, true, Tail(D - d)));
  return SumLanes(acc);
}

ffi::Error NormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                       float epsilon, ffi::ThreadPool pool) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || int64_t(scale.element_count()) != dims[1] ||
      int64_t(bias.element_count()) != dims[1])
    return ffi::Error::InvalidArgument("layer norm takes x [R, D], scale [D] and bias [D]");
  const int64_t R = dims[0], D = dims[1];
  const float *xs = x.typed_data(), *g = scale.typed_data(), *b = bias.typed_data();
  float *ys = y->typed_data(), *means = mean->typed_data(), *rstds = rstd->typed_data();
  const int64_t items = (R + kNormRows - 1) / kNormRows;
  auto work = [&](int64_t item, int64_t) {
    for (int64_t r = item * kNormRows; r < std::min(R, (item + 1) * kNormRows); ++r) {
      const float* row = xs + r * D;
      const float m = RowSum(D, [&](int64_t d, bool partial, TailMask t) {
                        return Load(row + d, partial, t);
                      }) / float(D);
      const Lane center = Broadcast(m);
      const float var = RowSum(D, [&](int64_t d, bool partial, TailMask t) {
                          Lane diff = SubtractLanes(Load(row + d, partial, t), center);
                          if (partial) {  // Masked-off lanes loaded 0: zero them again.
                            alignas(64) float kept[kLane] = {};
                            StoreTail(kept, t, diff);
                            diff = LoadLane(kept);
                          }
                          return MultiplyLanes(diff, diff);
                        }) / float(D);
      const float s = 1.0f / std::sqrt(var + epsilon);
      const Lane inv = Broadcast(s);
      float* out = ys + r * D;
      for (int64_t d = 0; d < D; d += kLane) {
        const bool partial = d + kLane > D;
        const TailMask t = Tail(partial ? D - d : 0);
        const Lane normed = MultiplyLanes(SubtractLanes(Load(row + d, partial, t), center), inv);
        Store(out + d, partial, t,
              MultiplyAdd(normed, Load(g + d, partial, t), Load(b + d, partial, t)));
      }
      means[r] = m;
      rstds[r] = s;
    }
  };
  ForEachItem(pool, items, Participants(pool, items), work);
  return ffi::Error::Success();
}

ffi::Error NormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                        ffi::Buffer<ffi::F32> out_grad, ffi::ResultBuffer<ffi::F32> x_grad,
                        ffi::ResultBuffer<ffi::F32> scale_grad,
                        ffi::ResultBuffer<ffi::F32> bias_grad, ffi::ThreadPool pool) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || int64_t(scale.element_count()) != dims[1] ||
      int64_t(mean.element_count()) != dims[0] || int64_t(rstd.element_count()) != dims[0] ||
      out_grad.dimensions().size() != 2 || out_grad.dimensions()[0] != dims[0] ||
      out_grad.dimensions()[1] != dims[1])
    return ffi::Error::InvalidArgument(
        "layer norm's gradient takes x [R, D], scale [D], mean [R], rstd [R], dy [R, D]");
  const int64_t R = dims[0], D = dims[1];
  const float *xs = x.typed_data(), *g = scale.typed_data(), *dys = out_grad.typed_data();
  const float *means = mean.typed_data(), *rstds = rstd.typed_data();
  float* dxs = x_grad->typed_data();
  const int64_t items = (R + kNormRows - 1) / kNormRows;
  const int64_t threads = Participants(pool, items);
  // Per run of items: its rows' sums of dy * xhat (scale's gradient) and of dy (bias's),
  // added up after the threads finish.
  std::vector<std::vector<float>> partial_sums(threads, std::vector<float>(2 * D, 0.0f));
  auto work = [&](int64_t item, int64_t, int64_t run) {
    float *dg = partial_sums[run].data(), *db = dg + D;
    for (int64_t r = item * kNormRows; r < std::min(R, (item + 1) * kNormRows); ++r) {
      const float *row = xs + r * D, *dy = dys + r * D;
      const Lane center = Broadcast(means[r]), inv = Broadcast(rstds[r]);
      // xhat = (x - mean) * rstd; gy = dy * scale; dx = rstd * (gy - mean(gy) - xhat *
      // mean(gy * xhat)). Masked-off lanes load 0 for dy, so both sums skip them.
      Lane sum_gy = ZeroLane(), sum_gy_xhat = ZeroLane();
      for (int64_t d = 0; d < D; d += kLane) {
        const bool partial = d + kLane > D;
        const TailMask t = Tail(partial ? D - d : 0);
        const Lane xhat = MultiplyLanes(SubtractLanes(Load(row + d, partial, t), center), inv);
        const Lane grad = Load(dy + d, partial, t);
        const Lane gy = MultiplyLanes(grad, Load(g + d, partial, t));
        sum_gy = AddLanes(sum_gy, gy);
        sum_gy_xhat = MultiplyAdd(gy, xhat, sum_gy_xhat);
        Store(dg + d, partial, t, MultiplyAdd(grad, xhat, Load(dg + d, partial, t)));
        Store(db + d, partial, t, AddLanes(grad, Load(db + d, partial, t)));
      }
      const Lane a = Broadcast(SumLanes(sum_gy) / float(D));
      const Lane c = Broadcast(SumLanes(sum_gy_xhat) / float(D));
      float* dx = dxs + r * D;
      for (int64_t d = 0; d < D; d += kLane) {
        const bool partial = d + kLane > D;
        const TailMask t = Tail(partial ? D - d : 0);
        const Lane xhat = MultiplyLanes(SubtractLanes(Load(row + d, partial, t), center), inv);
        const Lane gy = MultiplyLanes(Load(dy + d, partial, t), Load(g + d, partial, t));
        const Lane centered = SubtractLanes(SubtractLanes(gy, a), MultiplyLanes(xhat, c));
        Store(dx + d, partial, t, MultiplyLanes(centered, inv));
      }
    }
  };
  ForEachRun(pool, items, threads, work);
  float *dg = scale_grad->typed_data(), *db = bias_grad->typed_data();
  for (int64_t d = 0; d < D; ++d) {
    float sum_g = 0.0f, sum_b = 0.0f;
    for (int64_t t = 0; t < threads; ++t) {
      sum_g += partial_sums[t][d];
      sum_b += partial_sums[t][D + d];
    }
    dg[d] = sum_g;
    db[d] = sum_b;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnLayerNormForward, NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KilnLayerNormBackward, NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

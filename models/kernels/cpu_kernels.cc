// Kiln's XLA:CPU custom calls (jax.ffi), built and loaded by models/cpu_kernels.py:
// causal softmax attention with dropout on the attention weights (forward and backward),
// and Philox random words for dropout masks.
//
// Why: XLA:CPU runs attention's small batched dots ([T, H] x [H, T] per batch and head) at
// about a third of its matmul peak and materialises every [T, T] intermediate in memory.
// Here each thread takes whole (batch, head) pairs, keeps a block of scores in its cache and
// multiplies with single-threaded Eigen GEMMs, which reach ~80% of a core's peak on these
// shapes. Dropout masks come from Philox-4x32-10 (Salmon et al. 2011, the generator of
// PyTorch's and cuRAND's dropout), keyed by a per-call seed and counted by (pair, row,
// column), so the backward pass regenerates exactly the forward pass's masks.
//
// Layout: q, k, v, out and their gradients are token-major [B, T, N, H] (q already scaled
// by 1/sqrt(H)); the softmax probabilities, kept from the forward pass for the backward
// pass (which then needs no q k^T and no exp), are [B, N, T, T]. Query i attends keys
// 0..i. A weight is kept when a 16-bit draw is below `threshold` and then scaled by
// 65536 / threshold, the same quantised inverted dropout as models/dropout.py; threshold
// 65536 switches dropout off.

#include <Eigen/Core>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using View = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;
using ConstView = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

// Query rows per block: the block reads keys only up to its last row, so with 64-row
// blocks a 256-token sequence computes 5/8 of the full score matrix instead of all of it.
constexpr int64_t kBlock = 64;
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

// Participants for `pairs` pairs of attention: as many as the pool has threads (the caller
// is usually one of them), so the cores are filled but not oversubscribed.
int64_t Participants(ffi::ThreadPool& pool, int64_t pairs) {
  return std::max<int64_t>(1, std::min<int64_t>(pairs, pool.num_threads()));
}

// Runs work(pair, slot) for every pair on `participants` threads: the caller and tasks on
// XLA's intra-op pool (no thread start-up per call), each with its own scratch `slot`.
// Counters live on the heap and the caller returns once every pair is done, so a task that
// starts late finds no pair left and touches nothing of this call's stack.
template <typename Work>
void ForEachPair(ffi::ThreadPool& pool, int64_t pairs, int64_t participants, Work& work) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0}, slots{1};
  };
  auto progress = std::make_shared<Progress>();
  auto run = [progress, pairs, &work](int64_t slot) {
    for (int64_t pair = progress->next++; pair < pairs; pair = progress->next++) {
      work(pair, slot);
      progress->done++;
    }
  };
  for (int64_t t = 1; t < participants; ++t)
    pool.Schedule([progress, run] { run(progress->slots++); });
  run(0);
  while (progress->done.load() < pairs) std::this_thread::yield();
}

ffi::Error CheckDims(const ffi::AnyBuffer::Dimensions& q, const ffi::AnyBuffer::Dimensions& k,
                     const ffi::AnyBuffer::Dimensions& v, const ffi::Buffer<ffi::S32>& shard,
                     Dims* dims) {
  if (shard.element_count() != 3)
    return ffi::Error::InvalidArgument("causal attention's shard is [batch offset, head "
                                       "offset, total heads]");
  if (q.size() != 4 || k.size() != 4 || v.size() != 4)
    return ffi::Error::InvalidArgument("causal attention takes [B, T, N, H] q, k and v");
  for (int i = 0; i < 4; ++i)
    if (q[i] != k[i] || q[i] != v[i])
      return ffi::Error::InvalidArgument("causal attention needs q, k, v of one shape");
  const int32_t* where = shard.typed_data();
  *dims = Dims{q[0], q[1], q[2], q[3], where[0], where[1], where[2]};
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> shard,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probabilities,
                   int32_t threshold, ffi::ThreadPool pool) {
  Dims d;
  if (ffi::Error error = CheckDims(q.dimensions(), k.dimensions(), v.dimensions(), shard, &d);
      error.failure())
    return error;
  const int64_t T = d.length, H = d.dim, stride = d.stride();
  const bool dropout = threshold < int32_t(kLevels);
  const int64_t threads = Participants(pool, d.pairs());
  // Per thread: the dropped weights of one block and a row of dropout scales.
  std::vector<RowMatrix> dropped(threads, RowMatrix(std::min(kBlock, T), T));
  std::vector<std::vector<float>> scales(threads, std::vector<float>(T));
  const uint32_t* key = seed.typed_data();
  auto work = [&](int64_t pair, int64_t thread) {
    const int64_t at = d.offset(pair);
    const Eigen::OuterStride<> step(stride);
    ConstView Q(q.typed_data() + at, T, H, step), K(k.typed_data() + at, T, H, step);
    ConstView V(v.typed_data() + at, T, H, step);
    View O(out->typed_data() + at, T, H, step);
    // This pair's [T, T] probabilities, kept for the backward pass (as XLA keeps its
    // softmax output); only the causal blocks (row i: columns up to its block's end) are
    // written and read.
    View S(probabilities->typed_data() + pair * T * T, T, T, Eigen::OuterStride<>(T));
    float* scale = scales[thread].data();
    for (int64_t start = 0; start < T; start += kBlock) {
      const int64_t rows = std::min(kBlock, T - start), columns = start + rows;
      auto P = S.block(start, 0, rows, columns);
      P.noalias() = Q.middleRows(start, rows) * K.topRows(columns).transpose();
      auto W = dropped[thread].topLeftCorner(rows, columns);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = start + r, visible = i + 1;
        float* s = S.row(i).data();
        Eigen::Map<Eigen::ArrayXf> weights(s, visible);  // Eigen's exp is vectorised.
        const float top = weights.maxCoeff();
        weights = (weights - top).exp();
        weights *= 1.0f / weights.sum();
        for (int64_t j = visible; j < columns; ++j) s[j] = 0.0f;
        if (dropout) {
          DropoutRow(key, uint32_t(threshold), d.global_pair(pair), i, visible, scale);
          float* w = dropped[thread].row(r).data();
          Eigen::Map<Eigen::ArrayXf>(w, visible) =
              weights * Eigen::Map<Eigen::ArrayXf>(scale, visible);
          for (int64_t j = visible; j < columns; ++j) w[j] = 0.0f;
        }
      }
      if (dropout) {
        O.middleRows(start, rows).noalias() = W * V.topRows(columns);
      } else {
        O.middleRows(start, rows).noalias() = P * V.topRows(columns);
      }
    }
  };
  ForEachPair(pool, d.pairs(), threads, work);
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
  const int64_t T = d.length, H = d.dim, stride = d.stride();
  const bool dropout = threshold < int32_t(kLevels);
  const int64_t threads = Participants(pool, d.pairs());
  const int64_t block_rows = std::min(kBlock, T);
  // Per thread: the score gradient, the gradient of the dropped weights, the dropped weights.
  std::vector<RowMatrix> score_grads(threads, RowMatrix(block_rows, T));
  std::vector<RowMatrix> grads(threads, RowMatrix(block_rows, T));
  std::vector<RowMatrix> dropped(threads, RowMatrix(block_rows, T));
  std::vector<std::vector<float>> scales(threads, std::vector<float>(T));
  std::vector<std::vector<float>> deltas(threads, std::vector<float>(T));
  const uint32_t* key = seed.typed_data();
  auto work = [&](int64_t pair, int64_t thread) {
    const int64_t at = d.offset(pair);
    const Eigen::OuterStride<> step(stride);
    ConstView Q(q.typed_data() + at, T, H, step), K(k.typed_data() + at, T, H, step);
    ConstView V(v.typed_data() + at, T, H, step), O(out.typed_data() + at, T, H, step);
    ConstView dO(out_grad.typed_data() + at, T, H, step);
    View dQ(q_grad->typed_data() + at, T, H, step), dK(k_grad->typed_data() + at, T, H, step);
    View dV(v_grad->typed_data() + at, T, H, step);
    ConstView S(probabilities.typed_data() + pair * T * T, T, T, Eigen::OuterStride<>(T));
    float* scale = scales[thread].data();
    float* delta = deltas[thread].data();
    // delta_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term.
    for (int64_t i = 0; i < T; ++i) delta[i] = dO.row(i).dot(O.row(i));
    dK.setZero();
    dV.setZero();
    for (int64_t start = 0; start < T; start += kBlock) {
      const int64_t rows = std::min(kBlock, T - start), columns = start + rows;
      auto P = S.block(start, 0, rows, columns);
      auto dS = score_grads[thread].topLeftCorner(rows, columns);
      auto G = grads[thread].topLeftCorner(rows, columns);
      auto W = dropped[thread].topLeftCorner(rows, columns);
      G.noalias() = dO.middleRows(start, rows) * V.topRows(columns).transpose();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = start + r;
        Eigen::Map<const Eigen::ArrayXf> prob(S.row(i).data(), columns);
        Eigen::Map<Eigen::ArrayXf> grad(grads[thread].row(r).data(), columns);
        Eigen::Map<Eigen::ArrayXf> score_grad(score_grads[thread].row(r).data(), columns);
        if (dropout) {  // Masked columns hold probability 0, so their gradients are 0 too.
          DropoutRow(key, uint32_t(threshold), d.global_pair(pair), i, columns, scale);
          Eigen::Map<Eigen::ArrayXf> keep(scale, columns);
          Eigen::Map<Eigen::ArrayXf>(dropped[thread].row(r).data(), columns) = prob * keep;
          score_grad = prob * (grad * keep - delta[i]);
        } else {
          score_grad = prob * (grad - delta[i]);
        }
      }
      if (dropout) {
        dV.topRows(columns).noalias() += W.transpose() * dO.middleRows(start, rows);
      } else {
        dV.topRows(columns).noalias() += P.transpose() * dO.middleRows(start, rows);
      }
      dQ.middleRows(start, rows).noalias() = dS * K.topRows(columns);
      dK.topRows(columns).noalias() += dS.transpose() * Q.middleRows(start, rows);
    }
  };
  ForEachPair(pool, d.pairs(), threads, work);
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

// Causal flash attention, forward and backward, for CPUs with AVX512-BF16 (causal_attention.py says why).
//
// bf16 queries/keys/values in; bf16 output and the fp32 log-sum-exp of the scores out (what torch's
// CPU flash kernel gives, too); bf16 gradients back. Scores, softmax, sums and every accumulation stay
// fp32; only the probabilities (and, in backward, the score gradients) are rounded to bf16 before their
// products, as in torch's kernel. Every product runs on one register-tiled micro-kernel (`vdpbf16ps`:
// 16 fp32 lanes, each adding the dot product of a pair of bf16), whose right-hand operand is "packed in
// pairs": element (k, n) of a [K, N] matrix lives at ((k / 2) * N + n) * 2 + k % 2. Results are rounded to
// bf16 by `vcvtneps2bf16` (to nearest even, as torch; it flushes values below 2^-126 to zero).
//
// Plain C++ on OpenMP threads (common.h), no torch headers: g++ builds it in about two seconds, and it is
// called through ctypes with raw pointers and element strides.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using ernie45::bf16;
using ernie45::parallel_items;

constexpr int64_t kTileRows = 6;   // rows of one register tile
constexpr int64_t kTileCols = 64;  // columns of one register tile (4 vectors of 16 fp32)
constexpr int64_t kQueryBlock = 48;
constexpr int64_t kKeyBlock = 256;

// C[R, 16*V] (+)= A[R, 2*pairs] @ B, B packed in pairs with row length ldb (columns).
template <int R, int V>
void tile(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs, float* c, int64_t ldc,
          bool accumulate) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh right[V];
    for (int v = 0; v < V; ++v) right[v] = (__m512bh)_mm512_loadu_si512(b + (p * ldb + 16 * v) * 2);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh left = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], left, right[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

using TileFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, float*, int64_t, bool);

template <int R>
constexpr TileFn kTilesOfRows[4] = {tile<R, 1>, tile<R, 2>, tile<R, 3>, tile<R, 4>};
constexpr const TileFn* kTiles[kTileRows] = {kTilesOfRows<1>, kTilesOfRows<2>, kTilesOfRows<3>,
                                             kTilesOfRows<4>, kTilesOfRows<5>, kTilesOfRows<6>};

// C[M, N] (+)= A[M, K] @ B[K, N]; A bf16 row-major with row stride lda, K even, N a multiple of 16,
// B packed in pairs with row length ldb >= N.
void gemm(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  for (int64_t col = 0; col < n; col += kTileCols) {
    const int64_t vectors = std::min<int64_t>(kTileCols, n - col) / 16;
    for (int64_t row = 0; row < m; row += kTileRows) {
      const int64_t rows = std::min(kTileRows, m - row);
      kTiles[rows - 1][vectors - 1](a + row * lda, lda, b + col * 2, ldb, k / 2, c + row * ldc + col, ldc, accumulate);
    }
  }
}

// exp(x) for 16 lanes: x = n ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series to r^6 (error below
// one fp32 ulp), times 2^n. Lanes below -87 (masked scores are -inf) give exactly 0; NaN stays NaN.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);  // not below: NaN kept
  return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(p, n));
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}

// Row max of x[0:count) (count >= 1).
float row_max(const float* x, int64_t count) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < count; j += 16)
    best = _mm512_max_ps(best, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(count - j), x + j));
  return _mm512_reduce_max_ps(best);
}

// probs[0:width) = bf16(exp(scale * scores - shift)) for the first `count` columns, 0 after; returns
// the fp32 sum of the exponentials.
float exp_row(const float* scores, int64_t count, int64_t width, float scale, float shift, bf16* probs) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 live = count > j ? first_lanes(count - j) : (__mmask16)0;
    const __m512 s = _mm512_maskz_loadu_ps(live, scores + j);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_fmsub_ps(s, _mm512_set1_ps(scale), _mm512_set1_ps(shift))));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256((__m256i*)(probs + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(sum);
}

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// A [B, H, S, D] (or [B, H, S] when D = 1) tensor: element strides of batch, head and position;
// the last dimension contiguous.
template <typename T>
struct View {
  T* data;
  int64_t batch, head, row;
  T* at(int64_t b, int64_t h, int64_t i = 0) const { return data + b * batch + h * head + i * row; }
};

struct Shape {
  int64_t batch, heads, kv_heads, q_len, k_len, head_dim;
  float scale;
  int64_t group() const { return heads / kv_heads; }
  int64_t offset() const { return k_len - q_len; }  // query i sits at key position offset + i, sees keys <= it
};

// [a0..a15, b0..b15] (bf16) -> the pairs (a0, b0), (a1, b1), ... (a15, b15).
inline __m512i interleave_halves(__m512i both) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

// x [rows, cols] (row stride `stride`, cols a multiple of 16) as the right-hand side B = x of a product
// over its rows: packed in pairs of rows, [padded_rows / 2][cols][2], rows past `rows` zero.
void pack_rows(const bf16* x, int64_t rows, int64_t cols, int64_t stride, int64_t padded_rows, bf16* dst) {
  std::memset(dst, 0, sizeof(bf16) * padded_rows * cols);
  for (int64_t r = 0; r < rows; r += 2)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256i this_row = _mm256_loadu_si256((const __m256i*)(x + r * stride + c));
      const __m256i next_row =
          r + 1 < rows ? _mm256_loadu_si256((const __m256i*)(x + (r + 1) * stride + c)) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(this_row), next_row, 1);
      _mm512_storeu_si512(dst + ((r / 2) * cols + c) * 2, interleave_halves(both));
    }
}

// x [rows, cols] (row stride `stride`, cols even) as the right-hand side B = x^T of a product over its
// columns: packed in pairs of columns, [cols / 2][padded_rows][2], rows past `rows` zero. A pair of
// columns of one row is one 32-bit word, so this is a transpose of words.
void pack_transposed(const bf16* x, int64_t rows, int64_t cols, int64_t stride, int64_t padded_rows, bf16* dst) {
  std::memset(dst, 0, sizeof(bf16) * padded_rows * cols);
  for (int64_t first = 0; first < rows; first += 16)  // 16 rows at a time: each store is one cache line
    for (int64_t c = 0; c < cols; c += 2)
      for (int64_t r = first; r < std::min(rows, first + 16); ++r)
        std::memcpy(dst + ((c / 2) * padded_rows + r) * 2, x + r * stride + c, 4);
}

struct ForwardScratch {
  std::vector<float> scores, acc, max, sum;
  std::vector<bf16> probs;
  explicit ForwardScratch(int64_t head_dim)
      : scores(kQueryBlock * kKeyBlock), acc(kQueryBlock * head_dim), max(kQueryBlock), sum(kQueryBlock),
        probs(kQueryBlock * kKeyBlock) {}
};

// One block of queries of one (batch, head): the online softmax over blocks of keys.
// keys: k^T packed ([D/2][padded][2]); values: v packed ([padded/2][D][2]).
void attend_block(const Shape& shape, const bf16* q, int64_t q_row, int64_t first, const bf16* keys,
                  const bf16* values, int64_t padded, bf16* out, int64_t out_row, float* lse, int64_t lse_row,
                  ForwardScratch& s) {
  const int64_t rows = std::min(kQueryBlock, shape.q_len - first), dim = shape.head_dim;
  const int64_t key_end = shape.offset() + first + rows;  // keys [0, key_end) are seen by some row
  q += first * q_row;
  std::fill(s.acc.begin(), s.acc.end(), 0.0f);
  std::fill(s.max.begin(), s.max.end(), -INFINITY);
  std::fill(s.sum.begin(), s.sum.end(), 0.0f);
  for (int64_t start = 0; start < key_end; start += kKeyBlock) {
    const int64_t width = round_up(std::min(kKeyBlock, key_end - start), 16);  // <= padded - start
    gemm(rows, width, dim, q, q_row, keys + start * 2, padded, s.scores.data(), kKeyBlock, false);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t seen = std::min(width, shape.offset() + first + r + 1 - start);  // causal
      float* acc = s.acc.data() + r * dim;
      bf16* probs = s.probs.data() + r * kKeyBlock;
      if (seen <= 0) {
        std::memset(probs, 0, sizeof(bf16) * width);
        continue;
      }
      const float* scores = s.scores.data() + r * kKeyBlock;
      const float new_max = std::max(s.max[r], shape.scale * row_max(scores, seen));
      const float rescale = std::exp(s.max[r] - new_max);  // exp(-inf) = 0 on the first block
      s.sum[r] = s.sum[r] * rescale + exp_row(scores, seen, width, shape.scale, new_max, probs);
      s.max[r] = new_max;
      if (rescale != 1.0f)
        for (int64_t d = 0; d < dim; ++d) acc[d] *= rescale;
    }
    gemm(rows, dim, width, s.probs.data(), kKeyBlock, values + start * dim, dim, s.acc.data(), dim, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inverse = _mm512_set1_ps(1.0f / s.sum[r]);
    for (int64_t d = 0; d < dim; d += 16) {
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(s.acc.data() + r * dim + d), inverse);
      _mm256_storeu_si256((__m256i*)(out + (first + r) * out_row + d), (__m256i)_mm512_cvtneps_pbh(o));
    }
    lse[(first + r) * lse_row] = s.max[r] + std::log(s.sum[r]);
  }
}

constexpr int64_t kBackwardBlock = 64;  // keys and queries per block of the backward

// Lanes l of a 16-wide vector whose index base + l lies in [lo, hi).
inline __mmask16 lanes_between(int64_t lo, int64_t hi, int64_t base) {
  const int64_t from = std::clamp<int64_t>(lo - base, 0, 16), to = std::clamp<int64_t>(hi - base, 0, 16);
  return to > from ? (__mmask16)(first_lanes(to) & ~first_lanes(from)) : (__mmask16)0;
}

// 16 fp32 of row a and 16 of row b as 16 bf16 pairs (a[i], b[i]): two rows packed in pairs.
inline __m512i interleave_bf16(__m512 a, __m512 b) { return interleave_halves((__m512i)_mm512_cvtne2ps_pbh(b, a)); }

// One (batch, head)'s queries and output gradient, packed for the backward's products.
struct QueryOperands {
  std::vector<bf16> q_t, grad_t;  // q^T, grad_out^T packed ([D/2][padded][2]): right of k @ q^T, v @ grad_out^T
  std::vector<bf16> q, grad;      // q, grad_out packed ([padded/2][D][2]): right of probs^T @ grad_out etc.
  std::vector<float> lse, delta;  // [padded]: log-sum-exp of the scores, rowsum(grad_out * out)
};

struct BackwardScratch {
  std::vector<float> scores_t, grad_probs_t;
  std::vector<bf16> probs_t, grad_scores_t, grad_scores_pairs;
  BackwardScratch()
      : scores_t(kBackwardBlock * kBackwardBlock), grad_probs_t(kBackwardBlock * kBackwardBlock),
        probs_t(kBackwardBlock * kBackwardBlock), grad_scores_t(kBackwardBlock * kBackwardBlock),
        grad_scores_pairs(kBackwardBlock * kBackwardBlock) {}
};

// Keys [start, start + kBackwardBlock) of one kv head against every query of one of its heads that sees
// them, all products written with the keys as rows (no transposes):
//   scores^T = k q^T, grad_probs^T = v grad_out^T, probs^T = exp(scale scores^T - lse),
//   grad_scores^T = scale probs^T (grad_probs^T - delta);
//   grad_v += probs^T grad_out, grad_k += grad_scores^T q (fp32 [block, D], this block's keys);
//   grad_q^T += k^T grad_scores^T (fp32 [D, padded queries]).
// k, v: the kv head's rows; k_t: its k^T, plain row-major [D, k_t_row].
void backward_block(const Shape& shape, const bf16* k, int64_t k_row, const bf16* v, int64_t v_row,
                    const bf16* k_t, int64_t k_t_row, const QueryOperands& op, int64_t padded, int64_t start,
                    float* grad_q_t, float* grad_k, float* grad_v, BackwardScratch& s) {
  const int64_t dim = shape.head_dim, block = kBackwardBlock;
  const int64_t keys = std::min(block, shape.k_len - start), rows = round_up(keys, 2);  // rows: even, for pairs
  k += start * k_row;
  v += start * v_row;
  const int64_t first_query = std::max<int64_t>(0, start - shape.offset()) / block * block;
  for (int64_t first = first_query; first < shape.q_len; first += block) {
    const int64_t queries = std::min(block, shape.q_len - first), width = round_up(queries, 16);
    gemm(keys, width, dim, k, k_row, op.q_t.data() + first * 2, padded, s.scores_t.data(), block, false);
    gemm(keys, width, dim, v, v_row, op.grad_t.data() + first * 2, padded, s.grad_probs_t.data(), block, false);
    for (int64_t j = 0; j < rows; j += 2) {  // two keys at a time: their gradient rows go out in pairs
      __m512 grad_scores[2];
      for (int64_t i = 0; i < width; i += 16) {
        for (int64_t pair = 0; pair < 2; ++pair) {
          const int64_t row = j + pair;  // key start + row is seen by queries >= start + row - offset
          const __mmask16 live =
              row < keys ? lanes_between(start + row - shape.offset(), shape.q_len, first + i) : (__mmask16)0;
          const __m512 scores = _mm512_maskz_loadu_ps(live, s.scores_t.data() + row * block + i);
          const __m512 lse = _mm512_maskz_loadu_ps(live, op.lse.data() + first + i);
          const __m512 probs =
              _mm512_maskz_mov_ps(live, exp16(_mm512_fmsub_ps(scores, _mm512_set1_ps(shape.scale), lse)));
          const __m512 grad_probs = _mm512_maskz_loadu_ps(live, s.grad_probs_t.data() + row * block + i);
          const __m512 delta = _mm512_maskz_loadu_ps(live, op.delta.data() + first + i);
          grad_scores[pair] =
              _mm512_mul_ps(_mm512_mul_ps(probs, _mm512_set1_ps(shape.scale)), _mm512_sub_ps(grad_probs, delta));
          _mm256_storeu_si256((__m256i*)(s.probs_t.data() + row * block + i), (__m256i)_mm512_cvtneps_pbh(probs));
          _mm256_storeu_si256((__m256i*)(s.grad_scores_t.data() + row * block + i),
                              (__m256i)_mm512_cvtneps_pbh(grad_scores[pair]));
        }
        _mm512_storeu_si512(s.grad_scores_pairs.data() + ((j / 2) * block + i) * 2,
                            interleave_bf16(grad_scores[0], grad_scores[1]));
      }
    }
    const int64_t even_queries = round_up(queries, 2);
    gemm(rows, dim, even_queries, s.probs_t.data(), block, op.grad.data() + first * dim, dim, grad_v, dim, true);
    gemm(rows, dim, even_queries, s.grad_scores_t.data(), block, op.q.data() + first * dim, dim, grad_k, dim, true);
    gemm(dim, width, rows, k_t + start, k_t_row, s.grad_scores_pairs.data(), block, grad_q_t + first, padded, true);
  }
}

// Packs one (batch, head)'s queries and output gradient, and its log-sum-exp and delta rows.
void pack_queries(const Shape& shape, const bf16* q, int64_t q_row, const bf16* grad, int64_t grad_row,
                  const bf16* out, int64_t out_row, const float* lse, int64_t lse_row, int64_t padded,
                  QueryOperands& op) {
  const int64_t dim = shape.head_dim;
  op.q_t.resize(padded * dim);
  op.grad_t.resize(padded * dim);
  op.q.resize(padded * dim);
  op.grad.resize(padded * dim);
  pack_transposed(q, shape.q_len, dim, q_row, padded, op.q_t.data());
  pack_transposed(grad, shape.q_len, dim, grad_row, padded, op.grad_t.data());
  pack_rows(q, shape.q_len, dim, q_row, padded, op.q.data());
  pack_rows(grad, shape.q_len, dim, grad_row, padded, op.grad.data());
  op.lse.assign(padded, 0.0f);
  op.delta.assign(padded, 0.0f);
  for (int64_t i = 0; i < shape.q_len; ++i) {
    op.lse[i] = lse[i * lse_row];
    __m512 sum = _mm512_setzero_ps();  // pairs of exact products, summed in fp32
    for (int64_t d = 0; d < dim; d += 32) {
      const __mmask32 live = dim - d >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)0xFFFFu;
      sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_maskz_loadu_epi16(live, grad + i * grad_row + d),
                             (__m512bh)_mm512_maskz_loadu_epi16(live, out + i * out_row + d));
    }
    op.delta[i] = _mm512_reduce_add_ps(sum);
  }
}

}  // namespace

extern "C" {

// q [B, H, Sq, D], k/v [B, Hkv, Sk, D] bf16, D contiguous and a multiple of 16, H a multiple of Hkv,
// Sq <= Sk: query i attends keys <= Sk - Sq + i. Writes out [B, H, Sq, D] bf16 and lse [B, H, Sq] fp32
// (the log-sum-exp of the scaled scores). strides: element strides (batch, head, position) of q, k, v,
// out, lse in that order.
void causal_attention_forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int64_t batch,
                              int64_t heads, int64_t kv_heads, int64_t q_len, int64_t k_len, int64_t head_dim,
                              float scale, const int64_t* strides, int64_t threads) {
  const Shape shape{batch, heads, kv_heads, q_len, k_len, head_dim, scale};
  const View<const bf16> qv{q, strides[0], strides[1], strides[2]}, kv{k, strides[3], strides[4], strides[5]},
      vv{v, strides[6], strides[7], strides[8]};
  const View<bf16> outv{out, strides[9], strides[10], strides[11]};
  const View<float> lsev{lse, strides[12], strides[13], strides[14]};
  const int64_t padded = round_up(k_len, kKeyBlock), slab = padded * head_dim;
  std::vector<bf16> keys(batch * kv_heads * slab), values(batch * kv_heads * slab);
  parallel_items(batch * kv_heads, threads, [&](int64_t i, int64_t) {
    const int64_t b = i / kv_heads, h = i % kv_heads;
    pack_transposed(kv.at(b, h), k_len, head_dim, kv.row, padded, keys.data() + i * slab);
    pack_rows(vv.at(b, h), k_len, head_dim, vv.row, padded, values.data() + i * slab);
  });
  const int64_t blocks = (q_len + kQueryBlock - 1) / kQueryBlock;
  std::vector<ForwardScratch> scratch(std::max<int64_t>(1, threads), ForwardScratch(head_dim));
  parallel_items(batch * heads * blocks, threads, [&](int64_t i, int64_t t) {
    const int64_t block = blocks - 1 - i % blocks, b = i / blocks / heads, h = i / blocks % heads;  // long blocks first
    const int64_t slab_index = b * kv_heads + h / shape.group();
    attend_block(shape, qv.at(b, h), qv.row, block * kQueryBlock, keys.data() + slab_index * slab,
                 values.data() + slab_index * slab, padded, outv.at(b, h), outv.row, lsev.at(b, h), lsev.row,
                 scratch[t]);
  });
}

// The gradients of causal_attention_forward: grad_q [B, H, Sq, D], grad_k/grad_v [B, Hkv, Sk, D] bf16,
// from grad_out and the forward's q, k, v, out, lse. strides: (batch, head, position) of grad_out, q, k,
// v, out, lse, grad_q, grad_k, grad_v in that order.
void causal_attention_backward(const bf16* grad_out, const bf16* q, const bf16* k, const bf16* v, const bf16* out,
                               const float* lse, bf16* grad_q, bf16* grad_k, bf16* grad_v, int64_t batch,
                               int64_t heads, int64_t kv_heads, int64_t q_len, int64_t k_len, int64_t head_dim,
                               float scale, const int64_t* strides, int64_t threads) {
  const Shape shape{batch, heads, kv_heads, q_len, k_len, head_dim, scale};
  auto view = [&](auto* data, int64_t index) {
    return View<std::remove_pointer_t<decltype(data)>>{data, strides[3 * index], strides[3 * index + 1],
                                                       strides[3 * index + 2]};
  };
  const auto grad_outv = view(grad_out, 0), qv = view(q, 1), kv = view(k, 2), vv = view(v, 3), outv = view(out, 4);
  const auto lsev = view(lse, 5);
  const auto grad_qv = view(grad_q, 6), grad_kv = view(grad_k, 7), grad_vv = view(grad_v, 8);
  const int64_t block = kBackwardBlock, dim = head_dim, group = shape.group();
  const int64_t padded_queries = round_up(q_len, block), padded_keys = round_up(k_len, block);
  // Keys are split into chunks so that there are at least as many (batch, kv head, chunk) items as threads
  // (so with more threads than batch x kv heads, grad_q's fp32 sums run in another order).
  const int64_t chunks = std::max<int64_t>(1, std::min((threads + batch * kv_heads - 1) / (batch * kv_heads),
                                                       padded_keys / block));
  const int64_t chunk_len = round_up((padded_keys + chunks - 1) / chunks, block);
  std::vector<float> grad_q_parts(chunks * batch * heads * dim * padded_queries, 0.0f);  // [chunk][b][h][D][Sq]
  parallel_items(chunks * batch * kv_heads, threads, [&](int64_t i, int64_t) {
    const int64_t chunk = i / (batch * kv_heads), b = i % (batch * kv_heads) / kv_heads, kv_head = i % kv_heads;
    const int64_t begin = chunk * chunk_len, end = std::min(k_len, begin + chunk_len);
    if (begin >= end) return;
    std::vector<bf16> k_t(dim * padded_keys, 0);  // k^T, row-major (written row by row)
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t key = 0; key < k_len; ++key) k_t[d * padded_keys + key] = kv.at(b, kv_head, key)[d];
    // one row more: a block of an odd number of keys writes an even number of gradient rows
    std::vector<float> grad_k_rows((end - begin + 1) * dim, 0.0f), grad_v_rows((end - begin + 1) * dim, 0.0f);
    QueryOperands op;
    BackwardScratch scratch;
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      pack_queries(shape, qv.at(b, h), qv.row, grad_outv.at(b, h), grad_outv.row, outv.at(b, h), outv.row,
                   lsev.at(b, h), lsev.row, padded_queries, op);
      float* grad_q_t = grad_q_parts.data() + ((chunk * batch + b) * heads + h) * dim * padded_queries;
      for (int64_t start = begin; start < end; start += block)
        backward_block(shape, kv.at(b, kv_head), kv.row, vv.at(b, kv_head), vv.row, k_t.data(), padded_keys, op,
                       padded_queries, start, grad_q_t, grad_k_rows.data() + (start - begin) * dim,
                       grad_v_rows.data() + (start - begin) * dim, scratch);
    }
    for (int64_t key = begin; key < end; ++key)
      for (int64_t d = 0; d < dim; d += 16) {
        const int64_t at = (key - begin) * dim + d;
        _mm256_storeu_si256((__m256i*)(grad_kv.at(b, kv_head, key) + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(grad_k_rows.data() + at)));
        _mm256_storeu_si256((__m256i*)(grad_vv.at(b, kv_head, key) + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(grad_v_rows.data() + at)));
      }
  });
  parallel_items(batch * heads, threads, [&](int64_t i, int64_t) {
    const int64_t b = i / heads, h = i % heads;
    float* total = grad_q_parts.data() + (b * heads + h) * dim * padded_queries;  // chunk 0's [D, Sq]
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const float* part = total + chunk * batch * heads * dim * padded_queries;
      for (int64_t j = 0; j < dim * padded_queries; ++j) total[j] += part[j];
    }
    // [D, Sq] -> rows of grad_q: each query's 16 d at a time, gathered from 16 rows of `total` that stay
    // in cache for the 16 queries after it (one value at a time, each d a row apart, this took 9 of a
    // 1,024-token layer's 35 ms).
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int32_t>(padded_queries)));
    for (int64_t first = 0; first < q_len; first += 16)
      for (int64_t d = 0; d < dim; d += 16)
        for (int64_t query = first; query < std::min(q_len, first + 16); ++query)
          _mm256_storeu_si256((__m256i*)(grad_qv.at(b, h, query) + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(rows, total + d * padded_queries + query, 4)));
  });
}
}

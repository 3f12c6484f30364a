// A few rows through their routed experts' projections, for CPUs with AVX512-BF16 (expert_rows.py
// says why): out[n, :] = w[e(n)] @ x[n, :] for rows n sorted by expert e(n).
//
// Decoding sends a handful of rows to a handful of experts, so each product reads a whole expert
// weight for one to four rows: the work is bound by memory bandwidth. Every weight row is read once
// per (up to) four input rows, four weight rows at a time, as fp32 dot products of bf16 pairs
// (`vdpbf16ps`), rounded to bf16 once at the end, as torch's CPU matmul does.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using ernie45::bf16;
using ernie45::float_to_bf16;
using ernie45::parallel_items;

constexpr int64_t kOutputBlock = 64;  // weight rows (output features) of one work item
constexpr int kRowTile = 4;           // input rows sharing each weight load
constexpr int kOutputTile = 4;        // weight rows read together

// out[r, o] = x[r, :] . w[o, :] for R input rows (stride `in`) and O weight rows (stride `in`).
template <int O, int R>
void dot_tile(const bf16* x, const bf16* w, int64_t in, bf16* out, int64_t out_row) {
  __m512 acc[O][R];
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    const __mmask32 live = in - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (in - i)) - 1u);
    __m512bh rows[R];
    for (int r = 0; r < R; ++r) rows[r] = (__m512bh)_mm512_maskz_loadu_epi16(live, x + r * in + i);
    for (int o = 0; o < O; ++o) {
      const __m512bh weights = (__m512bh)_mm512_maskz_loadu_epi16(live, w + o * in + i);
      for (int r = 0; r < R; ++r) acc[o][r] = _mm512_dpbf16_ps(acc[o][r], weights, rows[r]);
    }
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) out[r * out_row + o] = float_to_bf16(_mm512_reduce_add_ps(acc[o][r]));
}

// R input rows through `outputs` weight rows.
template <int R>
void rows_through(const bf16* x, const bf16* w, int64_t in, int64_t outputs, bf16* out, int64_t out_row) {
  int64_t o = 0;
  for (; o + kOutputTile <= outputs; o += kOutputTile) dot_tile<kOutputTile, R>(x, w + o * in, in, out + o, out_row);
  for (; o < outputs; ++o) dot_tile<1, R>(x, w + o * in, in, out + o, out_row);
}

using RowsFn = void (*)(const bf16*, const bf16*, int64_t, int64_t, bf16*, int64_t);
constexpr RowsFn kRowsThrough[kRowTile] = {rows_through<1>, rows_through<2>, rows_through<3>, rows_through<4>};

struct Item {
  int64_t expert, first_row, rows, first_output;
};

}  // namespace

extern "C" {

// x [N, in] bf16, rows grouped by expert (counts [E] int64, summing to N); w [E, out, in] bf16;
// out [N, out] bf16. All contiguous.
void expert_rows_linear(const bf16* x, const bf16* w, const int64_t* counts, bf16* out, int64_t experts,
                        int64_t out_features, int64_t in_features, int64_t threads) {
  std::vector<Item> items;  // (expert, block of its weight rows): empty experts cost nothing
  for (int64_t e = 0, row = 0; e < experts; row += counts[e], ++e)
    for (int64_t o = 0; counts[e] > 0 && o < out_features; o += kOutputBlock) items.push_back({e, row, counts[e], o});
  parallel_items(static_cast<int64_t>(items.size()), threads, [&](int64_t i, int64_t) {
    const Item& item = items[i];
    const bf16* weight = w + (item.expert * out_features + item.first_output) * in_features;
    const int64_t outputs = std::min(kOutputBlock, out_features - item.first_output);
    for (int64_t r = 0; r < item.rows; r += kRowTile) {
      const int64_t tile = std::min<int64_t>(kRowTile, item.rows - r);
      kRowsThrough[tile - 1](x + (item.first_row + r) * in_features, weight, in_features, outputs,
                             out + (item.first_row + r) * out_features + item.first_output, out_features);
    }
  });
}

}  // extern "C"

// CPU kernels of BatchNorm (+ add) + ReLU: statistics, apply, and the two backward passes.
//
// Every activation of one call is dense and shares one storage layout, viewed as [outer, C, inner]:
// storage element i belongs to channel (i / inner) % C (NCHW: inner = H*W; channels_last and 2-D:
// inner = 1). Math in fp32, each result rounded once to the activation dtype. Included by module.h after
// cpu_kernels.h; the Python entry points at the bottom are registered there.
//
// Reductions (bn_stats, bn_bwd_reduce) are deterministic: the work is cut into fixed units that depend
// on the shape only (inner == 1: blocks of rows, cut into channel groups when rows are wide, of ~kStatElems
// elements, see RowUnits; inner > 1: plane segments of at most kStatElems elements), each unit is summed
// sequentially (lane-wise in fp32 runs of kSpill values added into fp64 lanes, then lanes in a fixed
// order), and the per-unit partials are merged per channel in unit order in fp64. The thread count only
// decides who computes which unit.
//
// Statistics are stable: every unit sums x - K_c with K_c = the channel's first value (shifted data, exact
// for nearby values), and the units' shifted sums are added in fp64 (see stats_t).
#pragma once

#include <torch/extension.h>

#include "cpu_kernels.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace fused_residual {
namespace CPU_CAPABILITY {
namespace bn {

// Elements per reduction unit (the unit partition depends on the shape only).
constexpr int64_t kStatElems = 32768;
// Elementwise passes work in sub-blocks of this many elements (a multiple of kChunk): the mask of a
// sub-block is packed from the stored output while it is still in cache.
constexpr int64_t kSub = 2048;
// Register block: 4 fVecs = 32 channels (inner == 1) or 32 elements of a plane (inner > 1).
constexpr int kNV = 4;
constexpr int64_t kW = 8 * kNV;

// n valid elements (n may exceed NV * 8) of T at p as NV fp32 vectors; lanes past n are zero. Straight
// loads into the result (no bounce through a stack array: 16-byte stores read back as 32 bytes stall).
template <int NV>
inline void load_f(const float* p, int64_t n, fVec (&v)[NV]) {
  if (n >= 8 * NV) {
    for (int k = 0; k < NV; ++k) v[k] = fVec::loadu(p + 8 * k);
    return;
  }
  for (int k = 0; k < NV; ++k) {
    const int64_t cnt = std::min<int64_t>(std::max<int64_t>(n - 8 * k, 0), 8);
    v[k] = cnt == 8 ? fVec::loadu(p + 8 * k) : cnt > 0 ? fVec::loadu(p + 8 * k, cnt) : fVec(0.f);
  }
}

template <typename T, int NV>
inline void load_f(const T* p, int64_t n, fVec (&v)[NV]) {  // Half / BFloat16: 16 per Vectorized<T>
  constexpr int64_t S = Vectorized<T>::size();
  static_assert(NV % 2 == 0 && S == 16, "NV must hold whole Vectorized<T>");
  for (int q = 0; q < NV / 2; ++q) {
    const int64_t cnt = n >= 8 * NV ? S : std::min<int64_t>(std::max<int64_t>(n - q * S, 0), S);
    const Vectorized<T> x = cnt == S ? Vectorized<T>::loadu(p + q * S)
                            : cnt > 0 ? Vectorized<T>::loadu(p + q * S, cnt)
                                      : Vectorized<T>(T(0));
    std::tie(v[2 * q], v[2 * q + 1]) = at::vec::convert_to_float<T>(x);
  }
}

// Lanes of vector k valid among n elements, clamped to [0, 8].
inline int64_t lanes(int64_t n, int k) { return std::min<int64_t>(std::max<int64_t>(n - 8 * k, 0), 8); }

// The 8 mask bits of elements [i, i + 8) (bit j = element i + j), for any i; never reads past nbytes.
inline uint8_t bits_at(const uint8_t* mask, int64_t nbytes, int64_t i) {
  const int64_t b = i >> 3;
  const int s = static_cast<int>(i & 7);
  uint32_t v = mask[b];
  if (s != 0 && b + 1 < nbytes) v |= uint32_t(mask[b + 1]) << 8;
  return static_cast<uint8_t>(v >> s);
}

struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

// Long reductions add fp32 vectors over runs of at most kSpill steps (each fp32 sum adds at most kSpill
// values, so its rounding error does not grow with the reduction's length) and spill each run's sums into
// fp64 lanes. The order is fixed, so the result stays deterministic.
constexpr int kSpill = 32;

// d[j] += v[j] for the 8 lanes of v, in fp64.
inline void spill_lanes(double* d, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), lo));
  _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), hi));
#else
  float t[8];
  v.store(t);
  for (int j = 0; j < 8; ++j) d[j] += t[j];
#endif
}

// Two fp32 sums of kNV vectors each, fed by f(step, a, b) for steps [0, n), spilled into da and db (kW fp64
// lanes each, added to) every kSpill steps.
template <typename F>
inline void spilled_sums(int64_t n, double* da, double* db, F f) {
  for (int64_t s0 = 0; s0 < n; s0 += kSpill) {
    const int64_t s1 = std::min<int64_t>(n, s0 + kSpill);
    fVec a[kNV], b[kNV];
    for (int k = 0; k < kNV; ++k) a[k] = b[k] = fVec(0.f);
    for (int64_t i = s0; i < s1; ++i) f(i, a, b);
    for (int k = 0; k < kNV; ++k) {
      spill_lanes(da + 8 * k, a[k]);
      spill_lanes(db + 8 * k, b[k]);
    }
  }
}

// One register block of a row-blocked reduction (RowUnits): two sums of w <= kW channels over n rows, fed by
// f(r, width, a, b) for row r (width is the constant kW where the block is whole), stored as fp64 partials at
// p1[0, w) and p2[0, w).
template <typename F>
inline void block_sums(int64_t n, int64_t w, double* p1, double* p2, F f) {
  double d1[kW] = {}, d2[kW] = {};
  auto rows_loop = [&](int64_t width) {
    spilled_sums(n, d1, d2, [&](int64_t r, fVec (&a)[kNV], fVec (&b)[kNV]) { f(r, width, a, b); });
  };
  if (w == kW) rows_loop(kW); else rows_loop(w);  // the first with a constant width
  for (int64_t j = 0; j < w; ++j) {
    p1[j] = d1[j];
    p2[j] = d2[j];
  }
}

inline double lanes_total(const double* v) {  // lane order
  double t = 0.0;
  for (int j = 0; j < kW; ++j) t += v[j];
  return t;
}

// (count, mean, M2) of n values from their shifted sums s1 = sum(x - K), s2 = sum((x - K)^2).
inline Moments from_shifted(int64_t n, float K, double s1, double s2) {
  Moments m;
  m.n = static_cast<double>(n);
  const double d = s1 / m.n;
  m.mean = static_cast<double>(K) + d;
  m.m2 = std::max(0.0, s2 - s1 * d);
  return m;
}

// Runs f over the segments of [i0, i1) that stay in one row (inner == 1: f(a, b, c0) where element a has
// channel c0 and channels rise by one per element) or in one plane (inner > 1: channel c0 for all).
template <typename F>
inline void for_segments(int64_t i0, int64_t i1, int64_t C, int64_t inner, F f) {
  int64_t i = i0;
  while (i < i1) {
    int64_t end, c;
    if (inner == 1) {
      const int64_t row = i / C;
      c = i - row * C;
      end = std::min(i1, (row + 1) * C);
    } else {
      const int64_t plane = i / inner;
      c = plane % C;
      end = std::min(i1, (plane + 1) * inner);
    }
    f(i, end, c);
    i = end;
  }
}

// Per-channel vectors padded with zeros so that a register block's full loads (kNV fVecs, kW channels) at
// any channel offset < C stay inside.
inline std::vector<float> padded(const float* p, int64_t C) {
  std::vector<float> v(static_cast<size_t>(C + kW), 0.f);
  std::copy(p, p + C, v.begin());
  return v;
}

// The row-blocked reductions (inner == 1) walk a block of rows register block by register block, each row
// kW elements at a time with a stride of C: a pattern the hardware prefetchers follow poorly. While one
// register block is summed, the same rows' next block (p + kW; `left` elements of the row from p on) is
// fetched into the cache.
template <typename T>
inline void prefetch_next(const T* p, int64_t left) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t e = kW; e < std::min<int64_t>(left, 2 * kW); e += kLine) __builtin_prefetch(p + e);
}

// The units of the row-blocked reductions (inner == 1): R rows by W channels (W = C, or a multiple of kW),
// about kStatElems elements each. Rows wider than kStatElems / kMinRows are cut into channel groups instead
// of blocks of fewer rows: a unit then sums up to kMinRows rows per channel (fp32 runs of kSpill values
// between spills, where blocks of kStatElems / C rows gave runs of 4 at C = 8192) and the fp64 partials,
// one per (row block, channel), stay ~1/kMinRows of x (at C = 8192 and 128 rows they were the size of x).
struct RowUnits {
  static constexpr int64_t kMinRows = 64;
  int64_t rows, C, R, W, blocks, groups;
  RowUnits(int64_t rows_, int64_t C_) : rows(rows_), C(C_) {
    if (C * kMinRows <= kStatElems) {
      W = C;
      R = kStatElems / C;
    } else {
      R = kMinRows;
      W = kStatElems / kMinRows / kW * kW;
    }
    blocks = (rows + R - 1) / R;
    groups = (C + W - 1) / W;
  }
  // Runs f(b, r0, r1, c0, w, left) in parallel, unit by unit, for each register block of a unit: row block
  // b (rows [r0, r1)), channels [c0, c0 + w) with w <= kW, `left` channels of the unit's group from c0 on.
  template <typename F>
  void for_each_block(F f) const;
};

// Grain (in units) for at::parallel_for over units of `unit` elements: about kStatElems per task, so that a
// reduction of 2 units (e.g. 50K elements) already runs on two threads.
inline int64_t unit_grain(int64_t unit) { return std::max<int64_t>(1, kStatElems / std::max<int64_t>(unit, 1)); }

template <typename F>
void RowUnits::for_each_block(F f) const {
  at::parallel_for(0, blocks * groups, unit_grain(R * W), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / groups, g0 = (u % groups) * W, g1 = std::min(C, g0 + W);
      const int64_t r0 = b * R, r1 = std::min(rows, r0 + R);
      for (int64_t c0 = g0; c0 < g1; c0 += kW) f(b, r0, r1, c0, std::min<int64_t>(kW, g1 - c0), g1 - c0);
    }
  });
}

// The per-channel totals of two sets of unit partials, each channel's units added in unit order in fp64.
// Unit (o, c, s) is at (o * C + c) * nseg + s: o a row block (inner == 1, nseg = 1) or an outer index, s a
// segment of the plane. Walked in storage order (o outermost), not channel by channel with a stride.
inline void sum_partials(const std::vector<double>& p1, const std::vector<double>& p2, int64_t C, int64_t O,
                         int64_t nseg, std::vector<double>& s1, std::vector<double>& s2) {
  s1.assign(static_cast<size_t>(C), 0.0);
  s2.assign(static_cast<size_t>(C), 0.0);
  if (nseg == 1) {  // the same additions in the same order per channel, vectorised across channels
    double* __restrict t1 = s1.data();
    double* __restrict t2 = s2.data();
    for (int64_t o = 0; o < O; ++o) {
      const double* __restrict q1 = p1.data() + o * C;
      const double* __restrict q2 = p2.data() + o * C;
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += q1[c];
        t2[c] += q2[c];
      }
    }
    return;
  }
  for (int64_t o = 0; o < O; ++o) {
    const double* q1 = p1.data() + o * C * nseg;
    const double* q2 = p2.data() + o * C * nseg;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < nseg; ++s) {
        s1[c] += q1[c * nseg + s];
        s2[c] += q2[c * nseg + s];
      }
  }
}

// ---- bn_stats ------------------------------------------------------------------------------------------
// Shifted data: every value of channel c is taken relative to K_c, the channel's first value in storage
// (exact for nearby values, so no cancellation for data far from zero). Each unit sums d = x - K_c and d^2
// in fp32; the units' sums are added per channel in unit order in fp64, and mean = K + S1 / n,
// var = (S2 - S1^2 / n) / n. One shift per channel makes the merge two additions per unit, not a
// Chan update with divisions: at thousands of channels the merge would cost as much as the pass.
template <typename T>
void stats_t(const T* x, int64_t n, int64_t C, int64_t inner, float* mean_out, float* var_out) {
  const int64_t outer = n / (C * inner);
  std::vector<float> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<float>(x[c * inner]);
  const std::vector<float> pk = padded(shift.data(), C);  // zeros past C: there x = 0 too, so d = 0
  std::vector<double> p1, p2;
  // partials (sum_partials' layout): unit (o, c, s) at (o * C + c) * nseg + s, o a row block (inner == 1,
  // nseg = 1) or an outer index, s a segment of plane (o, c); O units of o
  int64_t O = outer, nseg = 1;
  if (inner == 1) {
    const RowUnits ru(outer, C);
    O = ru.blocks;
    p1.resize(static_cast<size_t>(ru.blocks * C));
    p2.resize(static_cast<size_t>(ru.blocks * C));
    ru.for_each_block([&](int64_t b, int64_t r0, int64_t r1, int64_t c0, int64_t w, int64_t left) {
      fVec K[kNV];
      for (int k = 0; k < kNV; ++k) K[k] = fVec::loadu(pk.data() + c0 + 8 * k);
      // sums of d = x - K and of d^2
      block_sums(r1 - r0, w, p1.data() + b * C + c0, p2.data() + b * C + c0,
                 [&](int64_t i, int64_t width, fVec (&s1)[kNV], fVec (&s2)[kNV]) {
                   const T* row = x + (r0 + i) * C + c0;
                   fVec v[kNV];
                   prefetch_next(row, left);
                   load_f(row, width, v);
                   for (int k = 0; k < kNV; ++k) {
                     const fVec d = v[k] - K[k];
                     s1[k] = s1[k] + d;
                     s2[k] = s2[k] + d * d;
                   }
                 });
    });
  } else {
    const int64_t seg = std::min(inner, kStatElems);
    nseg = (inner + seg - 1) / seg;
    const int64_t units = outer * C * nseg;  // unit u = (o * C + c) * nseg + s
    p1.resize(static_cast<size_t>(units));
    p2.resize(static_cast<size_t>(units));
    at::parallel_for(0, units, unit_grain(seg), [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t plane = u / nseg, s = u - plane * nseg;
        const int64_t len = std::min(seg, inner - s * seg);
        const T* q = x + plane * inner + s * seg;
        const fVec Kv(shift[plane % C]);
        double d1[kW] = {}, d2[kW] = {};
        const int64_t whole = len / kW;
        spilled_sums(whole, d1, d2, [&](int64_t i, fVec (&s1)[kNV], fVec (&s2)[kNV]) {
          fVec v[kNV];
          load_f(q + i * kW, kW, v);
          for (int k = 0; k < kNV; ++k) {
            const fVec d = v[k] - Kv;
            s1[k] = s1[k] + d;
            s2[k] = s2[k] + d * d;
          }
        });
        if (whole * kW < len) {
          const int64_t cnt = len - whole * kW;
          spilled_sums(1, d1, d2, [&](int64_t, fVec (&s1)[kNV], fVec (&s2)[kNV]) {
            fVec v[kNV];
            load_f(q + whole * kW, cnt, v);
            for (int k = 0; k < kNV; ++k) {
              const fVec d = fVec::set(fVec(0.f), v[k] - Kv, lanes(cnt, k));
              s1[k] = s1[k] + d;
              s2[k] = s2[k] + d * d;
            }
          });
        }
        p1[u] = lanes_total(d1);
        p2[u] = lanes_total(d2);
      }
    });
  }
  const int64_t count = outer * inner;
  std::vector<double> a1, a2;
  sum_partials(p1, p2, C, O, nseg, a1, a2);
  for (int64_t c = 0; c < C; ++c) {
    const Moments m = from_shifted(count, shift[c], a1[c], a2[c]);
    mean_out[c] = static_cast<float>(m.mean);
    var_out[c] = static_cast<float>(m.m2 / m.n);
  }
}

// ---- bn_apply ------------------------------------------------------------------------------------------
// Stores r (cnt elements) at p and replaces r by the values stored (rounded to T): the mask is the gate of
// what was stored.
template <typename T>
inline void store_rounded(T* p, int64_t cnt, fVec (&r)[Pack<T>::kVecs]) {
  auto v = at::vec::convert_from_float<T>(r[0], r[1]);
  if (cnt == Vectorized<T>::size()) v.store(p); else v.store(p, cnt);
  std::tie(r[0], r[1]) = at::vec::convert_to_float<T>(v);
}
template <>
inline void store_rounded<float>(float* p, int64_t cnt, fVec (&r)[1]) {
  if (cnt == fVec::size()) r[0].store(p); else r[0].store(p, cnt);
}

// Appends gate bits to a bit stream in registers, 64 at a time: the results of a sub-block come in
// storage order, so bit offsets only grow and no byte is read back.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "BitWriter stores 64-bit words as mask bytes");
struct BitWriter {
  uint64_t* words;
  uint64_t acc = 0;
  int pos = 0;
  int64_t w = 0;
  // the low cnt (1..8) bits of v
  inline void put(uint32_t v, int cnt) {
    acc |= uint64_t(v) << pos;
    pos += cnt;
    if (pos >= 64) {
      words[w++] = acc;
      pos -= 64;
      acc = pos ? uint64_t(v) >> (cnt - pos) : 0;
    }
  }
  inline void flush() {
    if (pos) words[w] = acc;
  }
};

inline uint32_t low_bits(const fVec& r, int64_t cnt) {
  const uint32_t v = keep_bits(r);
  return cnt < 8 ? v & ((1u << cnt) - 1u) : v;
}

// NV fVecs (8 * NV elements) stored at p, rounded to T; with kRound, v becomes the values stored.
template <typename T, int NV, bool kRound>
inline void store_f(T* p, fVec (&v)[NV]) {
  if constexpr (std::is_same_v<T, float>) {
    for (int k = 0; k < NV; ++k) v[k].store(p + 8 * k);
  } else {
    static_assert(NV % 2 == 0, "NV must hold whole Vectorized<T>");
    for (int q = 0; q < NV / 2; ++q) {
      const auto h = at::vec::convert_from_float<T>(v[2 * q], v[2 * q + 1]);
      h.store(p + 16 * q);
      if (kRound) std::tie(v[2 * q], v[2 * q + 1]) = at::vec::convert_to_float<T>(h);
    }
  }
}

// The rows paths (inner == 1, C a multiple of 8 * NV): row by row, NV vectors of channels per step, no
// segment bookkeeping, the shortcut and the gate's form chosen at compile time. A step starts at a multiple
// of 8 elements, so its gate is NV whole mask bytes, written or read at once (no byte is shared by threads).
template <int NV>
inline void store_mask_bytes(uint8_t* p, const fVec (&r)[NV]) {
  uint32_t bits = 0;
  for (int k = 0; k < NV; ++k) bits |= uint32_t(keep_bits(r[k])) << (8 * k);
  std::memcpy(p, &bits, NV);  // little-endian: byte k = vector k
}

template <int NV>
inline void gate_from_bytes(fVec (&g)[NV], const uint8_t* p) {
  uint32_t bits = 0;
  std::memcpy(&bits, p, NV);
  for (int k = 0; k < NV; ++k) g[k] = gate_bits(g[k], static_cast<uint8_t>(bits >> (8 * k)));
}

template <typename T, int NV, bool kSkip, bool kMask>
void apply_rows_t(const T* x, const T* skip, const float* pa, const float* pb, T* out, uint8_t* mask, int64_t rows,
                  int64_t C) {
  constexpr int64_t S = 8 * NV;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
    fVec xv[NV], sv[NV], r[NV];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t base = row * C;
      for (int64_t c = 0; c < C; c += S) {
        const int64_t i = base + c;
        load_f(x + i, S, xv);
        if (kSkip) load_f(skip + i, S, sv);
        for (int k = 0; k < NV; ++k) {
          fVec y = xv[k] * fVec::loadu(pa + c + 8 * k) + fVec::loadu(pb + c + 8 * k);
          if (kSkip) y = y + sv[k];
          r[k] = relu_vec(y);
        }
        store_f<T, NV, kMask>(out + i, r);  // the mask is the gate of what was stored
        if (kMask) store_mask_bytes(mask + (i >> 3), r);
      }
    }
  });
}

template <typename T, int NV>
void apply_rows(const T* x, const T* skip, const float* a, const float* b, T* out, uint8_t* mask, int64_t rows,
                int64_t C) {
  if (skip && mask) apply_rows_t<T, NV, true, true>(x, skip, a, b, out, mask, rows, C);
  else if (skip) apply_rows_t<T, NV, true, false>(x, skip, a, b, out, mask, rows, C);
  else if (mask) apply_rows_t<T, NV, false, true>(x, skip, a, b, out, mask, rows, C);
  else apply_rows_t<T, NV, false, false>(x, skip, a, b, out, mask, rows, C);
}

// Vectors per step of the rows paths for C channels of T: 4 (32 channels) where C allows, else one
// Vectorized<T>; 0: C is not a multiple of the vector width (the generic path).
template <typename T>
constexpr int rows_step(int64_t C) {
  return C % kW == 0 ? kNV : C % Pack<T>::size() == 0 ? Pack<T>::kVecs : 0;
}

// out = relu((x * alpha + beta) + skip), alpha = scale and beta = shift - mean * scale per channel (as
// ATen's CPU BatchNorm computes x_hat * weight + bias: one multiply-add per element), rounded once;
// mask = gate of the stored out.
template <typename T>
void apply_t(const T* x, const T* skip, const float* mean, const float* scale, const float* shift, T* out,
             uint8_t* mask, int64_t n, int64_t C, int64_t inner) {
  using P = Pack<T>;
  std::vector<float> alpha(C), beta(C);
  for (int64_t c = 0; c < C; ++c) {
    alpha[c] = scale[c];
    beta[c] = shift[c] - mean[c] * scale[c];
  }
  std::vector<float> pa, pb;
  if (inner == 1) {
    pa = padded(alpha.data(), C);
    pb = padded(beta.data(), C);
    const int step = rows_step<T>(C);
    if (step == kNV) return apply_rows<T, kNV>(x, skip, pa.data(), pb.data(), out, mask, n / C, C);
    if (step == P::kVecs) return apply_rows<T, P::kVecs>(x, skip, pa.data(), pb.data(), out, mask, n / C, C);
  }
  parallel_chunks(n, [&](int64_t i0, int64_t i1) {
    fVec xv[P::kVecs], sv[P::kVecs], r[P::kVecs];
    uint64_t words[kSub / 64 + 1];
    for (int64_t s0 = i0; s0 < i1; s0 += kSub) {  // s0 is a multiple of 64: no mask byte shared by tasks
      const int64_t s1 = std::min(i1, s0 + kSub);
      BitWriter bw{words};
      for_segments(s0, s1, C, inner, [&](int64_t a, int64_t b, int64_t c) {
        const bool rows = inner == 1;
        fVec va, vb;
        if (!rows) {
          va = fVec(alpha[c]);
          vb = fVec(beta[c]);
        }
        for (int64_t j = a; j < b; j += P::size()) {
          const int64_t cnt = std::min<int64_t>(P::size(), b - j);
          const int64_t cc = c + (j - a);
          P::load(x + j, cnt, xv);
          if (skip) P::load(skip + j, cnt, sv);
          for (int k = 0; k < P::kVecs; ++k) {
            if (rows) {
              va = fVec::loadu(pa.data() + cc + 8 * k);
              vb = fVec::loadu(pb.data() + cc + 8 * k);
            }
            fVec y = xv[k] * va + vb;
            if (skip) y = y + sv[k];
            r[k] = relu_vec(y);
          }
          store_rounded(out + j, cnt, r);
          if (mask) {
            for (int k = 0; k < P::kVecs; ++k) {
              if (8 * k < cnt) bw.put(low_bits(r[k], cnt - 8 * k), static_cast<int>(std::min<int64_t>(8, cnt - 8 * k)));
            }
          }
        }
      });
      if (mask) {
        bw.flush();
        std::memcpy(mask + (s0 >> 3), words, static_cast<size_t>((s1 - s0 + 7) / 8));  // little-endian
      }
    }
  });
}

// ---- the gate ------------------------------------------------------------------------------------------
// g = dy where the gate of element i0 + 8k + lane is on, else +0 (a select: NaN / Inf where off give 0).
template <typename T, int NV>
struct Gate {
  const T* out;
  const uint8_t* mask;
  int64_t nbytes;
  // v: NV fVecs of dy for elements [i, i + 8 NV), cnt of them valid.
  inline void apply(fVec (&g)[NV], int64_t i, int64_t cnt) const {
    if (mask) {
      for (int k = 0; k < NV; ++k) {
        if (8 * k < cnt) g[k] = gate_bits(g[k], bits_at(mask, nbytes, i + 8 * k));
      }
    } else {
      fVec o[NV];
      load_f(out + i, cnt, o);  // lanes past cnt: dy and out are 0, g = 0
      for (int k = 0; k < NV; ++k) g[k] = fVec::blendv(g[k], fVec(0.f), o[k] <= fVec(0.f));
    }
  }
};

// ---- bn_bwd_reduce -------------------------------------------------------------------------------------
template <typename T>
void bwd_reduce_t(const T* dy, const T* x, const T* out, const uint8_t* mask, const float* mean, int64_t n,
                  int64_t C, int64_t inner, float* sum_g, float* sum_gx) {
  const int64_t outer = n / (C * inner);
  const Gate<T, kNV> gate{out, mask, (n + 7) / 8};
  std::vector<double> pg, pgx;  // partials, laid out as in stats_t
  int64_t O = outer, nseg = 1;
  if (inner == 1) {
    const RowUnits ru(outer, C);
    O = ru.blocks;
    pg.resize(static_cast<size_t>(ru.blocks * C));
    pgx.resize(static_cast<size_t>(ru.blocks * C));
    ru.for_each_block([&](int64_t b, int64_t r0, int64_t r1, int64_t c0, int64_t w, int64_t left) {
      fVec M[kNV];
      load_f(mean + c0, w, M);
      // sums of g and of g * (x - mean)
      block_sums(r1 - r0, w, pg.data() + b * C + c0, pgx.data() + b * C + c0,
                 [&](int64_t r, int64_t width, fVec (&sg)[kNV], fVec (&sgx)[kNV]) {
                   const int64_t i = (r0 + r) * C + c0;
                   fVec g[kNV], xv[kNV];
                   prefetch_next(dy + i, left);
                   prefetch_next(x + i, left);
                   load_f(dy + i, width, g);
                   load_f(x + i, width, xv);
                   // whole mask bytes where the block is whole and rows start on a byte
                   if (mask != nullptr && width == kW && C % 8 == 0) gate_from_bytes(g, mask + (i >> 3));
                   else gate.apply(g, i, width);
                   for (int k = 0; k < kNV; ++k) {
                     sg[k] = sg[k] + g[k];
                     sgx[k] = sgx[k] + g[k] * (xv[k] - M[k]);
                   }
                 });
    });
  } else {
    const int64_t seg = std::min(inner, kStatElems);
    nseg = (inner + seg - 1) / seg;
    const int64_t units = outer * C * nseg;
    pg.resize(static_cast<size_t>(units));
    pgx.resize(static_cast<size_t>(units));
    at::parallel_for(0, units, unit_grain(seg), [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t plane = u / nseg, s = u - plane * nseg;
        const int64_t len = std::min(seg, inner - s * seg);
        const int64_t base = plane * inner + s * seg;
        const fVec M(mean[plane % C]);
        double d1[kW] = {}, d2[kW] = {};
        auto step = [&](int64_t i, int64_t cnt, fVec (&sg)[kNV], fVec (&sgx)[kNV]) {
          fVec g[kNV], xv[kNV];
          load_f(dy + base + i, cnt, g);
          load_f(x + base + i, cnt, xv);
          gate.apply(g, base + i, cnt);
          for (int k = 0; k < kNV; ++k) {
            sg[k] = sg[k] + g[k];
            sgx[k] = sgx[k] + g[k] * (xv[k] - M);  // lanes past cnt: g = 0, x = 0
          }
        };
        const int64_t whole = len / kW;
        spilled_sums(whole, d1, d2, [&](int64_t i, fVec (&sg)[kNV], fVec (&sgx)[kNV]) { step(i * kW, kW, sg, sgx); });
        if (whole * kW < len) {
          spilled_sums(1, d1, d2, [&](int64_t, fVec (&sg)[kNV], fVec (&sgx)[kNV]) {
            step(whole * kW, len - whole * kW, sg, sgx);
          });
        }
        pg[u] = lanes_total(d1);
        pgx[u] = lanes_total(d2);
      }
    });
  }
  std::vector<double> a1, a2;
  sum_partials(pg, pgx, C, O, nseg, a1, a2);
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = static_cast<float>(a1[c]);
    sum_gx[c] = static_cast<float>(a2[c]);
  }
}

// ---- bn_bwd_apply --------------------------------------------------------------------------------------
// bwd_apply_t's rows path (see apply_rows_t).
template <typename T, int NV, bool kSkip, bool kMask>
void bwd_apply_rows_t(const T* dy, const T* x, const T* out, const uint8_t* mask, const float* pm, const float* pa,
                      const float* pb, const float* pd, T* dx, T* dskip, int64_t rows, int64_t C) {
  constexpr int64_t S = 8 * NV;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
    fVec g[NV], xv[NV], o[NV], r[NV];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t base = row * C;
      for (int64_t c = 0; c < C; c += S) {
        const int64_t i = base + c;
        load_f(dy + i, S, g);
        load_f(x + i, S, xv);
        if (kMask) {
          gate_from_bytes(g, mask + (i >> 3));
        } else {
          load_f(out + i, S, o);
          for (int k = 0; k < NV; ++k) g[k] = fVec::blendv(g[k], fVec(0.f), o[k] <= fVec(0.f));
        }
        if (kSkip) store_f<T, NV, false>(dskip + i, g);
        for (int k = 0; k < NV; ++k) {
          const int64_t q = c + 8 * k;
          r[k] = ((g[k] - fVec::loadu(pb + q)) - (xv[k] - fVec::loadu(pm + q)) * fVec::loadu(pd + q)) *
                 fVec::loadu(pa + q);
        }
        store_f<T, NV, false>(dx + i, r);
      }
    }
  });
}

template <typename T, int NV>
void bwd_apply_rows(const T* dy, const T* x, const T* out, const uint8_t* mask, const float* m, const float* a,
                    const float* b, const float* d, T* dx, T* dskip, int64_t rows, int64_t C) {
  if (dskip && mask) bwd_apply_rows_t<T, NV, true, true>(dy, x, out, mask, m, a, b, d, dx, dskip, rows, C);
  else if (dskip) bwd_apply_rows_t<T, NV, true, false>(dy, x, out, mask, m, a, b, d, dx, dskip, rows, C);
  else if (mask) bwd_apply_rows_t<T, NV, false, true>(dy, x, out, mask, m, a, b, d, dx, dskip, rows, C);
  else bwd_apply_rows_t<T, NV, false, false>(dy, x, out, mask, m, a, b, d, dx, dskip, rows, C);
}

// dskip = g; dx = ((g - b) - (x - mean) * d) * a, rounded once.
template <typename T>
void bwd_apply_t(const T* dy, const T* x, const T* out, const uint8_t* mask, const float* mean, const float* a,
                 const float* b, const float* d, T* dx, T* dskip, int64_t n, int64_t C, int64_t inner) {
  using P = Pack<T>;
  constexpr int NV = P::kVecs;
  const Gate<T, NV> gate{out, mask, (n + 7) / 8};
  std::vector<float> pm, pa, pb, pd;
  if (inner == 1) {
    pm = padded(mean, C);
    pa = padded(a, C);
    pb = padded(b, C);
    pd = padded(d, C);
    const int step = rows_step<T>(C);
    const float *m_ = pm.data(), *a_ = pa.data(), *b_ = pb.data(), *d_ = pd.data();
    if (step == kNV) return bwd_apply_rows<T, kNV>(dy, x, out, mask, m_, a_, b_, d_, dx, dskip, n / C, C);
    if (step == NV) return bwd_apply_rows<T, NV>(dy, x, out, mask, m_, a_, b_, d_, dx, dskip, n / C, C);
  }
  parallel_chunks(n, [&](int64_t i0, int64_t i1) {
    fVec g[NV], xv[NV], r[NV];
    for_segments(i0, i1, C, inner, [&](int64_t s0, int64_t s1, int64_t c) {
      if (inner == 1) {
        for (int64_t j = s0; j < s1; j += P::size()) {
          const int64_t cnt = std::min<int64_t>(P::size(), s1 - j);
          const int64_t cc = c + (j - s0);
          P::load(dy + j, cnt, g);
          P::load(x + j, cnt, xv);
          gate.apply(g, j, cnt);
          if (dskip) P::store(dskip + j, cnt, g);
          for (int k = 0; k < NV; ++k) {
            const int64_t o = cc + 8 * k;
            r[k] = ((g[k] - fVec::loadu(pb.data() + o)) -
                    (xv[k] - fVec::loadu(pm.data() + o)) * fVec::loadu(pd.data() + o)) *
                   fVec::loadu(pa.data() + o);
          }
          P::store(dx + j, cnt, r);
        }
      } else {
        const fVec vm(mean[c]), va(a[c]), vb(b[c]), vd(d[c]);
        for (int64_t j = s0; j < s1; j += P::size()) {
          const int64_t cnt = std::min<int64_t>(P::size(), s1 - j);
          P::load(dy + j, cnt, g);
          P::load(x + j, cnt, xv);
          gate.apply(g, j, cnt);
          if (dskip) P::store(dskip + j, cnt, g);
          for (int k = 0; k < NV; ++k) r[k] = ((g[k] - vb) - (xv[k] - vm) * vd) * va;
          P::store(dx + j, cnt, r);
        }
      }
    });
  });
}

}  // namespace bn
}  // namespace CPU_CAPABILITY

// ---- Python entry points (registered in module.h) ------------------------------------------------------
namespace {

namespace kbn = fused_residual::CPU_CAPABILITY::bn;

#define FR_BN_DTYPE_SWITCH(dtype, NAME, ...)                                   \
  switch (dtype) {                                                             \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }           \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; }         \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__; break; } \
    default: TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype); \
  }

// x: CPU, dense, a supported dtype, numel a multiple of C * inner.
void bn_check_x(const at::Tensor& x, int64_t C, int64_t inner, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": unsupported dtype ", x.scalar_type(), " (float32, float16, bfloat16)");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), op, ": x must be dense (non-overlapping, no gaps), got strides ",
              x.strides());
  TORCH_CHECK(C >= 1 && inner >= 1, op, ": C and inner must be >= 1, got C=", C, " inner=", inner);
  TORCH_CHECK(x.numel() % (C * inner) == 0, op, ": numel ", x.numel(), " is not a multiple of C*inner = ",
              C * inner);
}

// An activation beside x: same device, dtype, shape and storage layout.
void bn_check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", expected ",
              x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected ", x.sizes());
  bool same = t.is_non_overlapping_and_dense();
  for (int64_t dim = 0; same && dim < t.dim(); ++dim) same = t.size(dim) <= 1 || t.stride(dim) == x.stride(dim);
  TORCH_CHECK(same, op, ": ", name, " must have x's storage layout (strides ", x.strides(), "), got strides ",
              t.strides());
}

void bn_check_vec(const at::Tensor& v, int64_t C, const char* op, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.is_contiguous() && v.numel() == C, op,
              ": ", name, " must be a contiguous float32 CPU tensor of ", C, " elements, got ", v.scalar_type(),
              " ", v.sizes(), " on ", v.device());
}

const uint8_t* bn_mask(const std::optional<at::Tensor>& mask, int64_t numel, const char* op) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kByte && mask->is_contiguous() &&
                  mask->numel() == (numel + 7) / 8,
              op, ": mask must hold ", (numel + 7) / 8, " contiguous uint8 CPU bytes, got ", mask->sizes(), " ",
              mask->scalar_type());
  return mask->data_ptr<uint8_t>();
}

// One channel: every element is channel 0 whatever the layout, so read storage as one plane.
void bn_normalize_layout(int64_t numel, int64_t C, int64_t& inner) {
  if (C == 1) inner = std::max<int64_t>(numel, 1);
}

void bn_stats(const at::Tensor& x, int64_t C, int64_t inner, const at::Tensor& mean, const at::Tensor& var) {
  constexpr const char* op = "bn_stats";
  bn_check_x(x, C, inner, op);
  bn_check_vec(mean, C, op, "mean");
  bn_check_vec(var, C, op, "var");
  const int64_t n = x.numel();
  if (n == 0) return;
  bn_normalize_layout(n, C, inner);
  py::gil_scoped_release no_gil;
  FR_BN_DTYPE_SWITCH(x.scalar_type(), op,
                     kbn::stats_t<scalar_t>(static_cast<const scalar_t*>(x.data_ptr()), n, C, inner,
                                            mean.data_ptr<float>(), var.data_ptr<float>()));
}

// The activations of a forward pass beside x (skip, out) and the mean.
void bn_check_forward_pass(const at::Tensor& x, const std::optional<at::Tensor>& skip, const at::Tensor& out,
                           const at::Tensor& mean, int64_t C, int64_t inner, const char* op) {
  bn_check_x(x, C, inner, op);
  if (skip.has_value()) bn_check_like(*skip, x, op, "skip");
  bn_check_like(out, x, op, "out");
  bn_check_vec(mean, C, op, "mean");
}

void bn_apply(const at::Tensor& x, const std::optional<at::Tensor>& skip, const at::Tensor& mean,
              const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out,
              const std::optional<at::Tensor>& mask, int64_t C, int64_t inner) {
  constexpr const char* op = "bn_apply";
  bn_check_forward_pass(x, skip, out, mean, C, inner, op);
  bn_check_vec(scale, C, op, "scale");
  bn_check_vec(shift, C, op, "shift");
  const int64_t n = x.numel();
  uint8_t* m = const_cast<uint8_t*>(bn_mask(mask, n, op));
  if (n == 0) return;
  bn_normalize_layout(n, C, inner);
  py::gil_scoped_release no_gil;
  FR_BN_DTYPE_SWITCH(
      x.scalar_type(), op,
      kbn::apply_t<scalar_t>(static_cast<const scalar_t*>(x.data_ptr()),
                             skip.has_value() ? static_cast<const scalar_t*>(skip->data_ptr()) : nullptr,
                             mean.data_ptr<float>(), scale.data_ptr<float>(), shift.data_ptr<float>(),
                             static_cast<scalar_t*>(out.data_ptr()), m, n, C, inner));
}

void bn_bwd_reduce(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& out,
                   const std::optional<at::Tensor>& mask, const at::Tensor& mean, int64_t C, int64_t inner,
                   const at::Tensor& sum_g, const at::Tensor& sum_gx) {
  constexpr const char* op = "bn_bwd_reduce";
  bn_check_x(x, C, inner, op);
  bn_check_like(dy, x, op, "dy");
  TORCH_CHECK(out.has_value() || mask.has_value(), op, ": pass out or mask (the ReLU gate)");
  if (out.has_value()) bn_check_like(*out, x, op, "out");
  bn_check_vec(mean, C, op, "mean");
  bn_check_vec(sum_g, C, op, "sum_g");
  bn_check_vec(sum_gx, C, op, "sum_gx");
  const int64_t n = x.numel();
  const uint8_t* m = bn_mask(mask, n, op);
  if (n == 0) return;
  bn_normalize_layout(n, C, inner);
  py::gil_scoped_release no_gil;
  FR_BN_DTYPE_SWITCH(
      x.scalar_type(), op,
      kbn::bwd_reduce_t<scalar_t>(static_cast<const scalar_t*>(dy.data_ptr()),
                                  static_cast<const scalar_t*>(x.data_ptr()),
                                  m == nullptr ? static_cast<const scalar_t*>(out->data_ptr()) : nullptr, m,
                                  mean.data_ptr<float>(), n, C, inner, sum_g.data_ptr<float>(),
                                  sum_gx.data_ptr<float>()));
}

// The activations of a backward pass beside x (dy, dx, dskip, the gate: out or mask) and the mean.
void bn_check_backward_pass(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& out,
                            const std::optional<at::Tensor>& mask, const at::Tensor& mean, const at::Tensor& dx,
                            const std::optional<at::Tensor>& dskip, int64_t C, int64_t inner, const char* op) {
  bn_check_x(x, C, inner, op);
  bn_check_like(dy, x, op, "dy");
  bn_check_like(dx, x, op, "dx");
  if (dskip.has_value()) bn_check_like(*dskip, x, op, "dskip");
  TORCH_CHECK(out.has_value() || mask.has_value(), op, ": pass out or mask (the ReLU gate)");
  if (out.has_value()) bn_check_like(*out, x, op, "out");
  bn_check_vec(mean, C, op, "mean");
}

void bn_bwd_apply(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& out,
                  const std::optional<at::Tensor>& mask, const at::Tensor& mean, const at::Tensor& a,
                  const at::Tensor& b, const at::Tensor& d, const at::Tensor& dx,
                  const std::optional<at::Tensor>& dskip, int64_t C, int64_t inner) {
  constexpr const char* op = "bn_bwd_apply";
  bn_check_backward_pass(dy, x, out, mask, mean, dx, dskip, C, inner, op);
  bn_check_vec(a, C, op, "a");
  bn_check_vec(b, C, op, "b");
  bn_check_vec(d, C, op, "d");
  const int64_t n = x.numel();
  const uint8_t* m = bn_mask(mask, n, op);
  if (n == 0) return;
  bn_normalize_layout(n, C, inner);
  py::gil_scoped_release no_gil;
  FR_BN_DTYPE_SWITCH(
      x.scalar_type(), op,
      kbn::bwd_apply_t<scalar_t>(static_cast<const scalar_t*>(dy.data_ptr()),
                                 static_cast<const scalar_t*>(x.data_ptr()),
                                 m == nullptr ? static_cast<const scalar_t*>(out->data_ptr()) : nullptr, m,
                                 mean.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),
                                 d.data_ptr<float>(), static_cast<scalar_t*>(dx.data_ptr()),
                                 dskip.has_value() ? static_cast<scalar_t*>(dskip->data_ptr()) : nullptr, n, C,
                                 inner));
}


// Releases the GIL for the kernels when the calling thread holds it: a call from Python holds it, the
// autograd engine runs the fast path's backward (bn_call.h) with it released.
struct GilRelease {
  std::optional<py::gil_scoped_release> release;
  GilRelease() {
    if (PyGILState_Check()) release.emplace();
  }
};

// ---- whole ops: the per-channel arithmetic between the passes in C++, one call from Python ------------------

// A per-channel vector (weight, bias, running statistics: float32 or the activation's 16-bit dtype, as AMP
// models keep them) as float32, or `fill` where absent.
std::vector<float> bn_channel_values(const std::optional<at::Tensor>& v, int64_t C, float fill, const char* op,
                                     const char* name) {
  std::vector<float> out(static_cast<size_t>(C), fill);
  if (!v.has_value()) return out;
  TORCH_CHECK(v->device().is_cpu() && v->dim() == 1 && v->numel() == C, op, ": ", name, " must be a CPU tensor of ",
              C, " elements, got ", v->sizes(), " on ", v->device());
  const int64_t st = v->stride(0);
  switch (v->scalar_type()) {
    case at::kFloat: { const float* p = v->data_ptr<float>(); for (int64_t c = 0; c < C; ++c) out[c] = p[c * st]; break; }
    case at::kHalf: { const at::Half* p = v->data_ptr<at::Half>(); for (int64_t c = 0; c < C; ++c) out[c] = p[c * st]; break; }
    case at::kBFloat16: { const at::BFloat16* p = v->data_ptr<at::BFloat16>(); for (int64_t c = 0; c < C; ++c) out[c] = p[c * st]; break; }
    default: TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", v->scalar_type());
  }
  return out;
}

// The forward of batch_norm_relu / batch_norm_add_relu: batch statistics (training; NaN for an empty x, as
// eager) or the running ones, invstd = 1 / sqrt(var + eps), then out = relu(x_hat * weight + bias [+ skip])
// and the mask. mean, invstd and var (float32, C) are outputs; as the separate primitives compute them.
void bn_forward(const at::Tensor& x, const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                const std::optional<at::Tensor>& running_var, bool training, double eps, const at::Tensor& out,
                const std::optional<at::Tensor>& mask, const at::Tensor& mean, const at::Tensor& invstd,
                const at::Tensor& var, int64_t C, int64_t inner) {
  constexpr const char* op = "bn_forward";
  bn_check_forward_pass(x, skip, out, mean, C, inner, op);
  bn_check_vec(invstd, C, op, "invstd");
  bn_check_vec(var, C, op, "var");
  const int64_t n = x.numel();
  uint8_t* m = const_cast<uint8_t*>(bn_mask(mask, n, op));
  float* pmean = mean.data_ptr<float>();
  float* pvar = var.data_ptr<float>();
  float* pinv = invstd.data_ptr<float>();
  if (training) {
    if (n == 0) {
      std::fill(pmean, pmean + C, std::numeric_limits<float>::quiet_NaN());
      std::fill(pvar, pvar + C, std::numeric_limits<float>::quiet_NaN());
    }
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), op, ": eval mode needs the running statistics");
    const std::vector<float> rm = bn_channel_values(running_mean, C, 0.f, op, "running_mean");
    const std::vector<float> rv = bn_channel_values(running_var, C, 0.f, op, "running_var");
    std::copy(rm.begin(), rm.end(), pmean);
    std::copy(rv.begin(), rv.end(), pvar);
  }
  const std::vector<float> w = bn_channel_values(weight, C, 1.f, op, "weight");
  const std::vector<float> b = bn_channel_values(bias, C, 0.f, op, "bias");
  int64_t in = inner;
  bn_normalize_layout(n, C, in);
  const GilRelease no_gil;  // also called from the autograd engine's threads (bn_call.h)
  if (training && n > 0) {
    FR_BN_DTYPE_SWITCH(x.scalar_type(), op,
                       kbn::stats_t<scalar_t>(static_cast<const scalar_t*>(x.data_ptr()), n, C, in, pmean, pvar));
  }
  std::vector<float> scale(static_cast<size_t>(C));
  const float feps = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) {
    pinv[c] = 1.f / std::sqrt(pvar[c] + feps);  // torch.rsqrt(var + eps) in float32
    scale[c] = weight.has_value() ? pinv[c] * w[c] : pinv[c];
  }
  if (n == 0) return;
  FR_BN_DTYPE_SWITCH(
      x.scalar_type(), op,
      kbn::apply_t<scalar_t>(static_cast<const scalar_t*>(x.data_ptr()),
                             skip.has_value() ? static_cast<const scalar_t*>(skip->data_ptr()) : nullptr, pmean,
                             scale.data(), b.data(), static_cast<scalar_t*>(out.data_ptr()), m, n, C, in));
}

// The backward: the per-channel sums (training, or where weight / bias need gradients), a = invstd * weight,
// b = sum_g / count, d = invstd^2 * sum_gx / count (training; 0 in eval), then dx and dskip in one pass;
// grad_weight = sum_gx * invstd and grad_bias = sum_g (float32, C) are outputs.
void bn_backward(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& out,
                 const std::optional<at::Tensor>& mask, const at::Tensor& mean, const at::Tensor& invstd,
                 const std::optional<at::Tensor>& weight, bool training, bool param_grads, const at::Tensor& dx,
                 const std::optional<at::Tensor>& dskip, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                 int64_t C, int64_t inner) {
  constexpr const char* op = "bn_backward";
  bn_check_backward_pass(dy, x, out, mask, mean, dx, dskip, C, inner, op);
  bn_check_vec(invstd, C, op, "invstd");
  bn_check_vec(grad_weight, C, op, "grad_weight");
  bn_check_vec(grad_bias, C, op, "grad_bias");
  const int64_t n = x.numel();
  const uint8_t* m = bn_mask(mask, n, op);
  const std::vector<float> w = bn_channel_values(weight, C, 1.f, op, "weight");
  float* sum_gx = grad_weight.data_ptr<float>();  // the sums land in the outputs, then become them
  float* sum_g = grad_bias.data_ptr<float>();
  std::fill(sum_gx, sum_gx + C, 0.f);
  std::fill(sum_g, sum_g + C, 0.f);
  const float* pmean = mean.data_ptr<float>();
  const float* pinv = invstd.data_ptr<float>();
  int64_t in = inner;
  bn_normalize_layout(n, C, in);
  const GilRelease no_gil;  // also called from the autograd engine's threads (bn_call.h)
  const void* gate = m == nullptr ? out->data_ptr() : nullptr;
  if (n > 0 && (training || param_grads)) {
    FR_BN_DTYPE_SWITCH(
        x.scalar_type(), op,
        kbn::bwd_reduce_t<scalar_t>(static_cast<const scalar_t*>(dy.data_ptr()),
                                    static_cast<const scalar_t*>(x.data_ptr()), static_cast<const scalar_t*>(gate), m,
                                    pmean, n, C, in, sum_g, sum_gx));
  }
  std::vector<float> a(static_cast<size_t>(C)), b(static_cast<size_t>(C), 0.f), d(static_cast<size_t>(C), 0.f);
  const float count = static_cast<float>(C > 0 ? n / C : 0);
  for (int64_t c = 0; c < C; ++c) {
    a[c] = weight.has_value() ? pinv[c] * w[c] : pinv[c];
    if (training) {  // as the float32 tensor arithmetic of the generic path computes them
      b[c] = sum_g[c] / count;
      d[c] = pinv[c] * pinv[c] * sum_gx[c] / count;
    }
  }
  if (n > 0) {
    FR_BN_DTYPE_SWITCH(
        x.scalar_type(), op,
        kbn::bwd_apply_t<scalar_t>(static_cast<const scalar_t*>(dy.data_ptr()),
                                   static_cast<const scalar_t*>(x.data_ptr()), static_cast<const scalar_t*>(gate), m,
                                   pmean, a.data(), b.data(), d.data(), static_cast<scalar_t*>(dx.data_ptr()),
                                   dskip.has_value() ? static_cast<scalar_t*>(dskip->data_ptr()) : nullptr, n, C, in));
  }
  for (int64_t c = 0; c < C; ++c) sum_gx[c] *= pinv[c];  // grad_weight = sum(g * (x - mean)) * invstd
}

// running = (1 - momentum) * running + momentum * batch, the variance unbiased (count / (count - 1)), in
// place, for float32 buffers (F.batch_norm's update; others take the tensor arithmetic), with the buffers'
// version counters bumped as F.batch_norm's in-place update bumps them.
void bn_update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                       const at::Tensor& var, int64_t count, double momentum) {
  constexpr const char* op = "bn_update_running";
  const int64_t C = mean.numel();
  bn_check_vec(mean, C, op, "mean");
  bn_check_vec(var, C, op, "var");
  bn_check_vec(running_mean, C, op, "running_mean");
  bn_check_vec(running_var, C, op, "running_var");
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  const float* pm = mean.data_ptr<float>();
  const float* pv = var.data_ptr<float>();
  const float mom = static_cast<float>(momentum), keep = static_cast<float>(1.0 - momentum);
  const float unbias = count > 1 ? static_cast<float>(static_cast<double>(count) / static_cast<double>(count - 1)) : 1.f;
  // As running.mul_(keep).add_(batch, alpha=mom) computes it: the product rounded, then one fused
  // multiply-add (ATen's add with alpha).
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = std::fma(pm[c], mom, rm[c] * keep);
    rv[c] = std::fma(pv[c] * unbias, mom, rv[c] * keep);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
}

#undef FR_BN_DTYPE_SWITCH

}  // namespace
}  // namespace fused_residual

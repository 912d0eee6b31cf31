// CPU kernels of fused_residual, written once and compiled once per instruction set.
//
// Each extension module (`ext_<isa>.cpp`, built by setup.py with that instruction set's compiler flags)
// defines CPU_CAPABILITY and includes module.h, which includes this header: the code below lands in
// namespace fused_residual::<isa> with ATen's Vectorized<T> at that width. Python imports the module that
// matches torch.backends.cpu.get_cpu_capability() (which honours ATEN_CPU_CAPABILITY).
//
// Numerics follow eager PyTorch on CPU bit for bit:
//   forward   out = relu(z + skip): the sum in fp32, ReLU keeps NaN and -0.0 (CPU eager's clamp_min);
//   backward  gin = grad where not (out <= 0) else +0: a select, so kept gradients are copied unchanged.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_kernels.h"
#endif

namespace fused_residual {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// Elements per mask byte group handled by one task: 64 elements = 8 mask bytes, so no byte is shared by
// two threads.
constexpr int64_t kChunk = 64;
// Chunks per parallel task (~32K elements, the grain ATen uses for elementwise ops).
constexpr int64_t kGrainChunks = 512;

inline float relu_scalar(float x) { return x < 0.f ? 0.f : x; }  // NaN and -0.0 pass
inline bool relu_keeps(float out) { return !(out <= 0.f); }    // gradient gate

#if defined(CPU_CAPABILITY_AVX2)
// maxps returns its second operand when either is NaN and when both are zeros: max(+0, x) is x for NaN
// and -0.0, 0 for x < 0.
inline fVec relu_vec(const fVec& x) { return _mm256_max_ps(_mm256_setzero_ps(), x); }
#else
inline fVec relu_vec(const fVec& x) { return fVec::blendv(x, fVec(0.f), x < fVec(0.f)); }
#endif
// A lambda, not a function, so that map2 inlines it.
constexpr auto gate_vec = [](const fVec& grad, const fVec& out) {
  return fVec::blendv(grad, fVec(0.f), out <= fVec(0.f));
};

// Mask bits of one fVec (8 lanes): bit j set where not (y[j] <= 0), i.e. y > 0 or NaN.
static_assert(fVec::size() == 8, "mask packing assumes 8 floats per Vectorized<float>");

inline uint8_t keep_bits(const fVec& y) {
#if defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_NLE_UQ)));
#else
  float v[8];
  y.store(v);
  uint8_t bits = 0;
  for (int j = 0; j < 8; ++j) bits |= uint8_t(relu_keeps(v[j])) << j;
  return bits;
#endif
}

// g where bit j of `bits` is set, +0 elsewhere: an AND with an all-ones or all-zeros lane, so kept values
// keep their bits.
#if defined(CPU_CAPABILITY_AVX2)
// The 256 lane masks of a mask byte (8 KiB, L1-resident): gating is one load and one AND.
struct GateTable {
  alignas(32) uint32_t lanes[256][8];
};
constexpr GateTable make_gate_table() {
  GateTable t{};
  for (int b = 0; b < 256; ++b)
    for (int j = 0; j < 8; ++j) t.lanes[b][j] = ((b >> j) & 1) ? 0xFFFFFFFFu : 0u;
  return t;
}
inline constexpr GateTable kGateTable = make_gate_table();
#endif

inline fVec gate_bits(const fVec& g, uint8_t bits) {
#if defined(CPU_CAPABILITY_AVX2)
  return _mm256_and_ps(g, _mm256_load_ps(reinterpret_cast<const float*>(kGateTable.lanes[bits])));
#else
  float v[8];
  g.store(v);
  for (int j = 0; j < 8; ++j) v[j] = ((bits >> j) & 1) ? v[j] : 0.f;
  return fVec::loadu(v);
#endif
}

// ---- packs: n <= size() elements of T as kVecs fp32 vectors ---------------------------------------------
template <typename T>
struct Pack {  // Half / BFloat16: one Vectorized<T> = two fVecs
  static constexpr int kVecs = 2;
  static constexpr int64_t size() { return Vectorized<T>::size(); }
  static void load(const T* p, int64_t n, fVec (&v)[kVecs]) {
    auto x = n == size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(x);
  }
  static void store(T* p, int64_t n, const fVec (&v)[kVecs]) {
    auto x = at::vec::convert_from_float<T>(v[0], v[1]);
    if (n == size()) x.store(p); else x.store(p, n);
  }
};

template <>
struct Pack<float> {
  static constexpr int kVecs = 1;
  static constexpr int64_t size() { return fVec::size(); }
  static void load(const float* p, int64_t n, fVec (&v)[kVecs]) {
    v[0] = n == size() ? fVec::loadu(p) : fVec::loadu(p, n);
  }
  static void store(float* p, int64_t n, const fVec (&v)[kVecs]) {
    if (n == size()) v[0].store(p); else v[0].store(p, n);
  }
};

// out[i] = f(a[i], b[i]) over [i0, i1) in fp32. With `mask` (i0 a multiple of 8), also the gate bits of
// each result: one byte per fVec.
template <typename T, typename F>
inline void map2(const T* a, const T* b, T* out, int64_t i0, int64_t i1, F f, uint8_t* mask = nullptr) {
  using P = Pack<T>;
  fVec va[P::kVecs], vb[P::kVecs], r[P::kVecs];
  for (int64_t i = i0; i < i1; i += P::size()) {
    const int64_t n = std::min<int64_t>(P::size(), i1 - i);
    P::load(a + i, n, va);
    P::load(b + i, n, vb);
    for (int k = 0; k < P::kVecs; ++k) r[k] = f(va[k], vb[k]);
    P::store(out + i, n, r);
    if (mask) {
      for (int k = 0; k < P::kVecs && i + 8 * k < i1; ++k) {
        // lanes past i1 were loaded as zeros and give 0 bits
        mask[(i >> 3) + k] = keep_bits(r[k]);
      }
    }
  }
}

// gin[i] = grad[i] where its mask bit is set, else +0, over [i0, i1) with i0 a multiple of 8.
template <typename T>
inline void gate_from_mask(const T* grad, const uint8_t* mask, T* gin, int64_t i0, int64_t i1) {
  using P = Pack<T>;
  fVec g[P::kVecs];
  for (int64_t i = i0; i < i1; i += P::size()) {
    const int64_t n = std::min<int64_t>(P::size(), i1 - i);
    P::load(grad + i, n, g);
    for (int k = 0; k < P::kVecs; ++k) g[k] = i + 8 * k < i1 ? gate_bits(g[k], mask[(i >> 3) + k]) : g[k];
    P::store(gin + i, n, g);
  }
}

// mask bytes for out[i0, i1), i0 a multiple of 8.
template <typename T>
inline void pack_mask(const T* out, uint8_t* mask, int64_t i0, int64_t i1) {
  using P = Pack<T>;
  fVec v[P::kVecs];
  for (int64_t i = i0; i < i1; i += P::size()) {
    const int64_t n = std::min<int64_t>(P::size(), i1 - i);
    P::load(out + i, n, v);
    for (int k = 0; k < P::kVecs && i + 8 * k < i1; ++k) mask[(i >> 3) + k] = keep_bits(v[k]);
  }
}

// Runs f(i0, i1) over [0, n) in parallel, cut at multiples of kChunk elements.
template <typename F>
inline void parallel_chunks(int64_t n, F f) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
    f(c0 * kChunk, std::min(n, c1 * kChunk));
  });
}

// ---- add + ReLU ----------------------------------------------------------------------------------------------
template <typename T>
void add_relu_fwd_flat_t(const void* z, const void* skip, void* out, uint8_t* mask, int64_t n) {
  auto zp = static_cast<const T*>(z);
  auto sp = static_cast<const T*>(skip);
  auto op = static_cast<T*>(out);
  parallel_chunks(n, [&](int64_t i0, int64_t i1) {
    map2(zp, sp, op, i0, i1, [](const fVec& a, const fVec& b) { return relu_vec(a + b); }, mask);
  });
}

template <typename T>
void add_relu_bwd_flat_t(const void* grad, const void* out, const uint8_t* mask, void* gin, int64_t n) {
  auto gp = static_cast<const T*>(grad);
  auto op = static_cast<const T*>(out);
  auto ip = static_cast<T*>(gin);
  parallel_chunks(n, [&](int64_t i0, int64_t i1) {
    if (mask) {
      gate_from_mask(gp, mask, ip, i0, i1);
    } else {
      map2(gp, op, ip, i0, i1, gate_vec);
    }
  });
}

template <typename T>
void relu_mask_flat_t(const void* out, uint8_t* mask, int64_t n) {
  auto op = static_cast<const T*>(out);
  parallel_chunks(n, [&](int64_t i0, int64_t i1) { pack_mask(op, mask, i0, i1); });
}

// out (any strides) = relu(z + skip); a TensorIterator walks the layouts the flat kernel cannot.
template <typename T>
void add_relu_fwd_strided_t(const at::Tensor& z, const at::Tensor& skip, const at::Tensor& out) {
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(z)
                  .add_const_input(skip)
                  .check_all_same_dtype(true)
                  .build();
  iter.for_each([](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    for (int64_t j = 0; j < n1; ++j) {
      char* o = data[0] + j * strides[3];
      const char* a = data[1] + j * strides[4];
      const char* b = data[2] + j * strides[5];
      for (int64_t i = 0; i < n0; ++i) {
        const float s = static_cast<float>(*reinterpret_cast<const T*>(a + i * strides[1])) +
                        static_cast<float>(*reinterpret_cast<const T*>(b + i * strides[2]));
        *reinterpret_cast<T*>(o + i * strides[0]) = static_cast<T>(relu_scalar(s));
      }
    }
  });
}

template <typename T>
void add_relu_bwd_strided_t(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gin) {
  auto iter = at::TensorIteratorConfig()
                  .add_output(gin)
                  .add_const_input(grad)
                  .add_const_input(out)
                  .check_all_same_dtype(true)
                  .build();
  iter.for_each([](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    for (int64_t j = 0; j < n1; ++j) {
      char* o = data[0] + j * strides[3];
      const char* g = data[1] + j * strides[4];
      const char* r = data[2] + j * strides[5];
      for (int64_t i = 0; i < n0; ++i) {
        const T gv = *reinterpret_cast<const T*>(g + i * strides[1]);
        const float rv = static_cast<float>(*reinterpret_cast<const T*>(r + i * strides[2]));
        *reinterpret_cast<T*>(o + i * strides[0]) = relu_keeps(rv) ? gv : T(0);
      }
    }
  });
}

// ---- GEMM epilogue and its backward (CPU GEMM path) ---------------------------------------------------
// out = relu(out + bias[col] + residual) in place; out is [M, N] contiguous, residual (optional) has any
// strides (already added by addmm when it could be), bias (optional) is [N].
template <typename T>
void bias_relu_rows_t(const at::Tensor& out, const at::Tensor& bias) {
  const int64_t M = out.size(0), N = out.size(1);
  T* op = out.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* row = op + m * N;
      if (bp) {
        map2(row, bp, row, 0, N, [](const fVec& a, const fVec& b) { return relu_vec(a + b); });
      } else {
        map2(row, row, row, 0, N, [](const fVec& a, const fVec&) { return relu_vec(a); });
      }
    }
  });
}

// gm = grad where not (out <= 0) else 0, and colsum[n] = sum_m gm[m, n] in fp32. Rows are summed in fixed
// blocks of kRowBlock, then the block partials in order: the result does not depend on the thread count.
constexpr int64_t kRowBlock = 256;

template <typename T>
void relu_grad_colsum_t(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gm,
                          const at::Tensor& colsum) {
  const int64_t M = grad.size(0), N = grad.size(1);
  const T* gp = grad.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  T* mp = gm.data_ptr<T>();
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::Tensor partial;
  float* pp = nullptr;
  if (colsum.defined()) {
    partial = at::zeros({blocks, N}, grad.options().dtype(at::kFloat));
    pp = partial.data_ptr<float>();
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * kRowBlock, m1 = std::min(M, m0 + kRowBlock);
      map2(gp + m0 * N, op + m0 * N, mp + m0 * N, 0, (m1 - m0) * N, gate_vec);
      if (pp) {
        float* acc = pp + b * N;
        for (int64_t m = m0; m < m1; ++m) {
          const T* row = mp + m * N;
          for (int64_t n = 0; n < N; ++n) acc[n] += static_cast<float>(row[n]);
        }
      }
    }
  });
  if (pp) {
    float* cp = colsum.data_ptr<float>();
    std::fill(cp, cp + N, 0.f);
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t n = 0; n < N; ++n) cp[n] += pp[b * N + n];
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fused_residual

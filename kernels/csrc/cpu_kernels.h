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

inline fVec relu_vec(const fVec& x) { return fVec::blendv(x, fVec(0.f), x < fVec(0.f)); }
// A lambda, not a function, so that map2 inlines it.
constexpr auto gate_vec = [](const fVec& grad, const fVec& out) {
  return fVec::blendv(grad, fVec(0.f), out <= fVec(0.f));
};

// ---- load/store of n <= size() elements as fp32 vectors --------------------------------------------------
// For float a "pack" is one fVec; for Half/BFloat16 a pack is Vectorized<T> = two fVecs.
template <typename T>
struct Pack {
  static constexpr int64_t size() { return Vectorized<T>::size(); }
  static void load(const T* p, int64_t n, fVec& lo, fVec& hi) {
    auto v = n == size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(v);
  }
  static void store(T* p, int64_t n, const fVec& lo, const fVec& hi) {
    auto v = at::vec::convert_from_float<T>(lo, hi);
    if (n == size()) v.store(p); else v.store(p, n);
  }
  template <typename F>
  static void apply2(const T* a, const T* b, T* out, int64_t n, F f) {
    fVec a0, a1, b0, b1;
    load(a, n, a0, a1);
    load(b, n, b0, b1);
    store(out, n, f(a0, b0), f(a1, b1));
  }
};

template <>
struct Pack<float> {
  static constexpr int64_t size() { return fVec::size(); }
  template <typename F>
  static void apply2(const float* a, const float* b, float* out, int64_t n, F f) {
    if (n == size()) {
      f(fVec::loadu(a), fVec::loadu(b)).store(out);
    } else {
      f(fVec::loadu(a, n), fVec::loadu(b, n)).store(out, n);
    }
  }
};

// out[i] = f(a[i], b[i]) over [i0, i1), in fp32.
template <typename T, typename F>
inline void map2(const T* a, const T* b, T* out, int64_t i0, int64_t i1, F f) {
  constexpr int64_t V = Pack<T>::size();
  int64_t i = i0;
  for (; i + V <= i1; i += V) Pack<T>::apply2(a + i, b + i, out + i, V, f);
  if (i < i1) Pack<T>::apply2(a + i, b + i, out + i, i1 - i, f);
}

// mask bytes for out[i0, i1), i0 a multiple of 8.
template <typename T>
inline void pack_mask(const T* out, uint8_t* mask, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 8) {
    uint8_t byte = 0;
    const int64_t n = std::min<int64_t>(8, i1 - i);
    for (int64_t j = 0; j < n; ++j) byte |= uint8_t(relu_keeps(static_cast<float>(out[i + j]))) << j;
    mask[i / 8] = byte;
  }
}

template <typename T>
inline void gate_from_mask(const T* grad, const uint8_t* mask, T* gin, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) gin[i] = ((mask[i >> 3] >> (i & 7)) & 1) ? grad[i] : T(0);
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
    map2(zp, sp, op, i0, i1, [](const fVec& a, const fVec& b) { return relu_vec(a + b); });
    if (mask) pack_mask(op, mask, i0, i1);  // reads back the chunk just written, still in L1
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
void masked_grad_colsum_t(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gm,
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

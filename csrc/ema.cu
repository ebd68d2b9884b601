// Multi-tensor EMA, the CUDA C++ twin of kernels/ema.py's Triton kernel (same chunk table, same arithmetic):
// target <- momentum * target + weight * online (weight = 1 - momentum), optionally writing a low-precision copy
// of the new target in the same pass. One thread block per table row (one chunk of one tensor).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per vector access: 16 B of fp32, 8 B of bf16

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ float load_f32(T x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x) { return static_cast<T>(x); }

template <typename T, typename O, typename C, bool kCopy>
__global__ void __launch_bounds__(kThreads) ema_update_kernel(const int64_t* __restrict__ table, T* base_t,
                                                              const O* base_o, C* base_c, float momentum,
                                                              float weight) {
  // Table rows: element offsets of the three tensors from the first tensor of their list, first and end element.
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * 5;
  T* t = base_t + row[0];
  const O* o = base_o + row[1];
  C* c = kCopy ? base_c + row[2] : nullptr;
  const int64_t start = row[3], end = row[4];

  // Vector path when every pointer is aligned to its vector width (fresh allocations are; FSDP2 shards may not).
  const auto addr = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };
  const bool aligned = addr(t + start) % sizeof(Vec<T>) == 0 && addr(o + start) % sizeof(Vec<O>) == 0 &&
                       (!kCopy || addr(c + start) % sizeof(Vec<C>) == 0);
  int64_t i = start;
  if (aligned) {
    const int64_t vec_end = start + (end - start) / kVec * kVec;
    for (int64_t j = start + static_cast<int64_t>(threadIdx.x) * kVec; j < vec_end; j += kThreads * kVec) {
      Vec<T> vt = *reinterpret_cast<const Vec<T>*>(t + j);
      const Vec<O> vo = *reinterpret_cast<const Vec<O>*>(o + j);
      Vec<C> vc;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float v = momentum * load_f32(vt.v[k]) + weight * load_f32(vo.v[k]);
        vt.v[k] = from_f32<T>(v);
        if constexpr (kCopy) vc.v[k] = from_f32<C>(v);
      }
      *reinterpret_cast<Vec<T>*>(t + j) = vt;
      if constexpr (kCopy) *reinterpret_cast<Vec<C>*>(c + j) = vc;
    }
    i = vec_end;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += kThreads) {
    const float v = momentum * load_f32(t[j]) + weight * load_f32(o[j]);
    t[j] = from_f32<T>(v);
    if constexpr (kCopy) c[j] = from_f32<C>(v);
  }
}

template <typename T, typename C, bool kCopy>
void launch(const at::Tensor& table, const at::Tensor& target, const at::Tensor& online,
            const std::optional<at::Tensor>& copy, double momentum, double weight) {
  const int64_t rows = table.size(0);
  if (rows == 0) return;
  C* base_c = kCopy ? reinterpret_cast<C*>(copy->data_ptr()) : nullptr;
  ema_update_kernel<T, T, C, kCopy><<<static_cast<unsigned>(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      table.data_ptr<int64_t>(), reinterpret_cast<T*>(target.data_ptr()),
      reinterpret_cast<const T*>(online.data_ptr()), base_c, static_cast<float>(momentum), static_cast<float>(weight));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_with_copy(const at::Tensor& table, const at::Tensor& target, const at::Tensor& online,
                      const std::optional<at::Tensor>& copy, double momentum, double weight) {
  if (!copy.has_value()) return launch<T, T, false>(table, target, online, copy, momentum, weight);
  switch (copy->scalar_type()) {
    case at::kFloat: return launch<T, float, true>(table, target, online, copy, momentum, weight);
    case at::kHalf: return launch<T, __half, true>(table, target, online, copy, momentum, weight);
    case at::kBFloat16: return launch<T, __nv_bfloat16, true>(table, target, online, copy, momentum, weight);
    default: TORCH_CHECK(false, "ema_update: copy dtype ", copy->scalar_type(), " unsupported; use fp32/fp16/bf16");
  }
}

}  // namespace

// table: [C, 5] int64 on the tensors' device (kernels/ema.py: build_chunk_table); target_like, online_like and
// copy_like are the first tensor of each list: the bases the table's offsets count from, and the dtypes.
void ema_update_cuda(const at::Tensor& table, const at::Tensor& target_like, const at::Tensor& online_like,
                     const std::optional<at::Tensor>& copy_like, double momentum, double weight) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 5,
              "ema_update: the chunk table must be a [C, 5] int64 CUDA tensor");
  TORCH_CHECK(target_like.scalar_type() == online_like.scalar_type(), "ema_update (CUDA): target dtype ",
              target_like.scalar_type(), " != online dtype ", online_like.scalar_type(),
              "; use the Triton backend for mixed dtypes");
  const c10::cuda::CUDAGuard guard(table.device());
  switch (target_like.scalar_type()) {
    case at::kFloat: return launch_with_copy<float>(table, target_like, online_like, copy_like, momentum, weight);
    case at::kHalf: return launch_with_copy<__half>(table, target_like, online_like, copy_like, momentum, weight);
    case at::kBFloat16:
      return launch_with_copy<__nv_bfloat16>(table, target_like, online_like, copy_like, momentum, weight);
    default: TORCH_CHECK(false, "ema_update: target dtype ", target_like.scalar_type(), " unsupported");
  }
}

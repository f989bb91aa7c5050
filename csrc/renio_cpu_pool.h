// A small cache of gradient-sized CPU buffers.
//
// A (B*T, V) gradient is hundreds of MB: glibc serves it with a fresh mmap and unmaps it when the
// tensor dies, so every training step pays one page fault (and the kernel's zeroing) per 4 KiB of
// it, a third of a forward+backward at a 152k vocabulary on the reference VM. The CUDA caching
// allocator avoids this on GPUs; on CPU torch does not. Gradients of at least kMinCachedBytes are
// therefore carved from buffers that go back to this cache when their tensor is freed, and the
// next call reuses them with their pages already mapped. The cache holds at most kMaxBlocks
// buffers between calls (the memory of the last gradients, not more); cache_empty() returns them
// to the OS and cache_set_enabled(false) turns the cache off (renio_kernels.set_cpu_grad_cache).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace renio {

constexpr int64_t kMinCachedBytes = int64_t{1} << 20;
constexpr size_t kMaxBlocks = 2;

// A contiguous tensor of `sizes` and `dtype` for a kernel to fill completely (its contents are
// undefined). *fresh tells whether its pages may be untouched, i.e. worth prefaulting.
at::Tensor empty_grad(at::IntArrayRef sizes, c10::ScalarType dtype, bool* fresh);

// Frees every cached buffer; buffers still held by tensors return to the OS when freed.
void cache_empty();
// {enabled, cached bytes, cached buffers, reuses, new allocations} since the process started.
std::vector<int64_t> cache_info();
// Enables or disables the cache (disabling also empties it); returns the previous setting.
bool cache_set_enabled(bool enabled);

}  // namespace renio

// The gradient-buffer cache of renio_cpu_pool.h and its ops.
#include "renio_cpu_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

namespace renio {
namespace {

class GradCache {
 public:
  // Never destroyed: tensors freed during interpreter shutdown still call release().
  static GradCache& get() {
    static GradCache* cache = new GradCache;
    return *cache;
  }

  // The smallest cached buffer that holds `bytes`, else a new one (fresh = true).
  void* acquire(size_t bytes, size_t* capacity, bool* fresh) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_) {
        size_t best = free_.size();
        for (size_t i = 0; i < free_.size(); ++i) {
          const bool fits = free_[i].second >= bytes;
          if (fits && (best == free_.size() || free_[i].second < free_[best].second)) best = i;
        }
        if (best != free_.size()) {
          void* ptr = free_[best].first;
          *capacity = free_[best].second;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
          ++hits_;
          *fresh = false;
          return ptr;
        }
        ++misses_;
      }
    }
    *capacity = bytes;
    *fresh = true;
    return c10::alloc_cpu(bytes);
  }

  // Keeps the buffer for the next call, dropping the smallest cached one beyond kMaxBlocks.
  void release(void* ptr, size_t capacity) {
    std::pair<void*, size_t> evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!enabled_) {
        evicted = {ptr, capacity};
      } else {
        free_.emplace_back(ptr, capacity);
        if (free_.size() > kMaxBlocks) {
          auto smallest = free_.begin();
          for (auto it = free_.begin(); it != free_.end(); ++it) {
            if (it->second < smallest->second) smallest = it;
          }
          evicted = *smallest;
          free_.erase(smallest);
        }
      }
    }
    if (evicted.first != nullptr) c10::free_cpu(evicted.first);
  }

  void empty() {
    std::vector<std::pair<void*, size_t>> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped.swap(free_);
    }
    for (auto& block : dropped) c10::free_cpu(block.first);
  }

  bool set_enabled(bool enabled) {
    bool previous;
    {
      std::lock_guard<std::mutex> lock(mu_);
      previous = enabled_;
      enabled_ = enabled;
    }
    if (!enabled) empty();
    return previous;
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t bytes = 0;
    for (auto& block : free_) bytes += static_cast<int64_t>(block.second);
    return {enabled_ ? 1 : 0, bytes, static_cast<int64_t>(free_.size()), hits_, misses_};
  }

 private:
  GradCache() {
    const char* env = std::getenv("RENIO_CPU_GRAD_CACHE");
    enabled_ = env == nullptr || std::strcmp(env, "0") != 0;
  }

  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
  bool enabled_ = true;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace

at::Tensor empty_grad(at::IntArrayRef sizes, c10::ScalarType dtype, bool* fresh) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (bytes < kMinCachedBytes) {
    *fresh = false;
    return at::empty(sizes, options);
  }
  size_t capacity = 0;
  void* ptr = GradCache::get().acquire(static_cast<size_t>(bytes), &capacity, fresh);
  return at::for_blob(ptr, sizes)
      .options(options)
      .deleter([capacity](void* p) { GradCache::get().release(p, capacity); })
      .make_tensor();
}

void cache_empty() { GradCache::get().empty(); }

std::vector<int64_t> cache_info() { return GradCache::get().info(); }

bool cache_set_enabled(bool enabled) { return GradCache::get().set_enabled(enabled); }

}  // namespace renio

TORCH_LIBRARY_FRAGMENT(renio_kernels_cpu, m) {
  m.def("grad_cache_empty() -> ()", &renio::cache_empty);
  m.def("grad_cache_info() -> int[]", &renio::cache_info);
  m.def("grad_cache_set_enabled(bool enabled) -> bool", &renio::cache_set_enabled);
}

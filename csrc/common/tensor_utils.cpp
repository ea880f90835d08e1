#include "common/tensor_utils.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedmtl {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Buffers at least this large come from the cache below; smaller ones from torch's allocator, where
// glibc recycles them without page faults anyway.
constexpr size_t kCachedMinBytes = 2 * kHugePage;

size_t cache_limit_bytes() {
  const char* mb = std::getenv("FUSEDMTL_CPU_CACHE_MB");
  return (mb != nullptr ? std::strtoull(mb, nullptr, 10) : 1024) << 20;
}

// Large output buffers that were freed, kept for reuse. A fresh allocation of this size is a new
// mmap whose pages fault in on first write (about as costly as the loss itself at 16M elements);
// a training loop allocates the same gradient sizes every step, so reusing them skips that, the way
// the CUDA caching allocator does for GPU memory. Bounded by FUSEDMTL_CPU_CACHE_MB (default 1024;
// 0 disables it); buffers are 2 MiB aligned and advised for transparent huge pages.
class LargeBufferCache {
 public:
  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].nbytes == nbytes) {
          void* data = free_[i].data;
          cached_bytes_ -= nbytes;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return data;
        }
      }
    }
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(data != nullptr, "fusedmtl: out of memory allocating ", nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, rounded, MADV_HUGEPAGE);  // advisory: without THP it keeps 4 KiB pages
#endif
    return data;
  }

  void give(void* data, size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + nbytes <= limit_ && free_.size() < kMaxEntries) {
        free_.push_back({data, nbytes});
        cached_bytes_ += nbytes;
        return;
      }
    }
    std::free(data);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& entry : free_) std::free(entry.data);
    free_.clear();
    cached_bytes_ = 0;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  struct Entry {
    void* data;
    size_t nbytes;
  };
  static constexpr size_t kMaxEntries = 16;
  std::mutex mutex_;
  std::vector<Entry> free_;
  size_t cached_bytes_ = 0;
  const size_t limit_ = cache_limit_bytes();
};

LargeBufferCache& large_buffer_cache() {
  static auto* cache =
      new LargeBufferCache();  // never destroyed: tensors may outlive static teardown
  return *cache;
}

}  // namespace

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return ScalarKind::Double;
    case at::kHalf:
      return ScalarKind::Half;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    default:
      return ScalarKind::Float;
  }
}

at::Tensor empty_for_overwrite(const at::Tensor& like) {
  const at::TensorOptions options = like.options().memory_format(at::MemoryFormat::Contiguous);
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (!like.is_cpu() || nbytes < kCachedMinBytes) {
    return at::empty(like.sizes(), options);
  }
  void* data = large_buffer_cache().take(nbytes);
  return at::from_blob(
      data, like.sizes(), [nbytes](void* p) { large_buffer_cache().give(p, nbytes); },
      like.options());
}

void empty_cpu_cache() { large_buffer_cache().clear(); }

size_t cpu_cache_bytes() { return large_buffer_cache().cached_bytes(); }

}  // namespace fusedmtl

#include "common/tensor_utils.h"

#include <ATen/ops/empty.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedmtl {
namespace {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t stop = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHugePage - 1);
  if (stop > start) {
    // Advisory only: a kernel without THP simply keeps 4 KiB pages.
    madvise(reinterpret_cast<void*>(start), stop - start, MADV_HUGEPAGE);
  }
#endif
}

}  // namespace

at::Tensor empty_for_overwrite(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.is_cpu() && out.nbytes() >= 2 * kHugePage) {
    advise_huge_pages(out.data_ptr(), out.nbytes());
  }
  return out;
}

}  // namespace fusedmtl

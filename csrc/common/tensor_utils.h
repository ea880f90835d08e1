#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

#include "common/cpu_scalar.h"

namespace fusedmtl {

// The CPU kernels' name for a floating dtype (float32 for anything they do not take).
ScalarKind scalar_kind(at::ScalarType dtype);

// A contiguous tensor with the shape and options of `like`, for an op to write every element of.
// Large CPU buffers come from a bounded cache of freed ones (see tensor_utils.cpp): a fresh one
// page-faults on first touch, which costs more than the arithmetic of a memory-bound loss.
at::Tensor empty_for_overwrite(const at::Tensor& like);

// Frees the cached CPU buffers (fusedmtl.empty_cache()).
void empty_cpu_cache();
// Bytes held by the cache.
size_t cpu_cache_bytes();

}  // namespace fusedmtl

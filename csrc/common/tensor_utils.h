#pragma once

#include <ATen/core/Tensor.h>

namespace fusedmtl {

// A contiguous tensor with the shape and options of `like`, for an op to write every element of.
// Large CPU buffers are advised for transparent huge pages before their first write: a fresh
// allocation over glibc's mmap threshold otherwise page-faults once per 4 KiB on first touch, which
// costs more than the arithmetic of a memory-bound loss (see BUILD_NOTES).
at::Tensor empty_for_overwrite(const at::Tensor& like);

}  // namespace fusedmtl

// Run-time choice among CPU kernels compiled once per instruction set (see CMakeLists.txt).
//
// Kernel translation units are compiled with FUSEDMTL_CPU_CAPABILITY=default|avx2|avx512 and put
// everything they define in the namespace FUSEDMTL_CPU_NS (isa_default, isa_avx2, isa_avx512), so
// the copies never collide. They include no torch headers: inline functions of a header compiled
// with -mavx512f could otherwise be picked by the linker for every caller.
#pragma once

#include "common/macros.h"

#ifdef FUSEDMTL_CPU_CAPABILITY
#define FUSEDMTL_CPU_NS FUSEDMTL_CONCAT(isa_, FUSEDMTL_CPU_CAPABILITY)
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define FUSEDMTL_HAVE_X86_KERNELS 1
#else
#define FUSEDMTL_HAVE_X86_KERNELS 0
#endif

namespace fusedmtl {

enum class CpuCapability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The capability kernels run with: the best this CPU supports, lowered by the environment variable
// FUSEDMTL_CPU_CAPABILITY=default|avx2|avx512 or by set_cpu_capability (tests use it to run every
// variant on one machine).
CpuCapability cpu_capability();
// Returns the capability actually in force: a request above what the CPU supports is lowered.
CpuCapability set_cpu_capability(const char* name);
const char* cpu_capability_name(CpuCapability capability);

// A kernel with one implementation per capability.
template <typename Fn>
struct CpuKernel {
  Fn default_impl;
  Fn avx2_impl;
  Fn avx512_impl;

  Fn get() const {
    switch (cpu_capability()) {
      case CpuCapability::AVX512:
        return avx512_impl;
      case CpuCapability::AVX2:
        return avx2_impl;
      default:
        return default_impl;
    }
  }
};

}  // namespace fusedmtl

// Declares namespace::isa_*::name for each compiled capability and defines a CpuKernel for them.
#if FUSEDMTL_HAVE_X86_KERNELS
#define FUSEDMTL_CPU_KERNEL(ns, name, type)                                       \
  namespace ns::isa_default {                                                     \
  type name;                                                                      \
  }                                                                               \
  namespace ns::isa_avx2 {                                                        \
  type name;                                                                      \
  }                                                                               \
  namespace ns::isa_avx512 {                                                      \
  type name;                                                                      \
  }                                                                               \
  namespace ns {                                                                  \
  inline const ::fusedmtl::CpuKernel<decltype(&isa_default::name)> name##_kernel{ \
      &isa_default::name, &isa_avx2::name, &isa_avx512::name};                    \
  }
#else
#define FUSEDMTL_CPU_KERNEL(ns, name, type)                                       \
  namespace ns::isa_default {                                                     \
  type name;                                                                      \
  }                                                                               \
  namespace ns {                                                                  \
  inline const ::fusedmtl::CpuKernel<decltype(&isa_default::name)> name##_kernel{ \
      &isa_default::name, &isa_default::name, &isa_default::name};                \
  }
#endif

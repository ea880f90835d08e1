#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/cpu_capability.h"

namespace fusedmtl {
namespace {

CpuCapability supported_capability() {
#if FUSEDMTL_HAVE_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuCapability::AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return CpuCapability::AVX2;
  }
#endif
  return CpuCapability::Default;
}

bool parse_capability(const char* name, CpuCapability* out) {
  if (name == nullptr) return false;
  if (std::strcmp(name, "default") == 0)
    *out = CpuCapability::Default;
  else if (std::strcmp(name, "avx2") == 0)
    *out = CpuCapability::AVX2;
  else if (std::strcmp(name, "avx512") == 0)
    *out = CpuCapability::AVX512;
  else
    return false;
  return true;
}

CpuCapability lowered_to_supported(CpuCapability requested) {
  const CpuCapability supported = supported_capability();
  return static_cast<int>(requested) < static_cast<int>(supported) ? requested : supported;
}

CpuCapability initial_capability() {
  CpuCapability requested = CpuCapability::AVX512;
  parse_capability(std::getenv("FUSEDMTL_CPU_CAPABILITY"), &requested);
  return lowered_to_supported(requested);
}

std::atomic<int>& capability_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_capability())};
  return slot;
}

}  // namespace

CpuCapability cpu_capability() {
  return static_cast<CpuCapability>(capability_slot().load(std::memory_order_relaxed));
}

CpuCapability set_cpu_capability(const char* name) {
  CpuCapability requested;
  if (parse_capability(name, &requested)) {
    capability_slot().store(static_cast<int>(lowered_to_supported(requested)));
  }
  return cpu_capability();
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::AVX512:
      return "avx512";
    case CpuCapability::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace fusedmtl

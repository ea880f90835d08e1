#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

#include "linalg/jacobi_math.h"
#include "linalg/linalg.h"

namespace fusedmtl::linalg {
namespace {

void check_matrix(const char* op, const at::Tensor& A) {
  TORCH_CHECK(A.dim() >= 2, op, ": expected A of shape [..., m, n], got ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", A.scalar_type());
}

// A's batch dimensions followed by tail.
std::vector<int64_t> batched(const at::Tensor& A, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_outputs(const at::Tensor& A) {
  constexpr const char* op = "fusedmtl.linalg.jacobi_svd";
  check_matrix(op, A);
  const int64_t m = A.size(-2), n = A.size(-1);
  TORCH_CHECK(1 <= n && n <= m, op, ": expected 1 <= n <= m for A of shape [..., m, n], got ",
              A.sizes());
  TORCH_CHECK(n <= kMaxColumns && m <= kMaxRows, op, ": at most ", kMaxRows, " rows and ",
              kMaxColumns, " columns (a small-matrix kernel), got ", A.sizes());
  return {at::empty(batched(A, {m, n}), A.options()), at::empty(batched(A, {n}), A.options()),
          at::empty(batched(A, {n, n}), A.options())};
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_outputs(const at::Tensor& A) {
  constexpr const char* op = "fusedmtl.linalg.jacobi_eigh";
  check_matrix(op, A);
  const int64_t n = A.size(-1);
  TORCH_CHECK(A.size(-2) == n && n >= 1, op, ": expected a square A of shape [..., n, n], got ",
              A.sizes());
  TORCH_CHECK(n <= kMaxColumns, op, ": at most ", kMaxColumns,
              " rows and columns (a small-matrix kernel), got ", A.sizes());
  return {at::empty(batched(A, {n}), A.options()), at::empty(batched(A, {n, n}), A.options())};
}

}  // namespace fusedmtl::linalg

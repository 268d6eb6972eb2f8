// Gathering a strided MLX array's elements into row-major order, for primitives that take
// their inputs as they come (a slice, a transpose) instead of asking the graph for a Contiguous
// node: a decode step would pay for that node on every product and layer (~3 us of MLX's
// scheduling each, ~2,000 nodes a token). Shared by the decode kernels and the qmm extension.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace octomil {

// dst (row-major, a.size() elements) = a's elements, a of any strides.
template <typename T>
void gather_rows(const mlx::core::array& a, T* dst) {
  const T* src = a.data<T>();
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  const int dims = static_cast<int>(shape.size());
  std::vector<int> index(dims, 0);
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t at = 0;
    for (int d = 0; d < dims; ++d) at += index[d] * strides[d];
    dst[i] = src[at];
    for (int d = dims - 1; d >= 0 && ++index[d] == shape[d]; --d) index[d] = 0;
  }
}

// a's elements in row-major order: its own data when row-contiguous, else a gathered copy kept in
// scratch (which must outlive the returned pointer).
template <typename T>
const T* row_major(const mlx::core::array& a, std::vector<T>& scratch) {
  if (a.flags().row_contiguous) return a.data<T>();
  scratch.resize(a.size());
  gather_rows(a, scratch.data());
  return scratch.data();
}

}  // namespace octomil

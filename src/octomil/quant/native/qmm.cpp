// The qmm extension: an MLX primitive whose CPU evaluation runs qkernel.c's quantized products.
//
// A primitive (rather than a call from Python) keeps the products inside MLX's lazy graphs: a
// decode step stays one graph, evaluated once, with no synchronisation per layer.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <sstream>
#include <vector>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "qkernel.h"
#include "strided_rows.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

class QuantizedRowsMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedRowsMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    const auto& scales = inputs[2];
    const auto& biases = inputs[3];
    for (size_t i = 1; i < inputs.size(); ++i)
      if (!inputs[i].flags().row_contiguous)
        throw std::runtime_error("[octomil_qmm] weights must be row-contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);
    qmm_job job{};
    job.k = static_cast<int>(x.shape(-1));
    job.rows = static_cast<int>(x.size() / job.k);
    job.n = static_cast<int>(out.shape(-1));
    job.bits = bits_;
    job.group_size = group_size_;
    job.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
    job.half_scales = scales.dtype() == mx::float16;
    job.scales = scales.data<void>();
    job.biases = biases.data<void>();
    job.out = out.data<float>();
    // A strided x (a slice, a transpose) is gathered on the stream's thread: cheaper than a
    // Contiguous node per product in the graph, which every decode step would pay for.
    encoder.dispatch([job, x]() mutable {
      std::vector<float> scratch;
      job.x = octomil::row_major(x, scratch);
      if (!qmm_run(&job)) throw std::runtime_error("[octomil_qmm] unsupported product shape");
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[octomil_qmm] CPU only");
  }

  // d(x W^T)/dx = g W with W dequantized by MLX's own op (slow on the CPU, but only calibration
  // differentiates through compact weights: its adapters learn through the frozen head).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg != 0)
        throw std::invalid_argument(
            "[octomil_qmm] gradients only with respect to x: compact weights are frozen");
      // fp32 scales: with fp16 ones MLX dequantizes in fp16 (relative error ~5e-4).
      auto scales = mx::astype(primals[2], mx::float32, stream());
      auto biases = mx::astype(primals[3], mx::float32, stream());
      auto w = mx::dequantize(primals[1], scales, biases, group_size_, bits_, "affine",
                              std::nullopt, mx::float32, stream());
      grads.push_back(mx::matmul(mx::astype(cotangents[0], mx::float32, stream()), w, stream()));
    }
    return grads;
  }

  const char* name() const override { return "OctomilQuantizedRowsMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedRowsMatmul&>(other);
    return o.group_size_ == group_size_ && o.bits_ == bits_;
  }

 private:
  int group_size_;
  int bits_;
};

// y = x @ dequantize(w, scales, biases).T for MLX affine-quantized w (uint32 packed, (n, k*bits/32)).
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits) {
  auto stream = mx::to_stream(std::monostate{});
  if (bits != 4 && bits != 8) throw std::invalid_argument("[octomil_qmm] bits must be 4 or 8");
  if (group_size <= 0 || group_size % 32)
    throw std::invalid_argument("[octomil_qmm] group_size must be a multiple of 32");
  if (w.ndim() != 2 || w.dtype() != mx::uint32)
    throw std::invalid_argument("[octomil_qmm] w must be 2-D uint32");
  const int k = static_cast<int>(w.shape(1)) * 32 / bits;
  const int n = static_cast<int>(w.shape(0));
  if (x.ndim() < 1 || x.shape(-1) != k || k % group_size) {
    std::ostringstream msg;
    msg << "[octomil_qmm] x's last dimension must be " << k;
    throw std::invalid_argument(msg.str());
  }
  mx::Shape groups{n, k / group_size};
  if (scales.shape() != groups || biases.shape() != groups)
    throw std::invalid_argument("[octomil_qmm] scales and biases must be (n, k / group_size)");
  if ((scales.dtype() != mx::float32 && scales.dtype() != mx::float16) ||
      biases.dtype() != scales.dtype())
    throw std::invalid_argument("[octomil_qmm] scales and biases must be both float32 or float16");
  auto out_shape = x.shape();
  out_shape.back() = n;
  // No reshape or copy nodes: the primitive takes x as it is (any leading shape, any strides).
  auto xf = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream);
  return mx::array(out_shape, mx::float32,
                   std::make_shared<QuantizedRowsMatmul>(stream, group_size, bits),
                   {xf, w, scales, biases});
}

}  // namespace

NB_MODULE(_octomil_qmm, m) {
  m.doc() = "Octomil's quantized products for MLX's CPU backend (see qkernel.c)";
  m.def("quantized_matmul", &quantized_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("group_size"), nb::arg("bits"),
        "x @ dequantize(w, scales, biases).T without materialising the fp32 weights.");
  m.def("isa", []() { return std::string(qmm_isa()); });
  m.def("select_isa", [](const std::string& name) { return qmm_select_isa(name.c_str()) != 0; });
  m.def("calls", [](bool prefill) { return qmm_calls(prefill ? 1 : 0); }, nb::arg("prefill"));
  m.attr("max_rows") = static_cast<int>(QMM_MAX_ROWS);
}

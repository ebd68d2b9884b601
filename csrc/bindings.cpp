// Python bindings of fastjepa._C (built only with FASTJEPA_BUILD_CUDA=1; see setup.py).
#include <torch/extension.h>

#include <optional>

void ema_update_cuda(const at::Tensor& table, const at::Tensor& target_like, const at::Tensor& online_like,
                     const std::optional<at::Tensor>& copy_like, double momentum, double weight);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ema_update", &ema_update_cuda,
        "Multi-tensor EMA over a [C, 5] chunk table: target <- momentum * target + weight * online (+ copy)",
        py::arg("table"), py::arg("target_like"), py::arg("online_like"), py::arg("copy_like"),
        py::arg("momentum"), py::arg("weight"));
}

// textgpt2._C: one def per launcher (csrc/launchers.h), nothing else. Argument checking lives
// in textgpt2/ops.py, the only caller.
#include <pybind11/pybind11.h>

#include "launchers.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "textgpt2 CUDA kernels (raw pointers; call through textgpt2.ops)";

    m.def("encoder_forward", &encoder_forward, py::arg("out"), py::arg("idx"), py::arg("wte"),
          py::arg("wpe"), py::arg("B"), py::arg("T"), py::arg("C"), py::arg("V"),
          py::arg("dtype"), py::arg("stream"));
    m.def("encoder_backward_scratch_size", &encoder_backward_scratch_size, py::arg("B"),
          py::arg("T"), py::arg("C"), py::arg("V"));
    m.def("encoder_backward", &encoder_backward, py::arg("dwte"), py::arg("dwpe"),
          py::arg("scratch"), py::arg("dout"), py::arg("idx"), py::arg("plan"), py::arg("B"),
          py::arg("T"), py::arg("C"), py::arg("V"), py::arg("dtype"), py::arg("stream"));
    m.def("encoder_backward_plan_size", &encoder_backward_plan_size, py::arg("B"), py::arg("T"),
          py::arg("C"));
    m.def("encoder_backward_plan", &encoder_backward_plan, py::arg("plan"), py::arg("ids"),
          py::arg("B"), py::arg("T"), py::arg("C"), py::arg("V"));
    m.def("encoder_backward_plan_layout", &encoder_backward_plan_layout, py::arg("out"),
          py::arg("B"), py::arg("T"), py::arg("C"));

    m.def("layernorm_forward", &layernorm_forward, py::arg("out"), py::arg("mean"),
          py::arg("rstd"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("N"),
          py::arg("C"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
    m.def("layernorm_backward_scratch_size", &layernorm_backward_scratch_size, py::arg("N"),
          py::arg("C"));
    m.def("layernorm_backward", &layernorm_backward, py::arg("dx"), py::arg("dweight"),
          py::arg("dbias"), py::arg("scratch"), py::arg("dout"), py::arg("x"),
          py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("N"), py::arg("C"),
          py::arg("dtype"), py::arg("stream"));

    m.def("residual_forward", &residual_forward, py::arg("out"), py::arg("a"), py::arg("b"),
          py::arg("n"), py::arg("dtype"), py::arg("stream"));

    m.def("bias_forward", &bias_forward, py::arg("out"), py::arg("x"), py::arg("bias"),
          py::arg("N"), py::arg("OC"), py::arg("dtype"), py::arg("stream"));
    m.def("bias_backward_scratch_size", &bias_backward_scratch_size, py::arg("N"),
          py::arg("OC"));
    m.def("bias_backward", &bias_backward, py::arg("dbias"), py::arg("scratch"),
          py::arg("dout"), py::arg("N"), py::arg("OC"), py::arg("dtype"), py::arg("stream"));
    m.def("gelu_forward", &gelu_forward, py::arg("out"), py::arg("x"), py::arg("n"),
          py::arg("dtype"), py::arg("stream"));
    m.def("gelu_backward", &gelu_backward, py::arg("dx"), py::arg("x"), py::arg("dout"),
          py::arg("n"), py::arg("dtype"), py::arg("stream"));

    m.def("cross_entropy_forward_backward", &cross_entropy_forward_backward, py::arg("losses"),
          py::arg("dlogits"), py::arg("logits"), py::arg("targets"), py::arg("N"), py::arg("V"),
          py::arg("Vp"), py::arg("dloss_scale"), py::arg("dtype"), py::arg("stream"));

    m.def("global_norm_scratch_size", &global_norm_scratch_size, py::arg("n"));
    m.def("global_norm_squared", &global_norm_squared, py::arg("out"), py::arg("scratch"),
          py::arg("grads"), py::arg("n"), py::arg("stream"));
    m.def("adamw_update", &adamw_update, py::arg("params"), py::arg("grads"), py::arg("m"),
          py::arg("v"), py::arg("norm_sq"), py::arg("n"), py::arg("n_decay"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
          py::arg("max_norm"), py::arg("step"), py::arg("stream"));

    m.def("attention_forward", &attention_forward, py::arg("out"), py::arg("lse"),
          py::arg("qkv"), py::arg("B"), py::arg("T"), py::arg("C"), py::arg("H"),
          py::arg("dtype"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"),
          py::arg("stream"));
    m.def("attention_backward_scratch_size", &attention_backward_scratch_size, py::arg("B"),
          py::arg("T"), py::arg("H"));
    m.def("attention_backward", &attention_backward, py::arg("dqkv"), py::arg("scratch"),
          py::arg("dout"), py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("B"),
          py::arg("T"), py::arg("C"), py::arg("H"), py::arg("dtype"), py::arg("dropout_p"),
          py::arg("seed"), py::arg("offset"), py::arg("stream"));

    m.def("dropout_forward", &dropout_forward, py::arg("out"), py::arg("x"), py::arg("seed"),
          py::arg("offset"), py::arg("n"), py::arg("p"), py::arg("dtype"), py::arg("stream"));
    m.def("dropout_backward", &dropout_backward, py::arg("dx"), py::arg("dout"), py::arg("seed"),
          py::arg("offset"), py::arg("n"), py::arg("p"), py::arg("dtype"), py::arg("stream"));
}

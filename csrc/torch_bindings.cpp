// The only file that registers kernels. Schemas are defined in Python (blip_fast/ops/*.py), so
// a build without this extension still has every op; these blocks add the C++ kernels for the
// devices they cover and take precedence there over the Python reference kernels.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(blip_fast, CPU, m) {
  m.impl("cross_attention_fwd", &blip_fast::cross_attention_fwd);
  m.impl("cross_attention_bwd", &blip_fast::cross_attention_bwd);
  m.impl("attention_fwd", &blip_fast::attention_fwd);
  m.impl("attention_bwd", &blip_fast::attention_bwd);
  m.impl("itc_fwd", &blip_fast::itc_fwd);
  m.impl("itc_bwd", &blip_fast::itc_bwd);
  m.impl("gathered_cross_attention_fwd", &blip_fast::gathered_cross_attention_fwd);
  m.impl("gathered_cross_attention_bwd", &blip_fast::gathered_cross_attention_bwd);
  m.impl("lm_head_loss_fwd", &blip_fast::lm_head_loss_fwd);
  m.impl("lm_head_loss_bwd", &blip_fast::lm_head_loss_bwd);
}

#ifdef BLIP_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(blip_fast, CUDA, m) {
  // No CUDA backward yet: cross_attention_bwd and gathered_cross_attention_bwd on CUDA run the
  // Python reference kernels (training on CUDA takes the Triton family).
  m.impl("cross_attention_fwd", &blip_fast::cross_attention_fwd);
  // No C++ CUDA itc_bwd: blip_fast/ops/itc.py registers the Triton backward for that key.
  m.impl("itc_fwd", &blip_fast::itc_fwd);
  m.impl("gathered_cross_attention_fwd", &blip_fast::gathered_cross_attention_fwd);
  // No C++ CUDA lm_head_loss: blip_fast/ops/lm_head_loss.py registers the Triton family.
}
#endif

// `from blip_fast import _C` only needs a module object: loading the library runs the
// registrations above. No pybind11 (FlashAttention 3's flash_api.cpp does the same).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}

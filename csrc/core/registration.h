// Argument checks shared by the torch-typed host functions in csrc/ops/. Each message names the
// op, the argument and what is wrong with it, so a caller can fix the call without this code.
// `op` is the op's name, e.g. "cross_attention_fwd".
#pragma once

#include <c10/util/Exception.h>

// x sits on ref's device.
#define CHECK_DEVICE(op, x, ref)                                                               \
  TORCH_CHECK((x).device() == (ref).device(), op, ": " #x " is on ", (x).device(), " but " #ref \
              " is on ", (ref).device())

// x has ref's dtype.
#define CHECK_DTYPE(op, x, ref)                                                       \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), op, ": " #x " has dtype ",    \
              (x).scalar_type(), " but " #ref " has dtype ", (ref).scalar_type())

// x's sizes are exactly the listed ones.
#define CHECK_SHAPE(op, x, ...)                                                                \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), op, ": " #x " must have shape ", \
              c10::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

// Each op family registers its Python bindings from its own file (csrc/<op>_bindings.cpp);
// bindings.cpp creates the module and calls them. Adding an op family adds one line here and
// one call in bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace fastdiff {

void bind_lincomb(pybind11::module_& m);
void bind_group_norm(pybind11::module_& m);
void bind_threshold(pybind11::module_& m);
void bind_schedule(pybind11::module_& m);

}  // namespace fastdiff

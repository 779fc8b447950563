// Launching an emulated kernel the way the CUDA driver launches a real one: from cuLaunchKernel's
// kernelParams, an array of pointers to each argument's bytes. tests/test_nvrtc_path.py builds, per kernel
// file, a library whose emu_launch_by_name() maps the NVRTC name expressions fastconv/_nvrtc.py launches to
// emu_call on the instantiation, so the Python side's launch plans and packed arguments run unchanged.
#pragma once

#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu.h"

// 0 on success; 1 when the argument count differs from the kernel's parameter count, 2 + i when argument i's
// size differs from its parameter's (a ctypes mirror out of step with the kernel).
template <typename... Params, size_t... I>
void emu_call_unpacked(void (*kernel)(Params...), unsigned grid, int block, size_t smem, void** params,
                       std::index_sequence<I...>) {
  std::tuple<std::decay_t<Params>...> values;
  (std::memcpy(static_cast<void*>(&std::get<I>(values)), params[I], sizeof(std::get<I>(values))), ...);
  emu_launch(dim3(grid), block, smem, kernel, std::get<I>(values)...);
}

template <typename... Params>
int emu_call(void (*kernel)(Params...), unsigned grid, int block, size_t smem, void** params, const size_t* sizes,
             int count) {
  if (count != static_cast<int>(sizeof...(Params))) return 1;
  const size_t expected[] = {sizeof(std::decay_t<Params>)...};
  for (int i = 0; i < count; ++i)
    if (sizes[i] != expected[i]) return 2 + i;
  emu_call_unpacked(kernel, grid, block, smem, params, std::index_sequence_for<Params...>{});
  return 0;
}

// Fixed-width integer types for headers shared by the host compiler, nvcc and NVRTC: NVRTC compiles
// device code without the C library's headers, so it gets the (LP64) typedefs instead of <stdint.h>.
#pragma once

#if defined(__CUDACC_RTC__)
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif

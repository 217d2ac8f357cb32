// The native CPU build (csrc/cpu, ccam_kernels/cpu_native.py) compiles with -fvisibility=hidden:
// only the C entry points marked CCAM_CPU_EXPORT are visible to ctypes.
#pragma once

#define CCAM_CPU_EXPORT extern "C" __attribute__((visibility("default")))

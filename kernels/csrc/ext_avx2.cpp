// fused_residual._C_avx2: the CPU kernels built with -mavx2 -mfma -mf16c (setup.py adds the flags).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "module.h"

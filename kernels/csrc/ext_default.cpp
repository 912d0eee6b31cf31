// fused_residual._C: the CPU kernels built for any x86-64 / other CPU (ATen's generic Vectorized).
#define CPU_CAPABILITY DEFAULT
#include "module.h"

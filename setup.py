"""Build and install fused_residual.

The C++ CPU kernels (``kernels/csrc``) are compiled ahead of time into ``fused_residual._C`` with ninja
through torch's cpp_extension, so a compiler is needed at install time only, and a broken toolchain shows
up at install rather than in the middle of a training run. They need torch at build time:

    pip install --no-build-isolation -e .

Environment switches:
    FUSED_RESIDUAL_BUILD_CPP=0   skip the C++ build (the ``cpp`` backend then reports why it cannot run)
    MAX_JOBS=N                   parallel compile jobs (torch's cpp_extension reads it)

If the build is skipped or fails, the package still installs and imports; ``fused-residual info`` names
the cause.
"""

import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("kernels", "csrc")


def cpp_extensions():
    if os.environ.get("FUSED_RESIDUAL_BUILD_CPP", "1") == "0":
        print("fused_residual: FUSED_RESIDUAL_BUILD_CPP=0, not building the C++ CPU kernels", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # torch is needed to build; without it we install the pure-Python parts.
        print(f"fused_residual: torch not importable at build time ({exc}); not building the C++ CPU "
              "kernels. Install torch first and use `pip install --no-build-isolation`.", file=sys.stderr)
        return [], {}
    import platform

    common = ["-O3", "-fopenmp", "-Wno-unused-function"]  # -fopenmp: at::parallel_for is OpenMP inline code
    depends = [os.path.join(CSRC, f) for f in ("cpu_kernels.h", "module.h")]
    exts = [CppExtension("fused_residual._C", [os.path.join(CSRC, "ext_default.cpp")], depends=depends,
                         extra_compile_args=common, extra_link_args=["-fopenmp"])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The same kernels with AVX2 Vectorized<T>; Python imports it where torch reports AVX2 or better.
        exts.append(CppExtension("fused_residual._C_avx2", [os.path.join(CSRC, "ext_avx2.cpp")], depends=depends,
                                 extra_compile_args=common + ["-mavx2", "-mfma", "-mf16c"],
                                 extra_link_args=["-fopenmp"]))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="fused_residual",
    version="0.1.0",
    description="Fused Triton and CPU kernels for residual blocks: add+ReLU and GEMM + bias + residual + ReLU",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fused_residual", "fused_residual.*"]) + ["fused_residual._kernels"],
    package_dir={"fused_residual._kernels": "kernels"},
    package_data={"fused_residual._kernels": ["csrc/*.h", "csrc/*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "torchvision", "timm", "hypothesis"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fused-residual = fused_residual.cli:main"]},
)

"""Build and install fused_residual.

The C++ CPU kernels (``kernels/csrc``) are compiled ahead of time into ``fused_residual._C`` with ninja
through torch's cpp_extension, so a compiler is needed at install time only, and a broken toolchain shows
up at install rather than in the middle of a training run. They need torch at build time:

    pip install --no-build-isolation -e .

Environment switches:
    FUSED_RESIDUAL_BUILD_CPP=auto  (default) build; if compiling fails, warn and install without the kernels
    FUSED_RESIDUAL_BUILD_CPP=1     build, and fail the install if compiling fails (scripts/setup.sh, CI)
    FUSED_RESIDUAL_BUILD_CPP=0     skip the C++ build
    MAX_JOBS=N                     parallel compile jobs (torch's cpp_extension reads it)

Without the kernels the package still installs and imports; the ``cpp`` backend and ``fused-residual info``
name the cause.
"""

import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("kernels", "csrc")


BUILD_CPP = os.environ.get("FUSED_RESIDUAL_BUILD_CPP", "auto").lower()
if BUILD_CPP not in ("auto", "0", "1"):
    raise SystemExit(f"FUSED_RESIDUAL_BUILD_CPP must be auto, 0 or 1, got {BUILD_CPP!r}")


def cpp_extensions():
    if BUILD_CPP == "0":
        print("fused_residual: FUSED_RESIDUAL_BUILD_CPP=0, not building the C++ CPU kernels", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # torch is needed to build; without it we install the pure-Python parts.
        message = (f"fused_residual: torch not importable at build time ({exc}); not building the C++ CPU "
                   "kernels. Install torch first and use `pip install --no-build-isolation`.")
        if BUILD_CPP == "1":
            raise SystemExit(message)
        print(message, file=sys.stderr)
        return [], {}
    import platform

    common = ["-O3", "-fopenmp", "-Wno-unused-function"]  # -fopenmp: at::parallel_for is OpenMP inline code
    depends = [os.path.join(CSRC, f) for f in ("cpu_kernels.h", "module.h", "batch_norm.h", "bn_call.h")]
    exts = [CppExtension("fused_residual._C", [os.path.join(CSRC, "ext_default.cpp")], depends=depends,
                         extra_compile_args=common, extra_link_args=["-fopenmp"])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The same kernels with AVX2 Vectorized<T>; Python imports it where torch reports AVX2 or better.
        exts.append(CppExtension("fused_residual._C_avx2", [os.path.join(CSRC, "ext_avx2.cpp")], depends=depends,
                                 extra_compile_args=common + ["-mavx2", "-mfma", "-mf16c"],
                                 extra_link_args=["-fopenmp"]))

    class OptionalBuildExtension(BuildExtension):
        """Builds with ninja; under FUSED_RESIDUAL_BUILD_CPP=auto a failed build is reported, not fatal."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: install the pure-Python parts
                if BUILD_CPP == "1":
                    raise
                print(f"fused_residual: building {ext.name} failed ({type(exc).__name__}: {exc}); installing "
                      "without it (set FUSED_RESIDUAL_BUILD_CPP=1 to make this an error)", file=sys.stderr)

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="fused_residual",
    version="0.1.0",
    description="Fused Triton and CPU kernels for residual blocks: add+ReLU and GEMM + bias + residual + ReLU",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fused_residual", "fused_residual.*"])
    + ["fused_residual._kernels", "fused_residual._benchmarks"],
    # kernels/ and benchmarks/ live at the top of the repository and install inside the package (a top-level
    # ``kernels`` or ``benchmarks`` module would clash with other distributions of those names).
    package_dir={"fused_residual._kernels": "kernels", "fused_residual._benchmarks": "benchmarks"},
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
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["fused-residual = fused_residual.cli:main"]},
)

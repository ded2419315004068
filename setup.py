"""fasttrain: fast-loading, high-throughput ETMAE trainer for chest X-ray ViTs.

`converters/` and `kernels/` are top-level folders in the repo but install as
`fasttrain.converters` and `fasttrain.kernels` (package_dir mapping), so no generic
top-level names land in site-packages.
"""
from setuptools import setup

VERSION = "0.1.0"

setup(
    name="fasttrain",
    version=VERSION,
    description="ETMAE: knowledge-distilled tiny masked autoencoders for chest X-rays, trained fast",
    python_requires=">=3.10",
    packages=[
        "fasttrain",
        "fasttrain.models",
        "fasttrain.data",
        "fasttrain.train",
        "fasttrain.eval",
        "fasttrain.serve",
        "fasttrain.workflows",
        "fasttrain.format",
        "fasttrain.bench",
        "fasttrain.converters",
        "fasttrain.kernels",
    ],
    package_dir={
        "fasttrain": "fasttrain",
        "fasttrain.converters": "converters",
        "fasttrain.kernels": "kernels",
    },
    install_requires=[
        # Pinned: these wheels lie on local disk; an unpinned torch downloads gigabytes.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0",
        "numpy>=1.24",
        "numba>=0.59",
        "scikit-learn>=1.3",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=10",
        "simplejpeg>=1.7",
        # converters: 8/16-bit grey PNG through libpng, 1.6-2.3x PIL, bit-identical (issue 14); optional
        # at run time (PIL decodes the same pixels without it)
        "imagecodecs>=2024.1",
        "pydicom>=2.4",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        # ffcv needs: apt-get install -y --no-install-recommends pkg-config libturbojpeg0-dev libopencv-dev
        "ffcv": ["ffcv==1.0.2", "opencv-python-headless", "pyturbojpeg<2", "numba>=0.59"],
        # torch 2.14.1 is a CUDA 13 build: use DALI's CUDA 13 wheel.
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        # fasttrain export --format onnx: onnxscript for torch's dynamo exporter, onnxruntime to check the file
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        "dev": ["pytest>=7", "pytest-timeout>=2", "onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
    },
    entry_points={"console_scripts": ["fasttrain=fasttrain.cli:main"]},
)

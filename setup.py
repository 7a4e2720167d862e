from setuptools import find_packages, setup

setup(
    name="glm-engine",
    version="0.1.0",
    description="A Megatron-style parallel training engine for GLM models, with the "
                "LightChatGLM pruning + distillation recipe",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "engine", "engine.*",
                                    "kernels", "kernels.*"]),
    # torch is pinned by the Makefile (the CPU wheel on this machine); any 2.x >= 2.4 works
    install_requires=["torch>=2.4", "numpy", "sentencepiece", "safetensors", "sacrebleu"],
    extras_require={
        "test": ["pytest"],
        "triton": ["triton"],
        # plots for runners/report.py (make paper); the tables need nothing extra
        "report": ["matplotlib"],
        # --train.tensorboard: metrics.jsonl's scalars as TensorBoard event files
        "tensorboard": ["tensorboard"],
        # more zh_CN gettext catalogues to extract training pairs from
        "data": ["jupyterlab-language-pack-zh-cn", "sphinx", "django"],
    },
)

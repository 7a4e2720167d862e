"""A from-scratch GLM (ChatGLM2/3 blocks, GLM blank infilling) in raw torch.
Single-device code: nothing here imports engine/."""
from model.config import GLMConfig, PRESETS
from model.glm import GLM

__all__ = ["GLM", "GLMConfig", "PRESETS"]

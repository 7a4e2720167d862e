"""The LightChatGLM recipe: data, compression, fine-tuning, evaluation, reports."""

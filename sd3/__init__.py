"""The SD3 components and file formats: the VAE, safetensors checkpoints and atomic writes, LoRA students, the diffusers export and model cards."""

"""Spectral editing of LoRA adapters: compact SVD, exact sensitivities, edit modes."""

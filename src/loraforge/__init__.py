"""loraforge: fine-tune, edit and evaluate LoRA adapters as Kubernetes batch jobs."""

__version__ = "0.1.0"

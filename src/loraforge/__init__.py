"""loraforge: fine-tune, edit and evaluate LoRA adapters as Kubernetes batch jobs."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns at import time that an optional kernel from the Hugging Face
# Hub is missing; it falls back to its own kernels, and the Hub is not a dependency here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

"""The Llama-family model, at its historical import path.

The model families live in ``reference/models/`` (one module per architecture);
``reference.models.build_model(config)`` picks one by ``model_type``. This module
keeps ``from reference.model import Model, ModelArgs`` working.
"""

from .models.llama import Model, ModelArgs

__all__ = ["Model", "ModelArgs"]

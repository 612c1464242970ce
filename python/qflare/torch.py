"""PyTorch helpers: a model's ``state_dict`` to and from QFLARE weights.

Only floating tensors are federated (the enclave aggregates in float32);
integer buffers such as BatchNorm's ``num_batches_tracked`` stay local and
are left out of the weights, and out of the file you register with
``qflare model init``. Importing this module needs ``torch``; the rest of
the package does not.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
import torch

__all__ = ["state_dict_to_weights", "load_weights", "save_initial_model"]


def state_dict_to_weights(model: torch.nn.Module) -> Dict[str, np.ndarray]:
    """The model's floating parameters and buffers as float32 NumPy arrays."""
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def load_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Copies ``weights`` into the model (cast to each tensor's dtype and device).

    Every floating tensor of the model must be present; integer buffers are
    left as they are.
    """
    state = model.state_dict()
    floating = {name for name, tensor in state.items() if tensor.is_floating_point()}
    missing = floating - set(weights)
    extra = set(weights) - floating
    if missing or extra:
        raise KeyError(f"weights do not fit the model: missing {sorted(missing)}, extra {sorted(extra)}")
    with torch.no_grad():
        for name in floating:
            state[name].copy_(torch.from_numpy(np.asarray(weights[name])))
    return model


def save_initial_model(model: torch.nn.Module, path: str) -> None:
    """Writes the model's floating tensors as the safetensors file to register."""
    from safetensors.numpy import save_file

    save_file(state_dict_to_weights(model), path)

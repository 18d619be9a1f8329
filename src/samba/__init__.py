"""Samba: a chunked Mamba language model with an attention readout, trained to be sparse."""

from .config import ModelConfig, Params, load_params
from .model import Samba, SambaOutput

__all__ = ["ModelConfig", "Params", "Samba", "SambaOutput", "load_params"]
__version__ = "0.1.0"

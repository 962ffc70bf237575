"""IP-Adapter-Plus on SDXL or SD 1.5: the personalization model PatchDPO trains and evaluates."""

from .attention_processor import IPAttnProcessor, adapter_modules_of, install_ip_adapter, set_ip_adapter_scale
from .checkpoint import load_adapter_state, load_ip_adapter_checkpoint, save_ip_adapter
from .ip_adapter import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, IPAdapterPlus, IPAdapterPlusXL
from .resampler import Resampler

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_PROMPT",
    "IPAdapterPlus",
    "IPAdapterPlusXL",
    "IPAttnProcessor",
    "Resampler",
    "adapter_modules_of",
    "install_ip_adapter",
    "load_adapter_state",
    "load_ip_adapter_checkpoint",
    "save_ip_adapter",
    "set_ip_adapter_scale",
]

"""The latent grid quality maps are made at: training resolution / the base model's latent scale.

The maps must match the latents training computes, so the scale is asked of the model's family
(`base_models`: the VAE's downsampling, and any packing of latent cells), from the model's
configs (`<model>/vae/config.json`, a folder or a Hugging Face id), instead of being typed by hand.
"""

from __future__ import annotations

import json
import os

from common.errors import BadInputError
from common.hub import resolve_file

VAE_CONFIG = "vae/config.json"


def model_vae_scale_factor(base_model: str | os.PathLike, revision: str | None = None) -> int:
    """Pixels per latent cell of a base model (folder or id), from its family; only configs are read (or fetched)."""
    from base_models import family_of  # imported here: it loads diffusers, which --help does not need

    family = family_of(base_model, "--base_model_path", revision)
    config_path = resolve_file(f"{str(base_model).rstrip('/')}/{VAE_CONFIG}", "--base_model_path", revision)
    try:
        return family.latent_scale(json.loads(config_path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadInputError(f"{config_path}: not a diffusers VAE config with block_out_channels ({type(exc).__name__})") from None


def latent_grid(resolution: int, base_model: str | os.PathLike | None, vae_scale_factor: int | None) -> tuple[int, int]:
    """(latent edge, factor) from the model's VAE config; a given `vae_scale_factor` must agree with it.

    Without a model the factor is taken as given (for a VAE that is not at hand).
    """
    if base_model is None and vae_scale_factor is None:
        raise BadInputError("pass --base_model_path (the base model training uses) so the maps match its latent grid")
    factor = vae_scale_factor
    if base_model is not None:
        factor = model_vae_scale_factor(base_model)
        if vae_scale_factor is not None and vae_scale_factor != factor:
            raise BadInputError(
                f"--vae_scale_factor {vae_scale_factor} contradicts the VAE of --base_model_path {base_model} (factor {factor})"
            )
    if factor < 1 or resolution % factor:
        raise BadInputError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return resolution // factor, factor

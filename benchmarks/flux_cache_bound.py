"""How much `--cache_dir` can speed up a FLUX.1-dev training step at real scale: an upper bound from FLOPs.

    python benchmarks/flux_cache_bound.py

The cache removes the encoders from a step (T5-XXL at 512 tokens, CLIP-L's vision tower, the VAE
encoding both images of a pair); the frozen 12 B transformer's forward and backward over the pair's
two images stays. Counts both with `torch.utils.flop_counter.FlopCounterMode` on the meta device
(the published configs of `stand_ins.flux.FULL`, no weights, ~1 min on a CPU) and prints, per
resolution, each part and the bound `(encoders + transformer) / transformer` on the cached step's
speed-up, which holds whatever the hardware as long as it runs both at the same FLOP rate.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config, T5EncoderModel

from stand_ins.flux import FULL

RESOLUTIONS = (512, 1024)
IMAGES_PER_PAIR = 2  # the reference and the generated image
T5_TOKENS, CLIP_PIXELS, TERA = 512, 224, 1e12


def flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def transformer_step(transformer: FluxTransformer2DModel, resolution: int) -> None:
    """Forward and backward of one pair through the frozen transformer (the gradient reaches every block, as the
    adapter's does from the first double block on)."""
    tokens, batch = (resolution // 16) ** 2, IMAGES_PER_PAIR
    text = torch.randn(batch, T5_TOKENS, FULL.transformer["joint_attention_dim"], requires_grad=True)
    prediction = transformer(
        hidden_states=torch.randn(batch, tokens, FULL.transformer["in_channels"]),
        encoder_hidden_states=text,
        pooled_projections=torch.randn(batch, FULL.transformer["pooled_projection_dim"]),
        timestep=torch.ones(batch),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(T5_TOKENS, 3),
        guidance=torch.ones(batch),
    ).sample
    prediction.sum().backward()


def main() -> None:
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FULL.transformer).requires_grad_(False)
        t5 = T5EncoderModel(T5Config(**FULL.text_encoder_2))
        vae = AutoencoderKL(**FULL.vae)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**FULL.image_encoder))
        print("| resolution | transformer fwd+bwd | T5-XXL | VAE encode | CLIP-L vision | encoders' share | cache speed-up at most |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for resolution in RESOLUTIONS:
            step = flops(lambda resolution=resolution: transformer_step(transformer, resolution))
            text = flops(lambda: t5(input_ids=torch.zeros(1, T5_TOKENS, dtype=torch.long)))
            latents = flops(lambda resolution=resolution: vae.encode(torch.randn(IMAGES_PER_PAIR, 3, resolution, resolution)))
            image = flops(lambda: clip(pixel_values=torch.randn(1, 3, CLIP_PIXELS, CLIP_PIXELS)))
            encoders = text + latents + image
            print(
                f"| {resolution} px | {step / TERA:.1f} TFLOP | {text / TERA:.2f} | {latents / TERA:.2f} | {image / TERA:.3f} "
                f"| {encoders / (encoders + step):.1%} | {(encoders + step) / step:.3f}x |"
            )


if __name__ == "__main__":
    main()

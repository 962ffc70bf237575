"""Per-process memory of training the XLabs FLUX IP-Adapter on a frozen FLUX.1-dev transformer, sharded or not.

    python benchmarks/sharding_memory.py

Counts, on the meta device (no weights, a few seconds on a CPU), the published FLUX.1-dev transformer
config with diffusers' `FluxIPAdapterAttnProcessor` on its 19 double-stream blocks (XLabs' layout:
4096-wide image tokens into the 3072-wide blocks, k and v with bias) and XLabs' image projection
(CLIP-L 768 -> 4 tokens x 4096, LayerNorm), then applies `patchdpo.sharding.planned_bytes` for 1, 2,
4 and 8 processes. The base is held in bf16, the adapter trains in fp32 with AdamW (gradient + two
moments). Prints a Markdown table in GB (10^9 bytes); activations, encoders and the VAE come on top.
"""

from __future__ import annotations

import torch
from torch import nn

from stand_ins.flux import FULL

#: black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = FULL.transformer
XLABS_TOKENS, CLIP_L_WIDTH = 4, 768
GB = 1e9


class XLabsFluxAdapter(nn.Module):
    """The FLUX transformer with XLabs' IP-Adapter installed; the image projection sits outside the blocks."""

    def __init__(self) -> None:
        from diffusers import FluxTransformer2DModel
        from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

        super().__init__()
        self.transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16).requires_grad_(False)
        width, context = self.transformer.inner_dim, FLUX_DEV["joint_attention_dim"]
        for block in self.transformer.transformer_blocks:
            block.attn.set_processor(FluxIPAdapterAttnProcessor(width, context, num_tokens=(XLABS_TOKENS,)))
        self.image_proj = nn.Sequential(nn.Linear(CLIP_L_WIDTH, XLABS_TOKENS * context), nn.LayerNorm(context))


def table(model: nn.Module, process_counts: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, float]]:
    """One row per process count: GB held per process, by part."""
    from patchdpo.sharding import planned_bytes

    rows = []
    for processes in process_counts:
        plan = planned_bytes(model, processes)
        adapter = 4 * plan.trainable  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
        gathered = plan.gathered if processes > 1 else 0
        rows.append(
            dict(
                processes=processes,
                frozen=plan.frozen / GB,
                adapter=adapter / GB,
                gathered=gathered / GB,
                total=(plan.frozen + adapter + gathered) / GB,
                unsynced_grads=plan.trainable_unsharded / GB if processes > 1 else 0.0,
            )
        )
    return rows


def main() -> None:
    with torch.device("meta"):
        model = XLabsFluxAdapter()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"FLUX.1-dev transformer {frozen / 1e9:.2f} B parameters (bf16), XLabs adapter {trainable / 1e9:.3f} B (fp32 + AdamW)\n")
    print("| processes | frozen transformer | adapter + grads + AdamW | gathered blocks (transient) | total | + accumulation grads |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in table(model):
        cells = [f"{row[key]:.2f} GB" for key in ("frozen", "adapter", "gathered", "total", "unsynced_grads")]
        print(f"| {row['processes']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

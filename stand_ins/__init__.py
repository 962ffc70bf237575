"""Random-weight stand-ins for the real models, and synthetic data, in the real on-disk layouts.

No pretrained weights can be downloaded on the development machines, so the tests, the offline demo
and the CPU benchmarks run the real code on these. Library code never imports this package.

Naming: `build_*` returns an in-memory model; `save_*` writes the real on-disk layout (what
`from_pretrained`, `clip.load` or our loaders read) and returns where it went.

- `sdxl`: SDXL pipelines (tiny / mid / full shapes) with their IP-Adapter-Plus checkpoint.
- `sd15`: SD 1.5 pipelines (tiny / full) with h94's `models/image_encoder` and `ip-adapter-plus_sd15.bin`.
- `components`: what both share: VAE / CLIP configs, the offline CLIP tokenizer, the CLIP ViT-H image
  encoder, the Resampler and IP-Adapter-Plus checkpoints in the public layout.
- `vit_models`: DINOv2 / ViT / CLIP-vision patch backbones, and textured test images.
- `metric_models`: the CLIP ViT-B/32 archive and the DINO ViT-S/16 folder of the evaluation.
- `pairs`: a PatchDPO training-data folder with quality maps.
"""

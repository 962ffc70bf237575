"""Random-weight FLUX.1-dev + XLabs IP-Adapter stand-ins, saved in the real on-disk layouts.

No pretrained weights can be downloaded where this project is tested, so the FLUX tests build a
pipeline folder with FLUX.1-dev's layout (`transformer`, `vae`, `text_encoder` CLIP-L text,
`text_encoder_2` T5 encoder, `tokenizer`, `tokenizer_2`, `scheduler`, `model_index.json` naming
`FluxPipeline`), a CLIP vision folder standing in for `openai/clip-vit-large-patch14`, and an
`ip_adapter.safetensors` with the exact key names of `XLabs-AI/flux-ip-adapter`. `TINY` has the
structure of FLUX.1-dev (guidance embedding, double and single blocks, packed 2x2 latents, a VAE
with FLUX's shift and scale and its 8x stride) at widths that build and run on a CPU in seconds;
`FULL` holds the published configs (for the memory plan: instantiate them on the meta device).

The T5 tokenizer is made offline: a SentencePiece unigram model trained on a fixed corpus by
`tokenizers`, wrapped in `T5TokenizerFast`; the CLIP tokenizer is the real BPE openai-clip ships.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import SentencePieceUnigramTokenizer, Tokenizer
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ip_adapter.xlabs import write_xlabs_file
from stand_ins.components import build_clip_tokenizer, save_configs

#: Image tokens of XLabs' v1 adapter (diffusers reads 4 unless the projection has 16 x 4096 rows).
NUM_TOKENS = 4


@dataclass(frozen=True)
class FluxShape:
    """Constructor arguments of every component; `scheduler` is FLUX.1-dev's scheduler_config.json."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    image_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    t5_max_length: int = 512


#: FLUX.1-dev's scheduler: dynamic shifting at sampling time, so the training sigma table is unshifted.
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _transformer(
    layers: int, single_layers: int, heads: int, head_dim: int, latent_channels: int, t5_dim: int, clip_dim: int, rope
) -> dict:
    return dict(
        patch_size=1,
        in_channels=4 * latent_channels,  # the pipeline packs 2x2 latent patches into one token
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_dim,
        guidance_embeds=True,
        axes_dims_rope=rope,
    )


def _vae(channels: tuple[int, ...], latent_channels: int, groups: int, layers: int) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        norm_num_groups=groups,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _t5(d_model: int, layers: int, heads: int, d_kv: int, d_ff: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _clip_vision(hidden: int, layers: int, heads: int, intermediate: int, patch: int, projection: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=224,
        patch_size=patch,
        projection_dim=projection,
        hidden_act="quick_gelu",
    )


TINY = FluxShape(
    transformer=_transformer(2, 2, heads=2, head_dim=16, latent_channels=4, t5_dim=32, clip_dim=32, rope=(4, 6, 6)),
    # Four blocks as FLUX's VAE, so latents are 1/8 of the image as on the real model.
    vae=_vae((8, 8, 16, 16), latent_channels=4, groups=4, layers=1),
    text_encoder=_clip_text(32, 2, 4, 37),
    text_encoder_2=_t5(32, 2, 4, 8, 37, vocab=200),
    image_encoder=_clip_vision(32, 2, 4, 37, patch=32, projection=16),
    scheduler=SCHEDULER,
)
#: Between the two, for the CPU speed proxies (`benchmarks/`): the transformer dominates a step as on the real model.
MID = FluxShape(
    transformer=_transformer(2, 4, heads=4, head_dim=32, latent_channels=16, t5_dim=128, clip_dim=128, rope=(8, 12, 12)),
    vae=_vae((32, 64, 128, 128), latent_channels=16, groups=16, layers=1),
    text_encoder=_clip_text(128, 2, 4, 256),
    text_encoder_2=_t5(128, 2, 4, 32, 256, vocab=200),
    image_encoder=_clip_vision(128, 2, 4, 256, patch=32, projection=128),
    scheduler=SCHEDULER,
)
#: The published configs: FLUX.1-dev transformer and VAE, CLIP-L text, T5-v1.1-XXL encoder, CLIP ViT-L/14 vision.
FULL = FluxShape(
    transformer=_transformer(19, 38, heads=24, head_dim=128, latent_channels=16, t5_dim=4096, clip_dim=768, rope=(16, 56, 56)),
    vae=_vae((128, 256, 512, 512), latent_channels=16, groups=32, layers=2),
    text_encoder=_clip_text(768, 12, 12, 3072),
    text_encoder_2=_t5(4096, 24, 64, 64, 10240, vocab=32128),
    image_encoder=_clip_vision(1024, 24, 16, 4096, patch=14, projection=768),
    scheduler=SCHEDULER,
)
SHAPES = {"tiny": TINY, "mid": MID, "full": FULL}

#: The text the tiny T5 tokenizer is trained on: the words of the test prompts and DreamBench-like prompts.
_CORPUS = [
    "a photo of a dog on the beach",
    "a cat wearing a red hat in the snow",
    "a backpack on a wooden table with a city in the background",
    "a sks toy floating in an ocean of milk",
    "a purple clock next to a green vase",
    "a shiny robot toy with a wheat field in the background",
    "a teapot on top of a mirror, cube shaped, made of lego",
]


def build_t5_tokenizer(vocab_size: int = 200, max_length: int = 512) -> T5TokenizerFast:
    """A SentencePiece unigram T5 tokenizer trained offline on `_CORPUS`, the same in every run.

    The trainer's scores differ in their last bits from run to run (parallel sums) and so does the
    order of the pieces; rounding the scores and sorting the pieces by score, then text, makes the
    vocabulary and its ids a function of the corpus alone.
    """
    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(_CORPUS, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    state = json.loads(trained._tokenizer.to_str())
    specials, pieces = state["model"]["vocab"][:3], state["model"]["vocab"][3:]
    state["model"]["vocab"] = specials + sorted(([piece, round(score, 6)] for piece, score in pieces), key=lambda p: (-p[1], p[0]))
    return T5TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def build_flux_pipeline(shape: FluxShape = TINY, seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    tokenizer_2 = build_t5_tokenizer(max_length=shape.t5_max_length)
    if len(tokenizer_2) > shape.text_encoder_2["vocab_size"]:
        raise ValueError(f"the T5 tokenizer has {len(tokenizer_2)} tokens, more than the encoder's vocabulary")
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**shape.transformer),
        vae=AutoencoderKL(**shape.vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**shape.text_encoder)),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(**shape.text_encoder_2)),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**shape.scheduler),
    )


def build_image_encoder(shape: FluxShape = TINY, seed: int = 1) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**shape.image_encoder)).eval()


def save_image_encoder(path: str | os.PathLike, shape: FluxShape = TINY, seed: int = 1) -> Path:
    """The CLIP vision folder with its preprocessor, as `openai/clip-vit-large-patch14` ships it."""
    path = Path(path)
    build_image_encoder(shape, seed).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def xlabs_state(shape: FluxShape = TINY, seed: int = 3, num_tokens: int = NUM_TOKENS, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Random tensors under XLabs' exact key names, far from the identity so the image prompt visibly acts."""
    generator = torch.Generator().manual_seed(seed)
    t5_dim, clip_dim = shape.transformer["joint_attention_dim"], shape.image_encoder["projection_dim"]
    inner = shape.transformer["num_attention_heads"] * shape.transformer["attention_head_dim"]
    shapes = {
        "ip_adapter_proj_model.proj.weight": (num_tokens * t5_dim, clip_dim),
        "ip_adapter_proj_model.proj.bias": (num_tokens * t5_dim,),
        "ip_adapter_proj_model.norm.weight": (t5_dim,),
        "ip_adapter_proj_model.norm.bias": (t5_dim,),
    }
    for block in range(shape.transformer["num_layers"]):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj"
            shapes[f"{prefix}.weight"] = (inner, t5_dim)
            shapes[f"{prefix}.bias"] = (inner,)
    state = {key: torch.randn(size, generator=generator) * std for key, size in shapes.items()}
    state["ip_adapter_proj_model.norm.weight"] += 1.0
    return state


@dataclass(frozen=True)
class FluxModelPaths:
    flux_dir: Path
    image_encoder_dir: Path
    ip_ckpt: Path

    @property
    def base_model_dir(self) -> Path:
        """The pipeline folder, under the name every family's stand-in paths share."""
        return self.flux_dir


def save_flux_models(root: str | os.PathLike, shape: FluxShape = TINY) -> FluxModelPaths:
    """FLUX pipeline folder, CLIP vision folder and an XLabs-layout `ip_adapter.safetensors` under `root`."""
    root = Path(root)
    build_flux_pipeline(shape).save_pretrained(root / "flux")
    save_image_encoder(root / "image_encoder", shape)
    ckpt = write_xlabs_file(root / "ip_adapter.safetensors", xlabs_state(shape), dtype=torch.float32)
    return FluxModelPaths(flux_dir=root / "flux", image_encoder_dir=root / "image_encoder", ip_ckpt=ckpt)


def save_flux_configs(root: str | os.PathLike, shape: FluxShape = FULL) -> FluxModelPaths:
    """Only the model_index.json and config.json files of a FLUX folder and an image-encoder folder (what the memory plan reads)."""
    root = Path(root)
    save_configs(
        {
            root / "flux" / "model_index.json": {"_class_name": FluxPipeline.__name__},
            root / "flux" / "transformer": {"_class_name": FluxTransformer2DModel.__name__, **shape.transformer},
            root / "flux" / "vae": {"_class_name": AutoencoderKL.__name__, **shape.vae},
            root / "flux" / "text_encoder": CLIPTextConfig(**shape.text_encoder).to_dict(),
            root / "flux" / "text_encoder_2": T5Config(**shape.text_encoder_2).to_dict(),
            root / "image_encoder": CLIPVisionConfig(**shape.image_encoder).to_dict(),
        }
    )
    return FluxModelPaths(flux_dir=root / "flux", image_encoder_dir=root / "image_encoder", ip_ckpt=root / "no-checkpoint")


def meta_transformer(shape: FluxShape = FULL) -> FluxTransformer2DModel:
    """The transformer with no storage (meta device): its parameter count and shapes, for the memory plan."""
    with torch.device("meta"):
        return FluxTransformer2DModel(**shape.transformer)


def load_flux_pipeline(flux_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    return FluxPipeline.from_pretrained(str(flux_dir), torch_dtype=dtype, local_files_only=True)

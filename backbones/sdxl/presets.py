"""The SDXL presets: their names, the component configs written out in code, the sampling scheduler
config of SDXL 1.0 and the files of the ``world`` preset."""

from __future__ import annotations

from typing import Any

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"

PRESETS: dict[str, str] = {
    "tiny": "SDXL block layout at toy width (UNet 32/64/128 ch, 2 tiny CLIPs, 8x VAE), seeded, 128 px, CPU",
    "sdxl-base": f"SDXL 1.0 base: weights of {SDXL_BASE_ID}; with random_weights: true the full architecture "
                 "(UNet 2.57 B params) with random weights, reading no files",
    "sdxl-base-random": "alias of sdxl-base with random_weights: true (benchmarks)",
    "world": "the tiny architecture trained on the synthetic world (cstoolkit world train sdxl): UNet + VAE from "
             "the shipped fp16 safetensors, the 2 tiny CLIPs from their seed; 128 px, CPU",
}
#: presets whose weights are always built from the seed (no file exists for them)
RANDOM_PRESETS = {"tiny": "tiny", "sdxl-base-random": "sdxl-base"}

#: Seed of the preset weights: every build of a preset gives the same weights.
PRESET_SEED = 0

# SDXL 1.0's scheduler/scheduler_config.json (sampling); training uses DDPMScheduler with the same betas.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


_SDXL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def tiny_component_configs() -> dict[str, dict[str, Any]]:
    """Configs of the ``tiny`` preset: SDXL's block layout, toy widths.

    UNet: DownBlock2D / CrossAttnDownBlock2D x2, CrossAttnUpBlock2D x2 / UpBlock2D (so up_blocks.0
    and up_blocks.1 have attentions.0-2), 32/64/128 channels, head dim 16, 2 layers per block,
    transformer layers (1, 2, 2). Text encoders: CLIP 32-d (quick_gelu) + CLIP 64-d with a 64-d
    projection (gelu) -> cross_attention_dim 96. VAE: 4 blocks (8x down), 4 latent channels.
    """
    te1 = {
        "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 3, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    te2 = {**te1, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "hidden_act": "gelu",
           "projection_dim": 64}
    time_dim = 8
    unet = {
        **_SDXL_BLOCKS,
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 2,
        "attention_head_dim": (2, 4, 8),  # diffusers' name; it is the number of heads (head dim 16)
        "transformer_layers_per_block": (1, 2, 2),
        "cross_attention_dim": te1["hidden_size"] + te2["hidden_size"],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + te2["projection_dim"],
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 128,
        "scaling_factor": 5.0,  # posterior means of this random VAE have std ~0.17: scaled latents ~unit std
        "force_upcast": True,
    }
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def sdxl_base_component_configs() -> dict[str, dict[str, Any]]:
    """Configs of SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0), written out in code."""
    te1 = {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    te2 = {**te1, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
           "hidden_act": "gelu", "projection_dim": 1280}
    unet = {
        **_SDXL_BLOCKS,
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
        "upcast_attention": None,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


_PRESET_CONFIGS = {"tiny": tiny_component_configs, "sdxl-base": sdxl_base_component_configs,
                   "world": tiny_component_configs}

#: files of the ``world`` preset under world/weights/sdxl/ (written by ``cstoolkit world train sdxl``)
WORLD_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
               "vae/config.json", "vae/diffusion_pytorch_model.safetensors")

"""SDXL: two CLIP text encoders and a UNet conditioned on a pooled caption embedding and on image sizes.

As `StableDiffusionXLPipeline` encodes a prompt: each encoder's penultimate hidden states, concatenated
(768 + 1280 = 2048 wide for SDXL base), are the cross-attention context; the second encoder's projected
pooled output (1280) joins the time embedding. An empty caption (caption dropout) gives zeros for both
where the pipeline's `force_zeros_for_empty_prompt` is set (SDXL base sets it), as its unconditional
prompt does at inference. Long captions (`data.max_token_length`) are read in windows as kohya's
`get_hidden_states_sdxl` does, the pooled embedding from the first window; `train.clip_skip` does not apply.

The six `time_ids` of each image are SDXL's micro-conditioning: its original size as seen (height,
width), the top-left corner of its crop in the resized image as trained (after the flip, if flipped), and
the bucket it is trained at (height, width): the real values of each image, not constants.
"""

from __future__ import annotations

from sdtune.errors import SdtuneError
from sdtune.family.base import Components, Conditioning, Family
from sdtune.family.sd import joined, tokenize


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    def load_options(self) -> dict:
        return dict(add_watermarker=False)

    def vae_dtype(self, vae, working_dtype):
        """fp32 under fp16 where the VAE's config says `force_upcast` (SDXL's own VAE overflows in fp16; an
        fp16-safe one such as madebyollin/sdxl-vae-fp16-fix says false), else the working precision."""
        import torch

        return torch.float32 if working_dtype == torch.float16 and vae.config.force_upcast else working_dtype

    def components(self, pipe):
        return Components(unet=pipe.unet, vae=pipe.vae, text_encoders=(pipe.text_encoder, pipe.text_encoder_2),
                          tokenizers=(pipe.tokenizer, pipe.tokenizer_2), scheduler=pipe.scheduler, family=self,
                          options={"force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt})

    def assemble(self, components):
        text_encoder, text_encoder_2 = components.text_encoders
        tokenizer, tokenizer_2 = components.tokenizers
        return self.pipeline_type()(
            vae=components.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=components.unet, scheduler=components.scheduler, add_watermarker=False,
            force_zeros_for_empty_prompt=components.options.get("force_zeros_for_empty_prompt", True))

    def check_text(self, encoders, clip_skip: int) -> None:
        if clip_skip != 1:  # kohya's sdxl_train_util: "clip_skip will be unexpected", and it is not applied
            raise SdtuneError(f"train.clip_skip={clip_skip} does not apply to SDXL, which reads both text encoders' "
                              "penultimate layers already (kohya ignores it for SDXL): set train.clip_skip=1")

    def encode(self, components, captions: list[str], grad: bool = False) -> Conditioning:
        import torch

        tokens = [tokenize(tokenizer, captions, next(encoder.parameters()).device, components.text.windows)
                  for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True)]
        cond = self.encode_tokens(components.text_encoders, tokens, grad)
        if components.options.get("force_zeros_for_empty_prompt", True):
            with torch.set_grad_enabled(grad):
                empty = torch.tensor([not caption for caption in captions], device=cond.hidden.device)
                cond.hidden = torch.where(empty[:, None, None], 0.0, cond.hidden)
                cond.pooled = torch.where(empty[:, None], 0.0, cond.pooled)
        return cond

    def encode_tokens(self, encoders, tokens, grad: bool = False, clip_skip: int = 1) -> Conditioning:
        """Each encoder's penultimate hidden states, joined; `clip_skip` is not read (`read_text` refuses it)."""
        import torch

        hidden, pooled = [], None
        with torch.set_grad_enabled(grad):
            for encoder, ids in zip(encoders, tokens, strict=True):
                out = encoder(ids.reshape(-1, ids.shape[-1]), output_hidden_states=True)
                hidden.append(joined(out.hidden_states[-2], ids))
                pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
                if ids.dim() == 3:  # long captions: the first window's, as kohya's pool2[::n_size]
                    pooled = pooled.reshape(*ids.shape[:2], -1)[:, 0]
            return Conditioning(hidden=torch.cat(hidden, dim=-1), pooled=pooled)

    def added_cond(self, cond: Conditioning, items, device, dtype) -> dict:
        import torch

        ids = torch.tensor([time_ids(item) for item in items], device=device, dtype=dtype)
        return {"text_embeds": cond.pooled.to(device, dtype), "time_ids": ids}


def time_ids(item) -> list[int]:
    """(original height, width, crop top, crop left, target height, width) of one `sdtune.data.Item`."""
    width, height = item.example.size if all(item.example.size) else item.resized
    left, top, right, _ = item.crop
    if item.flip:  # the corner as the model sees the picture: mirrored
        left = item.resized[0] - right
    bucket_w, bucket_h = item.bucket
    return [height, width, top, left, bucket_h, bucket_w]


# What the single-file clients (ComfyUI, AUTOMATIC1111: sgm's layout) and kohya call this family's parts;
# `sdtune.family.load` tells a file's architecture by these and `sdtune.export` writes them.
StableDiffusionXL.single_file_text = {  # architecture -> where each text encoder's keys start in one file
    "sdxl": ("conditioner.embedders.0.transformer.",  # CLIP-L, transformers' layout
             "conditioner.embedders.1.model."),       # OpenCLIP-bigG, OpenCLIP's own layout
}
StableDiffusionXL.kohya_text_prefixes = ("lora_te1_", "lora_te2_")  # a kohya LoRA's text-encoder module names
StableDiffusionXL.kohya_sgm_names = True  # kohya names an SDXL UNet's LoRA modules by sgm's (input_blocks.4.1...)
StableDiffusionXL.kohya_model_spec = {"sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")}
StableDiffusionXL.model_spec_implementation = "https://github.com/Stability-AI/generative-models"
StableDiffusionXL.embedding_keys = ("clip_l", "clip_g")  # a textual inversion file's vectors, per encoder

"""LoRA (`train.method = "lora"`): peft adapters on the frozen model, and the files they are shared as.

- `adapter`: attach the adapters (`[lora]` keys), read and restore what trains;
- `files`: `pytorch_lora_weights.safetensors` (diffusers) and `lora.safetensors` (kohya / AUTOMATIC1111);
- `init_from`: what a LoRA file holds (`lora.init_from`), so the `[lora]` keys follow it;
- `apply`: a base pipeline with a trained LoRA loaded (sampling) or merged into its weights (`sdtune merge`).
"""

"""Adapters (`train.method = "lora"`): peft's LoRA, LoHa, LoKr and DoRA on the frozen model, and the files they
are shared as.

- `algorithms`: the per-algorithm table (peft config, file key names, scale conventions);
- `adapter`: attach the adapters (`[lora]` keys), read and restore what trains, `load_file` (`lora.init_from`);
- `apply`: a base model with a trained adapter merged into its weights (`sdtune sample`, `sdtune merge`);
- `merge`: `sdtune merge`.
The files are written by `sdtune.export.lora_files`; what a file holds is read by `sdtune.config.lora_file`.
"""

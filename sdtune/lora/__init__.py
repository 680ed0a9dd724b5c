"""Adapters (`train.method = "lora"`): peft's LoRA, LoHa, LoKr and DoRA on the frozen model, and the files they
are shared as.

- `algorithms`: the per-algorithm table (peft config, file key names, scale conventions);
- `kohya_names`: the names of the adapters' weights, peft's and the kohya/LyCORIS file's;
- `adapter`: attach the adapters (`[lora]` keys), read and restore what trains, `load_file` (`lora.init_from`);
- `apply`: a base model with a trained adapter merged into its weights (`sdtune sample`, `sdtune merge`).
The files are written by `sdtune.export.lora_files`, `sdtune merge` is `sdtune.merge` (above the export it
writes with); what a file holds is read by `sdtune.config.lora_file`.
"""

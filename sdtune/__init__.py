"""sdtune: fine-tune Stable Diffusion on one consumer GPU, planned by memory presets.

The packages name one sentence: the CLI (`cli`) **runs** (`run`) a **plan** (`plan`, picked by the
**estimate**, `estimate/`) that **trains** (`train/`) a model **family** (`family/`) on **data** (`data/`) with
an **optim**izer tier (`optim/`, perhaps **offload**ed, `offload/`), then **export**s it (`export/`). `config/`
holds the keys and presets every stage reads, `lora/` the adapters, `util/` what every stage shares (files,
libraries, the process's world), `toy/` the shapes world of the demo and sdtune-tiny's recipe. Arrows point
down: `train/` never imports `estimate/` or `run`, and nothing imports `cli`. Nothing here imports torch, so
`sdtune --help` stays instant.

What a run says goes to `logging.getLogger("sdtune")` (each module logs through its own child logger). The
CLI prints it; as a library, the NullHandler below keeps it silent (Python's convention for libraries)
until the caller configures logging, e.g. `logging.basicConfig(level=logging.INFO)`.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

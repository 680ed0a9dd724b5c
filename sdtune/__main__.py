"""`python -m sdtune ...`: what launchers start, one process per GPU.

    torchrun --nproc-per-node 2 -m sdtune train --preset rtx4090 --data ./images
    accelerate launch --num_processes 2 -m sdtune train --preset rtx4090 --data ./images
"""

from sdtune.cli import app

app(prog_name="sdtune")

"""Training data: discovery and checks (`scan`), opening images (`images`), the batch stream (`stream`).

    scan = scan_folder("images", DataConfig())
    stream = BatchStream(scan.examples, DataConfig(), batch_size=2, seed=0)
    pixels, captions = stream.batch(0)
"""

from sdtune.data.scan import Example, Scan, scan_folder
from sdtune.data.stream import BatchStream, load_image

__all__ = ["BatchStream", "Example", "Scan", "load_image", "scan_folder"]

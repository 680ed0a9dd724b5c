"""Training data: discovery and checks (`scan`), opening images (`images`), aspect-ratio buckets
(`buckets`), the batch stream (`stream`).

    scan = scan_folder("images", DataConfig())
    stream = BatchStream(scan.examples, DataConfig(), batch_size=2, seed=0)
    pixels, captions = stream.batch(0)
"""

from sdtune.data.buckets import assign, fit, make_buckets
from sdtune.data.scan import Example, Scan, scan_folder
from sdtune.data.stream import BatchStream, ImageFailed, Item

__all__ = ["BatchStream", "Example", "ImageFailed", "Item", "Scan", "assign", "fit", "make_buckets", "scan_folder"]

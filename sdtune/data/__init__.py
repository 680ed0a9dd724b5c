"""Training data: discovery (`scan`), one image's checks (`verify`), captions (`captions`), opening images
(`images`), aspect-ratio buckets (`buckets`), the batch stream (`stream`), the one iterator the loop,
validation and tests load micro-batches through (`batches`: prefetch, broken images), what the UNet trains on
and its caches (`features`, `cache`), and `sdtune data check`'s report (`check`).

    scan = scan_folder("images", DataConfig())
    stream = BatchStream(scan.examples, DataConfig(), batch_size=2, seed=0)
    items = stream.items(0)
    pixels = stream.pixels(items)
"""

from sdtune.data.buckets import assign, fit, make_buckets
from sdtune.data.scan import Example, Scan, scan_folder
from sdtune.data.stream import BatchStream, ImageFailed, Item

__all__ = ["BatchStream", "Example", "ImageFailed", "Item", "Scan", "assign", "fit", "make_buckets", "scan_folder"]

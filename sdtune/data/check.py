"""`sdtune data check`: a scan of the training folder in numbers (`report`), as the command prints it.

    rep = report(scan_all("images", cfg.data), cfg.data, model_tokenizer(cfg.model))  # counts, buckets, captions
    rows = subset_reports(scan_subsets(cfg.data), cfg.data)  # a dataset config's or [[data.subsets]]: per subset
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from sdtune.config import DataConfig, SubsetConfig
from sdtune.data import captions
from sdtune.data.buckets import assign, make_buckets
from sdtune.data.captions import fixed
from sdtune.data.scan import Scan, Skip
from sdtune.data.tokens import CutCaptions, cut_captions


@dataclass(frozen=True)
class Report:
    found: int                                     # image files found, usable or not
    usable: int
    with_repeats: int                              # usable images counted with their folder's repeats
    buckets: list[tuple[tuple[int, int], int, int]]  # (bucket, images, with repeats), in bucket order
    captions: list[tuple[str, int]]                # (caption source, images), most first
    empty_captions: int                            # usable images whose caption is empty
    skipped: list[Skip]
    warnings: list[str]                            # Scan.warnings: files used that may not read as meant
    notes: list[str]                               # Scan.notes: folders not searched (output folders)
    summary: str                                   # Scan.summary(): "" when nothing was skipped
    cut: CutCaptions | None = None                 # captions longer than the text encoder reads (a tokenizer given)
    tokenizer: str = ""                            # which tokenizer measured them


def report(scan: Scan, cfg: DataConfig, tokenizer: tuple | None = None) -> Report:
    """What `sdtune data check` prints, computed from a scan (buckets as the batch stream assigns them);
    with `tokenizer` ((tokenizer, its name), `sdtune.data.tokens.model_tokenizer`), the captions it cuts."""
    buckets = make_buckets(cfg)
    images, repeats = Counter(), Counter()
    for example in scan.examples:
        bucket = assign(example.size, buckets)
        images[bucket] += 1
        repeats[bucket] += example.repeats
    sources = Counter(e.caption_source for e in scan.examples)
    return Report(
        found=len(scan.examples) + len(scan.skipped), usable=len(scan.examples),
        with_repeats=sum(e.repeats for e in scan.examples),
        buckets=[(b, images[b], repeats[b]) for b in buckets if images[b]],
        captions=sorted(sources.items(), key=lambda kv: (-kv[1], kv[0])),
        empty_captions=sum(1 for e in scan.examples if not e.caption), skipped=list(scan.skipped),
        warnings=list(scan.warnings), notes=list(scan.notes), summary=scan.summary(),
        cut=(cut_captions([(e.image, fixed(e.caption, cfg)) for e in scan.examples], tokenizer[0],
                          cfg.max_token_length) if tokenizer else None),
        tokenizer=tokenizer[1] if tokenizer else "")


@dataclass(frozen=True)
class SubsetReport:
    subset: SubsetConfig
    images: int                          # usable images
    skipped: Counter                     # kind -> files
    captions: list[tuple[str, int]]      # (caption source, images), most first
    sample: tuple[str, str] | None       # (image name, its caption as one step trains it), the first image's


def subset_reports(scans: list[Scan], cfg: DataConfig) -> list[SubsetReport]:
    """Per table of `cfg.subsets` (its scan from `scan_subsets`, in order): what `sdtune data check` lists."""
    rows = []
    for index, (subset, scan) in enumerate(zip(cfg.subsets, scans, strict=True)):
        first = scan.examples[0] if scan.examples else None
        sample = None if first is None else (
            first.image.name, captions.render(first.caption, cfg.for_subset(index), random.Random(0)))
        sources = Counter(e.caption_source for e in scan.examples)
        rows.append(SubsetReport(subset, len(scan.examples), Counter(s.kind for s in scan.skipped),
                                 sorted(sources.items(), key=lambda kv: (-kv[1], kv[0])), sample))
    return rows

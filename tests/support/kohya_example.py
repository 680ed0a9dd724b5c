"""sd-scripts' own example dataset config (its docs/config_README-en.md, the first example), as written apart
from its paths (`{root}`): a DreamBooth-style dataset of two character subsets and a regularisation subset,
then a fine-tuning dataset at 768 px; `dreambooth_part` is the file up to that second dataset."""

README_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root}/piyo'
  metadata_file = '{root}/piyo/piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def dreambooth_part(root: str) -> str:
    """The example's text up to its fine-tuning dataset, its paths under `root`."""
    text = README_EXAMPLE.format(root=root)
    return text[:text.index("# This is a fine-tuning")]

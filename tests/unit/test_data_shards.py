"""Latents packed into shards (`data.cache_shards`): the same training as one file per latent, reused
warm, a lost shard encoded again, and two processes' shards merged into one index."""

import torch
from support.helpers import train

from sdtune.data.shards import ShardedCache


def _latent_files(cache):
    return sorted(p.name for p in (cache / "latents").rglob("*.safetensors"))


def test_sharded_latents_train_as_one_file_each_and_are_reused(tiny_sd1, images, tmp_path):
    def run(name, cache, *extra):
        return train(tiny_sd1, images, tmp_path / name, "--max-steps", "3", "--set", "data.cache_latents=true",
                     "--set", f"data.cache_dir={tmp_path / cache}", "--set", "output.single_file=false", *extra)

    files = run("files", "files-cache")
    sharded = run("sharded", "shard-cache", "--set", "data.cache_shards=4")
    assert sharded["losses"] == files["losses"]
    shards = _latent_files(tmp_path / "shard-cache")
    assert len(shards) == 2 and all(name.startswith("shard-") for name in shards)  # 6 latents: 4 + 2
    assert len(_latent_files(tmp_path / "files-cache")) == 6
    again = run("again", "shard-cache", "--set", "data.cache_shards=4")
    assert again["losses"] == files["losses"] and _latent_files(tmp_path / "shard-cache") == shards  # all reused
    (next((tmp_path / "shard-cache").rglob(shards[0]))).unlink()  # a lost shard: its latents are encoded again
    lost = run("lost", "shard-cache", "--set", "data.cache_shards=4")
    assert lost["losses"] == files["losses"] and len(_latent_files(tmp_path / "shard-cache")) == 2


def test_two_processes_shards_are_merged_into_one_index(tmp_path):
    first, second = (ShardedCache(tmp_path, "latents", "vae", entries=2) for _ in range(2))
    for i in range(3):
        first.put(f"a{i}", {"mean": torch.full((2,), float(i))})
        second.put(f"b{i}", {"mean": torch.full((2,), 10.0 + i)})
    first.flush()
    second.flush()
    reader = ShardedCache(tmp_path, "latents", "vae", entries=2)
    assert torch.equal(reader.get("a2")["mean"], torch.full((2,), 2.0))
    assert torch.equal(reader.get("b0")["mean"], torch.full((2,), 10.0))
    assert reader.get("c0") is None
    first.reload()
    assert first.get("b1") is not None

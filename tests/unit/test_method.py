"""`sdtune.train.method`: the one answer to what trains, for every combination the config allows."""

import pytest

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.method import Embedding, FullFineTune, Lora, method_for

NO_TEXT_CACHE = "data.cache_text=false"


@pytest.mark.parametrize("sets, kind, text_encoders, weights_file", [
    ((), FullFineTune, False, "unet.safetensors"),
    (("train.text_encoder_lr=1e-5", NO_TEXT_CACHE), FullFineTune, True, "unet.safetensors"),
    (("train.method=lora",), Lora, False, "lora.safetensors"),
    (("train.method=lora", "lora.text_encoder=true", NO_TEXT_CACHE), Lora, True, "lora.safetensors"),
    (("train.method=embedding", "embedding.token=<sks>"), Embedding, True, "embedding.safetensors"),  # with grad
])
def test_each_way_of_training_says_whether_the_text_encoders_train(sets, kind, text_encoders, weights_file):
    cfg, _ = load_config("cpu", list(sets))
    method = method_for(cfg)
    assert type(method) is kind and method.trains_text_encoders is text_encoders
    assert method.weights_file == weights_file


@pytest.mark.parametrize("sets", [("train.text_encoder_lr=1e-5", "train.method=lora", NO_TEXT_CACHE),
                                  ("lora.text_encoder=true", NO_TEXT_CACHE)])
def test_the_config_refuses_text_encoder_training_the_method_cannot_do(sets):
    with pytest.raises(SdtuneError):
        load_config("cpu", list(sets))


def test_a_lora_streams_its_frozen_base_only():
    import torch

    frozen, adapter = torch.nn.Parameter(torch.zeros(1), requires_grad=False), torch.nn.Parameter(torch.zeros(1))
    select = Lora().streamed()
    assert select(frozen) and not select(adapter)
    assert FullFineTune().streamed() is None
    assert Embedding().streamed() is None and Embedding.frozen_unet  # its UNet is all frozen: all of it streams


def test_the_header_reader_knows_every_file_key_the_algorithms_write():
    """config/lora_file.py reads a file's header below the stages, so it lists the kohya keys itself: they must
    be exactly those `sdtune.lora.algorithms` writes for its peft parameters, and alpha."""
    from sdtune.config.lora_file import KOHYA_KEYS
    from sdtune.lora.algorithms import PARAMS, kohya_name

    assert KOHYA_KEYS == {"alpha", *(kohya_name(param) for param in PARAMS)}

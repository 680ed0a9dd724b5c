"""Long captions (data.max_token_length) and train.clip_skip against kohya's sd-scripts: its functions are
transcribed below (library/train_util.py at 48d368fa: `BaseDataset.get_input_ids`, `get_hidden_states`,
`pool_workaround`, `get_hidden_states_sdxl`) and compared with sdtune's families on the same captions of 10,
100 and 200 tokens, with CLIP's full-size tokenizer (both pad tokens) and small random CLIP text encoders."""

import argparse
import dataclasses

import pytest
import torch

from sdtune.family.base import Components, TextReading
from sdtune.family.clip_tokenizer import CLIP_L_PAD, OPEN_CLIP_PAD, clip_tokenizer
from sdtune.family.sd import StableDiffusion, tokenize
from sdtune.family.sdxl import StableDiffusionXL

WORDS = ["cat", "dog", "red", "blue", "tree", "house", "girl", "sky"]  # one CLIP token each


def caption(tokens: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


CAPTIONS = [caption(10), caption(100), caption(200), ""]


# --- kohya's sd-scripts, transcribed (library/train_util.py) --------------------------------------------------

def kohya_get_input_ids(caption, tokenizer, tokenizer_max_length):
    """BaseDataset.get_input_ids; tokenizer_max_length is max_token_length + 2 (75: 77)."""
    input_ids = tokenizer(
        caption, padding="max_length", truncation=True, max_length=tokenizer_max_length, return_tensors="pt"
    ).input_ids
    if tokenizer_max_length > tokenizer.model_max_length:
        input_ids = input_ids.squeeze(0)
        iids_list = []
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            for i in range(1, tokenizer_max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (input_ids[0].unsqueeze(0), input_ids[i: i + tokenizer.model_max_length - 2],
                             input_ids[-1].unsqueeze(0))
                ids_chunk = torch.cat(ids_chunk)
                iids_list.append(ids_chunk)
        else:
            for i in range(1, tokenizer_max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (input_ids[0].unsqueeze(0), input_ids[i: i + tokenizer.model_max_length - 2],
                             input_ids[-1].unsqueeze(0))
                ids_chunk = torch.cat(ids_chunk)
                if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                    ids_chunk[-1] = tokenizer.eos_token_id
                if ids_chunk[1] == tokenizer.pad_token_id:
                    ids_chunk[1] = tokenizer.eos_token_id
                iids_list.append(ids_chunk)
        input_ids = torch.stack(iids_list)  # 3,77
    return input_ids


def kohya_get_hidden_states(args, input_ids, tokenizer, text_encoder):
    """get_hidden_states (input_ids: b, n, 77). transformers 5's CLIPTextModel holds final_layer_norm itself
    (kohya's `text_encoder.text_model.final_layer_norm` is transformers 4's path to the same module)."""
    if input_ids.size()[-1] != tokenizer.model_max_length:
        return text_encoder(input_ids)[0]
    b_size = input_ids.size()[0]
    input_ids = input_ids.reshape((-1, tokenizer.model_max_length))
    if args.clip_skip is None:
        encoder_hidden_states = text_encoder(input_ids)[0]
    else:
        enc_out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        encoder_hidden_states = enc_out["hidden_states"][-args.clip_skip]
        text_model = getattr(text_encoder, "text_model", text_encoder)
        encoder_hidden_states = text_model.final_layer_norm(encoder_hidden_states)
    encoder_hidden_states = encoder_hidden_states.reshape((b_size, -1, encoder_hidden_states.shape[-1]))
    if args.max_token_length is not None:
        if args.v2:
            states_list = [encoder_hidden_states[:, 0].unsqueeze(1)]
            for i in range(1, args.max_token_length, tokenizer.model_max_length):
                chunk = encoder_hidden_states[:, i: i + tokenizer.model_max_length - 2]
                if i > 0:
                    for j in range(len(chunk)):
                        if input_ids[j, 1] == tokenizer.eos_token:  # an id against a string: never true
                            chunk[j, 0] = chunk[j, 1]
                states_list.append(chunk)
            states_list.append(encoder_hidden_states[:, -1].unsqueeze(1))
            encoder_hidden_states = torch.cat(states_list, dim=1)
        else:
            states_list = [encoder_hidden_states[:, 0].unsqueeze(1)]
            for i in range(1, args.max_token_length, tokenizer.model_max_length):
                states_list.append(encoder_hidden_states[:, i: i + tokenizer.model_max_length - 2])
            states_list.append(encoder_hidden_states[:, -1].unsqueeze(1))
            encoder_hidden_states = torch.cat(states_list, dim=1)
    return encoder_hidden_states


def kohya_pool_workaround(text_encoder, last_hidden_state, input_ids, eos_token_id):
    eos_token_mask = (input_ids == eos_token_id).int()
    eos_token_index = torch.argmax(eos_token_mask, dim=1)
    pooled_output = last_hidden_state[torch.arange(last_hidden_state.shape[0]), eos_token_index]
    return text_encoder.text_projection(pooled_output.to(text_encoder.text_projection.weight.dtype))


def kohya_get_hidden_states_sdxl(max_token_length, input_ids1, input_ids2, tokenizer1, tokenizer2, text_encoder1,
                                 text_encoder2):
    """get_hidden_states_sdxl (its commented-out copy of the v2 branch left out, as there)."""
    b_size = input_ids1.size()[0]
    input_ids1 = input_ids1.reshape((-1, tokenizer1.model_max_length))
    input_ids2 = input_ids2.reshape((-1, tokenizer2.model_max_length))
    enc_out = text_encoder1(input_ids1, output_hidden_states=True, return_dict=True)
    hidden_states1 = enc_out["hidden_states"][11]
    enc_out = text_encoder2(input_ids2, output_hidden_states=True, return_dict=True)
    hidden_states2 = enc_out["hidden_states"][-2]
    pool2 = kohya_pool_workaround(text_encoder2, enc_out["last_hidden_state"], input_ids2, tokenizer2.eos_token_id)
    n_size = 1 if max_token_length is None else max_token_length // 75
    hidden_states1 = hidden_states1.reshape((b_size, -1, hidden_states1.shape[-1]))
    hidden_states2 = hidden_states2.reshape((b_size, -1, hidden_states2.shape[-1]))
    if max_token_length is not None:
        states_list = [hidden_states1[:, 0].unsqueeze(1)]
        for i in range(1, max_token_length, tokenizer1.model_max_length):
            states_list.append(hidden_states1[:, i: i + tokenizer1.model_max_length - 2])
        states_list.append(hidden_states1[:, -1].unsqueeze(1))
        hidden_states1 = torch.cat(states_list, dim=1)
        states_list = [hidden_states2[:, 0].unsqueeze(1)]
        for i in range(1, max_token_length, tokenizer2.model_max_length):
            states_list.append(hidden_states2[:, i: i + tokenizer2.model_max_length - 2])
        states_list.append(hidden_states2[:, -1].unsqueeze(1))
        hidden_states2 = torch.cat(states_list, dim=1)
        pool2 = pool2[::n_size]
    return hidden_states1, hidden_states2, pool2


# --- helpers ---------------------------------------------------------------------------------------------------

def kohya_ids(tokenizer, max_token_length: int):
    """kohya's batch of ids: each caption's get_input_ids ([1, 77] or [n, 77]) stacked, as its collate does."""
    return torch.stack([kohya_get_input_ids(c, tokenizer, max_token_length + 2) for c in CAPTIONS])


def random_encoder(layers: int, width: int, projection: bool = False, eos_token_id: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(layers * 100 + width)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=width * 2, num_attention_heads=2,
                            num_hidden_layers=layers, max_position_embeddings=77, projection_dim=width,
                            bos_token_id=49406, eos_token_id=eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def components(family, encoders, tokenizers, **options):
    return Components(unet=None, vae=None, text_encoders=tuple(encoders), tokenizers=tuple(tokenizers),
                      scheduler=None, family=family, options=options)


# --- the tests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pad", [CLIP_L_PAD, OPEN_CLIP_PAD])
@pytest.mark.parametrize("max_token_length", [150, 225])
def test_windows_of_token_ids_are_kohyas(pad, max_token_length):
    tokenizer = clip_tokenizer(pad)
    ours = tokenize(tokenizer, CAPTIONS, "cpu", TextReading(max_token_length).windows)
    assert ours.shape == (len(CAPTIONS), max_token_length // 75, 77)
    assert torch.equal(ours, kohya_ids(tokenizer, max_token_length))
    if pad == OPEN_CLIP_PAD:  # the 200-token caption's cut windows end with EOS; the short one's empty windows
        assert ours[2, 0, -1] == ours[2, 1, -1] == tokenizer.eos_token_id  # start with EOS
        assert ours[0, 1, 1] == tokenizer.eos_token_id and ours[0, 1, 2] == tokenizer.pad_token_id


def test_75_tokens_read_as_the_pipeline_does():
    """The default reads exactly what diffusers' pipeline encodes: 77 ids, the encoder's last hidden state."""
    tokenizer, encoder = clip_tokenizer(), random_encoder(3, 32)
    c = components(StableDiffusion(), [encoder], [tokenizer])
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(c.family.encode(c, CAPTIONS).hidden, encoder(ids)[0])
    assert c.prompt_encoder() is None and c.text.note() == ""  # samples: the pipeline encodes the strings


@pytest.mark.parametrize("pad,v2", [(CLIP_L_PAD, False), (OPEN_CLIP_PAD, True)])
@pytest.mark.parametrize("max_token_length,clip_skip", [(75, 2), (150, 1), (225, 1), (225, 2)])
def test_sd_hidden_states_are_kohyas(pad, v2, max_token_length, clip_skip):
    tokenizer, encoder = clip_tokenizer(pad), random_encoder(3, 32)
    c = components(StableDiffusion(), [encoder], [tokenizer])
    c.family.read_text(c, max_token_length, clip_skip)
    args = argparse.Namespace(max_token_length=None if max_token_length == 75 else max_token_length,
                              clip_skip=None if clip_skip == 1 else clip_skip, v2=v2)
    ids = kohya_ids(tokenizer, max_token_length)
    with torch.no_grad():
        ours = c.family.encode(c, CAPTIONS).hidden
        theirs = kohya_get_hidden_states(args, ids, tokenizer, encoder)
    assert ours.shape == (len(CAPTIONS), max_token_length + 2, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if clip_skip == 2:  # not the last layer's states: the penultimate's through the final norm
        assert not torch.allclose(ours, c.family.encode(dataclasses.replace(c, text=TextReading(max_token_length)),
                                                        CAPTIONS).hidden)


@pytest.mark.parametrize("max_token_length", [75, 150, 225])
def test_sdxl_hidden_states_and_pooled_are_kohyas(max_token_length):
    """CLIP-L's 12 layers (kohya reads its hidden_states[11]) and a projected OpenCLIP-like encoder whose
    tokenizer pads with "!" (its config's eos_token_id 2, as SDXL's: transformers pools at the highest id)."""
    tokenizers = clip_tokenizer(CLIP_L_PAD), clip_tokenizer(OPEN_CLIP_PAD)
    encoders = random_encoder(12, 16), random_encoder(3, 24, projection=True, eos_token_id=2)
    c = components(StableDiffusionXL(), encoders, tokenizers, force_zeros_for_empty_prompt=False)
    c.family.read_text(c, max_token_length)
    with torch.no_grad():
        ours = c.family.encode(c, CAPTIONS)
        ids = [kohya_ids(t, max_token_length) for t in tokenizers]
        h1, h2, pool = kohya_get_hidden_states_sdxl(None if max_token_length == 75 else max_token_length, *ids,
                                                    *tokenizers, *encoders)
    assert ours.hidden.shape == (len(CAPTIONS), max_token_length + 2, 16 + 24)
    torch.testing.assert_close(ours.hidden, torch.cat([h1, h2], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pool, rtol=1e-6, atol=1e-6)
    zeroed = components(StableDiffusionXL(), encoders, tokenizers, force_zeros_for_empty_prompt=True)
    zeroed.family.read_text(zeroed, max_token_length)
    with torch.no_grad():
        empty = zeroed.family.encode(zeroed, CAPTIONS)
    assert not empty.hidden[3].any() and not empty.pooled[3].any()  # the empty caption: zeros, as the pipeline's
    assert torch.equal(empty.hidden[:3], ours.hidden[:3])


def test_clip_skip_is_checked_against_the_model():
    from sdtune.errors import SdtuneError

    c = components(StableDiffusion(), [random_encoder(3, 32)], [clip_tokenizer()])
    c.family.read_text(c, 75, 3)  # the first layer's output
    with pytest.raises(SdtuneError, match=r"train.clip_skip=4 reads before .* between 1 and 3"):
        c.family.read_text(c, 75, 4)
    xl = components(StableDiffusionXL(), [random_encoder(3, 16), random_encoder(3, 24, projection=True)],
                    [clip_tokenizer(), clip_tokenizer(OPEN_CLIP_PAD)])
    with pytest.raises(SdtuneError, match=r"train.clip_skip=2 does not apply to SDXL.*set train.clip_skip=1"):
        xl.family.read_text(xl, 225, 2)


def test_config_ranges():
    from sdtune.config import load_config
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError, match="data.max_token_length in --set .* must be one of 75, 150, 225; got 100"):
        load_config("cpu", ["data.max_token_length=100"])
    with pytest.raises(SdtuneError, match="train.clip_skip must be at least 1"):
        load_config("cpu", ["train.clip_skip=0"])


def test_captions_cut_at_the_long_limit():
    from pathlib import Path

    from sdtune.data.tokens import cut_captions

    examples = [(Path(f"{n}.png"), caption(n)) for n in (10, 100, 200)]
    assert cut_captions(examples, clip_tokenizer()).count == 2  # 77: the 100- and 200-token captions
    at_150 = cut_captions(examples, clip_tokenizer(), 150)
    assert (at_150.count, at_150.limit) == (1, 152) and at_150.example.startswith("200.png (202 tokens)")
    assert cut_captions(examples, clip_tokenizer(), 225).count == 0


def test_the_text_cache_is_keyed_by_how_captions_are_read():
    from sdtune.config import DataConfig
    from sdtune.data.features import Features

    c = components(StableDiffusion(), [random_encoder(3, 32)], [clip_tokenizer()])
    identities = set()
    for reading in [(75, 1), (225, 1), (75, 2), (225, 2), (75, 1)]:
        c.family.read_text(c, *reading)
        identities.add(Features(c, DataConfig(), plan=None)._text_identity())
    assert len(identities) == 4


def test_the_estimator_traces_the_long_context(tiny_sdxl):
    from sdtune.estimate import trace
    from sdtune.family.meta import meta_model

    parts = meta_model(str(tiny_sdxl))
    for reading, length in [(TextReading(), 77), (TextReading(150), 152), (TextReading(225), 227)]:
        hidden, pooled = trace._text(parts, 2, torch.float32, False, reading)
        assert hidden.shape == (2, length, 80) and pooled.shape == (2, 32)
        parked, _ = trace._text(dataclasses.replace(parts, text_encoders=()), 2, torch.float32, False, reading)
        assert parked.shape == hidden.shape  # a text cache hands the UNet the same context

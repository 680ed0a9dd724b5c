"""The estimator with each adapter algorithm (`lora.algo`, `lora.dora`): it attaches peft's LoHa, LoKr and DoRA on
meta-device parts as training does, and counts their weights and AdamW state as a real placement holds them."""

import pytest

from sdtune.config import load_config
from sdtune.estimate import estimate

ALGOS = {"lora": [], "loha": ["lora.algo=loha"], "lokr": ["lora.algo=lokr"], "dora": ["lora.dora=true"],
         "loha-conv": ["lora.algo=loha", "lora.target=attention+conv", "lora.conv_rank=2"]}


def _estimate_and_placed(model, sets: list[str]):
    """(the estimate, the trainable values of a real placement) of a rank-4 adapter run on `model`."""
    from sdtune.family.load import load_components
    from sdtune.plan import make_plan
    from sdtune.train.placement import place

    cfg, info = load_config("cpu", [f"model.pretrained={model}", "data.resolution=64", "train.method=lora",
                                    "lora.rank=4", *sets])
    placed = place(load_components(str(model)), make_plan(cfg.memory, "cpu", "sdpa"), cfg)
    placed.close()
    return estimate(cfg, info, str(model), device="cpu"), list(placed.weights().values())


@pytest.fixture(scope="module")
def counted(tiny_sd1):
    return {name: _estimate_and_placed(tiny_sd1, sets) for name, sets in ALGOS.items()}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_the_estimate_counts_each_algorithms_adapters_and_their_adamw_state(counted, algo):
    guess, trained = counted[algo]
    numel = sum(p.numel() for p in trained)
    assert guess.categories["weights"] == 4 * numel > 0
    assert guess.categories["optimizer_state"] == sum(8 * p.numel() + 4 for p in trained)


def test_the_algorithms_sizes_relate_as_their_shapes_say(counted):
    size = {name: guess.categories["weights"] // 4 for name, (guess, _) in counted.items()}
    assert size["loha"] == 2 * size["lora"]  # two low-rank pairs where LoRA has one
    assert size["lora"] < size["dora"] < size["lora"] * 1.2  # plus one magnitude per output row
    assert size["lokr"] < size["lora"]  # the tiny layers' Kronecker factors are small and full


def test_auto_keeps_the_algorithm():
    from sdtune.estimate.auto import Gpu, ordered

    gpu = Gpu(name="test card", total_memory=8 * 2**30, bf16=True)
    plans = ordered(gpu, ["train.method=lora", "lora.algo=lokr", "lora.factor=8"])
    assert plans and all((cfg.lora.algo, cfg.lora.factor) == ("lokr", 8) for _, cfg, _ in plans)

"""Weight streaming (`memory.param_offload=cpu`) on the CPU: block by block through a pool of device buffers,
it trains bit for bit like resident weights, holds a few blocks, and no op reads a weight from its host home.

The tiny UNet fits in one default block (128 MiB), so these tests cut it into blocks of an eighth of it.
"""

import copy
import functools
import shutil

import pytest
import torch
from support.fake_cuda import FakeCuda
from support.helpers import prepared
from support.testing import tiny_components
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sdtune.offload
from sdtune.offload.params import ParamStreamer, plan_units
from sdtune.train import loop as trainer


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _streamer(model, device, optimizer=None, *, fraction=8, prefetch_blocks=2, **kwargs) -> ParamStreamer:
    block_bytes = _bytes(model.parameters()) // fraction
    return ParamStreamer(model, device, optimizer, block_bytes=block_bytes, prefetch_blocks=prefetch_blocks, **kwargs)


def _tier(tier: str, folder) -> list[str]:
    if tier == "nvme":
        folder.mkdir(parents=True, exist_ok=True)
        return ["memory.optimizer_offload=nvme", f"memory.offload_dir={folder}"]
    return ["memory.optimizer_offload=cpu"]


@pytest.mark.parametrize("tier, prefetch_blocks", [("cpu", 2), ("nvme", 2), ("cpu", 0)])
def test_streamed_training_equals_resident_training(tiny_sd1, images, tmp_path, monkeypatch, tier, prefetch_blocks):
    """With gradient accumulation, and sampling between steps (inference streams too)."""
    monkeypatch.setattr(sdtune.offload, "ParamStreamer", _streamer)  # where the trainer imports it from
    common = ["train.max_steps=4", "memory.gradient_checkpointing=true", "train.gradient_accumulation_steps=2",
              *_tier(tier, tmp_path / "state")]
    resident = prepared(tiny_sd1, images, tmp_path / "resident", *common)
    streamed = prepared(tiny_sd1, images, tmp_path / "streamed", *common, "memory.param_offload=cpu",
                        f"memory.param_prefetch_blocks={prefetch_blocks}", "output.sample_every=2",
                        "output.sample_prompts=['a star']", "output.sample_steps=2")
    streamer = streamed.placement.streamer
    assert isinstance(streamer, ParamStreamer) and resident.placement.streamer is None
    assert streamer.prefetch_blocks == prefetch_blocks
    for run in (resident, streamed):
        trainer.loop(run)
    assert streamed.losses == resident.losses
    a, b = trainer.fp32_weights(resident), trainer.fp32_weights(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "streamed" / "samples" / "step-000002.png").is_file()
    # after the step every weight is home: the optimizer's host buffers, nothing left in the pool
    assert streamer.resident_bytes == 0 and not any(u.attached or u.buffer for u in streamer.units)
    assert all(p.data.data_ptr() == h.data_ptr() for u in streamer.units for p, h in zip(u.params, u.home, strict=True))
    largest, total = max(u.nbytes for u in streamer.units), _bytes(streamed.components.unet.parameters())
    assert 0 < streamer.peak_resident_bytes <= (prefetch_blocks + 1) * largest < 0.5 * total
    assert len(streamer._pool) == prefetch_blocks + 1  # it never had to grow


def _owners(model) -> list:
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


@pytest.mark.parametrize("fraction", [4, 8, 10**9])
def test_units_are_blocks_within_the_budget(fraction):
    unet = tiny_components()["unet"]
    budget = _bytes(unet.parameters()) // fraction
    units = plan_units(unet, budget)
    params = [p for _, ps in units for p in ps]
    assert len(params) == len(set(params)) == len(list(unet.parameters()))  # every parameter in one unit
    for module, ps in units:
        leaf = not any(True for child in module.children() for _ in child.parameters())
        assert _bytes(ps) <= budget or (leaf and ps == list(module.parameters()))
    if fraction == 10**9:  # budget below every layer: one unit per parameter-owning layer
        assert len(units) == len(_owners(unet))
    else:
        assert len(units) <= len(_owners(unet)) / 8  # 12 and 20 blocks, instead of 170 layers
        assert all(not isinstance(m, torch.nn.ModuleList) for m, _ in units)


def test_parameters_a_too_big_module_owns_itself_become_its_own_unit():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.extra = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(4))])  # read by forward below
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.layers[1](self.layers[0](x * self.scale + self.extra[0]))

    net = Net()
    units = plan_units(net, block_bytes=100)
    assert [(m, len(ps)) for m, ps in units] == [(net.layers[0], 2), (net.layers[1], 2), (net, 2)]
    reference, x = copy.deepcopy(net), torch.randn(3, 4)
    streamer = ParamStreamer(net, "cpu", block_bytes=100, prefetch_blocks=1)
    for _ in range(2):
        net(x).sum().backward()
        reference(x).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(net.parameters(), reference.parameters(), strict=True))
    assert streamer.resident_bytes == 0


class _HomeReads(TorchDispatchMode):
    """Records every op that reads a streamed weight from its host home instead of from a device buffer."""

    def __init__(self, streamer: ParamStreamer):
        super().__init__()
        self.streamer, self.found = streamer, []
        self.homes = {h.untyped_storage()._cdata for u in streamer.units for h in u.home}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        pool = {b.flat.untyped_storage()._cdata for b in self.streamer._pool}
        filling = func is torch.ops.aten.copy_.default and args[0].untyped_storage()._cdata in pool
        for t in tree_flatten((args, kwargs))[0]:
            if not filling and isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in self.homes:
                self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("version, fraction", [(1, 4), (1, 8), (2, 8)])
def test_forward_recomputation_and_backward_read_weights_only_on_the_device(version, fraction):
    """Every parameter is used only while its unit is attached (diffusers' attention processors call to_q
    inside Attention.forward, checkpointed blocks recompute inside their unit); what autograd saved of a
    weight outside checkpointed blocks (a Linear's `weight.t()`) is read back from the unit's current buffer,
    not from a buffer that holds another block by then: here every buffer is poisoned before backward."""
    unet = tiny_components(version)["unet"]
    unet.enable_gradient_checkpointing()
    reference = copy.deepcopy(unet)
    streamer = _streamer(unet, "cpu", fraction=fraction)
    generator = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10, 500])
    for _ in range(2):  # the second step prefetches from the first one's order
        mode = _HomeReads(streamer)
        with mode:
            loss = unet(x, t, c).sample.square().mean()
            streamer.release()
            for buffer in streamer._pool:
                buffer.flat.fill_(255)  # NaN in every float format
            loss.backward()
        reference(x, t, c).sample.square().mean().backward()
        assert mode.found == []
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(unet.parameters(), reference.parameters(), strict=True))


@pytest.mark.parametrize("fraction", [4, 8])
def test_a_streamed_frozen_base_is_read_only_on_the_device_and_leaves_block_by_block(fraction):
    """A LoRA over a streamed frozen UNet (adapters on attention and convolutions, a text context that needs
    its gradient as with a text-encoder LoRA): no op reads a frozen weight from its host home, the gradients
    of the adapters and of the context are the resident model's (to float rounding), and backward holds one
    or two blocks at a time: a frozen block leaves as soon as backward is done with it."""
    from sdtune.config import LoraConfig
    from sdtune.lora.adapter import attach, trainable

    unet = tiny_components()["unet"]
    attach(unet, [], LoraConfig(rank=4, target="attention+conv"), seed=0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero: give A a gradient too
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    unet.enable_gradient_checkpointing()
    reference = copy.deepcopy(unet)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    streamer = ParamStreamer(unet, "cpu", block_bytes=_bytes(frozen) // fraction, select=lambda p: not p.requires_grad)
    most = []
    streamer._count = functools.partial(lambda count, n: (count(n), most.append(
        sum(u.attached for u in streamer.units))), streamer._count)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500])
    c = torch.randn(2, 77, 32, generator=generator, requires_grad=True)
    c_ref = c.detach().clone().requires_grad_(True)
    for _ in range(2):
        mode = _HomeReads(streamer)
        with mode:
            loss = unet(x, t, c).sample.square().mean()
            streamer.release()
            for buffer in streamer._pool:
                buffer.flat.fill_(255)
            most.clear()
            loss.backward()
        reference(x, t, c_ref).sample.square().mean().backward()
        assert mode.found == []
        assert max(most) <= 2 < len(streamer.units)
    # to float rounding: the views change the order in which an input's gradient contributions are summed
    pairs = list(zip(trainable(unet), trainable(reference), strict=True))
    assert pairs and all(torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7) for a, b in pairs)
    torch.testing.assert_close(c.grad, c_ref.grad, rtol=1e-4, atol=1e-7)
    assert streamer.resident_bytes == 0


@pytest.mark.parametrize("prefetch_blocks", [0, 1, 2])
def test_after_the_first_step_every_copy_is_a_prefetch(prefetch_blocks):
    """The previous step's order predicts training forward, backward and an inference forward between."""
    unet = tiny_components()["unet"]
    unet.enable_gradient_checkpointing()
    streamer = _streamer(unet, "cpu", prefetch_blocks=prefetch_blocks)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    spot_copies = []
    for _ in range(3):
        unet(x, t, c).sample.square().mean().backward()
        streamer.release()  # as before the optimizer step
        with torch.no_grad():
            unet(x, t, c)
        spot_copies.append(streamer.spot_copies)
    units = len(streamer.units)
    if prefetch_blocks:
        assert spot_copies == [2 * units] * 3  # the first forward and backward only
    else:
        assert spot_copies == [3 * units, 6 * units, 9 * units]
    assert len(streamer._pool) == prefetch_blocks + 1


def test_the_estimator_counts_the_pool_the_engine_holds():
    from sdtune.estimate.memtrack import MemoryTracker

    pools = []
    for device in ("cpu", "meta"):
        unet = tiny_components()["unet"].to(device)
        unet.enable_gradient_checkpointing()
        tracker = MemoryTracker("meta")  # follows meta storages only: the CPU run is the engine's own count
        streamer = _streamer(unet, device, on_copy=functools.partial(tracker.relabel, category="weights"))
        x, c = torch.randn(1, 4, 8, 8, device=device), torch.randn(1, 77, 32, device=device)
        with tracker:
            for _ in range(2):
                unet(x, torch.tensor([10], device=device), c).sample.square().mean().backward()
        pools.append(streamer.pool_bytes)
        assert streamer.pool_bytes == len(streamer._pool) * streamer._buffer_bytes > 0
        if device == "meta":
            assert tracker.current["weights"] == streamer.pool_bytes
    assert pools[0] == pools[1]


def test_the_cuda_branches_wait_on_the_right_events(monkeypatch):
    """Runs the copy-stream code on the CPU under fake CUDA streams (tests/support/fake_cuda.py): no access
    unordered by the streams' waits, and bit for bit as resident weights, with the host weights changed
    between steps as the optimizer changes them."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    unet = tiny_components()["unet"]
    unet.enable_gradient_checkpointing()
    reference = copy.deepcopy(unet)
    with fake:
        streamer = _streamer(unet, fake.device)
        fake.mark_host(*(h for u in streamer.units for h in u.home))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    for _ in range(3):
        with fake:
            unet(x, t, c).sample.square().mean().backward()
            streamer.release()  # the optimizer's step pre-hook
        reference(x, t, c).sample.square().mean().backward()
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(unet.parameters(), reference.parameters(), strict=True))
        with torch.no_grad():  # the step changes the host weights
            for p, home in zip(reference.parameters(), (h for u in streamer.units for h in u.home), strict=True):
                p.mul_(0.9), home.mul_(0.9)
    assert fake.violations == []
    assert streamer.spot_copies == 2 * len(streamer.units)


@pytest.mark.parametrize("fixture, extra", [
    ("tiny_sd1", ["lora.target=attention+conv", "lora.text_encoder=true"]),
    ("tiny_sdxl", []),
])
def test_a_lora_streams_its_frozen_base_and_trains_as_resident(fixture, images, tmp_path, monkeypatch, request,
                                                               extra):
    """LoRA with `param_offload=cpu`: the frozen UNet streams block by block (with prior preservation's
    two backward passes a micro-batch), the adapters stay put, and training is the resident LoRA's to float
    rounding (a frozen block's inputs pass as views, so gradient sums add in another order). A frozen block
    leaves the device during backward, as soon as backward is done with it."""
    monkeypatch.setattr(sdtune.offload, "ParamStreamer", _streamer)
    model = request.getfixturevalue(fixture)
    shutil.copytree(images, tmp_path / "class")
    common = ["train.max_steps=3", "memory.gradient_checkpointing=true", "train.method=lora", "lora.rank=4",
              "train.learning_rate=1e-3", f"data.class_dir={tmp_path / 'class'}", "data.num_class_images=2", *extra]
    resident = prepared(model, images, tmp_path / "resident", *common)
    streamed = prepared(model, images, tmp_path / "streamed", *common, "memory.param_offload=cpu")
    streamer = streamed.placement.streamer
    frozen = [p for p in streamed.components.unet.parameters() if not p.requires_grad]
    assert {p for u in streamer.units for p in u.params} == set(frozen)  # the adapters are not streamed
    assert all(p.data.data_ptr() == h.data_ptr() for u in streamer.units for p, h in zip(u.params, u.home, strict=True))
    for run in (resident, streamed):
        trainer.loop(run)
    assert streamed.losses == pytest.approx(resident.losses, rel=1e-5)
    a, b = resident.placement.weights(), streamed.placement.weights()
    # within 1% of one AdamW step (lr 1e-3): Adam's normalised update magnifies rounding where a gradient is ~0
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert streamer.resident_bytes == 0 and not any(u.attached or u.buffer for u in streamer.units)
    largest = max(u.nbytes for u in streamer.units)
    assert 0 < streamer.peak_resident_bytes <= (streamer.prefetch_blocks + 1) * largest < 0.6 * _bytes(frozen)
    assert len(streamer._pool) == streamer.prefetch_blocks + 1  # it never had to grow

"""What the GPU would do that the meta device does not, for `sdtune.estimate`'s trace: CUDA autocast's
casting rules and the memory of CUDA's flash / memory-efficient attention kernels.

    with CudaSemantics(autocast=torch.bfloat16):   # around a forward traced on the meta device
        unet(latents, timesteps, text)
"""

from __future__ import annotations

import functools
import threading

from sdtune.errors import SdtuneError


class CudaSemantics:
    """What the GPU would do that the meta device does not, applied at the torch-function level:

    - CUDA autocast's casting rules when `autocast` is a dtype (real autocast ignores meta tensors), so the
      casts, and what autograd saves of them, are traced as on the GPU: convolutions, linears, matmuls and
      attention in the working precision, fp32 weights cast once per forward and cached (autocast's weight
      cache), norms and softmax in fp32;
    - attention through `_FlashAttention`, the memory behaviour of CUDA's flash / memory-efficient kernels.
    """

    def __init__(self, autocast=None):
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        self.dtype = autocast
        self.cache: dict[int, object] = {}
        self.in_forward = True
        self._threads = threading.local()  # torch-function modes are per thread; backward may run on another
        lower = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, torch.matmul,
                 torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
                 F.scaled_dot_product_attention}
        fp32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax}
        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if outer.dtype is not None and func in lower:
                    args, kwargs = outer._cast(args, outer.dtype), outer._cast(kwargs, outer.dtype)
                elif outer.dtype is not None and func in fp32:
                    args, kwargs = outer._cast(args, torch.float32), outer._cast(kwargs, torch.float32)
                if func is F.scaled_dot_product_attention:
                    return _attention(*args, **kwargs)
                return func(*args, **kwargs)

        self._mode = Mode()

    def _cast(self, tree, dtype):
        import torch
        from torch.utils._pytree import tree_map_only

        def cast(t):
            if not t.is_floating_point() or t.dtype == dtype:
                return t
            if t.is_leaf and t.requires_grad and self.in_forward:  # autocast caches weight casts per forward
                if id(t) not in self.cache:
                    self.cache[id(t)] = t.to(dtype)
                return self.cache[id(t)]
            return t.to(dtype)

        return tree_map_only(torch.Tensor, cast, tree)

    def end_forward(self) -> None:
        """Autocast's cache is dropped when the forward's autocast region ends."""
        self.cache.clear()
        self.in_forward = False

    def active(self) -> bool:
        return getattr(self._threads, "depth", 0) > 0

    def __enter__(self):
        self._mode.__enter__()
        self._threads.depth = getattr(self._threads, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        self._threads.depth -= 1
        return self._mode.__exit__(*exc)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if attn_mask is not None:
        raise SdtuneError("estimate: attention masks are not modelled")
    return _flash_function().apply(query, key, value)


@functools.cache
def _flash_function():
    import torch

    class _FlashAttention(torch.autograd.Function):
        """Flash attention's memory: keeps q, k, v, the output and an fp32 log-sum-exp per query for
        backward; backward adds an fp32 dq accumulator and a row statistic beside the three gradients."""

        @staticmethod
        def forward(ctx, query, key, value):
            out = torch.empty_like(query)
            lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(query, key, value, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            query, key, value, _, lse = ctx.saved_tensors
            accumulator = torch.empty(query.shape, dtype=torch.float32, device=query.device)  # noqa: F841
            row_stat = torch.empty_like(lse)  # noqa: F841
            return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    return _FlashAttention

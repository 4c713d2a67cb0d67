"""Σ over samples of |per-sample gradient|, from one batched forward and backward pass.

TATR's statistics need |∇θ L(x)| for every sample x separately, so the batched weight
gradient (the sum over samples) is of no use, and one backward pass per sample costs B
batched passes. Instead, the operations that consume a parameter are replaced, during
the forward pass, by autograd functions whose backward forms each sample's weight
gradient from that sample's saved input and output gradient (a [out, tokens] × [tokens,
in] product per sample for a linear layer), takes |·| and adds it to the parameter's
accumulator, a chunk of samples at a time, while the gradient with respect to the
input flows on as usual. No batched weight gradient is formed at all.

Supported uses of a parameter (enough for open_clip's image encoders, ViT and its
attention): ``F.linear``, ``F.conv2d`` (groups = 1), ``F.layer_norm``,
``F.multi_head_attention_forward`` (self-attention without masks on keys, dropout or
extra biases), ``x @ P``, and broadcasting a parameter (or a view of it) over the batch
by ``+`` or ``expand``. Any other operation on a parameter taking part raises an error
naming the parameter and the operation, so a model this does not understand fails
loudly instead of producing wrong statistics. Every input is batch-first with the
batch of the images; samples must not interact (eval mode, no batch norm in training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# torch has no public pytree module (torch.utils.pytree does not exist in 2.14); _pytree is
# what torch's own function modes use to find the tensors among a call's arguments
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from mergelab.engine.workspace import Workspace
from mergelab.errors import BadValue, MissingKey
from mergelab.models.logits import zero_shot_logits


class _Sink:
    """Where per-sample |gradients| go: one accumulator per parameter, scratch buffers."""

    def __init__(self, accumulators: Mapping[str, torch.Tensor], batch: int, chunk_size: int):
        self.accumulators = accumulators
        self.batch = batch
        self.chunk_size = chunk_size
        self.workspace = Workspace()

    def add_products(self, name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """accumulator += Σb |left[b] @ right[b]|, ``chunk_size`` samples at a time.

        The products are formed in the dtype of ``left`` (bfloat16 under bf16 autocast:
        ``right`` is cast to it, as autocast casts a matmul's operands) and summed over
        the chunk in the accumulator's. They and their sum land in reused buffers: one
        reduction over the chunk, then one addition, each a single pass over memory."""
        accumulator = self.accumulators[name]
        flat = accumulator.view(left.shape[1], right.shape[2])
        total = self.workspace.get("total", tuple(flat.shape), flat.dtype)
        right = right.to(left.dtype)
        for start in range(0, self.batch, self.chunk_size):
            stop = min(start + self.chunk_size, self.batch)
            shape = (stop - start, *flat.shape)
            buffer = self.workspace.get("products", shape, left.dtype)
            torch.bmm(left[start:stop], right[start:stop], out=buffer).abs_()
            flat.add_(torch.sum(buffer, 0, dtype=flat.dtype, out=total))

    def add_rows(self, name: str, per_sample: torch.Tensor) -> None:
        """accumulator += Σb |per_sample[b]| for a small [B, *shape] tensor, summed in the
        accumulator's dtype."""
        accumulator = self.accumulators[name]
        accumulator.add_(per_sample.abs().sum(0, dtype=accumulator.dtype).view_as(accumulator))

    def batch_first(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor`` as [B, -1, last dim], checking that dim 0 is the batch."""
        if tensor.shape[0] != self.batch:
            raise BadValue(
                f"per-sample gradients: {what} has shape {tuple(tensor.shape)}, expected the "
                f"batch ({self.batch}) first"
            )
        return tensor.reshape(self.batch, -1, tensor.shape[-1])


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b; per sample, ∂W = gᵀx and ∂b = Σtokens g."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink, weight_name, bias_name):
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.names = sink, (weight_name, bias_name)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        sink, (weight_name, bias_name) = ctx.sink, ctx.names
        g = sink.batch_first(grad, "a linear layer's output")
        if weight_name is not None:
            sink.add_products(weight_name, g.transpose(1, 2), sink.batch_first(x, "its input"))
        if bias_name is not None:
            sink.add_rows(bias_name, g.sum(1))
        # in the dtype autocast computed the layer in; autograd casts it back to x's
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


class _MatmulParameter(torch.autograd.Function):
    """y = x @ P; per sample, ∂P = xᵀg."""

    @staticmethod
    def forward(ctx, x, parameter, sink, name):
        ctx.save_for_backward(x, parameter)
        ctx.sink, ctx.name = sink, name
        return x @ parameter

    @staticmethod
    def backward(ctx, grad):
        x, parameter = ctx.saved_tensors
        sink = ctx.sink
        xb = sink.batch_first(x, "the left operand of x @ P")
        sink.add_products(ctx.name, xb.transpose(1, 2), sink.batch_first(grad, "x @ P"))
        grad_x = grad @ parameter.T.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _Conv2d(torch.autograd.Function):
    """A 2-D convolution as a linear map of unfolded patches; per sample, ∂W = g · patchesᵀ."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, sink, weight_name, bias_name):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.sink, ctx.names = geometry, sink, (weight_name, bias_name)
        return F.conv2d(x, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        sink, (weight_name, bias_name) = ctx.sink, ctx.names
        g = grad.reshape(sink.batch, grad.shape[1], -1)  # [B, out channels, positions]
        if weight_name is not None:
            patches = F.unfold(x.to(g.dtype), weight.shape[2:], dilation, padding, stride)
            sink.add_products(weight_name, g, patches.transpose(1, 2))
        if bias_name is not None:
            sink.add_rows(bias_name, g.sum(2))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(
                x.shape, weight.to(grad.dtype), grad, stride, padding, dilation
            )
        return grad_x, None, None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    """y = x̂ ⊙ w + b; per sample, ∂w = Σtokens g ⊙ x̂ and ∂b = Σtokens g."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps, sink, weight_name, bias_name):
        ctx.save_for_backward(x, weight, bias)
        ctx.shape, ctx.eps, ctx.sink, ctx.names = shape, eps, sink, (weight_name, bias_name)
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        sink, (weight_name, bias_name) = ctx.sink, ctx.names
        g = sink.batch_first(grad, "a layer norm's output")
        if weight_name is not None:
            normalized = F.layer_norm(x.to(weight.dtype), ctx.shape, eps=ctx.eps)
            sink.add_rows(weight_name, (g * sink.batch_first(normalized, "its input")).sum(1))
        if bias_name is not None:
            sink.add_rows(bias_name, g.sum(1))
        grad_x = None
        if ctx.needs_input_grad[0]:  # cheap to recompute; autograd knows the formula
            with torch.enable_grad():
                # in the weights' dtype, as autocast runs a layer norm in float32
                leaf = x.detach().to(weight.dtype).requires_grad_()
                y = F.layer_norm(leaf, ctx.shape, weight.detach(), bias.detach(), ctx.eps)
                (grad_x,) = torch.autograd.grad(y, leaf, grad)
        return grad_x, None, None, None, None, None, None, None


class _Broadcast(torch.autograd.Function):
    """y = x + P or y = P.expand(...), P broadcast over the batch; per sample, ∂P = g[b]
    summed over the dimensions along which P was broadcast."""

    @staticmethod
    def forward(ctx, x, parameter, sizes, sink, name):
        out = parameter.expand(sizes) if x is None else x + parameter
        padded = (1,) * (out.ndim - parameter.ndim) + tuple(parameter.shape)
        if out.shape[0] != sink.batch or padded[0] != 1:
            raise BadValue(
                f"per-sample gradients: {name!r} of shape {tuple(parameter.shape)} is "
                f"broadcast to {tuple(out.shape)}, not over the batch ({sink.batch}) first"
            )
        ctx.x_shape = None if x is None else x.shape
        ctx.padded, ctx.sink, ctx.name = padded, sink, name
        return out

    @staticmethod
    def backward(ctx, grad):
        sink = ctx.sink
        sink.add_rows(ctx.name, grad.sum_to_size((sink.batch, *ctx.padded[1:])))
        grad_x = None
        if ctx.x_shape is not None and ctx.needs_input_grad[0]:
            grad_x = grad.sum_to_size(ctx.x_shape)
        return grad_x, None, None, None, None


# operations that only reshape or cast a parameter: their result stands for the parameter
_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.to, torch.Tensor.unsqueeze}
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class _PerSampleMode(TorchFunctionMode):
    """Routes every use of a parameter taking part to the per-sample functions above."""

    def __init__(self, names: Mapping[torch.Tensor, str], sink: _Sink):
        super().__init__()
        self.names = WeakIdKeyDictionary(names)  # the parameter or a view of it → its name
        self.sink = sink

    def name(self, tensor) -> str | None:
        return self.names.get(tensor) if isinstance(tensor, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        used = [self.name(a) for a in flat if self.name(a) is not None]
        if not used:
            return func(*args, **kwargs)
        sink = self.sink
        if func is F.linear:
            x, weight, bias = _arguments(args, kwargs, ("input", "weight", "bias"), (None,))
            return _Linear.apply(x, weight, bias, sink, self.name(weight), self.name(bias))
        if func is F.conv2d:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            x, weight, bias, stride, padding, dilation, groups = _arguments(
                args, kwargs, names, (None, 1, 0, 1, 1)
            )
            if groups != 1 or isinstance(padding, str):
                raise BadValue(
                    f"per-sample gradients: conv2d of {used[0]!r} with groups={groups}, "
                    f"padding={padding!r} is not supported (groups 1, numeric padding only)"
                )
            geometry = (stride, padding, dilation)
            return _Conv2d.apply(
                x, weight, bias, geometry, sink, self.name(weight), self.name(bias)
            )
        if func is F.layer_norm:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            x, shape, weight, bias, eps = _arguments(args, kwargs, names, (None, None, 1e-5))
            return _LayerNorm.apply(
                x, tuple(shape), weight, bias, eps, sink, self.name(weight), self.name(bias)
            )
        if func is F.multi_head_attention_forward:
            return self.self_attention(*args, **kwargs)
        if func in _MATMULS and len(args) == 2 and self.name(args[0]) is None:
            return _MatmulParameter.apply(args[0], args[1], sink, self.name(args[1]))
        if func in _ADDS and len(args) == 2 and not kwargs:
            x, parameter = args if self.name(args[1]) is not None else args[::-1]
            if self.name(x) is None and isinstance(x, torch.Tensor):
                return _Broadcast.apply(x, parameter, None, sink, self.name(parameter))
        if func is torch.Tensor.expand:
            sizes = args[1] if len(args) == 2 and isinstance(args[1], Sequence) else args[1:]
            return _Broadcast.apply(None, args[0], tuple(sizes), sink, used[0])
        if func in _VIEWS and self.name(args[0]) is not None:
            out = func(*args, **kwargs)  # a cast too (``P.to(x.dtype)`` under autocast)
            self.names[out] = used[0]
            return out
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            raise BadValue(
                f"per-sample gradients: parameter {used[0]!r} is used by {_name_of(func)}, "
                "which is not supported (see mergelab.models.per_sample_gradients)"
            )
        return out  # metadata (dtype, shape, ...), not a computation

    def self_attention(
        self,
        query,
        key,
        value,
        embed_dim,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        bias_k,
        bias_v,
        add_zero_attn,
        dropout_p,
        out_proj_weight,
        out_proj_bias,
        training=True,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        use_separate_proj_weight=False,
        q_proj_weight=None,
        k_proj_weight=None,
        v_proj_weight=None,
        static_k=None,
        static_v=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        """F.multi_head_attention_forward for self-attention, written with the per-sample
        linear layers (its own internal calls bypass this mode)."""
        unsupported = {
            "cross-attention": not (query is key is value),
            "bias_k/bias_v": bias_k is not None or bias_v is not None,
            "add_zero_attn": add_zero_attn,
            "dropout in training": training and dropout_p > 0,
            "key_padding_mask": key_padding_mask is not None,
            "separate q/k/v projections": use_separate_proj_weight,
            "static keys/values": static_k is not None or static_v is not None,
            "unbatched input": query.ndim != 3,
        }
        found = [what for what, present in unsupported.items() if present]
        if found:
            raise BadValue(f"per-sample gradients: attention with {found[0]} is not supported")
        sink = self.sink
        x = query.transpose(0, 1)  # MultiheadAttention hands over [tokens, batch, dim]
        qkv = _Linear.apply(
            x, in_proj_weight, in_proj_bias, sink, self.name(in_proj_weight),
            self.name(in_proj_bias),
        )  # fmt: skip
        batch, tokens = x.shape[:2]
        heads = qkv.view(batch, tokens, 3, num_heads, embed_dim // num_heads).permute(2, 0, 3, 1, 4)
        mask = attn_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        attended = F.scaled_dot_product_attention(*heads, attn_mask=mask, is_causal=is_causal)
        merged = attended.transpose(1, 2).reshape(batch, tokens, embed_dim)
        out = _Linear.apply(
            merged, out_proj_weight, out_proj_bias, sink, self.name(out_proj_weight),
            self.name(out_proj_bias),
        )  # fmt: skip
        return out.transpose(0, 1), None


def _arguments(args, kwargs, names, defaults):
    """Positional-or-keyword arguments of a call, in the order of ``names``."""
    values = list(args) + [kwargs.get(n, _MISSING) for n in names[len(args) :]]
    tail = len(names) - len(defaults)
    return [defaults[i - tail] if v is _MISSING else v for i, v in enumerate(values[: len(names)])]


_MISSING = object()


def _name_of(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


@contextlib.contextmanager
def _taking_part(module: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Eval mode, and only the named parameters requiring grad, restored afterwards."""
    training = module.training
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        module.eval()
        for n, p in module.named_parameters():
            p.requires_grad_(n in names)
        yield
    finally:
        module.train(training)
        for n, p in module.named_parameters():
            p.requires_grad_(flags[n])


def accumulate_abs_gradients(
    module: torch.nn.Module,
    head: torch.Tensor,
    logit_scale: float,
    images: torch.Tensor,
    labels: torch.Tensor,
    accumulators: Mapping[str, torch.Tensor],
    chunk_size: int = 8,
) -> None:
    """accumulators[name] += Σ over the batch of |∇ CE(s · normalize(module(x)) @ headᵀ, y)|,
    per sample, for each parameter named in ``accumulators`` (module in eval mode).

    ``accumulators`` are preallocated float tensors shaped like their parameters (the
    running sums over batches); ``chunk_size`` samples' gradients of one parameter are
    held at a time.
    """
    if chunk_size < 1:
        raise BadValue(f"chunk_size must be ≥ 1, got {chunk_size}")
    parameters = dict(module.named_parameters())
    for name, accumulator in accumulators.items():
        if name not in parameters:
            raise MissingKey(f"per-sample gradients: the module has no parameter {name!r}")
        if accumulator.shape != parameters[name].shape:
            raise BadValue(
                f"per-sample gradients: accumulator of {name!r} has shape "
                f"{tuple(accumulator.shape)}, the parameter {tuple(parameters[name].shape)}"
            )
    sink = _Sink(accumulators, images.shape[0], chunk_size)
    by_tensor = {parameters[name]: name for name in accumulators}
    with _taking_part(module, list(accumulators)):
        with _PerSampleMode(by_tensor, sink):
            features = module(images)
        logits = zero_shot_logits(features, head, logit_scale)
        # summed, not averaged: each sample's gradient is that of its own loss
        F.cross_entropy(logits, labels, reduction="sum").backward()

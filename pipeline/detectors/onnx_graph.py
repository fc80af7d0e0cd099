"""An ONNX graph of convolutions as a torch module: the same weights and arithmetic, on any torch device and dtype,
with autograd (tests optimise an input against a real model through it).

Covers the operators of convolutional classifiers exported by tf2onnx and torch.onnx (Conv with fused batch norm,
Relu, Add, MaxPool, AveragePool, Transpose, Reshape, MatMul, Softmax, Flatten, Gemm); any other operator is an error
that names it, never a silent approximation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelSourceError


def _pads(attrs: dict[str, Any]) -> tuple[int, int, int, int]:
    """ONNX ``pads`` [top, left, bottom, right] -> ``F.pad``'s (left, right, top, bottom)."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise ModelSourceError(f"ONNX auto_pad={attrs['auto_pad']!r} is not supported: export with explicit pads")
    top, left, bottom, right = attrs.get("pads", (0, 0, 0, 0))
    return left, right, top, bottom


class OnnxGraph(torch.nn.Module):
    """An ONNX model's graph run node by node in torch, its initializers as buffers.

    >>> net = OnnxGraph.load("open-nsfw.onnx").eval()
    >>> net(torch.zeros(2, 224, 224, 3)).shape   # the graph's own input layout (NHWC here)
    torch.Size([2, 2])
    """

    def __init__(self, model: Any):
        super().__init__()
        from onnx import helper, numpy_helper

        graph = model.graph
        self._names: dict[str, str] = {}
        for i, tensor in enumerate(graph.initializer):
            self._names[tensor.name] = f"w{i}"
            self.register_buffer(f"w{i}", torch.from_numpy(numpy_helper.to_array(tensor).copy()))
        self._steps = []
        for node in graph.node:
            if node.op_type not in _OPS:
                raise ModelSourceError(f"ONNX operator {node.op_type} is not supported; supported: {sorted(_OPS)}")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            self._steps.append((node.op_type, list(node.input), node.output[0], attrs))
        self._input = next(i.name for i in graph.input if i.name not in self._names)
        self._output = graph.output[0].name

    @classmethod
    def load(cls, path: str | Path) -> OnnxGraph:
        import onnx

        return cls(onnx.load(str(path)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self._input: x}

        def get(name: str) -> torch.Tensor:
            return values[name] if name in values else getattr(self, self._names[name])

        for op, inputs, output, attrs in self._steps:
            values[output] = _OPS[op]([get(n) if n else None for n in inputs], attrs)
        return values[self._output]


def _conv(xs: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, weight, bias = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    left, right, top, bottom = _pads(a)
    if (left, top) != (right, bottom):  # asymmetric (TF's SAME on even sizes): pad first
        x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
    else:
        padding = (top, left)
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    return F.conv2d(x, weight, bias, a.get("strides", 1), padding, a.get("dilations", 1), a.get("group", 1))


def _max_pool(xs: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x = F.pad(xs[0], _pads(a), value=float("-inf"))
    return F.max_pool2d(x, a["kernel_shape"], a.get("strides", 1))


def _avg_pool(xs: list[Any], a: dict[str, Any]) -> torch.Tensor:
    if any(a.get("pads", (0,))):
        raise ModelSourceError("ONNX AveragePool with pads is not supported")
    return F.avg_pool2d(xs[0], a["kernel_shape"], a.get("strides", 1))


def _gemm(xs: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x = xs[0].T if a.get("transA") else xs[0]
    w = xs[1].T if a.get("transB") else xs[1]
    out = a.get("alpha", 1.0) * (x @ w.to(x.dtype))
    return out + a.get("beta", 1.0) * xs[2].to(x.dtype) if len(xs) > 2 and xs[2] is not None else out


_OPS = {
    "Conv": _conv,
    "Relu": lambda xs, a: F.relu(xs[0]),
    "Add": lambda xs, a: xs[0] + xs[1].to(xs[0].dtype),
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "Transpose": lambda xs, a: xs[0].permute(*a["perm"]),
    "Reshape": lambda xs, a: xs[0].reshape(*(int(d) for d in xs[1].tolist())),
    "Flatten": lambda xs, a: xs[0].flatten(a.get("axis", 1)),
    "MatMul": lambda xs, a: xs[0] @ xs[1].to(xs[0].dtype),
    "Gemm": _gemm,
    "Softmax": lambda xs, a: torch.softmax(xs[0].float(), dim=a.get("axis", -1)).to(xs[0].dtype),
}

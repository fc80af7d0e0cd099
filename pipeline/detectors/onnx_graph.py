"""An ONNX graph of convolutions as a torch module: the same weights and arithmetic, on any torch device and dtype,
with autograd (tests optimise an input against a real model through it).

Covers the operators of convolutional classifiers exported by tf2onnx and torch.onnx (Conv with fused batch norm,
Relu, Add, MaxPool, AveragePool, Transpose, Reshape, MatMul, Softmax, Flatten, Gemm); any other operator, and any
attribute value the interpreter does not implement (ceil_mode, pooling dilations, padded AveragePool, Reshape's zeros,
Flatten past axis 1, SAME auto_pad), is an error at load that names it, never a silent approximation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelSourceError


def _pads(attrs: dict[str, Any]) -> tuple[int, int, int, int]:
    """ONNX ``pads`` [top, left, bottom, right] -> ``F.pad``'s (left, right, top, bottom)."""
    top, left, bottom, right = attrs.get("pads", (0, 0, 0, 0))
    return left, right, top, bottom


def _refuse(op: str, attribute: str, value: Any, allowed: str) -> ModelSourceError:
    return ModelSourceError(f"ONNX {op} with {attribute}={value!r} is not supported (only {allowed})")


def _checked(op: str, attrs: dict[str, Any], opset: int, constants: dict[str, Any], inputs: list[str]) -> dict:
    """``attrs`` when the interpreter runs them exactly (Softmax's axis rule resolved for ``opset``); else an error."""
    if op in ("Conv", "MaxPool", "AveragePool") and attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise _refuse(op, "auto_pad", attrs["auto_pad"], "NOTSET or VALID: export with explicit pads")
    if op in ("MaxPool", "AveragePool"):
        if attrs.get("ceil_mode", 0) != 0:
            raise _refuse(op, "ceil_mode", attrs["ceil_mode"], "0")
        if any(d != 1 for d in attrs.get("dilations", ())):
            raise _refuse(op, "dilations", attrs["dilations"], "1s")
    if op == "AveragePool" and any(attrs.get("pads", ())):  # with or without count_include_pad
        raise _refuse(op, "pads", attrs["pads"], "0s")
    if op == "Reshape":
        if attrs.get("allowzero", 0) != 0:
            raise _refuse(op, "allowzero", attrs["allowzero"], "0")
        if inputs[1] in constants and 0 in constants[inputs[1]].tolist():
            raise _refuse(op, "shape", constants[inputs[1]].tolist(), "no 0s: copying a dimension is not implemented")
    if op == "Flatten" and attrs.get("axis", 1) != 1:
        raise _refuse(op, "axis", attrs["axis"], "1")
    if op == "Softmax":  # opset 13+: one axis (default -1); before: the input coerced to 2-D at axis (default 1)
        return {"axis": attrs.get("axis", -1 if opset >= 13 else 1), "coerce": opset < 13}
    return attrs


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
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None:
            raise ModelSourceError("ONNX model names no opset for the default domain: its operators' rules are unknown")
        self._names: dict[str, str] = {}
        constants = {}
        for i, tensor in enumerate(graph.initializer):
            self._names[tensor.name] = f"w{i}"
            constants[tensor.name] = numpy_helper.to_array(tensor).copy()
            self.register_buffer(f"w{i}", torch.from_numpy(constants[tensor.name]))
        self._steps = []
        for node in graph.node:
            if node.op_type not in _OPS:
                raise ModelSourceError(f"ONNX operator {node.op_type} is not supported; supported: {sorted(_OPS)}")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = _checked(node.op_type, attrs, opset, constants, list(node.input))
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


def _reshape(xs: list[Any], a: dict[str, Any]) -> torch.Tensor:
    shape = [int(d) for d in xs[1].tolist()]
    if 0 in shape:  # a shape computed in the graph (a constant one is refused at load)
        raise _refuse("Reshape", "shape", shape, "no 0s: copying a dimension is not implemented")
    return xs[0].reshape(*shape)


def _softmax(xs: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, axis = xs[0], a["axis"] % xs[0].ndim
    if not a["coerce"]:
        return torch.softmax(x.float(), dim=axis).to(x.dtype)
    rows = math.prod(x.shape[:axis])  # before opset 13: (prod(d < axis), prod(d >= axis)), softmax over each row
    return torch.softmax(x.float().reshape(rows, -1), dim=1).reshape(x.shape).to(x.dtype)


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
    "AveragePool": lambda xs, a: F.avg_pool2d(xs[0], a["kernel_shape"], a.get("strides", 1)),
    "Transpose": lambda xs, a: xs[0].permute(*a.get("perm", range(xs[0].ndim - 1, -1, -1))),
    "Reshape": _reshape,
    "Flatten": lambda xs, a: xs[0].flatten(a.get("axis", 1)),
    "MatMul": lambda xs, a: xs[0] @ xs[1].to(xs[0].dtype),
    "Gemm": _gemm,
    "Softmax": _softmax,
}

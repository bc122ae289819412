"""The engines that run a backbone at inference: torch (eager), or onnxruntime on the CPU.

`PixelBackbone` is the one definition of a backbone fed the image cache's uint8 squares
(normalisation and TTA inside, as the torch path does them) and `write_onnx` the one way it
becomes an ONNX graph: `defuse export` and the onnxruntime engine both use them.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import nn

from pipeline.data.transforms import model_input
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import embed

OPSET = 17
TOLERANCE = 1e-4  # largest |onnxruntime - torch| embedding or logit accepted on the first batch
# rows of the first batch also run in torch: a wrong graph is wrong on any image, and torch's
# pass over a whole first batch of 64 cost 0.9-1.5 s per backbone (2 cores)
CHECKED_ROWS = 8
_CPU = torch.device("cpu")


def tta_embed(model: nn.Module, images: torch.Tensor, tta: bool) -> tuple[torch.Tensor, ...]:
    """Embedding (B, D) and logits (B, C) of normalised ``images`` (B, 3, S, S); with ``tta``
    the mean over identity, h-flip and v-flip."""
    if not tta:
        return embed(model, images)
    views = [embed(model, v) for v in (images, images.flip(-1), images.flip(-2))]
    emb = torch.stack([e for e, _ in views]).mean(0)
    return emb, torch.stack([lo for _, lo in views]).mean(0)


class PixelBackbone(nn.Module):
    """A backbone as the feature cache sees it: uint8 squares (B, S, S, 3), the image cache's
    layout, -> embedding (B, D) and logits (B, C), float32."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, tta: bool):
        super().__init__()
        self.model, self.preprocessing, self.tta = model, preprocessing, tta
        self.eval()  # the exporter restores the mode it found, over every submodule

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = model_input(pixels.permute(0, 3, 1, 2), self.preprocessing, _CPU)
        return tta_embed(self.model, x, self.tta)


def _constant_same_padding(module: nn.Module, examples: tuple) -> nn.Module:
    """A copy of ``module`` whose TF 'SAME' convolutions (timm's `Conv2dSame`: the tf_
    models' strided ones) pad by constants, worked out for the sizes ``examples`` give them.

    Traced as they are, they pad by amounts computed from each input's shape at run time,
    which onnxruntime can neither fold into the Conv nor run in its blocked layout: it
    converts the activations out of that layout and back around each one, a third of
    lite0's time at 224 px (137 img/s against 200 with constant pads, 2 cores).
    """
    module, sizes = copy.deepcopy(module), {}
    convs = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    hooks = [
        conv.register_forward_pre_hook(
            lambda conv, args: sizes.setdefault(conv, set()).add(tuple(args[0].shape[-2:]))
        )
        for conv in convs
    ]
    module(*examples)
    for hook in hooks:
        hook.remove()
    for parent in list(module.modules()):  # one seen at several sizes keeps its own padding
        for name, conv in parent.named_children():
            if isinstance(conv, Conv2dSame) and len(sizes.get(conv, ())) == 1:
                setattr(parent, name, _padded_conv(conv, *sizes[conv]))
    return module


def _padded_conv(conv: Conv2dSame, size: tuple[int, int]) -> nn.Sequential:
    """``conv`` on inputs of ``size`` (H, W): a constant zero pad, then the same weights."""
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        padding=0, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
    )  # fmt: skip
    plain.weight, plain.bias = conv.weight, conv.bias
    pad = pad_same_arg(size, conv.kernel_size, conv.stride, conv.dilation)
    return nn.Sequential(nn.ZeroPad2d(pad), plain)


@torch.no_grad()
def write_onnx(module: nn.Module, examples: tuple, inputs: list, outputs: list, f) -> None:
    """``module`` traced on ``examples`` into ``f`` (a path or a binary file) by the legacy
    (TorchScript) exporter, which traces timm's models whole; every batch axis dynamic, the
    other axes the examples' (TF 'SAME' padding is fixed for them)."""
    module = _constant_same_padding(module, examples)
    with warnings.catch_warnings():  # the legacy exporter is chosen, its deprecation known
        warnings.simplefilter("ignore", DeprecationWarning)
        # mean and std become constants of the graph, as they should
        warnings.filterwarnings("ignore", "torch.tensor results are registered as constants")
        # the constant pads' reordering (a reversing Slice), which onnxruntime folds instead
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1 can be constant folded")
        torch.onnx.export(
            module,
            examples,
            f,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
            opset_version=OPSET,
            dynamo=False,
        )


def engine_for(engine: str, device: torch.device, pinned: str | None = None) -> str:
    """extract.engine resolved for ``device``: "auto" is the engine ``pinned`` by a head's
    cache when given (predict reproduces its features), else onnxruntime on the CPU (faster
    there, within TOLERANCE of torch: bench/bench_engine.py) and torch on CUDA. ConfigError
    where the engine cannot run on ``device``."""
    if engine == "auto":
        engine = pinned or ("onnxruntime" if device.type == "cpu" else "torch")
    if engine == "onnxruntime" and device.type != "cpu":
        raise ConfigError(
            f"extract.engine 'onnxruntime' runs on the CPU only, but the device is {device}; "
            "set extract.engine: torch (the engine on CUDA), or extract.device: cpu."
        )
    return engine


class OnnxBackbone:
    """`PixelBackbone` run by onnxruntime on the CPU, its graph built in memory once. The
    first batch's first CHECKED_ROWS also run in torch, and the two must agree within
    TOLERANCE, so that a bad export never fills a cache."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, tta: bool, name: str):
        import onnxruntime as ort

        self.name, self.net = name, PixelBackbone(model, preprocessing, tta)
        size = preprocessing.input_size
        graph = io.BytesIO()
        example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
        write_onnx(self.net, (example,), ["pixels"], ["embeddings", "logits"], graph)
        options = ort.SessionOptions()
        # Threads that spin between operators take the cores from the loader workers and any
        # other process: without spinning, lite0 at 224 px ran 1.12-1.16x faster (2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            graph.getvalue(), options, providers=["CPUExecutionProvider"]
        )
        self.checked = False

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (B, D) and logits (B, C), float32, of uint8 squares (B, S, S, 3)."""
        emb, logits = self.session.run(None, {"pixels": pixels})
        if not self.checked:
            rows = slice(CHECKED_ROWS)
            self._check(pixels[rows], emb[rows], logits[rows])
            self.checked = True
        return emb, logits

    def _check(self, pixels: np.ndarray, emb: np.ndarray, logits: np.ndarray) -> None:
        with torch.inference_mode():
            want = self.net(torch.from_numpy(pixels))
        diff = max(
            float(np.abs(got - w.numpy()).max()) for got, w in zip((emb, logits), want, strict=True)
        )
        if not diff <= TOLERANCE:
            raise CheckpointError(
                f"{self.name}: onnxruntime's embeddings or logits differ from torch's by "
                f"{diff:.3g} (> {TOLERANCE}) on the first batch, so its graph is wrong and "
                "nothing is written; set extract.engine: torch."
            )

"""The networks of the zoo sweep (issue 20): gluoncv 0.10.5's model zoo and gluonnlp 0.10's models,
built offline and traced to training symbols.

:func:`catalogue` lists every network the sweep covers (and, with ``excluded=True``, the zoo entries
it leaves out and why); :func:`build_network` builds one with random weights (``pretrained=False``,
``pretrained_base=False`` where the constructor takes it), hybridizes it, traces it to a symbol and
puts a loss on top (``SoftmaxOutput`` for classes, per pixel for segmentation, per token for language
models; ``LinearRegressionOutput`` for dense regression outputs such as pose heatmaps or detector
heads), returning the symbol and the input shapes ``plan_mirror`` takes.  Nothing may download:
:func:`forbid_network` makes every socket connection raise, so a constructor that tries shows up
as a build error instead of a silent download.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import mxnet as mx

__all__ = ["Built", "Network", "NetworkAccessError", "build_network", "catalogue", "find", "forbid_network"]

log = logging.getLogger("bench_zoo")

Shapes = List[Tuple[str, Tuple[int, ...]]]


class NetworkAccessError(RuntimeError):
    """A constructor tried to open a network connection (a download) during the offline sweep."""


def forbid_network() -> None:
    """Point ``MXNET_HOME`` at an empty temporary directory and make every socket connection raise
    :class:`NetworkAccessError` (for the rest of this process)."""
    os.environ["MXNET_HOME"] = tempfile.mkdtemp(prefix="zoo_mxnet_home_")

    def refuse(*args, **kwargs):
        raise NetworkAccessError(f"network access attempted ({args[1:2] or args})")

    socket.socket.connect = refuse          # type: ignore[assignment]
    socket.socket.connect_ex = refuse       # type: ignore[assignment]
    socket.create_connection = refuse       # type: ignore[assignment]
    socket.getaddrinfo = refuse             # type: ignore[assignment]


@dataclass(frozen=True)
class Network:
    """One network of the sweep.

    Attributes
    ----------
    name : str
        The zoo name (gluoncv or gluonnlp), or a backbone name of this module.
    family : str
        ``imagenet``, ``cifar``, ``segmentation``, ``pose``, ``video-3d``, ``video-2d``,
        ``detection`` (a detector's training heads), ``backbone`` (a detector's feature
        extractor), ``depth``, ``nlp-bert``, ``nlp-lm``, ``nlp-transformer``.
    input : str
        The input the sweep gives it, for the table (``2x3x224x224``, ``crop``...).
    """

    name: str
    family: str
    input: str


@dataclass
class Built:
    """A traced training symbol and the shapes to plan it at."""

    symbol: "mx.sym.Symbol"
    data_shapes: Shapes
    label_shapes: Shapes

    @property
    def input_text(self) -> str:
        """The data shapes, for the table (``data 2x3x224x224``)."""
        return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.data_shapes)


# ----------------------------------------------------------------------------- the catalogue
_DETECTORS = ("ssd_", "yolo3_", "faster_rcnn", "mask_rcnn", "custom_", "doublehead", "center_net_")
_SEGMENTATION = ("fcn_", "psp_", "deeplab", "danet_", "icnet_", "fastscnn_")
_VIDEO_3D = ("c3d_", "i3d_", "r2plus1d_", "p3d_", "slowfast_")
_VIDEO_DATASETS = re.compile(r"_(kinetics400|kinetics700|ucf101|hmdb51|sthsthv2)$")

#: Detector feature extractors (the full detectors need their own losses and targets).
BACKBONES = {
    "ssd_vgg16_atrous_300": "ssd_300_vgg16_atrous_voc",
    "ssd_vgg16_atrous_512": "ssd_512_vgg16_atrous_voc",
    "fpn_resnet50_v1b": "faster_rcnn_fpn_resnet50_v1b_coco",
    "fpn_resnet101_v1d": "faster_rcnn_fpn_resnet101_v1d_coco",
}

#: gluonnlp 0.10 models: name -> family.
NLP_MODELS = {
    "bert_12_768_12": "nlp-bert", "bert_24_1024_16": "nlp-bert", "ernie_12_768_12": "nlp-bert",
    "roberta_12_768_12": "nlp-bert", "roberta_24_1024_16": "nlp-bert",
    "distilbert_6_768_12": "nlp-bert",
    "standard_lstm_lm_200": "nlp-lm", "standard_lstm_lm_650": "nlp-lm",
    "standard_lstm_lm_1500": "nlp-lm", "awd_lstm_lm_600": "nlp-lm", "awd_lstm_lm_1150": "nlp-lm",
    "transformer_en_de_512": "nlp-transformer",
}

IMAGE_BATCH, CLIP_BATCH, NLP_BATCH = 2, 1, 2
SEQ_LEN, MASKED, BPTT, NLP_VOCAB = 128, 20, 35, 10000


def _exclusion(name: str) -> Optional[str]:
    """Why a gluoncv zoo entry is left out of the sweep, or None."""
    if name.endswith("_int8"):
        return "quantized (int8): built from pretrained weights"
    if name.endswith("_custom") or name.startswith("custom_"):
        return "a *_custom constructor (needs a class list; the same graph as its non-custom entry)"
    if name.startswith("siamrpn"):
        return "tracker with two image inputs and its own loss"
    if name.startswith(("yolo3_", "faster_rcnn", "mask_rcnn", "doublehead")):
        return "detector whose training forward needs targets: its backbone is swept instead"
    if name.startswith(("ssd_", "center_net_")) and not name.endswith("_voc"):
        return "same detector graph as its _voc entry (other class count)"
    if name.startswith("monodepth2"):
        return "depth model whose forward returns a dict (Gluon cannot trace it to a symbol)"
    return None


def _family(name: str) -> str:
    if name.startswith(("ssd_", "center_net_")):
        return "detection"
    if "pose" in name:
        return "pose"
    if name.startswith("cifar_"):
        return "cifar"
    if name.startswith(_SEGMENTATION) or (name.startswith("hrnet") and name.endswith("_s")):
        return "segmentation"
    if name.startswith(_VIDEO_3D):
        return "video-3d"
    if _VIDEO_DATASETS.search(name):
        return "video-2d"
    return "imagenet"


def _input_text(name: str, family: str) -> str:
    if family == "cifar":
        return f"{IMAGE_BATCH}x3x32x32"
    if family == "segmentation":
        return "1x3xcrop (crop_size)"
    if family == "pose":
        return f"{IMAGE_BATCH}x3x256x192"
    if family == "video-3d":
        return "1x3x" + "x".join(map(str, _clip(name, None)))
    if family == "detection":
        return f"1x3x{_detector_side(name)}x{_detector_side(name)}"
    if family.startswith("nlp"):
        return f"{NLP_BATCH}x{SEQ_LEN if family == 'nlp-bert' else BPTT} tokens"
    side = 299 if "inceptionv3" in name else 224
    return f"{IMAGE_BATCH}x3x{side}x{side}"


def catalogue(nlp: bool = True, excluded: bool = False) -> List[Network]:
    """Every network of the sweep, in zoo order (or, with ``excluded``, the left-out entries with
    the reason as their ``input``)."""
    from gluoncv.model_zoo import get_model_list

    networks, left_out = [], []
    for name in sorted(get_model_list()):
        reason = _exclusion(name)
        if reason:
            left_out.append(Network(name, "excluded", reason))
            continue
        family = _family(name)
        networks.append(Network(name, family, _input_text(name, family)))
    networks += [Network(name, "backbone", "1x3x512x512") for name in BACKBONES]
    if nlp and _has_gluonnlp():
        networks += [Network(name, family, _input_text(name, family)) for name, family in NLP_MODELS.items()]
    return left_out if excluded else networks


def _has_gluonnlp() -> bool:
    try:
        import gluonnlp  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- gluoncv builders
@contextlib.contextmanager
def _uninitialized_reset_ctx_skipped() -> Iterator[None]:
    """``Parameter.reset_ctx`` does nothing for a Parameter not initialized yet, while a network is
    built: gluoncv 0.10's action-recognition constructors (``vgg16_ucf101``, ``inceptionv3_hmdb51``,
    ...) with ``pretrained_base=False`` call ``collect_params().reset_ctx(ctx)`` on a base network
    nobody initialized ("Cannot reset context for Parameter ... because it has not been
    initialized"); the network is initialized when it is traced, on the CPU anyway."""
    original = mx.gluon.Parameter.reset_ctx

    def reset_ctx(param, ctx):
        if param._data is None and param._deferred_init == ():
            return None
        return original(param, ctx)

    mx.gluon.Parameter.reset_ctx = reset_ctx
    try:
        yield
    finally:
        mx.gluon.Parameter.reset_ctx = original


def _get_model(name: str, **kwargs) -> "mx.gluon.HybridBlock":
    """A gluoncv model, random weights; ``pretrained_base=False`` if the constructor takes it."""
    from gluoncv.model_zoo import get_model

    try:
        with _uninitialized_reset_ctx_skipped():
            return get_model(name, pretrained=False, pretrained_base=False, **kwargs)
    except TypeError as error:
        if "pretrained_base" not in str(error):
            raise
    except Warning as error:   # gluoncv's DarknetV3 raises Warning on unknown keyword arguments
        if "kwargs" not in str(error):
            raise
    return get_model(name, pretrained=False, **kwargs)


def _trace(block: "mx.gluon.HybridBlock", inputs: Sequence[str], train: bool = False) -> List:
    """Initialize, hybridize and call ``block`` on symbol variables; the outputs as a flat list."""
    block.initialize()
    block.hybridize()
    variables = [mx.sym.var(name) for name in inputs]
    if train:
        with mx.autograd.train_mode():
            out = block(*variables)
    else:
        out = block(*variables)
    flat: List = []

    def walk(value):
        if isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            flat.append(value)
    walk(out)
    return flat


def _shapes_of(outputs: Sequence, data_shapes: Shapes) -> List[Tuple[int, ...]]:
    _, shapes, _ = mx.sym.Group(list(outputs)).infer_shape(**dict(data_shapes))
    return [tuple(shape) for shape in shapes]


def _losses(outputs: Sequence, data_shapes: Shapes, kind: str) -> Built:
    """A loss on each output: ``class`` (SoftmaxOutput on the first output only), ``dense``
    (per-pixel SoftmaxOutput on every output), ``regress`` (LinearRegressionOutput on every output)."""
    if kind == "class":
        symbol = mx.sym.SoftmaxOutput(outputs[0], name="softmax")
        return Built(symbol, data_shapes, [("softmax_label", (data_shapes[0][1][0],))])
    shapes = _shapes_of(outputs, data_shapes)
    heads, labels = [], []
    for index, (out, shape) in enumerate(zip(outputs, shapes)):
        name = "softmax" if index == 0 else f"{'softmax' if kind == 'dense' else 'regress'}{index}"
        if kind == "dense":
            heads.append(mx.sym.SoftmaxOutput(out, multi_output=True, name=name))
            labels.append((f"{name}_label", (shape[0],) + shape[2:]))
        else:
            name = "regress" if index == 0 else name
            heads.append(mx.sym.LinearRegressionOutput(out, name=name))
            labels.append((f"{name}_label", shape))
    symbol = heads[0] if len(heads) == 1 else mx.sym.Group(heads)
    return Built(symbol, data_shapes, labels)


def _clip(name: str, block) -> Tuple[int, int, int]:
    """(frames, height, width) of a 3D video network's clip."""
    if name.startswith(("c3d_", "r2plus1d_")):
        return 16, 112, 112
    if name.startswith("p3d_"):
        return 16, 224, 224
    if name.startswith("slowfast_"):
        frames = (block.slow_frames + block.fast_frames) if block is not None else 0
        return frames or (4 + 32), 224, 224
    match = re.search(r"_f(\d+)s\d+", name)
    return (int(match.group(1)) if match else 32), 224, 224


def _detector_side(name: str) -> int:
    match = re.search(r"ssd_(\d+)_", name)
    return int(match.group(1)) if match else 512


def _build_gluoncv(net: Network, side: Optional[int], frames: Optional[int],
                   batch: Optional[int]) -> Built:
    name, family = net.name, net.family
    block = _get_model(name)
    if family == "video-3d":
        clip_frames, height, width = _clip(name, block)
        shape = (batch or CLIP_BATCH, 3, frames or clip_frames, side or height, side or width)
        return _losses(_trace(block, ["data"]), [("data", shape)], "class")
    if family == "segmentation":
        crop = side or getattr(block, "crop_size", 480)
        data = [("data", (batch or 1, 3, crop, crop))]
        return _losses(_trace(block, ["data"]), data, "dense")
    if family == "detection":
        size = side or _detector_side(name)
        return _losses(_trace(block, ["data"], train=True)[:3 if name.startswith("center") else 2],
                       [("data", (batch or 1, 3, size, size))], "regress")
    if family == "pose":
        data = [("data", (batch or IMAGE_BATCH, 3, side or 256, (side or 256) * 3 // 4))]
        return _losses(_trace(block, ["data"]), data, "regress")
    default = 32 if family == "cifar" else 299 if "inceptionv3" in name else 224
    size = side or default
    return _losses(_trace(block, ["data"]), [("data", (batch or IMAGE_BATCH, 3, size, size))], "class")


def _build_backbone(name: str, side: Optional[int], batch: Optional[int]) -> Built:
    from gluoncv.model_zoo.ssd.vgg_atrous import vgg16_atrous_300, vgg16_atrous_512
    from gluoncv.nn.feature import FPNFeatureExpander

    size = side or 512
    if name.startswith("ssd_vgg16"):
        block = (vgg16_atrous_300 if name.endswith("300") else vgg16_atrous_512)(pretrained=False)
        size = side or int(name[-3:])
    elif name == "fpn_resnet50_v1b":
        block = FPNFeatureExpander(
            network="resnet50_v1b", outputs=["layers1_relu8_fwd", "layers2_relu11_fwd",
                                             "layers3_relu17_fwd", "layers4_relu8_fwd"],
            num_filters=[256] * 4, use_1x1=True, use_upsample=True, use_elewadd=True, use_p6=True,
            no_bias=False, pretrained=False)
    else:
        block = FPNFeatureExpander(
            network="resnet101_v1d", outputs=["layers1_relu8_fwd", "layers2_relu11_fwd",
                                              "layers3_relu68_fwd", "layers4_relu8_fwd"],
            num_filters=[256] * 4, use_1x1=True, use_upsample=True, use_elewadd=True, use_p6=True,
            no_bias=False, pretrained=False)
    return _losses(_trace(block, ["data"]), [("data", (batch or 1, 3, size, size))], "regress")


# ----------------------------------------------------------------------------- gluonnlp builders
def _vocab(size: int, bert: bool = False):
    """A made-up vocabulary of ``size`` tokens (the real ones download)."""
    import gluonnlp as nlp

    counter = collections.Counter({f"w{index}": size - index for index in range(size)})
    cls = nlp.vocab.BERTVocab if bert else nlp.Vocab
    return cls(counter)


def _token_loss(logits, vocab: int, label_shape: Tuple[int, ...]) -> "mx.sym.Symbol":
    """Per-token softmax over ``vocab`` classes (label flattened in the graph)."""
    flat = mx.sym.reshape(logits, shape=(-1, vocab))
    label = mx.sym.reshape(mx.sym.var("softmax_label"), shape=(-1,))
    return mx.sym.SoftmaxOutput(flat, label, name="softmax")


def _build_bert(name: str, seq: int, batch: int) -> Built:
    """Masked-LM and next-sentence losses (gluonnlp's pretraining), BERT-base vocabulary size."""
    from gluonnlp.model import get_model

    vocab = _vocab(30522, bert=True)
    roberta, distil = name.startswith("roberta"), name.startswith("distilbert")
    kwargs = dict(vocab=vocab, dataset_name=None, pretrained=False)
    if not distil:
        kwargs.update(use_decoder=True)
    if not (roberta or distil):
        kwargs.update(use_pooler=True, use_classifier=True)
    block, _ = get_model(name, **kwargs)
    inputs = (["data"] + ([] if roberta or distil else ["token_types"]) + ["valid_length"]
              + ([] if distil else ["masked_positions"]))
    data = [(n, (batch, MASKED) if n == "masked_positions" else (batch,) if n == "valid_length"
             else (batch, seq)) for n in inputs]
    outputs = _trace(block, inputs)
    size = len(vocab)
    if distil:
        return _losses(outputs[:1], data, "regress")
    losses = [_token_loss(outputs[-1], size, (batch, MASKED))]
    labels = [("softmax_label", (batch, MASKED))]
    if not roberta:   # next-sentence classifier: outputs are (seq, pooled, nsp, mlm)
        losses.append(mx.sym.SoftmaxOutput(outputs[2], name="nsp"))
        labels.append(("nsp_label", (batch,)))
    return Built(mx.sym.Group(losses) if len(losses) > 1 else losses[0], data, labels)


def _build_lm(name: str, steps: int, batch: int) -> Built:
    """gluonnlp's word language model: (steps, batch) tokens, every step into the softmax."""
    from gluonnlp.model import get_model

    # NOTE [ gluonnlp's StandardRNN cannot be traced with dropout ]
    # Its hybrid_forward calls ``nd.Dropout`` on the encoder output (not ``F.Dropout``), so the
    # standard_lstm_lm_* models trace to a symbol only with that dropout at 0 (the LSTM layers
    # keep their own inter-layer dropout).  A gluonnlp bug, not the planner's.
    extra = dict(dropout=0.0, hparam_allow_override=True) if name.startswith("standard") else {}
    block, vocab = get_model(name, vocab=_vocab(NLP_VOCAB), dataset_name=None, pretrained=False,
                             **extra)
    block.initialize()
    block.hybridize()
    states = block.begin_state(batch_size=batch, func=mx.sym.zeros)
    flat_states = states if not isinstance(states[0], (list, tuple)) else [s for pair in states for s in pair]
    log.debug("%s: %d state arrays", name, len(flat_states))
    output, _ = block(mx.sym.var("data"), states)
    symbol = _token_loss(output, len(vocab), (steps, batch))
    return Built(symbol, [("data", (steps, batch))], [("softmax_label", (steps, batch))])


def _build_transformer(name: str, steps: int, batch: int) -> Built:
    """gluonnlp's NMT transformer: source and target sequences, per-token softmax on the target."""
    from gluonnlp.model import get_model

    from unittest import mock

    vocab = _vocab(NLP_VOCAB)
    # gluonnlp 0.10 loads (downloads) the dataset's vocabularies even when both are given; the
    # loader is replaced by one that returns the given vocabulary.
    with mock.patch("gluonnlp.model.transformer._load_vocab", lambda _name, given, *a, **k: given):
        model, _, _ = get_model(name, src_vocab=vocab, tgt_vocab=vocab, dataset_name="WMT2014",
                                pretrained=False)
    model.initialize()
    model.hybridize()
    names = ["src", "tgt", "src_valid_length", "tgt_valid_length"]
    src, tgt, src_length, tgt_length = (mx.sym.var(n) for n in names)
    # NMTModel.forward reads the encoder output's .shape (a Block, not traceable); its training
    # forward is composed here from the same hybrid parts, the memory mask built symbolically.
    memory, _ = model.encode(src, valid_length=src_length)
    steps_of_memory = mx.sym.reshape(mx.sym.contrib.arange_like(memory, axis=1), shape=(1, -1))
    mask = mx.sym.broadcast_lesser(steps_of_memory, mx.sym.reshape(src_length, shape=(-1, 1)))
    output, _, _ = model.decode_seq(tgt, [memory, mask], tgt_length)
    data = [(n, (batch, steps) if "valid" not in n else (batch,)) for n in names]
    return Built(_token_loss(output, len(vocab), (batch, steps)), data,
                 [("softmax_label", (batch, steps))])


def build_network(net: Network, side: Optional[int] = None, frames: Optional[int] = None,
                  batch: Optional[int] = None, steps: Optional[int] = None) -> Built:
    """Build, hybridize and trace ``net`` with a loss on top (see the module docstring).

    ``side`` (image side or crop), ``frames`` (clip length), ``batch`` and ``steps`` (sequence
    length) override the sweep's input sizes, for small CI inputs."""
    if net.family == "nlp-bert":
        return _build_bert(net.name, steps or SEQ_LEN, batch or NLP_BATCH)
    if net.family == "nlp-lm":
        return _build_lm(net.name, steps or BPTT, batch or NLP_BATCH)
    if net.family == "nlp-transformer":
        return _build_transformer(net.name, steps or BPTT, batch or NLP_BATCH)
    if net.family == "backbone":
        return _build_backbone(net.name, side, batch)
    return _build_gluoncv(net, side, frames, batch)


def find(name: str, nlp: bool = True) -> Network:
    """The catalogue entry called ``name``."""
    for net in catalogue(nlp=nlp):
        if net.name == name:
            return net
    raise KeyError(f"{name!r} is not in the zoo sweep (see bench_zoo.py --list)")



"""Symbols used by the examples, tests, benchmark and CLI.

All are built locally from code: nothing is downloaded.  ``gluon_symbol``
builds a gluoncv model (random weights) and traces it to a symbol.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import mxnet as mx

__all__ = ["preact_resnet_cifar", "memonger_resnet", "small_resnet", "gluon_symbol",
           "default_image_size", "unet", "lstm_language_model", "last_output_lstm", "bert_mlm",
           "bert_mlm_shapes"]


def _conv_bn_relu(data, num_filter, kernel, stride, pad, name, act=True):
    conv = mx.sym.Convolution(data, num_filter=num_filter, kernel=kernel, stride=stride, pad=pad,
                              no_bias=True, name=f"{name}_conv")
    out = mx.sym.BatchNorm(conv, fix_gamma=False, eps=2e-5, momentum=0.9, name=f"{name}_bn")
    return mx.sym.Activation(out, act_type="relu", name=f"{name}_relu") if act else out


def small_resnet(num_blocks: int = 3, channels: int = 8, num_classes: int = 10) -> "mx.sym.Symbol":
    """A small residual network with BatchNorm, for tests (input N x 3 x H x W)."""
    data = mx.sym.var("data")
    body = _conv_bn_relu(data, channels, (3, 3), (1, 1), (1, 1), "stem")
    for block in range(num_blocks):
        name = f"block{block}"
        branch = _conv_bn_relu(body, channels, (3, 3), (1, 1), (1, 1), f"{name}_a")
        branch = _conv_bn_relu(branch, channels, (3, 3), (1, 1), (1, 1), f"{name}_b", act=False)
        body = mx.sym.Activation(mx.sym.elemwise_add(branch, body, name=f"{name}_add"),
                                 act_type="relu", name=f"{name}_out")
    pool = mx.sym.Pooling(body, global_pool=True, kernel=(1, 1), pool_type="avg", name="pool")
    flat = mx.sym.Flatten(pool, name="flatten")
    fc = mx.sym.FullyConnected(flat, num_hidden=num_classes, name="fc")
    return mx.sym.SoftmaxOutput(fc, name="softmax")


def _preact_bottleneck(data, num_filter, stride, dim_match, name, mark_stage):
    bn1 = mx.sym.BatchNorm(data, fix_gamma=False, eps=2e-5, momentum=0.9, name=f"{name}_bn1")
    act1 = mx.sym.Activation(bn1, act_type="relu", name=f"{name}_relu1")
    conv1 = mx.sym.Convolution(act1, num_filter=num_filter // 4, kernel=(1, 1), no_bias=True,
                               name=f"{name}_conv1")
    bn2 = mx.sym.BatchNorm(conv1, fix_gamma=False, eps=2e-5, momentum=0.9, name=f"{name}_bn2")
    act2 = mx.sym.Activation(bn2, act_type="relu", name=f"{name}_relu2")
    conv2 = mx.sym.Convolution(act2, num_filter=num_filter // 4, kernel=(3, 3), stride=stride,
                               pad=(1, 1), no_bias=True, name=f"{name}_conv2")
    bn3 = mx.sym.BatchNorm(conv2, fix_gamma=False, eps=2e-5, momentum=0.9, name=f"{name}_bn3")
    act3 = mx.sym.Activation(bn3, act_type="relu", name=f"{name}_relu3")
    conv3 = mx.sym.Convolution(act3, num_filter=num_filter, kernel=(1, 1), no_bias=True,
                               name=f"{name}_conv3")
    if dim_match:
        shortcut = data
    else:
        shortcut = mx.sym.Convolution(act1, num_filter=num_filter, kernel=(1, 1), stride=stride,
                                      no_bias=True, name=f"{name}_sc")
    if mark_stage:
        shortcut._set_attr(mirror_stage="True")
    return mx.sym.elemwise_add(conv3, shortcut, name=f"{name}_plus")


def _preact_stages(body, units_per_stage, filters, mark_stages):
    """Stages of pre-activation bottleneck units; the first unit of later stages halves the size."""
    for stage, count in enumerate(units_per_stage):
        for unit in range(count):
            stride = (1, 1) if stage == 0 or unit > 0 else (2, 2)
            body = _preact_bottleneck(body, filters[stage + 1], stride, unit > 0,
                                      f"stage{stage + 1}_unit{unit + 1}", mark_stages)
    return body


def _preact_head(body, num_classes):
    """Final BatchNorm, ReLU, global average pooling, classifier and softmax loss."""
    bn = mx.sym.BatchNorm(body, fix_gamma=False, eps=2e-5, momentum=0.9, name="bn_final")
    relu = mx.sym.Activation(bn, act_type="relu", name="relu_final")
    pool = mx.sym.Pooling(relu, global_pool=True, kernel=(1, 1), pool_type="avg", name="pool_final")
    fc = mx.sym.FullyConnected(mx.sym.Flatten(pool), num_hidden=num_classes, name="fc")
    return mx.sym.SoftmaxOutput(fc, name="softmax")


def preact_resnet_cifar(depth: int = 1001, num_classes: int = 10,
                        mark_stages: bool = False) -> "mx.sym.Symbol":
    """Pre-activation bottleneck ResNet for 32x32 inputs (He et al., 2016).

    ``depth = 9 n + 2``; 1001 gives 333 bottleneck units (1000 weighted layers).
    With ``mark_stages`` the shortcuts carry ``mirror_stage`` marks as in the
    memonger's example.
    """
    if (depth - 2) % 9:
        raise ValueError(f"depth must be 9 n + 2 (e.g. 164, 1001), got {depth}")
    units = (depth - 2) // 9
    filters = (16, 64, 128, 256)
    data = mx.sym.var("data")
    body = mx.sym.Convolution(data, num_filter=filters[0], kernel=(3, 3), pad=(1, 1), no_bias=True,
                              name="conv0")
    body = _preact_stages(body, [units] * 3, filters, mark_stages)
    return _preact_head(body, num_classes)


def memonger_resnet(num_layers: int = 50, num_classes: int = 1000) -> "mx.sym.Symbol":
    """An ImageNet pre-activation ResNet annotated as in the memonger's example.

    The shortcut of every unit carries ``mirror_stage='True'``, which is what
    the seed's search needs.
    """
    units = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
             152: [3, 8, 36, 3]}.get(num_layers)
    if units is None:
        raise ValueError(f"num_layers must be one of 18, 34, 50, 101, 152; got {num_layers}")
    filters = (64, 256, 512, 1024, 2048)
    data = mx.sym.var("data")
    body = _conv_bn_relu(data, filters[0], (7, 7), (2, 2), (3, 3), "stem")
    body = mx.sym.Pooling(body, kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="max",
                          name="stem_pool")
    body = _preact_stages(body, units, filters, True)
    return _preact_head(body, num_classes)


def unet(depth: int = 4, base_filters: int = 32, num_classes: int = 2) -> "mx.sym.Symbol":
    """A U-Net (Ronneberger et al., 2015) for per-pixel classification, with long skips.

    Each level has two 3x3 conv-BatchNorm-ReLU layers; the encoder's output at
    each level is concatenated into the decoder at the same level, so the
    largest activations cross most of the network.  Input ``data`` is
    (N, 3, H, W) with H and W divisible by ``2 ** depth``; label
    ``softmax_label`` is (N, H, W).
    """
    def double_conv(data, filters, name):
        data = _conv_bn_relu(data, filters, (3, 3), (1, 1), (1, 1), f"{name}_a")
        return _conv_bn_relu(data, filters, (3, 3), (1, 1), (1, 1), f"{name}_b")

    x = mx.sym.var("data")
    skips = []
    for level in range(depth):
        x = double_conv(x, base_filters << level, f"down{level}")
        skips.append(x)
        x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max", name=f"pool{level}")
    x = double_conv(x, base_filters << depth, "bottom")
    for level in reversed(range(depth)):
        x = mx.sym.Deconvolution(x, num_filter=base_filters << level, kernel=(2, 2), stride=(2, 2),
                                 name=f"up{level}")
        x = mx.sym.Concat(x, skips[level], dim=1, name=f"skip{level}")
        x = double_conv(x, base_filters << level, f"dec{level}")
    x = mx.sym.Convolution(x, num_filter=num_classes, kernel=(1, 1), name="classifier")
    return mx.sym.SoftmaxOutput(x, multi_output=True, name="softmax")


def default_image_size(network: str) -> int:
    """Input side length a gluoncv classification network expects."""
    return 299 if "inception" in network else 224


def gluon_symbol(network: str, classes: int = 1000, loss: bool = True,
                 **model_kwargs) -> Tuple["mx.sym.Symbol", "mx.gluon.HybridBlock"]:
    """A gluoncv model (random weights, nothing downloaded) traced to a symbol.

    Parameters
    ----------
    network : str
        A gluoncv model-zoo name (``resnet50_v1b``, ``inceptionv3``...).
    classes : int
        Output classes.
    loss : bool
        Append ``SoftmaxOutput(name='softmax')`` (label ``softmax_label``).

    Returns
    -------
    (mx.sym.Symbol, HybridBlock)
        The symbol and the block it came from.
    """
    from gluoncv.model_zoo import get_model

    block = get_model(network, pretrained=False, classes=classes, **model_kwargs)
    block.initialize()
    block.hybridize()
    out = block(mx.sym.var("data"))
    if isinstance(out, (list, tuple)):
        out = out[0]
    symbol = mx.sym.SoftmaxOutput(out, name="softmax") if loss else out
    return symbol, block


def lstm_language_model(seq_len: int, vocab: int = 10000, num_embed: int = 200,
                        num_hidden: int = 200, num_layers: int = 2) -> "mx.sym.Symbol":
    """The bucketing language model of MXNet's ``example/rnn/bucketing/lstm_bucketing.py``.

    An embedding, ``num_layers`` LSTM cells unrolled ``seq_len`` steps with every step's
    output merged into one classifier and softmax (inputs ``data`` and ``softmax_label``,
    both ``(batch, seq_len)``).
    """
    stack = mx.rnn.SequentialRNNCell()
    for layer in range(num_layers):
        stack.add(mx.rnn.LSTMCell(num_hidden=num_hidden, prefix=f"lstm_l{layer}_"))
    data = mx.sym.Variable("data")
    label = mx.sym.Variable("softmax_label")
    embed = mx.sym.Embedding(data=data, input_dim=vocab, output_dim=num_embed, name="embed")
    outputs, _ = stack.unroll(seq_len, inputs=embed, merge_outputs=True)
    pred = mx.sym.Reshape(outputs, shape=(-1, num_hidden))
    pred = mx.sym.FullyConnected(data=pred, num_hidden=vocab, name="pred")
    label = mx.sym.Reshape(label, shape=(-1,))
    return mx.sym.SoftmaxOutput(data=pred, label=label, name="softmax")


def last_output_lstm(layers: int = 2, hidden: int = 512, steps: int = 100,
                     classes: int = 1000) -> "mx.sym.Symbol":
    """The bench LSTM: ``layers`` LSTM cells unrolled ``steps`` steps over ``data``
    (batch, steps, features), the sequence classified from its last output."""
    stack = mx.rnn.SequentialRNNCell()
    for layer in range(layers):
        stack.add(mx.rnn.LSTMCell(hidden, prefix=f"lstm_l{layer}_"))
    outputs, _ = stack.unroll(steps, inputs=mx.sym.var("data"), layout="NTC", merge_outputs=False)
    out = mx.sym.FullyConnected(outputs[-1], num_hidden=classes, name="fc")
    return mx.sym.SoftmaxOutput(out, name="softmax")


def bert_mlm(layers: int = 12, units: int = 768, heads: int = 12, hidden: int = 3072,
             vocab: int = 30522, seq_len: int = 512, max_length: int = 512, dropout: float = 0.1,
             masked: int = 80, tied: bool = True, type_vocab: int = 2,
             padding_mask: bool = False) -> "mx.sym.Symbol":
    """A BERT-shaped masked-language-model training symbol of the project's own (no gluonnlp).

    The layout of gluonnlp 0.10's ``bert_12_768_12`` with its masked-LM decoder: word,
    token-type and learned position embeddings summed, LayerNorm and Dropout (Google's BERT
    order; gluonnlp 0.10 drops before its LayerNorm); ``layers``
    post-norm encoder cells, each a fused query-key-value projection and MXNet's interleaved
    self-attention operators (``_contrib_interleaved_matmul_selfatt_qk``/``_valatt``, as gluonnlp
    0.10 uses them, sequence-major layout), softmax, Dropout on the attention probabilities, an
    output projection, Dropout, residual and LayerNorm, then a GELU feed-forward block
    (``hidden`` units, ``LeakyReLU(act_type='gelu')``), Dropout, residual and LayerNorm.  The
    decoder (dense, GELU, LayerNorm, then a ``vocab``-way classifier) runs on ``masked``
    positions per sequence, gathered as gluonnlp's ``_decode`` does (``masked=None``: every
    position), into ``SoftmaxOutput``.  With ``padding_mask`` the attention softmax takes
    each row's valid length (input ``valid_length`` (batch,); ``softmax(..., use_length=True)``)
    as gluonnlp 0.10's ``DotProductSelfAttentionCell`` does.  Not modelled: the pooler and the
    next-sentence classifier, gluonnlp's per-call concatenation of the query, key and value
    weights, and its final ``SequenceMask``.

    Parameters
    ----------
    layers, units, heads, hidden : int
        Encoder cells, model width, attention heads, feed-forward width (BERT-base: 12, 768, 12,
        3072).
    vocab : int
        Vocabulary (30522 for BERT's uncased WordPiece).
    seq_len, max_length : int
        Sequence length of the inputs, and rows of the position embedding (``seq_len <=
        max_length``).
    dropout : float
        Dropout probability on the embeddings, the attention probabilities and after each
        sublayer (BERT: 0.1); 0 leaves the Dropout nodes out.
    masked : int or None
        Masked positions decoded per sequence (gluonnlp's pretraining: 80 of 512); None decodes
        all ``seq_len`` positions.
    tied : bool
        The classifier's weight is the word embedding's (as in BERT and gluonnlp); False gives
        it its own ``mlm_out_weight``.
    padding_mask : bool
        Mask the attention by ``valid_length`` as gluonnlp 0.10 does (off: no padding).

    Returns
    -------
    mx.sym.Symbol
        Inputs ``data`` and ``token_types`` (batch, seq_len), ``masked_positions`` (batch,
        masked; positions within each sequence) unless ``masked`` is None, ``valid_length``
        (batch,) with ``padding_mask``, and label ``softmax_label`` (batch, masked) or (batch,
        seq_len), flattened in the graph (so ``Module`` splits every input on its batch axis).
    """
    if seq_len > max_length:
        raise ValueError(f"seq_len {seq_len} exceeds max_length {max_length}")
    if units % heads:
        raise ValueError(f"units ({units}) must be a multiple of heads ({heads})")

    def drop(x, name):
        return mx.sym.Dropout(x, p=dropout, name=name) if dropout else x

    def gelu_of(x, name):
        return mx.sym.LeakyReLU(x, act_type="gelu", name=name)

    data = mx.sym.var("data")
    word_weight = mx.sym.var("word_embed_weight")
    embed = mx.sym.Embedding(data, weight=word_weight, input_dim=vocab, output_dim=units,
                             name="word_embed")
    embed = embed + mx.sym.Embedding(mx.sym.var("token_types"), input_dim=type_vocab,
                                     output_dim=units, name="token_type_embed")
    position = mx.sym.slice_axis(mx.sym.var("position_weight", shape=(max_length, units)), axis=0,
                                 begin=0, end=seq_len, name="position_slice")
    embed = mx.sym.broadcast_add(embed, mx.sym.expand_dims(position, axis=0), name="embed_sum")
    x = drop(mx.sym.LayerNorm(embed, name="embed_ln"), "embed_drop")
    x = mx.sym.transpose(x, axes=(1, 0, 2), name="to_tnc")     # (seq, batch, units)
    lengths = None
    if padding_mask:   # gluonnlp 0.10: the valid length of every query row, per head
        steps = mx.sym.contrib.arange_like(data, axis=1)
        lengths = mx.sym.broadcast_add(mx.sym.reshape(mx.sym.var("valid_length"), shape=(-1, 1)),
                                       mx.sym.reshape(mx.sym.zeros_like(steps), shape=(1, -1)))
        lengths = mx.sym.cast(lengths, dtype="int32")
        lengths = mx.sym.reshape(mx.sym.broadcast_axis(mx.sym.expand_dims(lengths, axis=1), axis=1,
                                                       size=heads), shape=(-3, 0), name="att_lengths")
    for i in range(layers):
        pre = f"enc{i}_"
        qkv = mx.sym.FullyConnected(x, num_hidden=3 * units, flatten=False, name=pre + "qkv")
        scores = mx.sym.contrib.interleaved_matmul_selfatt_qk(qkv, heads=heads, name=pre + "scores")
        if lengths is None:
            probs = mx.sym.softmax(scores, axis=-1, name=pre + "probs")
        else:
            probs = mx.sym.softmax(scores, lengths, axis=-1, use_length=True, name=pre + "probs")
        probs = drop(probs, pre + "att_drop")
        context = mx.sym.contrib.interleaved_matmul_selfatt_valatt(qkv, probs, heads=heads,
                                                                   name=pre + "context")
        out = mx.sym.FullyConnected(context, num_hidden=units, flatten=False, name=pre + "proj")
        x = mx.sym.LayerNorm(x + drop(out, pre + "proj_drop"), name=pre + "ln1")
        ffn = mx.sym.FullyConnected(x, num_hidden=hidden, flatten=False, name=pre + "ffn1")
        ffn = gelu_of(ffn, pre + "gelu")
        ffn = mx.sym.FullyConnected(ffn, num_hidden=units, flatten=False, name=pre + "ffn2")
        x = mx.sym.LayerNorm(x + drop(ffn, pre + "ffn_drop"), name=pre + "ln2")
    x = mx.sym.transpose(x, axes=(1, 0, 2), name="to_ntc")     # (batch, seq, units)
    x = mx.sym.reshape(x, shape=(-1, units), name="flat")
    if masked is not None:
        positions = mx.sym.var("masked_positions")
        offsets = mx.sym.contrib.arange_like(positions, axis=0) * seq_len
        flat = mx.sym.broadcast_add(positions, mx.sym.expand_dims(offsets, axis=1))
        x = mx.sym.take(x, mx.sym.reshape(flat, shape=(-1,)), axis=0, name="mlm_gather")
    x = mx.sym.FullyConnected(x, num_hidden=units, name="mlm_dense")
    x = mx.sym.LayerNorm(gelu_of(x, "mlm_gelu"), name="mlm_ln")
    out_weight = word_weight if tied else mx.sym.var("mlm_out_weight")
    logits = mx.sym.FullyConnected(x, weight=out_weight, num_hidden=vocab, name="mlm_out")
    label = mx.sym.reshape(mx.sym.var("softmax_label"), shape=(-1,), name="label_flat")
    return mx.sym.SoftmaxOutput(logits, label, name="softmax")


def bert_mlm_shapes(batch: int = 8, seq_len: int = 512, masked: Optional[int] = 80,
                    padding_mask: bool = False):
    """``(data_shapes, label_shapes)`` of :func:`bert_mlm` (``masked=None``: every position)."""
    data: List[Tuple[str, Tuple[int, ...]]] = [("data", (batch, seq_len)), ("token_types", (batch, seq_len))]
    if masked is not None:
        data.append(("masked_positions", (batch, masked)))
    if padding_mask:
        data.append(("valid_length", (batch,)))
    return data, [("softmax_label", (batch, masked if masked is not None else seq_len))]

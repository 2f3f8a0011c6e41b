#!/usr/bin/env python
"""Train an LSTM language model on a synthetic corpus with MirroredBucketingModule.

Sentences of varying length are bucketed (mx.rnn.BucketSentenceIter); each bucket
gets its own mirror plan.  Nothing is downloaded.

    python examples/train_lstm_bucketing.py --num-layers 2 --num-hidden 512 --epochs 2
"""
from __future__ import annotations

import argparse
import logging
import random

import mxnet as mx
import numpy as np

from mxnet_mirror_hook import add_arguments, from_args

log = logging.getLogger("train_lstm_bucketing")


def synthetic_corpus(sentences: int, vocabulary: int, seed: int = 0):
    """Sentences drawn from a random first-order Markov chain (so there is something to learn)."""
    rng = np.random.RandomState(seed)
    transitions = rng.dirichlet(np.full(vocabulary - 1, 0.05), size=vocabulary)
    corpus = []
    for _ in range(sentences):
        length = int(rng.choice([8, 16, 24, 32]))
        token = int(rng.randint(1, vocabulary))
        sentence = [token]
        for _ in range(length - 1):
            token = int(rng.choice(vocabulary - 1, p=transitions[token])) + 1  # 0 is padding
            sentence.append(token)
        corpus.append(sentence)
    return corpus


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-hidden", type=int, default=256)
    parser.add_argument("--num-embed", type=int, default=128)
    parser.add_argument("--vocabulary", type=int, default=200)
    parser.add_argument("--sentences", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    add_arguments(parser, mirror_default=True)  # --mirror/--no-mirror, --memory-budget, --planner...
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    mx.random.seed(0)  # reproducible: mirrored and plain runs give the same perplexity
    np.random.seed(0)
    random.seed(0)  # BucketSentenceIter shuffles with Python's random

    buckets = [8, 16, 24, 32]
    train_iter = mx.rnn.BucketSentenceIter(synthetic_corpus(args.sentences, args.vocabulary),
                                           args.batch_size, buckets=buckets, invalid_label=0)
    stack = mx.rnn.SequentialRNNCell()
    for layer in range(args.num_layers):
        stack.add(mx.rnn.LSTMCell(args.num_hidden, prefix=f"lstm_l{layer}_"))

    def sym_gen(seq_len):
        data, label = mx.sym.var("data"), mx.sym.var("softmax_label")
        embed = mx.sym.Embedding(data, input_dim=args.vocabulary, output_dim=args.num_embed,
                                 name="embed")
        stack.reset()
        outputs, _ = stack.unroll(seq_len, inputs=embed, merge_outputs=True)
        pred = mx.sym.FullyConnected(mx.sym.reshape(outputs, shape=(-1, args.num_hidden)),
                                     num_hidden=args.vocabulary, name="pred")
        out = mx.sym.SoftmaxOutput(pred, label=mx.sym.reshape(label, shape=(-1,)),
                                   use_ignore=True, ignore_label=0, name="softmax")
        return out, ("data",), ("softmax_label",)

    module = from_args(args, bucketing=True)(sym_gen, default_bucket_key=train_iter.default_bucket_key,
                                             context=mx.cpu())
    metric = mx.metric.Perplexity(ignore_label=0)
    module.fit(train_iter, eval_metric=metric, num_epoch=args.epochs, optimizer="adam",
               optimizer_params={"learning_rate": 0.01}, initializer=mx.init.Xavier(),
               batch_end_callback=mx.callback.Speedometer(args.batch_size, 10))
    perplexity = metric.get()[1]
    plans = getattr(module, "mirror_plans", {})
    for key in sorted(plans):
        plan = plans[key]
        log.info("bucket %s: %s", key, plan.summary() if plan else "bound without gradients")
    log.info("summary: %d epochs, perplexity %.1f (vocabulary %d)%s", args.epochs, perplexity,
             args.vocabulary, ", mirrored" if args.mirror else ", plain")
    return {"perplexity": perplexity, "buckets": sorted(plans),
            "plans": {k: (p.baseline_mb, p.planned_mb) for k, p in plans.items() if p}}


if __name__ == "__main__":
    main()

"""TensorFlow side of the parity tests: build small GraphDefs and run them in TF itself.

TensorFlow is a test-only dependency; it is imported once per session (about 8 s). Graphs are
built two ways:

- with TF's own op constructors (``tf.raw_ops`` in a ``tf.Graph``), which write current
  attributes (``data_format``, ``dilations``, ``explicit_paddings``, ``half_pixel_centers`` ...);
- as raw NodeDefs with the 2015 attribute set (``selfflow.eval.synthetic.GraphBuilder``), for the
  ops TF no longer lets Python create (``BatchNormWithGlobalNormalization`` needs a GraphDef
  producer version below 9) and for the old ``Concat``.

``adm_features`` runs a graph the way ADM's evaluator does: ``import_graph_def`` with
``input_map={"ExpandDims:0": batch}``, ``pool_3:0`` and ``mixed_6/conv:0`` returned, the
spatial map cut to 7 channels, and the softmax computed as ``tf.nn.softmax(tf.matmul(pool, W))``
with ``W`` = input 1 of ``softmax/logits/MatMul``. TensorFlow honours the synthetic graphs'
control inputs (it runs every ``X/CheckNumerics`` before ``X``); selfflow skips them, so the
parity tests cover graphs with control edges as in the real file.
"""

from __future__ import annotations

import functools
import os

import numpy as np


@functools.cache
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    tensorflow.config.threading.set_intra_op_parallelism_threads(2)
    tensorflow.config.threading.set_inter_op_parallelism_threads(1)
    return tensorflow


def _session(graph):
    t = tf()
    config = t.compat.v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    return t.compat.v1.Session(graph=graph, config=config)


def graph_def(data: bytes):
    gd = tf().compat.v1.GraphDef()
    gd.ParseFromString(data)
    return gd


def run_graph(data: bytes, feeds: dict[str, np.ndarray], fetches: list[str]) -> list[np.ndarray]:
    """Import a serialized GraphDef into a fresh TF graph and run it."""
    t = tf()
    graph = t.Graph()
    with graph.as_default():
        t.compat.v1.import_graph_def(graph_def(data), name="")
    with _session(graph) as sess:
        return sess.run(fetches, {name: value for name, value in feeds.items()})


def adm_features(data: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool, spatial, softmax) of float32 NHWC images, computed in TF as ADM's evaluator does."""
    t = tf()
    v1 = t.compat.v1
    gd = graph_def(data)
    graph = t.Graph()
    with graph.as_default():
        batch = v1.placeholder(t.float32, shape=[None, None, None, 3])
        pool3, spatial = v1.import_graph_def(
            gd,
            input_map={"ExpandDims:0": batch},
            return_elements=["pool_3:0", "mixed_6/conv:0"],
            name="features",
        )
        spatial = spatial[..., :7]
        (matmul,) = v1.import_graph_def(gd, return_elements=["softmax/logits/MatMul"], name="sm")
        weight = matmul.inputs[1]
        pool_in = v1.placeholder(t.float32, shape=[None, weight.shape[0]])
        softmax = t.nn.softmax(t.matmul(pool_in, weight))
    with _session(graph) as sess:
        pool, spat = sess.run([pool3, spatial], {batch: images.astype(np.float32)})
        pool = pool.reshape(len(images), -1)
        probs = sess.run(softmax, {pool_in: pool})
    return pool, spat.reshape(len(images), -1), probs


def tf_built(build) -> bytes:
    """Serialize a graph made by ``build(tf)`` with TF's own op constructors."""
    t = tf()
    graph = t.Graph()
    with graph.as_default():
        build(t)
    return graph.as_graph_def().SerializeToString()


def float16_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's squared-distance block run in TensorFlow's own float16 kernels (eager, CPU).

    The expression is ADM's evaluator's (its pairwise distance block),
    ``max(|u|^2 - 2 u.v + |v|^2, 0)`` with every tensor float16: TF's ``reduce_sum`` of the squares and its ``matmul``, whose
    accumulation orders are TF's, not ours. Returns float16.
    """
    t = tf()
    a, b = t.constant(u.astype(np.float16)), t.constant(v.astype(np.float16))
    norm_a = t.reshape(t.reduce_sum(t.square(a), axis=1), [-1, 1])
    norm_b = t.reshape(t.reduce_sum(t.square(b), axis=1), [1, -1])
    return t.maximum(norm_a - 2 * t.matmul(a, b, transpose_b=True) + norm_b, 0.0).numpy()

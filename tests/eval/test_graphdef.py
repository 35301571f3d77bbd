"""GraphDef reading: constants decode as TensorFlow decodes them; bad graphs stop clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow.base.errors import ConfigurationError, EvaluationError
from selfflow.eval.graphdef import TFGraph, tensor_to_numpy
from selfflow.eval.inception import InceptionV3
from selfflow.eval.synthetic import FLOAT, GraphBuilder, inception_like_graph
from selfflow.eval.tf_ops import GraphExecutor
from tests.eval import tfgraphs


@pytest.mark.parametrize(
    "value, dtype, shape",
    [
        (np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "float32", None),
        (np.arange(-5, 7, dtype=np.int32).reshape(2, 6), "int32", None),
        (np.array([2**40, -3], dtype=np.int64), "int64", None),
        (np.array([0.5, -1.25, 65504], dtype=np.float16), "float16", None),
        (np.array([[0, 255, 7]], dtype=np.uint8), "uint8", None),
        (np.array([True, False, True]), "bool", None),
        (1.5, "float32", [2, 3]),  # one listed value, splatted over the shape
        (128.0, "float32", []),  # scalar, like Sub/y
        (7, "int32", [4]),
    ],
)
def test_constants_decode_like_tensorflow(value, dtype, shape):
    tf = tfgraphs.tf()
    proto = tf.make_tensor_proto(value, dtype=getattr(tf, dtype), shape=shape)
    expected = tf.make_ndarray(proto)
    from tensorboard.compat.proto import tensor_pb2

    ours = tensor_to_numpy(tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def test_garbage_is_not_a_graph(tmp_path):
    path = tmp_path / "bad.pb"
    path.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 10)
    with pytest.raises(ConfigurationError, match="not a readable TensorFlow GraphDef"):
        TFGraph.load(path)
    path.write_bytes(b"")
    with pytest.raises(ConfigurationError, match="holds no graph nodes"):
        TFGraph.load(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        TFGraph.load(tmp_path / "missing.pb")


def test_truncated_inception_graph_is_refused(tmp_path, inception_small):
    data = inception_small.read_bytes()
    path = tmp_path / "truncated.pb"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigurationError, match="GraphDef|no node"):
        InceptionV3(path)


def test_a_graph_without_the_inception_nodes_is_refused():
    b = GraphBuilder()
    b.node("x", "Placeholder", dtype=FLOAT)
    with pytest.raises(ConfigurationError, match="not ADM's Inception graph.*ExpandDims"):
        InceptionV3(TFGraph.from_bytes(b.to_bytes(), source="other.pb"))


def test_unknown_op_on_the_path_is_named():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    b.node("mixed_2/weird", "Erf", [x], T=FLOAT)
    b.node("y", "Relu", ["mixed_2/weird"], T=FLOAT)
    with pytest.raises(ConfigurationError, match=r"'mixed_2/weird' has op type 'Erf'"):
        GraphExecutor(TFGraph.from_bytes(b.to_bytes()), ["x:0"], ["y:0"])


def test_unused_unknown_ops_do_not_matter():
    # The Inception graph starts with DecodeJpeg, which is never run: images enter below it.
    graph = TFGraph.from_bytes(inception_like_graph(width=0.0625, image_size=75))
    assert graph.node("DecodeJpeg").op == "DecodeJpeg"
    model = InceptionV3(graph)
    pool, spatial = model.features(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))
    assert pool.shape[0] == 2 and spatial.shape == (2, 3 * 3 * 7)


def test_unfed_placeholder_is_reported():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    z = b.node("z", "Placeholder", dtype=FLOAT)
    b.node("y", "Add", [x, z], T=FLOAT)
    with pytest.raises(ConfigurationError, match="'z' is a Placeholder"):
        GraphExecutor(TFGraph.from_bytes(b.to_bytes()), ["x:0"], ["y:0"])


def test_cycles_are_reported():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    b.node("a", "Add", [x, "b"], T=FLOAT)
    b.node("b", "Relu", ["a"], T=FLOAT)
    with pytest.raises(ConfigurationError, match="cycle"):
        GraphExecutor(TFGraph.from_bytes(b.to_bytes()), ["x:0"], ["b:0"])


def test_nchw_convolution_is_refused_not_misread():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    w = b.const("w", np.ones((3, 3, 3, 4), np.float32))
    b.node("y", "Conv2D", [x, w], T=FLOAT, padding="SAME", strides=[1, 1, 1, 1], data_format="NCHW")
    with pytest.raises(ConfigurationError, match="data_format NCHW"):
        GraphExecutor(TFGraph.from_bytes(b.to_bytes()), ["x:0"], ["y:0"])


def test_feeds_and_constants_are_never_overwritten():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    c = b.const("c", np.array([-1.0, 2.0, -3.0], np.float32))
    view = b.node("view", "Identity", [c], T=FLOAT)
    b.node("y", "Add", [b.node("rx", "Relu", [x], T=FLOAT), b.node("rc", "Relu", [view])], T=FLOAT)
    executor = GraphExecutor(TFGraph.from_bytes(b.to_bytes()), ["x:0"], ["y:0"])
    assert executor.in_place == {"y"}  # the Relus are the last readers, of memory not theirs
    feed = torch.tensor([[1.0, -2.0, 3.0]])
    first = executor({"x:0": feed})[0].clone()
    second = executor({"x:0": feed})[0]
    np.testing.assert_array_equal(feed.numpy(), [[1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(first.numpy(), [[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(second.numpy(), first.numpy())


def test_layers_are_guarded_by_control_dependencies_that_are_never_run():
    # The 2015 graph: X/batchnorm -> X/CheckNumerics; X/control_dependency = Identity(X/batchnorm,
    # ^X/CheckNumerics) -> X (Relu); pools likewise, on their input.
    graph = TFGraph.from_bytes(inception_like_graph(width=0.03, image_size=75))
    nodes = graph.nodes
    for layer, checked in (("conv", "conv/batchnorm"), ("mixed_6/conv", "mixed_6/conv/batchnorm")):
        assert nodes[f"{layer}/CheckNumerics"].op == "CheckNumerics"
        assert list(nodes[f"{layer}/CheckNumerics"].input) == [checked]
        dependency = nodes[f"{layer}/control_dependency"]
        assert dependency.op == "Identity"
        assert list(dependency.input) == [checked, f"^{layer}/CheckNumerics"]
        assert list(nodes[layer].input) == [f"{layer}/control_dependency"]
    assert list(nodes["pool/control_dependency"].input) == ["conv_2", "^pool/CheckNumerics"]
    assert (
        list(nodes["pool"].input) == ["pool/control_dependency"] and nodes["pool"].op == "MaxPool"
    )
    model = InceptionV3(graph)
    order = {graph.nodes[n].op for n in model.executor.order}
    assert "CheckNumerics" not in order and "Identity" in order
    # The Identity in front of every ReLU does not stop the ReLU (or the batch norm) from
    # reusing dead memory.
    relus = {n for n in model.executor.order if graph.nodes[n].op == "Relu"}
    norms = {n for n in model.executor.order if n.endswith("/batchnorm")}
    assert len(relus) == len(norms) == 94
    assert relus | norms <= model.executor.in_place


def test_control_inputs_are_not_followed():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    b.node("unfed", "Placeholder", dtype=FLOAT)
    b.node("unknown", "Erf", ["unfed"], T=FLOAT)
    b.node("y", "Relu", [x, "^unknown", "^unfed"], T=FLOAT)
    executor = GraphExecutor(TFGraph.from_bytes(b.to_bytes()), ["x:0"], ["y:0"])
    assert executor.order == ["y"]
    (y,) = executor({"x:0": torch.tensor([-1.0, 2.0])})
    np.testing.assert_array_equal(y.numpy(), [0.0, 2.0])


def test_check_numerics_passes_finite_tensors_and_names_itself_on_nan_or_inf():
    b = GraphBuilder()
    x = b.node("x", "Placeholder", dtype=FLOAT)
    b.node("layer/CheckNumerics", "CheckNumerics", [x], T=FLOAT, message="layer input")
    data = b.to_bytes()
    executor = GraphExecutor(TFGraph.from_bytes(data), ["x:0"], ["layer/CheckNumerics:0"])
    finite = np.array([1.5, -2.0, 0.0], np.float32)
    (ours,) = executor({"x:0": torch.from_numpy(finite)})
    np.testing.assert_array_equal(
        ours.numpy(), tfgraphs.run_graph(data, {"x:0": finite}, ["layer/CheckNumerics:0"])[0]
    )
    tf = tfgraphs.tf()
    for bad, kind in ((np.nan, "NaN"), (np.inf, "Inf")):
        value = np.array([1.0, bad], np.float32)
        with pytest.raises(tf.errors.InvalidArgumentError, match="layer input"):
            tfgraphs.run_graph(data, {"x:0": value}, ["layer/CheckNumerics:0"])
        with pytest.raises(EvaluationError, match=f"'layer/CheckNumerics'.*layer input.*{kind}"):
            executor({"x:0": torch.from_numpy(value)})

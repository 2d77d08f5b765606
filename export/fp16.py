"""fp16 image graphs: onnxruntime's float16 converter, made to work on a graph with a Scan.

The conversion is onnxruntime's own `transformers.float16.convert_float_to_float16` (it ships with
onnxruntime: no new dependency), with keep_io_types, so the graph's IO contract stays float32 and
the runtime needs no change. Weights and matmuls go to fp16. What stays fp32 was decided by
measurement (docs/fp16.md): the maps' tail (`tail_nodes`: the layer sum, the resize, the min-max),
always, and for some towers the prompt loop's body (`loop_nodes`: the per-prompt LeGrad backward);
fp16_export.py picks per model.

The converter is written for graphs without subgraphs, and the image graph loops over prompts in a
Scan. Four repairs follow it, each checked by `onnx.checker` and the agreement tests:
  - casts it adds for a blocked node inside the Scan body land in the main graph: moved into the body;
  - a value_info it flips to fp16 for an initializer it keeps fp32: dropped (the initializer says it);
  - between two blocked nodes it rounds through fp16 (Cast to fp16, Cast back): the round trip is cut,
    and casts to the type a value already has are removed;
  - it appends the casts at the end of the graph: nodes are sorted again, counting what a Scan body
    reads from outside (an implicit input of the Scan node).

`emulate_fp16_compute` is the CPU's stand-in for fp16 kernels, used to measure and check.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

__all__ = ["convert_to_fp16", "tail_nodes", "loop_nodes", "emulate_fp16_compute"]

_INLINE_BYTES = 1024  # initializers up to this size keep their data during type inference
_LAYOUT_OPS = {  # ops that move values and compute nothing
    "Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Concat", "Gather", "GatherND", "Expand",
    "Shape", "Identity", "Split", "Flatten",
}  # fmt: skip
_MAPS = "layer_maps"  # the image graph's raw per-layer maps (IMAGE_GRAPH and CLASSIFIER_GRAPH)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a graph (with its subgraphs) reads without defining them: a subgraph's outer scope."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for sub in _subgraphs(node):
            used |= _outer_reads(sub)
        defined.update(node.output)
    return used - defined


def _reads(node: onnx.NodeProto) -> set[str]:
    """What a node needs before it runs: its inputs and what its subgraphs read from outside."""
    names = {x for x in node.input if x}
    for sub in _subgraphs(node):
        names |= _outer_reads(sub)
    return names


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every value's type inferred (value_info, subgraphs too).

    Inference runs on a copy whose large initializers are held aside, so it never serialises the
    weights (nor meets protobuf's 2 GB limit); their data goes back afterwards.
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    held = {}
    for t in stripped.graph.initializer:
        if t.raw_data and len(t.raw_data) > _INLINE_BYTES:
            held[t.name] = t.raw_data
            t.ClearField("raw_data")
    typed = onnx.shape_inference.infer_shapes(stripped)
    for t in typed.graph.initializer:
        if t.name in held:
            t.raw_data = held[t.name]
    return typed


def tail_nodes(graph: onnx.GraphProto, types: Mapping[str, int]) -> list[str]:
    """Names of the main graph's nodes downstream of the raw per-layer maps, the last computed values
    that the `layer_maps` output is a reshaped view of (the prompt loop's output, or a MAP head's
    per-layer means): the layer sum, the resize and the min-max, a classifier's mean and torchcam
    normalisation, a MAP head's empty-prompt correction. `types`: each value's element type."""
    producer = {y: n for n in graph.node for y in n.output}
    raw, stack = set(), [_MAPS]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is not None and node.op_type in _LAYOUT_OPS:  # follow the data, not the shapes
            stack += [x for x in node.input if types.get(x) == TensorProto.FLOAT]
        elif node is not None:
            raw.add(name)
    return _downstream(graph, raw)


def _downstream(graph: onnx.GraphProto, values: set[str]) -> list[str]:
    """Names of the main graph's nodes that read `values`, or what such nodes write, in order."""
    reached, names = set(values), []
    for node in graph.node:  # topologically sorted
        if reached & set(node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


_PROMPT_INPUTS = ("text_embeds", "class_ids")  # IMAGE_GRAPH's and CLASSIFIER_GRAPH's per-prompt input


def loop_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the per-prompt LeGrad backward's nodes: the prompt loop's body, or, in a graph that
    takes its prompts at once (no loop: `legrad-export --prompts batch`), every main-graph node
    downstream of the prompts input."""
    bodies = list(_graphs(graph))[1:]
    if bodies:
        return [n.name for g in bodies for n in g.node]
    return _downstream(graph, {i.name for i in graph.input if i.name in _PROMPT_INPUTS})


def convert_to_fp16(
    model: onnx.ModelProto, fp32_tail: bool = True, fp32_loop: bool = False, fp32_ops: tuple[str, ...] = ()
) -> onnx.ModelProto:
    """fp16 weights and compute, float32 IO. Kept fp32: the maps' tail (`fp32_tail`), the prompt
    loop's body (`fp32_loop`), and every node of the op types `fp32_ops` (besides the converter's
    default list, ops it cannot convert). `model` is not changed."""
    typed = _with_types(model)
    converted = convert_float_to_float16(
        typed,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *fp32_ops],
        node_block_list=[
            *(tail_nodes(typed.graph, _value_types(typed)) if fp32_tail else []),
            *(loop_nodes(typed.graph) if fp32_loop else []),
        ],
    )
    _drop_initializer_value_info(converted.graph)
    _move_casts_into_subgraphs(converted.graph)
    _fold_casts(converted)
    _sort(converted.graph)
    return converted


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    for g in _graphs(graph):
        inits = {t.name for t in g.initializer}
        keep = [v for v in g.value_info if v.name not in inits]
        del g.value_info[:]
        g.value_info.extend(keep)


def _move_casts_into_subgraphs(graph: onnx.GraphProto) -> None:
    """Nodes of the main graph that read a value defined inside a subgraph go into that subgraph."""
    main = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    main |= {y for n in graph.node for y in n.output}
    home: dict[str, onnx.GraphProto] = {}
    for g in list(_graphs(graph))[1:]:
        for name in [v.name for v in g.input] + [y for n in g.node for y in n.output]:
            if name not in main:
                home[name] = g
    moved: dict[str, onnx.GraphProto] = {}
    pending = list(graph.node)
    while True:
        stay, progress = [], False
        for node in pending:
            target = next((home[x] for x in node.input if x in home), None)
            if target is None:
                stay.append(node)
                continue
            target.node.append(node)
            for y in node.output:
                home[y] = moved[y] = target
            progress = True
        pending = stay
        if not progress:
            break
    del graph.node[:]
    graph.node.extend(pending)
    infos = list(graph.value_info)
    del graph.value_info[:]
    for info in infos:
        (moved[info.name].value_info if info.name in moved else graph.value_info).append(info)


def _fold_casts(model: onnx.ModelProto) -> None:
    """Cut float32 → float16 → float32 round trips and casts to a value's own type; drop dead casts."""
    types = _value_types(model)
    for g in _graphs(model.graph):
        producer = {y: n for n in g.node for y in n.output}
        protected = {v.name for v in g.output}
        rename: dict[str, str] = {}
        for node in g.node:
            if node.op_type != "Cast" or node.output[0] in protected:
                continue
            to = next(a.i for a in node.attribute if a.name == "to")
            source = node.input[0]
            parent = producer.get(source)
            if to == TensorProto.FLOAT and parent is not None and parent.op_type == "Cast":
                if types.get(parent.input[0]) == TensorProto.FLOAT:  # float32 → float16 → float32
                    source = parent.input[0]
            if types.get(source) == to:
                rename[node.output[0]] = source
        if rename:
            _rename_reads(g, rename)
    _drop_dead_casts(model.graph)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for g in _graphs(model.graph):
        for v in [*g.input, *g.output, *g.value_info]:
            types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in g.node:
            if n.op_type == "Cast":
                types[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
    return types


def _rename_reads(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    """Every read of a key (in this graph and in its subgraphs) reads the value instead."""

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for g in _graphs(graph):
        for node in g.node:
            for i, x in enumerate(node.input):
                if x in rename:
                    node.input[i] = resolve(x)


def _drop_dead_casts(graph: onnx.GraphProto) -> None:
    """Remove Cast nodes whose output nobody reads, until none is left (subgraphs' outer reads count)."""
    while True:
        read = set()
        for g in _graphs(graph):
            read |= {v.name for v in g.output}
            for node in g.node:
                read |= _reads(node)
        removed = False
        for g in _graphs(graph):
            keep = [n for n in g.node if n.op_type != "Cast" or n.output[0] in read]
            if len(keep) < len(g.node):
                removed = True
                names = {y for n in g.node for y in n.output} - {y for n in keep for y in n.output}
                infos = [v for v in g.value_info if v.name not in names]
                del g.node[:]
                g.node.extend(keep)
                del g.value_info[:]
                g.value_info.extend(infos)
        if not removed:
            return


def _sort(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """Topological order, stable: a node waits for its inputs and for its subgraphs' outer reads."""
    ready = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], list(graph.node)
    while pending:
        waiting = []
        for node in pending:
            if _reads(node) <= ready:
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted(_reads(waiting[0]) - ready)
            raise ValueError(f"fp16 graph has a cycle or a dangling input: {waiting[0].name} reads {missing}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
    scope = frozenset(ready)
    for node in graph.node:
        for sub in _subgraphs(node):
            _sort(sub, scope)


# ---------------------------------------------------------------- fp16 kernels, emulated on the CPU


def emulate_fp16_compute(fp16: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 twin of a converted graph that rounds every value the fp16 graph holds in fp16 to
    fp16: what fp16 kernels with fp32 accumulation (a GPU's) compute, run on the CPU.

    onnxruntime's CPU provider has no fp16 kernel for most ops (MatMul, Add, Mul, Softmax, ...): it
    casts their inputs to fp32 and keeps whole runs of such nodes in fp32, so an fp16 graph run on
    the CPU shows the weights' rounding but little of the activations'. This twin shows both. Run
    it with graph optimisations off, so onnxruntime keeps its casts.
    """
    typed = _with_types(fp16)
    types = _value_types(typed)
    for g in _graphs(typed.graph):
        for t in g.initializer:
            _to_fp32(t)
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
                v.type.tensor_type.elem_type = TensorProto.FLOAT
        nodes = []
        for node in g.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                    attr.i = TensorProto.FLOAT
                if attr.type == onnx.AttributeProto.TENSOR:
                    _to_fp32(attr.t)
            nodes.append(node)
            if node.op_type in _LAYOUT_OPS:  # moves values, rounds nothing
                continue
            for k, y in enumerate(node.output):
                if y and types.get(y) == TensorProto.FLOAT16:  # computed in fp32, rounded to fp16
                    node.output[k] = f"{y}__fp32"
                    nodes.append(_cast(f"{y}__fp32", f"{y}__fp16", TensorProto.FLOAT16))
                    nodes.append(_cast(f"{y}__fp16", y, TensorProto.FLOAT))
        del g.node[:]
        g.node.extend(nodes)
    return typed


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], to=to, name=f"{target}__cast")


def _to_fp32(t: onnx.TensorProto) -> None:
    if t.data_type == TensorProto.FLOAT16:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

"""onnxruntime session options: tuned, applied to both graphs, and validated."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from legrad_runtime import load
from legrad_runtime.errors import InputError
from legrad_runtime.session import session_options


def test_session_options_are_the_tuned_ones():
    options = session_options(3)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern
    assert session_options().intra_op_num_threads == 0  # 0: onnxruntime's choice, all physical cores


def test_loaded_model_sessions_use_the_tuned_options_and_the_thread_count(model_folder):
    model = load(model_folder, device="cpu", threads=1)
    for session in (model._image, model._text):
        applied = session.get_session_options()
        assert applied.intra_op_num_threads == 1
        assert applied.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert applied.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


@pytest.mark.parametrize("threads", [0, -2, 1.5, "2"])
def test_bad_thread_counts_are_refused(threads):
    with pytest.raises(InputError, match="threads"):
        session_options(threads)

"""Where an ONNX Runtime graph spends its time: per operator type and per node.

ORT's own profiler (``SessionOptions.enable_profiling``) writes a Chrome-trace JSON with
one ``Node`` event per kernel call. This module runs a model a few times under it, drops
the warm-up run and sums the kernel times, so a latency table can be explained (which op
type dominates, which single node is slow) by a command instead of a throwaway script.
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

@dataclass
class OrtProfile:
    """Kernel time per run (ms), summed per op type and per node.

    Attributes:
        total_ms: all kernels of one run.
        op_types: ``[{op_type, ms, nodes, share}]``, slowest first.
        nodes: ``[{node, op_type, ms, share}]``, slowest first.
        runs: the profiled runs (after one warm-up run).
    """

    total_ms: float
    op_types: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    runs: int = 0


def random_feeds(path: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's static input shapes (standard normal / small ints)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value for d in tensor.shape.dim]
        if any(d <= 0 for d in dims):
            raise ValueError(f'random_feeds: input {value.name!r} of {path} has a dynamic '
                             f'shape {dims}; pass feeds')
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise ValueError(f'random_feeds: input {value.name!r} has ONNX element type '
                             f'{tensor.elem_type} ({dtype}); allowed: numeric or bool; '
                             'pass feeds')
        feeds[value.name] = (rng.standard_normal(dims).astype(dtype)
                             if np.issubdtype(dtype, np.floating)
                             else rng.integers(0, 8, dims).astype(dtype))
    return feeds


def profile_ort(path: str | Path, feeds: dict[str, np.ndarray] | None = None, *,
                runs: int = 10, threads: int = 1) -> OrtProfile:
    """Profile ``runs`` runs of the model at ``path`` (after one warm-up run) on the CPU.

    Args:
        path: an ``.onnx`` file.
        feeds: inputs; default :func:`random_feeds`.
        runs: profiled runs (>= 1).
        threads: ORT's intra-op threads.
    """
    import onnxruntime as ort

    if runs < 1:
        raise ValueError(f'profile_ort: runs={runs} must be >= 1')
    feeds = feeds if feeds is not None else random_feeds(path)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / 'ort')
        sess = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return summarize(events, runs)


def summarize(events: list[dict], runs: int) -> OrtProfile:
    """Sum the ``Node`` kernel events after the first ``model_run`` (the warm-up)."""
    model_runs = sorted((e for e in events if e.get('name') == 'model_run'),
                        key=lambda e: e['ts'])
    if len(model_runs) < runs + 1:
        raise ValueError(f'summarize: {len(model_runs)} model_run events for {runs} runs + '
                         'a warm-up')
    start = model_runs[0]['ts'] + model_runs[0]['dur']
    per_node: dict[str, float] = defaultdict(float)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get('cat') != 'Node' or e['ts'] < start or not e['name'].endswith('_kernel_time'):
            continue
        node = e['name'][:-len('_kernel_time')]
        per_node[node] += e['dur'] / 1e3 / runs
        op_of[node] = e.get('args', {}).get('op_name', '?')
    total = sum(per_node.values())
    per_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for node, ms in per_node.items():
        per_op[op_of[node]][0] += ms
        per_op[op_of[node]][1] += 1

    def share(ms: float) -> float:
        return round(ms / total, 3) if total else 0.0

    op_types = sorted(({'op_type': op, 'ms': round(ms, 3), 'nodes': n, 'share': share(ms)}
                       for op, (ms, n) in per_op.items()), key=lambda r: -r['ms'])
    nodes = sorted(({'node': node, 'op_type': op_of[node], 'ms': round(ms, 3),
                     'share': share(ms)} for node, ms in per_node.items()),
                   key=lambda r: -r['ms'])
    return OrtProfile(total_ms=round(total, 3), op_types=op_types, nodes=nodes, runs=runs)

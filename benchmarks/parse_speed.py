"""How long parsing (and formatting) takes on large .cir files: the bar is a 10 MB file in under 10 s.

Three 10 MB circuits of the shapes a large file can take, each valid (it parses, compiles and runs):

* ``dense``: a large vocabulary (50,257 tokens, GPT-2's), every table dense ``f32"..."``;
* ``sparse``: the same vocabulary, tables sparse ``{token: value, ...}`` (half the entries nonzero);
* ``nodes``: many nodes and edges (MLP neurons reading and writing the residual stream).

For each it prints the size, the parse time, the format time, the seconds per MB (the ratio to file
size, which stays flat if the time is linear: compare ``--mb 2`` and ``--mb 10``) and the peak
memory of the process. Usage::

    PYTHONPATH=. python benchmarks/parse_speed.py [--mb 10] [--shape dense,sparse,nodes]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from circuitir.grammar import emit, format_text, parse
from circuitir.ir.circuit import Circuit, Node, NodeData, NormData
from circuitir.models.config import GPTConfig


def base(vocab: int, d_model: int, d_mlp: int, n_layer: int = 1) -> Circuit:
    config = GPTConfig(block_size=64, vocab_size=vocab, n_layer=n_layer, n_head=2, d_head=4, d_model=d_model,
                       d_mlp=d_mlp, activation_type="relu").to_dict()
    circuit = Circuit(config=config, candidates=[1, 2], header={"norm": "live", "source": {"model": "benchmark"}})
    circuit.norms["final"] = NormData(rms=True, eps=float(np.float32(1e-5)), width=d_model)
    for k in range(2):
        circuit.nodes[Node("logits", k)] = NodeData("output")
    return circuit


def tables_circuit(megabytes: float, sparse: bool) -> Circuit:
    vocab = 50257
    rng = np.random.default_rng(0)
    per_table = vocab * (7 if sparse else 5.4)  # bytes of text per table, roughly
    n = max(1, int(megabytes * 1e6 / per_table))
    circuit = base(vocab, d_model=max(8, n), d_mlp=8)
    for c in range(n):
        values = rng.standard_normal(vocab).astype(np.float32)
        if sparse:
            values[rng.random(vocab) < 0.5] = 0.0
        circuit.embed[c] = torch.from_numpy(values)
        circuit.nodes[Node("final_resid", c)] = NodeData("kept", gain=1.0)
        circuit.edges[Node("final_resid", c), Node("logits", c % 2)] = 0.5
    return circuit


def nodes_circuit(megabytes: float) -> Circuit:
    """MLP neurons, each reading 4 residual channels and writing 2, over 8 layers."""
    n_layer, d_model = 8, 4096
    per_neuron = 257  # bytes of text per neuron with its edges, roughly (measured)
    neurons = max(1, int(megabytes * 1e6 / per_neuron / n_layer))
    circuit = base(256, d_model=d_model, d_mlp=max(8, neurons), n_layer=n_layer)
    rng = np.random.default_rng(0)
    channels = rng.choice(d_model, size=64, replace=False).tolist()
    for c in channels:
        circuit.embed[c] = torch.zeros(256)
        circuit.embed[c][c % 256] = 1.0
        circuit.nodes[Node("final_resid", c)] = NodeData("kept", gain=1.0)
        circuit.edges[Node("final_resid", c), Node("logits", c % 2)] = 0.5
    for layer in range(n_layer):
        circuit.norms[f"{layer}.mlp"] = NormData(rms=True, eps=float(np.float32(1e-5)), width=d_model)
        for c in channels:
            circuit.nodes[Node(f"{layer}.mlp.act_in", c)] = NodeData("kept", gain=1.0)
            circuit.nodes[Node(f"{layer}.mlp.resid_delta", c)] = NodeData("kept", bias=0.0)
        for j in range(neurons):
            neuron = Node(f"{layer}.mlp.post_act", j)
            circuit.nodes[neuron] = NodeData("kept", bias=float(np.float32(0.01 * (j % 7))))
            for c in rng.choice(channels, size=4, replace=False).tolist():
                circuit.edges[Node(f"{layer}.mlp.act_in", c), neuron] = float(np.float32(rng.standard_normal()))
            for c in rng.choice(channels, size=2, replace=False).tolist():
                circuit.edges[neuron, Node(f"{layer}.mlp.resid_delta", c)] = float(np.float32(rng.standard_normal()))
    return circuit


def measure(name: str, text: str) -> None:
    megabytes = len(text.encode()) / 1e6
    times = []
    for step in (lambda: parse(text, name), lambda: format_text(text, name)):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (parse_wall, parse_cpu), (format_wall, format_cpu) = times
    # CPU time too: on a shared machine the wall clock also counts other processes.
    print(f"{name:7s} {megabytes:6.2f} MB  parse {parse_wall:6.2f} s wall, {parse_cpu:6.2f} s CPU "
          f"({parse_cpu / megabytes:5.2f} s/MB)  format {format_wall:6.2f} s wall, {format_cpu:6.2f} s CPU "
          f"({format_cpu / megabytes:5.2f} s/MB)  peak RSS {rss:6.0f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="size of each file [10]")
    parser.add_argument("--shape", default="dense,sparse,nodes")
    args = parser.parse_args()
    makers = {"dense": lambda: tables_circuit(args.mb, sparse=False),
              "sparse": lambda: tables_circuit(args.mb, sparse=True), "nodes": lambda: nodes_circuit(args.mb)}
    for name in args.shape.split(","):
        measure(name, emit(makers[name]()))


if __name__ == "__main__":
    main()

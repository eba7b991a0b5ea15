"""Calibrates the layer-by-layer engine's fixed cost per graph node (``NODE_COST_MACS`` in
cem_fast/pipeline/engines/incremental.py): the seconds one node of a graph run costs whatever its rectangles' size
(the slope of a one-intervention run's time over the depth of thin 16-channel conv stacks), over the seconds of
one multiply-accumulate of convolution (a 16-channel conv stack on a batch of 24x24 windows), and likewise one
operator of a plain forward on a small window and one batch of the pipeline around the model (``OP_COST_MACS``,
``BATCH_COST_MACS`` in cem_fast/pipeline/engines/cost.py). Prints each and their ratio: ``python benchmarks/node_cost.py [threads]`` (results: benchmarks/results/*-node-cost.md)."""
import sys
import time

import numpy as np
import torch

import cem_fast
from cem_fast.layerwise import LayerwiseGraph
from cem_fast.pipeline.engines.cost import count_forward


def stack(depth: int, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU()]
    layers.append(torch.nn.Conv2d(width, 3, 3, padding=1))
    return torch.nn.Sequential(*layers).eval().to(memory_format=torch.channels_last)


def best(call, rounds: int = 30) -> float:
    call()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    torch.set_grad_enabled(False)
    nodes, seconds = [], []
    for depth in (2, 4, 8, 12):
        net = stack(depth)
        graph = LayerwiseGraph(net)
        graph.materialise(torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last), 8)
        r = graph.output_radius()[0]
        need = np.array([[28 - r, 28 - r, 36 + r, 36 + r]])
        block = torch.rand(1, 3, 8, 8)
        nodes.append(sum(1 for x in graph.order if x.kind not in ("const", "output")))
        seconds.append(best(lambda: graph.run(block, np.array([[28, 28]]), need, torch.channels_last)))
    per_node = float(np.polyfit(nodes, seconds, 1)[0])
    # a plain forward's operator (OP_COST_MACS, the windows' extra forwards): the slope over the same stacks on
    # one 13x13 window (a 3-px spread around an 8-px block), against their counted operators
    ops, op_seconds = [], []
    for depth in (2, 4, 8, 12):
        net, x = stack(depth), torch.rand(1, 3, 13, 13).contiguous(memory_format=torch.channels_last)
        ops.append(count_forward(net, x).ops)
        op_seconds.append(best(lambda: net(x)))
    per_op = float(np.polyfit(ops, op_seconds, 1)[0])
    # a batch of the pipeline around the model (BATCH_COST_MACS): the slope of a run's sampling time over its
    # number of batches, the same 48 interventions of a 2-layer stack at batch sizes 48 down to 2
    img = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    batches, batch_seconds = [], []
    for size in (48, 24, 12, 6, 3, 2):
        def sampling():
            return cem_fast.causal_effect_map(stack(2), img, task="DN", sigma=30, roi=(24, 24, 16), coarse=3, fine=0,
                                              progress=False, windows="crop", incremental="off", batch_size=size)
        res = sampling()
        batches.append(-(-res.num_forwards // size))
        batch_seconds.append(min(sampling().extra["timings_s"]["sampling"] for _ in range(7)))
    per_batch = float(np.polyfit(batches, batch_seconds, 1)[0]) - per_op * ops[0]
    net = stack(4)
    macs = sum(m.in_channels * m.out_channels * 9 for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(64, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    rate = 64 * 24 * 24 * macs / best(lambda: net(x), 10)
    print(f"threads {torch.get_num_threads()}: a graph node {per_node * 1e6:.1f} us per run (nodes {nodes}: "
          f"{[round(s * 1e6) for s in seconds]} us); convolution {rate / 1e9:.1f} GMAC/s; "
          f"node cost {per_node * rate / 1e6:.2f} million multiply-accumulates")
    print(f"threads {torch.get_num_threads()}: an operator of a plain forward {per_op * 1e6:.1f} us (operators {ops}: "
          f"{[round(s * 1e6) for s in op_seconds]} us); op cost {per_op * rate / 1e6:.2f} million "
          "multiply-accumulates")
    print(f"threads {torch.get_num_threads()}: a batch of the pipeline, its model's operators aside, "
          f"{per_batch * 1e6:.0f} us (batches {batches}: {[round(s * 1e6) for s in batch_seconds]} us); batch cost "
          f"{per_batch * rate / 1e6:.2f} million multiply-accumulates")


if __name__ == "__main__":
    main()

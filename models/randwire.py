"""Randomly wired neural networks (Xie et al. 2019, "Exploring Randomly Wired Neural Networks").

Each random stage is built from an undirected random graph drawn by networkx
with an explicit seed (Watts-Strogatz WS(K, P), Erdos-Renyi ER(P) or
Barabasi-Albert BA(M)), turned into a DAG by orienting every edge from the
lower to the higher node index. An extra input (the stage's input tensor)
feeds every node with no predecessor, and an extra output node averages every
node with no successor. A node computes a weighted sum of its inputs (weights
``sigmoid(w)``, positive and learnable), then ReLU -> separable 3x3 convolution
(depthwise + pointwise) -> BatchNorm. The nodes fed by the stage input use
stride 2 and change the channel count.

The network follows the paper's Table 1; the default is the small regime:

========== =========== =========================== ===========================
stage      output      small regime                regular regime
========== =========== =========================== ===========================
conv1      112 x 112   3x3 conv, C/2, stride 2     3x3 conv, C/2, stride 2
conv2      56 x 56     3x3 conv, C, stride 2       random wiring N/2, C
conv3      28 x 28     random wiring N, C          random wiring N, 2C
conv4      14 x 14     random wiring N, 2C         random wiring N, 4C
conv5      7 x 7       random wiring N, 4C         random wiring N, 8C
classifier 1 x 1       1x1 conv 1280, global average pool, 1000-d fc
========== =========== =========================== ===========================

The forward pass is a loop over each stage's precomputed topological order
(Python lists), which ``torch.fx.symbolic_trace`` unrolls into a static graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import nn

from ._common import image_input, init_cnn, seeded

__all__ = [
    "GENERATORS",
    "RandomDag",
    "random_dag",
    "SeparableConv2d",
    "RandomNode",
    "RandomStage",
    "RandWire",
    "randwire",
]

#: Graph generators and their default parameters (the paper's best settings).
GENERATORS: dict[str, dict[str, float]] = {
    "ws": {"k": 4, "p": 0.75},
    "er": {"p": 0.2},
    "ba": {"m": 5},
}


@dataclass(frozen=True)
class RandomDag:
    """A random stage's wiring: a DAG on nodes ``0..nodes-1`` in topological order.

    Attributes
    ----------
    nodes : int
        Number of nodes.
    edges : tuple[tuple[int, int], ...]
        Directed edges ``(u, v)`` with ``u < v``, sorted.
    preds : tuple[tuple[int, ...], ...]
        ``preds[v]``: sorted predecessors of node ``v``; empty for a node fed
        by the stage input.
    outputs : tuple[int, ...]
        Nodes with no successor, averaged into the stage output.
    """

    nodes: int
    edges: tuple[tuple[int, int], ...]
    preds: tuple[tuple[int, ...], ...]
    outputs: tuple[int, ...]

    @property
    def inputs(self) -> tuple[int, ...]:
        """Nodes with no predecessor (fed by the stage input)."""
        return tuple(v for v in range(self.nodes) if not self.preds[v])


def _undirected_graph(generator: str, nodes: int, seed: int, params: dict[str, float]) -> nx.Graph:
    if generator == "ws":
        k, p = int(params["k"]), float(params["p"])
        if k < 2 or k % 2 or k >= nodes:
            raise ValueError(f"WS needs an even K with 2 <= K < nodes, got K={k}, nodes={nodes}")
        return nx.watts_strogatz_graph(nodes, k, p, seed=seed)
    if generator == "er":
        return nx.erdos_renyi_graph(nodes, float(params["p"]), seed=seed)
    if generator == "ba":
        m = int(params["m"])
        if not 1 <= m < nodes:
            raise ValueError(f"BA needs 1 <= M < nodes, got M={m}, nodes={nodes}")
        return nx.barabasi_albert_graph(nodes, m, seed=seed)
    raise ValueError(f"unknown graph generator {generator!r}; expected one of {sorted(GENERATORS)}")


def random_dag(generator: str, nodes: int, seed: int, **params: float) -> RandomDag:
    """Draw a random graph and orient it into a DAG (lower -> higher index).

    Parameters
    ----------
    generator : {"ws", "er", "ba"}
        Watts-Strogatz, Erdos-Renyi or Barabasi-Albert.
    nodes : int
        Number of nodes (at least 2).
    seed : int
        Seed passed to the networkx generator; the same seed gives the same DAG.
    **params : float
        Generator parameters overriding :data:`GENERATORS` defaults: ``k`` and
        ``p`` for WS, ``p`` for ER, ``m`` for BA.

    Returns
    -------
    RandomDag
        The oriented graph.

    Raises
    ------
    ValueError
        On an unknown generator, unknown parameter or invalid sizes.
    """
    if generator not in GENERATORS:
        raise ValueError(
            f"unknown graph generator {generator!r}; expected one of {sorted(GENERATORS)}"
        )
    unknown = set(params) - set(GENERATORS[generator])
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for generator {generator!r}; "
            f"expected {sorted(GENERATORS[generator])}"
        )
    if nodes < 2:
        raise ValueError(f"a random stage needs at least 2 nodes, got {nodes}")
    full = {**GENERATORS[generator], **params}
    graph = _undirected_graph(generator, nodes, seed, full)
    edges = tuple(sorted((min(u, v), max(u, v)) for u, v in graph.edges() if u != v))
    preds: list[list[int]] = [[] for _ in range(nodes)]
    has_succ = [False] * nodes
    for u, v in edges:
        preds[v].append(u)
        has_succ[u] = True
    return RandomDag(
        nodes=nodes,
        edges=edges,
        preds=tuple(tuple(sorted(p)) for p in preds),
        outputs=tuple(v for v in range(nodes) if not has_succ[v]),
    )


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 convolution followed by a pointwise 1x1 convolution (no biases).

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels.
    stride : int
        Stride of the depthwise convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply depthwise then pointwise convolution."""
        return self.pointwise(self.depthwise(x))


class RandomNode(nn.Module):
    """Aggregate inputs by a positive weighted sum, then ReLU -> separable conv -> BN.

    Parameters
    ----------
    in_degree : int
        Number of inputs; a node with one input skips the weighted sum.
    in_channels : int
        Channels of every input.
    out_channels : int
        Output channels.
    stride : int
        Stride of the separable convolution.
    """

    def __init__(
        self, in_degree: int, in_channels: int, out_channels: int, stride: int = 1
    ) -> None:
        super().__init__()
        if in_degree < 1:
            raise ValueError(f"in_degree must be at least 1, got {in_degree}")
        self.in_degree = in_degree
        # Random (seeded) logits rather than zeros, so that swapped inputs change the result.
        self.weight = nn.Parameter(torch.randn(in_degree)) if in_degree > 1 else None
        self.relu = nn.ReLU()
        self.conv = SeparableConv2d(in_channels, out_channels, stride)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Apply the node to its ``in_degree`` inputs (a list, in predecessor order)."""
        if self.weight is None:
            x = inputs[0]
        else:
            w = torch.sigmoid(self.weight)
            x = inputs[0] * w[0]
            for i in range(1, self.in_degree):
                x = x + inputs[i] * w[i]
        return self.bn(self.conv(self.relu(x)))


class RandomStage(nn.Module):
    """A randomly wired stage: nodes evaluated in the DAG's topological order.

    Parameters
    ----------
    dag : RandomDag
        The stage's wiring.
    in_channels : int
        Channels of the stage input.
    out_channels : int
        Channels of every node's output and of the stage output.
    """

    def __init__(self, dag: RandomDag, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.dag = dag
        # Plain Python lists: fx unrolls the loop in forward over them.
        self.preds: list[list[int]] = [list(p) for p in dag.preds]
        self.outputs: list[int] = list(dag.outputs)
        self.nodes = nn.ModuleList(
            RandomNode(len(p), out_channels, out_channels, 1)
            if p
            else RandomNode(1, in_channels, out_channels, 2)
            for p in self.preds
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage; the output is the average of the DAG's sink nodes."""
        results: list[torch.Tensor] = []
        for node, preds in zip(self.nodes, self.preds):
            inputs = [results[j] for j in preds] if preds else [x]
            results.append(node(inputs))
        out = results[self.outputs[0]]
        for j in self.outputs[1:]:
            out = out + results[j]
        if len(self.outputs) > 1:
            out = out / len(self.outputs)
        return out


class RandWire(nn.Module):
    """A randomly wired network (small or regular regime of the paper's Table 1).

    Parameters
    ----------
    dags : list[RandomDag]
        One DAG per random stage: 3 in the small regime (conv3-conv5), 4 in
        the regular regime (conv2-conv5).
    channels : int
        Base width ``C``.
    regime : {"small", "regular"}
        Stage structure.
    num_classes : int
        Output width of the final fully connected layer.
    """

    def __init__(
        self,
        dags: list[RandomDag],
        channels: int = 78,
        regime: str = "small",
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        c = channels
        if regime == "small":
            random_widths = [c, 2 * c, 4 * c]  # conv3..conv5; conv2 is a plain 3x3 conv
        elif regime == "regular":
            random_widths = [c, 2 * c, 4 * c, 8 * c]  # conv2..conv5
        else:
            raise ValueError(f"regime must be 'small' or 'regular', got {regime!r}")
        if len(dags) != len(random_widths):
            raise ValueError(f"{regime} regime needs {len(random_widths)} DAGs, got {len(dags)}")
        self.regime = regime
        half = max(1, c // 2)
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        if regime == "small":
            self.conv2: nn.Module = nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(half, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
            )
            prev = c
        else:
            prev = half
        stages: list[nn.Module] = []
        for dag, width in zip(dags, random_widths):
            stages.append(RandomStage(dag, prev, width))
            prev = width
        if regime == "regular":
            self.conv2 = stages.pop(0)
        self.conv3, self.conv4, self.conv5 = stages
        self.relu = nn.ReLU()
        self.classifier_conv = nn.Conv2d(prev, 1280, 1, bias=False)
        self.classifier_bn = nn.BatchNorm2d(1280)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(1280, num_classes)
        init_cnn(self)

    def dags(self) -> list[RandomDag]:
        """Return the wiring of every random stage, in network order."""
        stages = (self.conv2, self.conv3, self.conv4, self.conv5)
        return [m.dag for m in stages if isinstance(m, RandomStage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, H, W)`` images to ``(N, num_classes)`` logits."""
        x = self.bn1(self.conv1(x))
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.conv4(x)
        x = self.conv5(x)
        x = self.relu(x)
        x = self.relu(self.classifier_bn(self.classifier_conv(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def randwire(
    generator: str = "ws",
    nodes: int = 32,
    channels: int = 78,
    seed: int = 0,
    batch: int = 1,
    image: int = 224,
    regime: str = "small",
    **params: float,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A randomly wired network and an example input.

    Stage ``i`` (0-based, in network order) draws its graph with seed
    ``3 * seed + i`` (small regime; ``4 * seed + i`` in the regular regime), so
    a given ``seed`` always gives the same network and distinct seeds never
    share a stage seed. Weights and inputs are seeded independently of
    ``seed`` (fixed seed 0), so only the wiring changes with it.

    Parameters
    ----------
    generator : {"ws", "er", "ba"}
        Random graph model.
    nodes : int
        Nodes ``N`` per random stage (``N/2`` for the regular regime's conv2).
    channels : int
        Base width ``C`` (78 in the paper's small regime).
    seed : int
        Wiring seed (non-negative).
    batch : int
        Batch size of the example input.
    image : int
        Side of the square example image (at least 32).
    regime : {"small", "regular"}
        The paper's stage structure.
    **params : float
        Generator parameters: ``k``, ``p`` for WS (default 4, 0.75), ``p`` for
        ER (0.2), ``m`` for BA (5).

    Returns
    -------
    tuple[nn.Module, tuple[torch.Tensor, ...]]
        The model in eval mode and ``(images,)`` of shape ``(batch, 3, image, image)``.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if channels < 2:
        raise ValueError(f"channels must be at least 2, got {channels}")
    if regime == "small":
        sizes = [nodes, nodes, nodes]
    elif regime == "regular":
        sizes = [max(2, nodes // 2), nodes, nodes, nodes]
    else:
        raise ValueError(f"regime must be 'small' or 'regular', got {regime!r}")
    n_stages = len(sizes)
    dags = [random_dag(generator, n, n_stages * seed + i, **params) for i, n in enumerate(sizes)]
    with seeded():
        model = RandWire(dags, channels=channels, regime=regime).eval()
    return model, (image_input(batch, image),)

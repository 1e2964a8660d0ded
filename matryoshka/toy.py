"""Hierarchical sparse toy models: a tree of features with known, exactly orthogonal directions.

A model is built from a plain (JSON-able) spec::

    {"d": 20, "norm_jitter": 0.05, "seed": 0,
     "features": [
        {"name": "A", "p": 0.15, "magnitude": 1.0, "exclusive": true,
         "children": [{"name": "A1", "p": 0.2}, {"name": "A2", "p": 0.2}, {"name": "A3", "p": 0.2}]},
        {"name": "I1", "p": 0.05}]}

* ``p`` is the firing probability *given the parent fires* (unconditional for a root).
* ``exclusive`` children are options of one categorical draw: exactly one child with probability
  ``p`` each, or none with the remaining ``1 - sum(p)``.  Otherwise children fire independently.
* ``magnitude`` is a number (a constant, e.g. ``1.0`` for binary features) or ``{"mean", "std"}``
  (Gaussian, clipped at 0 so that an active feature never points backwards).
* ``parent_scale`` (a child's, default 1): its parent's magnitude is multiplied by it on the
  samples where this child fires, so a parent's magnitude can depend on which child fires.  With a
  parent of fixed magnitude, such a family's inputs are those of a parent whose magnitude does not
  depend on the child but whose child's direction leans towards it (``s·p + c = p + ((s − 1)p + c)``):
  no rule on the inputs alone can tell the two apart.

Features are numbered depth-first (a parent, then its subtree), which is also the order used by
every plot and metric.  Directions are the first ``F`` columns of the Q of a seeded Gaussian matrix's
QR decomposition (exactly orthonormal), each scaled by ``1 + norm_jitter * N(0, 1)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ToyModel", "nabeshima_spec", "child_magnitude_spec", "PRESETS"]


@dataclass(frozen=True)
class _Node:
    name: str
    parent: int  # -1 for a root
    p: float  # given the parent
    mean: float
    std: float
    parent_scale: float  # the parent's magnitude is multiplied by it where this node fires
    group: int  # index of the exclusive group this node is an option of, or -1
    depth: int


def _magnitude(spec: Any) -> tuple[float, float]:
    if spec is None:
        return 1.0, 0.0
    if isinstance(spec, (int, float)):
        return float(spec), 0.0
    return float(spec["mean"]), float(spec.get("std", 0.0))


def _flatten(features: list[dict]) -> tuple[list[_Node], list[list[int]]]:
    """Depth-first nodes and, per exclusive group, the node indices of its options."""
    nodes: list[_Node] = []
    groups: list[list[int]] = []

    def visit(spec: dict, parent: int, group: int, depth: int) -> None:
        mean, std = _magnitude(spec.get("magnitude"))
        p = float(spec["p"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"toy spec: feature {spec.get('name')!r} has p={p} outside [0, 1]")
        parent_scale = float(spec.get("parent_scale", 1.0))
        if not (math.isfinite(parent_scale) and parent_scale > 0):
            raise ValueError(f"toy spec: feature {spec.get('name')!r} has parent_scale={parent_scale}; "
                             "expected a finite number > 0")
        if parent < 0 and parent_scale != 1.0:
            raise ValueError(f"toy spec: feature {spec.get('name')!r} has a parent_scale but no parent")
        me = len(nodes)
        nodes.append(_Node(str(spec.get("name", f"f{me}")), parent, p, mean, std, parent_scale, group, depth))
        children = spec.get("children", [])
        child_group = -1
        if children and spec.get("exclusive", False):
            if sum(float(c["p"]) for c in children) > 1.0 + 1e-9:
                raise ValueError(f"toy spec: exclusive children of {nodes[me].name!r} have sum(p) > 1")
            child_group = len(groups)
            groups.append([])
        for child in children:
            if child_group >= 0:
                groups[child_group].append(len(nodes))
            visit(child, me, child_group, depth + 1)

    for spec in features:
        visit(spec, -1, -1, 0)
    return nodes, groups


class ToyModel:
    """Sample ``x = sum_f a_f * direction_f`` from a hierarchical feature spec (see module doc).

    Attributes:
        spec: the spec it was built from (a deep copy).
        names, parents: per feature, depth-first; ``parents[f] = -1`` for a root.
        directions: ``(F, d)`` true feature directions (orthogonal; unit norm up to the jitter).
    """

    def __init__(self, spec: dict) -> None:
        self.spec = copy.deepcopy(spec)
        nodes, groups = _flatten(self.spec["features"])
        self.d = int(self.spec["d"])
        if len(nodes) > self.d:
            raise ValueError(f"toy spec: {len(nodes)} features cannot be orthogonal in d={self.d}")
        self.names = [n.name for n in nodes]
        self.parents = [n.parent for n in nodes]
        self._p = torch.tensor([n.p for n in nodes], dtype=torch.float64)
        self._mean = torch.tensor([n.mean for n in nodes])
        self._std = torch.tensor([n.std for n in nodes])
        self._parent_scales = [(f, n.parent, n.parent_scale) for f, n in enumerate(nodes) if n.parent_scale != 1.0]
        self._group = torch.tensor([n.group for n in nodes])
        self._depth = max(n.depth for n in nodes)
        # An exclusive option fires when the group's uniform falls in [lo, hi): options tile [0, 1)
        # in order and the rest of the interval is "none".
        lo = torch.zeros(len(nodes), dtype=torch.float64)
        for members in groups:
            lo[members] = torch.cumsum(self._p[members], 0) - self._p[members]
        self._lo, self._hi = lo, lo + self._p
        self._num_groups = len(groups)
        self.directions = self._make_directions(int(self.spec.get("seed", 0)))

    @property
    def num_features(self) -> int:
        return len(self.names)

    def _make_directions(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(self.d, self.d, generator=g, dtype=torch.float64))
        dirs = q[:, : self.num_features].T  # rows: orthonormal
        jitter = float(self.spec.get("norm_jitter", 0.0))
        norms = 1.0 + jitter * torch.randn(self.num_features, 1, generator=g, dtype=torch.float64)
        return (dirs * norms).float()

    def children(self, f: int) -> list[int]:
        return [c for c, p in enumerate(self.parents) if p == f]

    def families(self) -> list[tuple[int, list[int]]]:
        """``(parent, children)`` for every feature that has children."""
        return [(f, self.children(f)) for f in range(self.num_features) if self.children(f)]

    def family_planes(self) -> list[tuple[int, int, float]]:
        """``(parent, its most frequent child, that child's probability given the parent)`` for every
        feature that has children: the plane where a frequent child can turn its parent's pair."""
        out = []
        for parent, children in self.families():
            best = max(children, key=lambda c: float(self._p[c]))  # p: the probability given the parent
            out.append((parent, best, float(self._p[best])))
        return out

    def marginal_probabilities(self) -> torch.Tensor:
        """``P(feature f is active)``: the product of the conditional ``p`` along its ancestors."""
        marg = self._p.clone()
        for f, parent in enumerate(self.parents):  # depth-first: a parent precedes its children
            if parent >= 0:
                marg[f] = marg[f] * marg[parent]
        return marg

    def expected_l0(self) -> float:
        """The true mean number of active features per sample (the target L0 of the recipes)."""
        return float(self.marginal_probabilities().sum())

    def sample(self, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, acts)``: ``(num, d)`` inputs and the ``(num, F)`` true feature activations.

        Vectorised over samples: one uniform per (sample, feature) and per (sample, exclusive group);
        the parent condition is propagated level by level (``depth`` tensor ops, not a per-sample loop).
        """
        F = self.num_features
        u = torch.rand(num, F, generator=generator, dtype=torch.float64)
        fires = u < self._p
        if self._num_groups:
            ug = torch.rand(num, self._num_groups, generator=generator, dtype=torch.float64)
            in_group = self._group >= 0
            ug_f = ug[:, self._group.clamp(min=0)]
            option = (ug_f >= self._lo) & (ug_f < self._hi)
            fires = torch.where(in_group, option, fires)
        parents = torch.tensor(self.parents)
        has_parent = parents >= 0
        active = fires
        for _ in range(self._depth):
            parent_active = torch.where(has_parent, active[:, parents.clamp(min=0)], True)
            active = fires & parent_active
        noise = torch.randn(num, F, generator=generator)
        magnitude = (self._mean + self._std * noise).clamp(min=0.0)
        for child, parent, scale in self._parent_scales:
            magnitude[:, parent] *= torch.where(active[:, child], scale, 1.0)
        acts = torch.where(active, magnitude, 0.0)
        return acts @ self.directions, acts


def nabeshima_spec(seed: int = 0) -> dict:
    """The original toy (Nabeshima, 2024): 20 binary features in d = 20.

    3 parents (p = 0.15), each with 3 mutually exclusive children (0.2 each, none 0.4), and 8
    independent features (p = 0.05); direction norms jittered by 5%.
    """
    features = []
    for parent in "ABC":
        children = [{"name": f"{parent}{i}", "p": 0.2} for i in (1, 2, 3)]
        features.append({"name": parent, "p": 0.15, "exclusive": True, "children": children})
    features += [{"name": f"I{i}", "p": 0.05} for i in range(1, 9)]
    return {"d": 20, "norm_jitter": 0.05, "seed": seed, "features": features}


def child_magnitude_spec(
    parent_p: float = 0.3,
    parent_magnitude: float = 2.0,
    child_p: float = 0.5,
    child_magnitude: float = 10.0,
    distractors: int = 6,
    distractor_p: float = 0.05,
    seed: int = 0,
) -> dict:
    """A parent and one child of much larger magnitude, plus independent binary distractors.

    Defaults: parent p = 0.3 with magnitude 2; the child fires only with its parent, with
    probability 0.5 given it (0.15 overall), magnitude 10.  ``d`` equals the number of features.
    """
    child = {"name": "child", "p": child_p, "magnitude": child_magnitude}
    parent = {"name": "parent", "p": parent_p, "magnitude": parent_magnitude, "children": [child]}
    features = [parent] + [{"name": f"D{i}", "p": distractor_p} for i in range(1, distractors + 1)]
    return {"d": 2 + distractors, "norm_jitter": 0.0, "seed": seed, "features": features}


PRESETS = {"nabeshima": nabeshima_spec, "child_magnitude": child_magnitude_spec}


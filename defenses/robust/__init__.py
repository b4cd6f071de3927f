"""Byzantine-robust aggregation: aggregators ``(n, d) -> (d,)``, pre-aggregators ``(n, d) -> (n', d)``,
and worker momentum (see docs/robust.md)."""

from defenses.robust.aggregators import (FLAME, Bulyan, CenteredClipping, CoordinateMedian, FLTrust, GeometricMedian,
                                         Krum, Mean, MultiKrum, NormBound, TrimmedMean)
from defenses.robust._ops import clip_rows, compiled, pairwise_sq_dists
from defenses.robust.momentum import MomentumTrainer
from defenses.robust.preagg import NNM, Bucketing, StaticClip

__all__ = ["Mean", "CoordinateMedian", "TrimmedMean", "Krum", "MultiKrum", "Bulyan", "GeometricMedian", "CenteredClipping",
           "FLTrust", "FLAME", "NormBound", "NNM", "Bucketing", "StaticClip", "MomentumTrainer",
           "clip_rows", "compiled", "pairwise_sq_dists"]

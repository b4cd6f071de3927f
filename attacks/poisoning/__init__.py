"""Poisoning attacks: data poisoning (label flip, backdoor) and model poisoning (see docs/robust.md)."""

from attacks.poisoning.data import Backdoor, LabelFlip
from attacks.poisoning.model import ALIE, IPM, Adaptive, GaussianNoise, Mimic, MinMax, MinSum, ModelReplacement, SignFlip

__all__ = ["LabelFlip", "Backdoor", "SignFlip", "GaussianNoise", "ModelReplacement", "ALIE", "IPM", "MinMax", "MinSum",
           "Mimic", "Adaptive"]

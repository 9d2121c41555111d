"""The classifier over all classes seen so far, grown at each task."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class GrowingClassifier(nn.Module):
    """Linear(d, C) with bias; `grow(n)` appends n rows: kaiming_uniform(nonlinearity='linear'),
    bias 0; old rows are copied unchanged. Row j scores the j-th class of the class order."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.zeros(0, in_features))
        self.bias = nn.Parameter(torch.zeros(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, n_new: int, generator: Optional[torch.Generator] = None) -> None:
        w_old, b_old = self.weight.detach(), self.bias.detach()
        bound = math.sqrt(3.0 / self.in_features)  # kaiming_uniform with gain 1 ('linear')
        w_new = (torch.rand(n_new, self.in_features, generator=generator) * 2 - 1) * bound
        self.weight = nn.Parameter(torch.cat([w_old, w_new.to(w_old)]))
        self.bias = nn.Parameter(torch.cat([b_old, b_old.new_zeros(n_new)]))

    def resize(self, n: int) -> None:
        self.weight = nn.Parameter(self.weight.new_zeros(n, self.in_features))
        self.bias = nn.Parameter(self.bias.new_zeros(n))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, C)
        return nn.functional.linear(feats, self.weight, self.bias)

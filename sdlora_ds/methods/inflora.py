"""InfLoRA (Liang and Li, CVPR 2024, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning").

Like O-LoRA, every task t adds a LoRA B_t A_t to every adapted projection and earlier ones stay
frozen and summed; unlike it, A_t is designed from data before the task and then FIXED: only B_t
(zero at the start) trains, so the task's update B_t A_t lies in the row space of A_t, chosen
orthogonal to the input subspace M of the earlier tasks: for an input x in span(M), B_t A_t x = 0,
which is what "interference-free" means. (Names: the LoRA convention of this package, y += B A x with
A (r, d_in) reading the input. The paper writes the branch the other way round: its designed
"dimensionality reduction matrix" B_t is our A_t, its trained, zero-initialised A_t is our B_t.)

Per adapted projection, with C_t = sum over the task's train tokens of x x^T (its input features):

    task start   P = the orthonormal complement of M (M: (d_in, k), orthonormal columns)
                 A_t = rows: the top-`rank` eigenvectors of P^T C_t P mapped back (P v), / sqrt(3)
    task end     C_t again, under the trained model; DualGPM-style memory update with threshold
                 eps_t: the energy of C_t already in span(M) is (tr C_t - tr P^T C_t P) / tr C_t;
                 the fewest top eigenvectors of P^T C_t P that bring it to >= eps_t join M

eps_t goes linearly from method_options.threshold_first (task 0) to threshold_last (the last task),
the shape of the authors' schedule (their code: lamb -> lame over the sessions). The 1/sqrt(3) scale
of A's rows is the authors' code's. Both passes read the task's train images once with the test
transform (the trainer's 'task_start'/'task_end' passes, model/base.py); C_t is summed in float64
and over ranks, so 1 and N processes design the same A up to float summation order. Projections
that read the same input (query and value of a block) share one C_t: it is computed and reduced once.

Where this differs from the authors' code, knowingly: energies are eigenvalues of C_t (the squared
singular values of the representation matrix, as in the paper and GPM; the code squares C_t's
singular values again); M is always stored as the basis of the earlier tasks' subspace (DualGPM
keeps its complement instead once that is smaller: the same projection, less memory); A_t comes
from the eigenvectors of P^T C_t P in the complement's coordinates (the paper's Eq.; exactly
orthogonal to M) rather than an SVD of (I - M M^T) C_t; the images go through the test transform,
not the training augmentation. The adapted projections are the config's adapter.target_modules
(query/value by default; the authors adapt key/value). The paper's, LibContinual's and the authors'
logged numbers, and how the protocols differ: docs/adding_a_method.md, section 8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError, RunConfig
from ..registry import Method
from .olora import TaskLoRALinear, TaskLoRAModel

A_SCALE = 1.0 / math.sqrt(3.0)  # row norm of the designed A (the authors' code)


@dataclass
class InfLoRAOptions:
    threshold_first: float = 0.95
    """DualGPM energy threshold eps of task 0's memory update: the share of the input features'
    energy the stored subspace must explain (0 < eps <= 1)."""
    threshold_last: float = 0.99
    """eps of the last task's update; linear in between: eps_t = first + (last - first) t / (T - 1)."""

    def validate(self, p: str) -> None:
        for name in ("threshold_first", "threshold_last"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"config field '{p}.{name}': got {v!r}; must be in (0, 1] (e.g. 0.95)")
        if self.threshold_last < self.threshold_first:
            raise ConfigError(f"config field '{p}.threshold_last': got {self.threshold_last!r}; must be >= "
                              f"threshold_first ({self.threshold_first!r}): the memory only grows")


def complement(memory: torch.Tensor) -> torch.Tensor:
    """(d, d - k) orthonormal basis of the complement of span(memory) (memory: (d, k) orthonormal), float64."""
    d, k = memory.shape
    if k == 0:
        return torch.eye(d, dtype=torch.float64, device=memory.device)
    m = memory.double()
    _, vecs = torch.linalg.eigh(torch.eye(d, dtype=torch.float64, device=m.device) - m @ m.t())  # eigenvalues 0 (k), 1
    return vecs[:, k:]


def top_in_complement(cov: torch.Tensor, memory: torch.Tensor) -> tuple:
    """(energies (d-k,) descending, directions (d, d-k)) of the features C restricted to the
    complement of span(memory): eigen-decomposition of P^T C P, directions mapped back as P v."""
    p = complement(memory)
    vals, vecs = torch.linalg.eigh(p.t() @ cov.double() @ p)  # ascending
    return vals.flip(0).clamp_min(0), p @ vecs.flip(1)


def same_values(a: Optional[torch.Tensor], b: torch.Tensor) -> bool:
    """b is a, or a view of a's memory with a's layout, not written since (the version counter is
    shared by detach()); the caller holds a, so its memory cannot have been reused."""
    return a is b or (a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device
                      and a._version == b._version)


class InfLoRALinear(TaskLoRALinear):
    """TaskLoRALinear + the stored subspace `memory` (d_in, k) of earlier tasks' inputs + a recorder of
    C = sum x x^T over the inputs of the forwards while `_keep` is set (the trainer's passes).

    Projections that read the very same input (query and value of one attention block) share one C:
    the model hands every layer the same one-slot `_last` [input, index of the layer that recorded
    it]; a layer whose input is that tensor records nothing and notes the recorder's index in
    `_same_as` (the same ops on the same values: the shared C is bitwise the one it would compute).
    "The same" is the same memory, layout and version, not the same Python object: ZeRO-3's
    forward pre-hook hands every module its own `detach()` of the input (a new object, same storage)."""

    def __init__(self, base, scaling: float, impl: str = "auto", penalise: bool = False):
        super().__init__(base, scaling, impl=impl, penalise=penalise)
        self.register_buffer("memory", base.weight.new_zeros(self.in_features, 0))
        self._keep: Optional[torch.Tensor] = None
        self._cov: Optional[torch.Tensor] = None
        self._last: Optional[list] = None  # set with _keep by InfLoRAModel.observe
        self._index = -1  # this layer's position in model.layers (set by InfLoRAModel)
        self._same_as: Optional[int] = None  # index of the layer whose C is this layer's, in this pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, d_in)
        if self._keep is not None:
            self._record(x)
        return super().forward(x)

    def _record(self, x: torch.Tensor) -> None:
        last = self._last
        if same_values(last[0], x):  # another projection of this block read x first: its C is ours
            assert self._cov is None and self._same_as in (None, last[1]), "projections paired differently"
            self._same_as = last[1]
            return
        assert self._same_as is None, f"projection {self._index} shared its input in one forward, not in another"
        xs = x[self._keep.to(x.device)].reshape(-1, x.shape[-1]).double()  # (tokens of kept samples, d_in)
        if self._cov is None:
            self._cov = xs.new_zeros(x.shape[-1], x.shape[-1])
        self._cov += xs.t() @ xs
        last[0], last[1] = x, self._index

    def take_cov(self) -> torch.Tensor:
        cov, self._cov = self._cov, None
        assert cov is not None, "no input was recorded"
        return cov

    @torch.no_grad()
    def design_a(self, cov: torch.Tensor) -> None:
        """A_t := the top directions of C outside span(memory), rows of norm 1/sqrt(3)."""
        _, dirs = top_in_complement(cov, self.memory)
        r = self.lora_a.shape[0]
        a = torch.zeros(r, self.in_features, dtype=torch.float64, device=dirs.device)
        n = min(r, dirs.shape[1])  # a full memory leaves fewer directions than the rank: the rest stay 0
        a[:n] = dirs[:, :n].t() * A_SCALE
        self.lora_a.copy_(a.to(self.lora_a))

    @torch.no_grad()
    def update_memory(self, cov: torch.Tensor, threshold: float) -> int:
        """Add the fewest new directions that bring the explained energy of C to >= threshold; returns
        how many were added."""
        total = float(torch.trace(cov.double()))
        vals, dirs = top_in_complement(cov, self.memory)
        if total <= 0 or dirs.shape[1] == 0:
            return 0
        explained = (total - float(vals.sum())) / total  # already in span(memory)
        need = 0
        for v in vals.tolist():
            if explained >= threshold:
                break
            explained += v / total
            need += 1
        self.memory = torch.cat([self.memory, dirs[:, :need].to(self.memory)], dim=1)
        return need


class InfLoRAModel(TaskLoRAModel):
    method = "inflora"
    layer_class = InfLoRALinear
    trains_a = False
    observes = ("task_start", "task_end")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg, 1.0)
        self.options = cfg.options
        self.num_tasks = cfg.cil.num_tasks

    def threshold(self, task: int) -> float:
        o = self.options
        return o.threshold_first + (o.threshold_last - o.threshold_first) * task / max(self.num_tasks - 1, 1)

    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        for layer in self.layers:  # A is designed by the 'task_start' pass, before the first step
            layer.freeze_current()
            layer.set_current(layer.weight.new_zeros(self.adapter_cfg.rank, layer.in_features), train_a=False)

    def observe(self, phase: str, t: int, pixel_values: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> None:
        last = [None, -1]  # one slot per forward: the input tensor last recorded and by which layer
        for i, layer in enumerate(self.layers):
            layer._keep, layer._last, layer._index = keep, last, i
        try:
            self.features(pixel_values)
        finally:
            for layer in self.layers:
                layer._keep = layer._last = None  # no activation outlives the forward

    def pass_covariances(self) -> tuple:
        """(covariances, owner): the C recorded in this pass by each projection that read an input
        first, and for every projection the position of its C in that list; the pass is cleared."""
        owners = [i if layer._same_as is None else layer._same_as for i, layer in enumerate(self.layers)]
        recorders = sorted(set(owners))
        covs = [self.layers[i].take_cov() for i in recorders]
        for layer in self.layers:
            layer._same_as = None
        return covs, [recorders.index(i) for i in owners]

    def observed(self, phase: str, t: int, reduce) -> str:
        local, owner = self.pass_covariances()
        flat = reduce(torch.cat([c.flatten().cpu() for c in local]))  # one collective for every projection
        device = self.layers[0].weight.device
        shared = [c.reshape(cl.shape).to(device) for c, cl in zip(flat.split([c.numel() for c in local]), local)]
        covs = [shared[j] for j in owner]
        inputs = f"{len(local)} input covariances for {len(self.layers)} projections"
        if phase == "task_start":
            for layer, cov in zip(self.layers, covs):
                layer.design_a(cov)
            return f"task {t}: InfLoRA designed A outside the stored subspaces (dims {self.memory_sizes()}; {inputs})"
        eps = self.threshold(t)
        added = [layer.update_memory(cov, eps) for layer, cov in zip(self.layers, covs)]
        self.events.append({"kind": "inflora_memory", "task": t, "threshold": eps, "added": added,
                            "sizes": self.memory_sizes()})
        return f"task {t}: InfLoRA memory at threshold {eps:.4f}: dims {self.memory_sizes()} ({inputs})"

    def memory_sizes(self) -> list:
        return [layer.memory.shape[1] for layer in self.layers]

    def _structure(self) -> dict:
        return {**super()._structure(), "memory": self.memory_sizes()}

    def _restore_structure(self, s: dict) -> None:
        super()._restore_structure(s)
        for layer, k in zip(self.layers, s["memory"]):
            layer.memory = layer.weight.new_zeros(layer.in_features, k)


METHOD = Method(name="inflora", label="InfLoRA", model=InfLoRAModel, options=InfLoRAOptions, stacks_per_task=True)

"""SD-LoRA (Wu et al., ICLR 2025): the project's method (model/model.py, model/sdlora.py).

Its variants are adapter settings, not methods: SD-LoRA-RR (adapter.rank_schedule), SD-LoRA-KD
(adapter.kd), the continuous-freeze ablation (adapter.freeze) and joint training (cil.num_tasks = 1).
Those adapter fields mean nothing to other methods, so they are declared as SD-LoRA's own.
"""
from __future__ import annotations

from ..model.model import SDLoRAModel
from ..registry import Method


def describe(config: dict) -> str:
    """'SD-LoRA', '-RR', '-KD' and the ablations a config switches on."""
    ad = config["adapter"]
    ablations = [f"m0 {ad['magnitude_init']:g}"] if ad.get("magnitude_init", 1.0) != 1.0 else []
    if ad.get("freeze", "normalize") != "normalize":
        ablations.append(f"{ad['freeze']} freeze")
    return ("SD-LoRA" + ("-RR" if ad.get("rank_schedule") else "") + ("-KD" if ad.get("kd", {}).get("enabled") else "")
            + (f" ({', '.join(ablations)})" if ablations else ""))


METHOD = Method(name="sdlora", label="SD-LoRA", model=SDLoRAModel, describe=describe,
                owns_adapter_fields=(("kd.enabled", False), ("rank_schedule", None), ("freeze", "normalize")),
                stacks_per_task=True)

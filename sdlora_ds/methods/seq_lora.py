"""Sequential LoRA baseline: one plain LoRA per projection trained through every task (model/baselines.py)."""
from ..model.baselines import SeqLoRAModel
from ..registry import Method

METHOD = Method(name="seq_lora", label="seq. LoRA", model=SeqLoRAModel)

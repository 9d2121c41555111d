"""Linear-probe baseline: frozen backbone, only the growing classifier trains (model/baselines.py)."""
from ..model.baselines import LinearProbeModel
from ..registry import Method

METHOD = Method(name="linear_probe", label="linear probe", model=LinearProbeModel)

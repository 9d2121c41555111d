"""NCM / SimpleCIL baseline: class means of frozen features, cosine similarity (model/baselines.py)."""
from ..model.baselines import NCMModel
from ..registry import Method

METHOD = Method(name="ncm", label="NCM", model=NCMModel)

"""sdlora_ds/config_fields.py: the lists name real config fields, and the sweep's is within the resume's."""
from sdlora_ds.config import config_from_dict, config_to_dict
from sdlora_ds.config_fields import NON_COMPUTING, RESUME_MAY_DIFFER
from sdlora_ds.logger import flatten

from conftest import tiny_config_dict


def test_every_listed_field_exists():
    fields = set(flatten(config_to_dict(config_from_dict(tiny_config_dict()))))
    assert not (RESUME_MAY_DIFFER - fields), sorted(RESUME_MAY_DIFFER - fields)


def test_a_non_computing_field_may_also_differ_on_resume():
    assert NON_COMPUTING < RESUME_MAY_DIFFER
    assert {"name", "dist.mixed_precision"} <= RESUME_MAY_DIFFER - NON_COMPUTING

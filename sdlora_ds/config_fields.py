"""Which config fields leave what a run computes unchanged: the two lists, side by side.

Both are dotted config field names (sdlora_ds/config.py documents each field).

- NON_COMPUTING: fields that change nothing computed. `sdlora-sweep` counts a finished run as done
  when its results.json differs from the sweep's config only in these (runs copied back from a
  cluster keep their own paths).
- RESUME_MAY_DIFFER: fields a resumed run may change against its checkpoint's config (resume.py
  refuses a difference in any other field, naming it): every non-computing field, plus the run's
  name, the weights' display name, how the data is read (caching, checksum verification, the
  bad-sample tolerance, how remote reads are retried), the evaluation batch, and dist.mixed_precision as written (the RESOLVED
  precision must match: resume.py checks it separately). The sweep's list is the narrower one, as
  each was before they met here.
"""
from __future__ import annotations

NON_COMPUTING = frozenset({
    "output_dir", "data.index", "backbone.path", "data.num_workers",  # where things are, how they are read
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",  # logging and saving cadence
    "dist.timeout_s",  # how long a collective waits
    # memory only: the blocks are recomputed with the same kernels (bitwise the same gradients on CPU,
    # tests/test_checkpoint.py), so a run that ran out of memory may resume with it on
    "train.activation_checkpointing", "backbone.check_shapes",  # the declared shapes are checked, not used
})

RESUME_MAY_DIFFER = NON_COMPUTING | frozenset({
    "name", "backbone.weights_name",
    "data.cache_task", "data.verify_checksums", "data.bad_sample_tolerance",
    "data.retries", "data.retry_wait", "data.read_timeout",  # how a remote read is retried, not what it reads
    "train.eval_batch",
    "dist.mixed_precision",  # the RESOLVED precision must match (checked separately)
})

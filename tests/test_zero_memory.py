"""bench/zero_memory.py at reduced depth: ZeRO-3 built under deepspeed.zero.Init splits a DINOv2-g-width
model over 2 CPU processes (the full-size table is the benchmark's, not CI's)."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import zero_memory  # noqa: E402


def test_two_blocks_of_dinov2_g_width_split_in_half_under_zero_init(capsys):
    assert zero_memory.main(["--backbone", "dinov2_g14", "--depth", "2", "--image-size", "28", "--stages", "3",
                             "--zero-init"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backbone"]["hidden_size"] == 1536 and res["backbone"]["swiglu"] and res["backbone"]["num_layers"] == 2
    whole = 4 * res["model_params"]  # fp32 bytes of every parameter
    assert res["model_params"] > 50_000_000  # two full-width giant blocks (28M parameters each)
    for rank in res["bytes_per_rank"]["3"]:
        # every weight matrix split in two; biases and norms (below the persistence threshold) whole
        assert 0.48 * whole <= rank["params"] <= 0.52 * whole, (rank["params"], whole)
        # partitioned as it was built, before the engine: no rank held the whole model
        assert rank["partitioned_at_build"] >= rank["partitioned_tensors"] > 0
        # the measured step's peak: what was resident (the partitions among it) + what the step held at once,
        # of which the gathered copies of partitioned tensors; the process's resident set holds all of it
        assert rank["peak"] == rank["resident"] + rank["step_peak"]
        assert rank["resident"] >= rank["params"] + rank["optimizer"]
        assert 0 < rank["gathered_at_peak"] <= rank["step_peak"]
        assert rank["max_rss"] > rank["peak"]

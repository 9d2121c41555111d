"""What a run records about itself: the backbone fingerprint is exact (a byte hash, the same with
any thread count) and older float-sum fingerprints still match their backbone. (config_record is
checked against a run's results in test_dry_run.py.)"""
import torch

from sdlora_ds.fileio import tensor_sha256
from sdlora_ds.run_record import backbone_fingerprint, fingerprint_matches


def test_backbone_fingerprint_is_exact_and_independent_of_the_thread_count():
    """A float-sum fingerprint changed in its last digit with the thread count (a 1-thread run was
    refused at export with 2 threads); the byte hash must not, and must see a one-ulp change."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 384, generator=g) * 0.02
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_sha256(w)
        torch.set_num_threads(max(2, before))
        two = tensor_sha256(w)
    finally:
        torch.set_num_threads(before)
    assert one == two
    bumped = w.clone()
    bumped[7, 11] = torch.nextafter(bumped[7, 11], torch.tensor(1.0))
    assert tensor_sha256(bumped) != one
    assert tensor_sha256(w.to(torch.bfloat16)) != tensor_sha256(w.to(torch.float16))


def test_fingerprints_written_before_sha256_still_match_their_backbone():
    model = torch.nn.Linear(384, 64)
    model.pretrained_keys = {"weight", "bias"}
    current = backbone_fingerprint(model)
    legacy = [float(getattr(model, k).detach().double().sum()) for k in sorted(model.pretrained_keys)]
    assert fingerprint_matches(current, current, model)
    assert fingerprint_matches([v * (1 + 1e-15) for v in legacy], current, model)  # last-digit noise
    assert not fingerprint_matches([legacy[0] + 1e-3, legacy[1]], current, model)  # another backbone
    assert not fingerprint_matches(current[:1] + ["0" * 64], current, model)

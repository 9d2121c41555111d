"""Data throughput per worker: the shard reader's fast path vs torchvision ImageFolder, same images.

    python bench/data_throughput.py [--images 400] [--min-side 500 --max-side 1000] [--workers 0]
                                    [--repeats 5] [--device cpu|cuda] [--out-json PATH]

Generates photo-like JPEGs (a smooth random field plus noise, quality 90) whose longer side is
uniform in [--min-side, --max-side] (ImageNet-R's are often 500-1000 px), in an ImageFolder tree;
converts the same files into shards (original bytes) and into resized shards (--resize-shorter
at conversion); then times one training epoch of decode + SPEC train augmentation at 224 px
(RandomResizedCrop(scale 0.05-1) bicubic + flip + ToTensor) for:
  imagefolder        torchvision.datasets.ImageFolder + DataLoader with the reference transform
                     (build_reference_transform: full PIL decode + torchvision v2): the baseline
  imagefolder_v1     the same with the classic v1 PIL transforms the reference code uses
  shards_reference   build_loader on the shards, data.decode = "reference" (the baseline's work)
  shards             build_loader, data.decode = "cpu": crop planned from the header, JPEG decoded
                     at reduced DCT scale when the crop allows it, only the crop region resampled;
                     local tars opened with webdataset's gopen and walked seekable (the default)
  shards_stream      the same through webdataset's tar iteration on the local files (every byte read)
  shards_http        the same from a local HTTP server on 127.0.0.1 (python -m http.server in another
                     process: its CPU time is not counted), read by sdlora_ds/data/remote.py:
                     urllib in the timed process, retry/resume bookkeeping, sha256 of every byte
  shards_http_nohash the same with data.verify_checksums off (no sha256)
  shards_http_before (--before-rev REV) REV's loader on the same server: webdataset's curl opener
                     (curl's CPU time, in its own process, is not counted with --clock cpu), no
                     hashing, no retries; shards_http / shards_http_before is the cost of the
                     retry and hashing machinery on the healthy path ("http_machinery_ratio")
  shards_before      (--before-rev REV) the loader as it was at git revision REV (e.g. the seek-only
                     reader with the shard-by-shard order), on the same shards
  --world N          time rank 0 of N simulated ranks (a worker reads 1/N of the samples: what
                     seeking saves over streaming grows with ranks x workers)
  shards_resizedN    the same on shards resized at conversion (--resized N: shorter side N, 448
                     and 256 by default): faster to decode, but another input distribution (a
                     crop holds fewer source pixels: more crops are upsampled, i.e. blurrier)
  cuda               (--device cuda) data.decode = "cuda": workers pass bytes, the GPU decodes
                     (nvjpeg) and augments; timed with a device synchronisation per batch
All variants run interleaved, --repeats epochs each, in one process, after one warm-up read of
every file (the page cache holds them). Per-worker rate: with --workers 0 the main process does
all the work and is timed by its CPU time (--clock auto; other processes on a shared machine
cannot inflate it); with workers or on CUDA, by the wall clock divided by the workers. Prints
img/s per worker, the ratios against imagefolder, and one JSON line (also written to --out-json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from timing import STATS, add_timing_args, device_name, setup_timing
from sdlora_ds.config import DataConfig
from sdlora_ds.data import ShardIndex, build_loader
from sdlora_ds.data.transforms import build_reference_transform
from shards.imagefolder import convert_folder


def make_jpegs(root: str, n: int, classes: int, sides: tuple[int, int], noise: int = 12,
               seed: int = 0) -> list[tuple[int, int]]:
    """Photo-like JPEGs, longer side uniform in `sides`, aspect 0.6-0.9, every third portrait: a
    smooth random field plus uniform noise of +-noise grey levels (the noise sets the bits per pixel,
    and so the entropy-decoding share of the decode, which DCT scaling cannot shrink)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    dims = []
    for i in range(n):
        long = int(rng.integers(sides[0], sides[1] + 1))
        short = int(long * rng.uniform(0.6, 0.9))
        w, h = (short, long) if i % 3 == 0 else (long, short)
        d = os.path.join(root, "train", f"class{i % classes:03d}")
        os.makedirs(d, exist_ok=True)
        field = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(field).resize((w, h), Image.BICUBIC)).astype(np.int16)
        arr = arr + rng.integers(-noise, noise + 1, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(os.path.join(d, f"img_{i:05d}.jpg"), quality=90)
        dims.append((w, h))
    for c in range(classes):  # the converter's pre-split layout needs a test folder too
        d = os.path.join(root, "test", f"class{c:03d}")
        os.makedirs(d, exist_ok=True)
        Image.new("RGB", (64, 64)).save(os.path.join(d, "t.jpg"))
    return dims


def fidelity(src: str, cfg, resized: list[int], n: int = 32) -> dict:
    """Output vs the reference (full decode, original image) over n images, one seed each: for the
    fast path on the original bytes, mean |difference| (same crop box up to rounding); for it and
    each resized copy, sharpness (mean |horizontal gradient|) / the reference's, averaged. A crop
    of a resized copy holds fewer source pixels: its sharpness drops below 1."""
    from PIL import Image
    from sdlora_ds.data.transforms import FastTransform
    from shards.imagefolder import encode_file
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(src, "train")) for f in fs)[:n]
    ref, fast = build_reference_transform(cfg, train=True), FastTransform(cfg, train=True)
    sharp = lambda x: float((x[..., 1:] - x[..., :-1]).abs().mean())  # noqa: E731
    out: dict = {}
    for name, opt in [("shards", None)] + [(f"shards_resized{r}", r) for r in resized]:
        diffs, ratios = [], []
        for i, path in enumerate(files):
            data = encode_file(path, {"resize_shorter": opt})[1]
            torch.manual_seed(i)
            a = fast(data)
            torch.manual_seed(i)
            b = ref(Image.open(path))
            diffs.append(float((a - b).abs().mean()))
            ratios.append(sharp(a) / sharp(b))
        # on a resized copy the same draws give another box (the position draw depends on the size):
        # only the sharpness statistic compares there
        out[name] = {"mean_abs_diff": round(float(np.mean(diffs)), 4) if opt is None else None,
                     "sharpness_ratio": round(float(np.mean(ratios)), 3)}
    return out


def decode_costs(src: str, clock, n: int = 64, rounds: int = 3) -> dict:
    """ms per image of the bare decoders on n of the JPEGs (min over rounds): PIL full, PIL at DCT
    scale 1/2 and 1/8 (at 1/8 the inverse DCT and colour work almost vanish: what is left is
    mostly entropy decoding, which no scaling removes), torchvision.io.decode_jpeg full."""
    import io
    from PIL import Image
    from torchvision.io import decode_jpeg
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(src, "train")) for f in fs)[:n]
    datas = [open(p, "rb").read() for p in files]

    def pil(k):
        def f(d):
            img = Image.open(io.BytesIO(d))
            if k > 1:
                img.draft("RGB", (img.size[0] // k, img.size[1] // k))
            img.load()
        return f
    fns = {"pil_full": pil(1), "pil_scale_1/2": pil(2), "pil_scale_1/8": pil(8),
           "torchvision_full": lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))}
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = clock()
            for d in datas:
                f(d)
            best[k] = min(best[k], (clock() - t0) / len(datas) * 1e3)
    return {k: round(v, 3) for k, v in best.items()}


def load_revision(rev: str):
    """build_loader as it was at git revision `rev` (its loader.py + reader.py, with today's index,
    transforms and decode modules): to time today's change against what it replaced, in one run."""
    import importlib.util
    import subprocess
    import types
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = {}
    for name in ("reader", "loader"):
        src = subprocess.run(["git", "-C", repo, "show", f"{rev}:sdlora_ds/data/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from sdlora_ds.data.reader import", "from _before_reader import")
        mod = types.ModuleType(f"_before_{name}")
        sys.modules[mod.__name__] = mod
        exec(compile(src, f"{rev}:sdlora_ds/data/{name}.py", "exec"), mod.__dict__)
        mods[name] = mod
    return mods["loader"].build_loader


def serve(root: str):
    """`python -m http.server` on 127.0.0.1 serving `root`, in its own process (so that its CPU time
    is not the timed process's) -> (base URL, stop function)."""
    import socket
    import subprocess
    import urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):  # wait until it answers (at most ~10 s)
        try:
            urllib.request.urlopen(base + "/index.json", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        sys.exit(f"error: the benchmark's HTTP server on {base} did not start")

    def stop():
        proc.terminate()
        proc.wait(10)
    return base, stop


class _Streamed:
    """A loader factory that walks local tars through webdataset's tar iteration (no seek)."""

    def __init__(self, make):
        self.make = make

    def __call__(self, epoch):
        from sdlora_ds.data import reader
        reader.SEEK_LOCAL = False  # read by forked workers at iteration: restored by time_epoch's caller
        return self.make(epoch)


def time_epoch(loader, clock, sync) -> tuple[float, int]:
    t0, n = clock(), 0
    for x, _ in loader:
        sync()
        n += x.shape[0]
    return clock() - t0, n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--min-side", type=int, default=500, help="shortest longer side of the generated JPEGs")
    ap.add_argument("--max-side", type=int, default=1000, help="longest longer side")
    ap.add_argument("--noise", type=int, default=12, help="+- grey levels of pixel noise in the JPEGs")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per variant (0: main process)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=5, help="epochs per variant (the --stat of them is reported)")
    ap.add_argument("--resized", type=int, nargs="*", default=[448, 256],
                    help="also time shards converted with --resize-shorter N, for each N")
    ap.add_argument("--out-json", default=None, help="also write the final JSON line to this file")
    ap.add_argument("--before-rev", default=None, metavar="REV",
                    help="also time the loader of this git revision (shards_before)")
    ap.add_argument("--world", type=int, default=1, help="simulated ranks; rank 0 is timed")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP variants")
    ap.add_argument("--only", nargs="*", default=None, metavar="VARIANT",
                    help="time only these variants (imagefolder, the ratios' base, is always timed)")
    add_timing_args(ap)
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False (no GPU or a CPU-only torch); "
                 "run without --device to time the CPU paths")
    if a.workers > 0 or a.device != "cpu":
        a.clock = "wall"  # worker processes' CPU time is not the main process's
    clock = setup_timing(a)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
    from torchvision.datasets import ImageFolder
    from torchvision import transforms as v1

    with tempfile.TemporaryDirectory() as tmp:
        work = a.dir or tmp
        src = os.path.join(work, "jpegs")
        dims = make_jpegs(src, a.images, a.classes, (a.min_side, a.max_side), a.noise)
        idx_full = convert_folder(src, os.path.join(work, "shards"), workers=1, progress=False, max_per_shard=64)
        resized = {n: ShardIndex.load(convert_folder(src, os.path.join(work, f"shards{n}"), workers=1, progress=False,
                                                     max_per_shard=64, resize_shorter=n)) for n in a.resized}
        cfg = DataConfig(index=idx_full, num_workers=a.workers)  # SPEC defaults: 224, bicubic, scale 0.05-1, flip
        index = ShardIndex.load(idx_full, verify_checksums=True)
        classes = list(range(index.num_classes))
        classic = v1.Compose([v1.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3),
                                                   interpolation=v1.InterpolationMode.BICUBIC),
                              v1.RandomHorizontalFlip(), v1.ToTensor()])

        def folder(transform):
            ds = ImageFolder(os.path.join(src, "train"), transform=transform)
            return torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers)

        kw = dict(split="train", class_ids=classes, train=True, batch_size=a.batch, rank=0, world_size=a.world,
                  num_workers=a.workers)

        def shards(ix, decode, build=build_loader, **over):
            c = DataConfig(index=ix.path, num_workers=a.workers, decode=decode, **over)
            return lambda e: build(ix, c, seed=0, epoch=e, **kw)
        stop_http = None
        extra = {"shards_stream": _Streamed(shards(index, "cpu"))}
        if not a.no_http:
            base, stop_http = serve(os.path.join(work, "shards"))
            http = ShardIndex.load(idx_full, shard_url=base + "/{path}")
            extra["shards_http"] = shards(http, "cpu")
            extra["shards_http_nohash"] = shards(http, "cpu", verify_checksums=False)
            if a.before_rev:
                extra["shards_http_before"] = shards(http, "cpu", load_revision(a.before_rev))
        if a.before_rev:
            extra["shards_before"] = shards(index, "cpu", load_revision(a.before_rev))
        variants = {"imagefolder": lambda e: folder(build_reference_transform(cfg, train=True)),
                    "imagefolder_v1": lambda e: folder(classic),
                    "shards_reference": shards(index, "reference"),
                    "shards": shards(index, "cpu"), **extra,
                    **{f"shards_resized{n}": shards(ix, "cpu") for n, ix in resized.items()}}
        if a.device.startswith("cuda"):
            variants["cuda"] = shards(index, "cuda")
        if a.only is not None:
            variants = {k: v for k, v in variants.items() if k == "imagefolder" or k in a.only}
        for p in [os.path.join(dp, f) for dp, _, fs in os.walk(work) for f in fs]:  # warm the page cache
            with open(p, "rb") as f:
                f.read()
        torch.manual_seed(0)
        times: dict[str, list] = {k: [] for k in variants}
        for rep in range(a.repeats):  # interleaved: a burst of load from elsewhere hits every variant
            for k, make in variants.items():
                from sdlora_ds.data import reader
                times[k].append(time_epoch(make(rep + 1), clock, sync))
                reader.SEEK_LOCAL = True
        if stop_http is not None:
            stop_http()
        stat = STATS[a.stat]
        runs = {k: (stat([t for t, _ in v]), v[0][1]) for k, v in times.items()}
        fid = fidelity(src, cfg, a.resized)
        dec = decode_costs(src, clock)
        sizes: dict = {k: sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(work, d))
                              for f in fs if f.endswith(".tar"))
                       for k, d in [("original", "shards")] + [(f"resized{n}", f"shards{n}") for n in a.resized]}
        jpeg_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(src, "train"))
                         for f in fs)
        sizes["jpeg_bits_per_px"] = 8 * jpeg_bytes / sum(w * h for w, h in dims)

    w = max(1, a.workers)
    rate = {k: n / t / w for k, (t, n) in runs.items()}
    longer = [max(d) for d in dims]
    print(f"{a.world} simulated rank(s), rank 0 timed; {a.images} JPEGs, longer side {min(longer)}-{max(longer)} px (mean {np.mean(longer):.0f}), "
          f"noise +-{a.noise}, {sizes['jpeg_bits_per_px']:.2f} bits/px, batch {a.batch}, "
          f"{a.workers} worker(s), {a.repeats} epochs per variant ({a.stat}), clock {a.clock}, "
          f"{device_name('cpu')}; 224 px train transform")
    for k, v in rate.items():
        print(f"  {k:18s} {v:8.1f} img/s per worker   x{v / rate['imagefolder']:.2f} vs imagefolder"
              + (f"   x{v / rate['shards_before']:.3f} vs shards_before" if "shards_before" in rate else ""))
    machinery = {}
    for k, base in (("http_machinery_ratio", "shards_http_before"), ("http_hash_ratio", "shards_http_nohash")):
        if "shards_http" in rate and base in rate:  # rate ratio: 0.97 = 3% slower per worker
            machinery[k] = round(rate["shards_http"] / rate[base], 3)
            print(f"  {k}: shards_http / {base} = {machinery[k]:.3f} (img/s per worker)")
    print("  bare decode, ms per image: " + ", ".join(f"{k} {v}" for k, v in dec.items()))
    for k, v in fid.items():
        print(f"  vs reference, {k}: mean |diff| {v['mean_abs_diff']}, sharpness ratio {v['sharpness_ratio']}")
    print("  shard MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items() if k != "jpeg_bits_per_px"))
    result = {"bench": "data_throughput", "device": a.device if a.device == "cpu" else device_name(a.device),
              "images": a.images, "longer_side": [min(longer), max(longer)], "noise": a.noise,
              "jpeg_bits_per_px": round(sizes.pop("jpeg_bits_per_px"), 2), "workers": a.workers, "batch": a.batch, "world": a.world,
              "repeats": a.repeats, "stat": a.stat, "clock": a.clock,
              "ips_per_worker": {k: round(v, 1) for k, v in rate.items()},
              **{f"{k}_over_imagefolder": round(v / rate["imagefolder"], 3) for k, v in rate.items()
                 if k != "imagefolder"},
              **machinery, "shard_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()}, "fidelity": fid,
              "decode_ms": dec}
    line = json.dumps(result)
    print(line)
    if a.out_json:
        with open(a.out_json, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()

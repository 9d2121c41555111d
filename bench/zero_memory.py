"""Per-rank parameter, gradient and optimizer memory of SD-LoRA on a ViT-B/16-sized backbone under
DeepSpeed ZeRO stage 0, 2 and 3, two processes (CPU, gloo, fp32: bytes are counted, not timed).

For each stage, two processes build the project's SDLoRAModel (ViT-B/16: d=768, 12 blocks, 224 px;
random weights, the shapes are what matters), start task 0 (40 classes, rank 10), create the engine
the way the trainer does (SGD momentum 0.9 over model.trainable_parameters()) with the DeepSpeed
settings of launch/ds_zero2.json / ds_zero3.json (stage 0: ds_zero2.json with stage 0; bf16 off on
CPU), and take one optimizer step on one 224x224 image per rank. Counted per rank, as bytes of
distinct tensor storages (a flat buffer and its views count once):

  params     what the rank stores of the model's parameters: the tensors themselves, or under
             ZeRO-3 the rank's partition of each partitioned one (ds_tensor) plus the whole of the
             "persistent" small ones (below stage3_param_persistence_threshold)
  grads      gradient storage right after backward, before the step: p.grad (stage 0), the rank's
             reduced gradient partition (ZeRO-2: averaged_gradients; ZeRO-3:
             grad_partitions_flat_buffer); DeepSpeed's transient reduce buckets are not counted
  optimizer  after the step: the optimizer's own copies of the weights (ZeRO-2's fp32 master
             partition; none at stage 0, whose optimizer updates the model tensors, nor under ZeRO-3
             in fp32, which updates the rank's partitions in place) + its state (momentum)

The frozen backbone is ~86M of the ~86.4M parameters; SD-LoRA trains ~0.4M. So ZeRO-2 only splits
the (small) trainable gradients and optimizer state, while ZeRO-3 also splits the frozen backbone
across the ranks: its params column is about half of stage 0's. On GPU with bf16 the params and
grads columns halve, and every stage keeps fp32 master weights of the trainable set (stage 0: whole;
ZeRO-2/3: the rank's partition) in the optimizer column. Prints a table, ends with ONE JSON line.

    python bench/zero_memory.py
    python bench/zero_memory.py --backbone dinov2_g14 --depth 2 --image-size 28 --stages 3 --zero-init

--backbone takes the shapes of a large-backbone config (configs/imagenetr_b40_vitl16.json,
imagenetr_b40_dinov2_g14.json) and --depth N keeps its first N blocks at full width, so the partition
can be checked at a size a CPU machine holds (tests/test_zero_memory.py: 2 blocks of DINOv2-g width on
2 processes). --zero-init builds the model inside deepspeed.zero.Init (ZeRO-3 only): every tensor is
partitioned as it is created, so no rank ever holds the whole backbone (without it each rank builds it
whole and the engine partitions it afterwards). --image-size sets the input (and the position grid).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # activation_memory (LivePeak), in spawned workers too
MiB = 1 << 20


def storages(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def flat(x):
    """Tensors inside nested dicts/lists."""
    import torch
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from flat(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from flat(v)


def ds_config(stage: int, world: int, prefetch=None, reuse=None) -> dict:
    """The launch file's settings for one image per rank in fp32. ZeRO-3, in elements, None for the
    file's value (DeepSpeed's default where the file names none): prefetch, stage3_prefetch_bucket_size
    (DeepSpeed's default 50M: gathered ahead of use from the second step on); reuse,
    stage3_max_reuse_distance (DeepSpeed's default 1G: a tensor used again within that many parameters
    of the trace stays gathered). Measured (bench/RESULTS.md): with a bucket the forward's layers stay
    gathered until their backward at reuse 0 as at 1G; bucket 0 + reuse 0 gather one module at a time."""
    name = "ds_zero3.json" if stage == 3 else "ds_zero2.json"
    with open(os.path.join(ROOT, "launch", name)) as f:
        cfg = json.load(f)
    cfg["zero_optimization"]["stage"] = stage
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world)
    cfg["bf16"], cfg["fp16"] = {"enabled": False}, {"enabled": False}  # CPU: fp32
    cfg["steps_per_print"] = 1 << 30
    for key, value in (("stage3_prefetch_bucket_size", prefetch), ("stage3_max_reuse_distance", reuse)):
        if value is not None:
            cfg["zero_optimization"][key] = value
    return cfg


BACKBONES = {"vit_b16": None, "vit_l16": "imagenetr_b40_vitl16.json", "dinov2_g14": "imagenetr_b40_dinov2_g14.json"}
SHAPES = ("arch", "hidden_size", "num_layers", "num_heads", "mlp_size", "patch_size", "swiglu")


def backbone_fields(name: str, depth, image_size: int) -> dict:
    """A 'config' backbone of the named config's shapes (BackboneConfig's defaults: ViT-B/16)."""
    fields = {"source": "config", "image_size": image_size}
    if BACKBONES[name]:
        with open(os.path.join(ROOT, "configs", BACKBONES[name])) as f:
            fields.update({k: v for k, v in json.load(f)["backbone"].items() if k in SHAPES})
    if depth:
        fields["num_layers"] = depth
    return fields


def resident_bytes() -> tuple:
    """(bytes, storage pointers) of every tensor Python can reach now: the model's parameters and
    buffers, the optimizer's and DeepSpeed's own (flat buffers, partitions, gradient partitions)."""
    import gc
    import torch
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return storages(tensors), {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def peak_of_step(model, step) -> dict:
    """Peak allocated bytes of one training step (step(): forward, backward, optimizer step): what was
    resident before it plus the peak of what the step allocated and held at once (activation_memory's
    LivePeak), and of that peak, the bytes of gathered ZeRO-3 parameters (full copies of partitioned
    tensors) at the moment it was reached. CPU has no allocator statistics: tensors are counted, not
    the allocator's caching; the Python runtime is not counted (max_rss in the record is)."""
    from activation_memory import LivePeak
    split = [p for p in model.parameters() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    # a gathered tensor that is the rank's own partition (one process: nothing to gather) adds nothing
    own = {p.ds_tensor.untyped_storage().data_ptr() for p in split}
    at_peak = {"gathered": 0}

    def on_peak():
        at_peak["gathered"] = storages(p.data for p in split
                                       if p.data.numel() and p.data.untyped_storage().data_ptr() not in own)
    resident, existing = resident_bytes()
    with LivePeak(existing, on_peak) as live:
        step()
    return {"resident": resident, "step_peak": live.peak, "peak": resident + live.peak,
            "gathered_at_peak": at_peak["gathered"]}


def worker(rank: int, world: int, stage: int, port: int, out: str, bb: dict, zero_init: bool, tasks: int = 1,
           prefetch=None, reuse=None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.nn.functional as F
    import deepspeed
    from sdlora_ds.config import config_from_dict
    from sdlora_ds.model import build_model
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    size = bb["image_size"]
    cfg = config_from_dict({"backbone": bb, "adapter": {"rank": 10}, "data": {"index": "unused", "image_size": size,
                                                                              "test_resize": size}})
    torch.manual_seed(0)
    if zero_init:  # partitioned as each tensor is created: no rank holds the whole backbone at any time
        with deepspeed.zero.Init(config_dict_or_path=ds_config(stage, world, prefetch, reuse)):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    # tensors already partitioned before the engine exists (zero.Init) vs all of them
    built_split = sum(1 for p in model.parameters() if hasattr(p, "ds_id") and not p.data.numel())
    for t in range(tasks):  # the last task trains; earlier ones leave frozen directions (buffers)
        model.start_task(t, 40)
    model.set_trainable()
    trainable = model.trainable_parameters()
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, world, prefetch, reuse))
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer; stage 0 does not

    def param_tensors():
        for p in model.parameters():
            if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition, and the whole of an available one
                yield p.ds_tensor
                if p.data.numel():
                    yield p.data
            else:
                yield p.data
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(rank))
    y = torch.tensor([rank % 40 + 40 * (tasks - 1)])
    engine.train()
    engine.set_gradient_accumulation_boundary(True)
    loss = F.cross_entropy(engine(x), y)
    engine.backward(loss)
    if stage == 0:
        grads = [p.grad for p in model.parameters()]
    elif stage == 3:
        grads = [getattr(optimizer, "grad_partitions_flat_buffer", None)] + [p.grad for p in model.parameters()]
    else:
        grads = list(flat(getattr(optimizer, "averaged_gradients", {}))) + [p.grad for p in model.parameters()]
    grad_bytes = storages(grads)
    engine.step()
    model_ptrs = {t.untyped_storage().data_ptr() for t in param_tensors() if t is not None and t.numel()}
    own = [p for g in inner.param_groups for p in g["params"] if p.untyped_storage().data_ptr() not in model_ptrs]
    opt_bytes = storages(own + list(flat(list(inner.state.values()))))
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
    # a second step, measured whole: ZeRO-3 prefetches from its second step on (the first records the
    # order the modules run in), and the optimizer state exists from the first

    def step():
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    peak = peak_of_step(model, step)
    import resource
    res = {**peak, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "buffers": storages(model.buffers()),
           "params": storages(param_tensors()), "grads": grad_bytes, "optimizer": opt_bytes,
           "model_params": n_all, "trainable_params": n_train,
           "partitioned_tensors": sum(1 for p in model.parameters() if hasattr(p, "ds_id") and not p.data.numel()),
           "partitioned_at_build": built_split}
    with open(os.path.join(out, f"stage{stage}_rank{rank}.json"), "w") as f:
        json.dump(res, f)
    torch.distributed.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="vit_b16")
    ap.add_argument("--depth", type=int, default=None, help="keep the first N blocks (full width)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tasks", type=int, default=1,
                    help="start this many tasks of 40 classes and train the last (5: the plan's last task)")
    ap.add_argument("--prefetch-bucket", type=int, default=None,
                    help="ZeRO-3 stage3_prefetch_bucket_size in elements (default: launch/ds_zero3.json's)")
    ap.add_argument("--reuse-distance", type=int, default=None,
                    help="ZeRO-3 stage3_max_reuse_distance in elements (default: launch/ds_zero3.json's)")
    ap.add_argument("--zero-init", action="store_true", help="build under deepspeed.zero.Init (--stages 3 only)")
    args = ap.parse_args(argv)
    if args.zero_init and args.stages != "3":
        ap.error("--zero-init partitions at construction, which is ZeRO-3: use it with --stages 3")
    bb = backbone_fields(args.backbone, args.depth, args.image_size)
    import torch.multiprocessing as mp
    stages = [int(s) for s in args.stages.split(",")]
    figures = {}
    with tempfile.TemporaryDirectory() as out:
        for stage in stages:
            mp.spawn(worker, args=(args.world, stage, free_port(), out, bb, args.zero_init, args.tasks, args.prefetch_bucket,
                                     args.reuse_distance), nprocs=args.world,
                     join=True)
            figures[stage] = [json.load(open(os.path.join(out, f"stage{stage}_rank{r}.json")))
                              for r in range(args.world)]
    first = figures[stages[0]][0]
    print(f"SD-LoRA on {args.backbone} ({bb.get('num_layers', 12)} blocks, {args.image_size} px; task {args.tasks - 1}, "
          f"{40 * args.tasks} classes, rank 10): {first['model_params']:,} parameters, {first['trainable_params']:,} trainable; {args.world} "
          f"processes, fp32{', built under zero.Init' if args.zero_init else ''}, per-rank MiB")
    print(f"{'stage':>5} {'rank':>4} {'params':>9} {'grads':>9} {'optimizer':>9} {'total':>9} {'step peak':>9} "
          f"{'gathered':>9}  partitioned tensors")
    for stage in stages:
        for r, f in enumerate(figures[stage]):
            total = f["params"] + f["grads"] + f["optimizer"]
            print(f"{stage:>5} {r:>4} {f['params'] / MiB:>9.2f} {f['grads'] / MiB:>9.3f} {f['optimizer'] / MiB:>9.3f} "
                  f"{total / MiB:>9.2f} {f['peak'] / MiB:>9.2f} {f['gathered_at_peak'] / MiB:>9.2f}  "
                  f"{f['partitioned_tensors']}")
    if 0 in figures and 3 in figures:
        print(f"ZeRO-3 params / stage-0 params on rank 0: {figures[3][0]['params'] / figures[0][0]['params']:.3f}")
    print(json.dumps({"bench": "zero_memory", "world_size": args.world, "dtype": "fp32", "backbone": bb,
                      "zero_init": args.zero_init, "tasks": args.tasks, "image_size": args.image_size,
                      "prefetch_bucket": args.prefetch_bucket, "reuse_distance": args.reuse_distance,
                      "model_params": first["model_params"], "trainable_params": first["trainable_params"],
                      "bytes_per_rank": {str(s): figures[s] for s in stages}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accelerate / DeepSpeed glue: building the accelerator, ZeRO facts, gathering, reductions, and
noticing a dead peer.

On CPU, accelerate does not create a process group for DeepSpeed by itself (ENVIRONMENT.md), so the
backend is always passed explicitly: gloo on CPU, nccl with CUDA. The collective timeout comes from
the config (dist.timeout_s), so a dead peer fails the run instead of hanging it.

ZeRO-3 partitions every parameter of the model, the frozen backbone included (that is what it is
for: backbones that do not fit one GPU). Outside the engine's forward/backward a partitioned
parameter is an empty placeholder (shape [0], DeepSpeed issue #5041), so every read of one outside
the forward pass goes through `gathered(...)` (deepspeed.zero.GatheredParameters): growing the model
at a task start, merging for evaluation, checkpointing. Under ZeRO-0/1/2 and without DeepSpeed,
`gathered` does nothing.

The magnitudes, shared by every adapted projection of every block, are ONE Parameter registered
once (model.magnitudes), so ZeRO-3 partitions it once and keeps one gradient partition for it. The
projections read it by calling that module (Magnitudes.forward), never through an attribute, so
ZeRO-3's pre-forward hook gathers it for each use (2 x blocks uses per forward) and its pre-backward
hook again for the backward; autograd sums the contributions of all uses into one gradient before
the parameter's single accumulation hook fires, so ZeRO-3 reduces it once per backward pass, like
any other parameter. In launch/ds_zero3.json it is far below stage3_param_persistence_threshold and stays
whole; the CPU tests partition it (launch/ds_cpu_zero3.json: threshold 0) and reproduce the
1-process losses (tests/test_distributed.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import sys
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager
from typing import Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from .config import ConfigError, RunConfig
from .errors import EXIT_STOPPED, EXIT_USER, rank_error_line, training_user_error, without_traceback
from .runlock import RunLock, RunLockError, release_all



@dataclasses.dataclass
class _DDPKwargs(DistributedDataParallelKwargs):
    """accelerate's DDP arguments plus torch >= 2.13's forward_sync_buffers (accelerate 1.x has no field)."""
    forward_sync_buffers: Optional[bool] = None


def ddp_kwargs_handler() -> DistributedDataParallelKwargs:
    """DDP without the per-forward buffer broadcast: the frozen directions are buffers, identical on
    every rank by construction, and broadcasting them at every forward would cost O(tasks) traffic
    per step for nothing. torch >= 2.13 spells it forward_sync_buffers=False (broadcast_buffers is
    deprecated there and warns); the buffers are still broadcast once when DDP wraps the model,
    which changes nothing since they are equal."""
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters:
        return _DDPKwargs(forward_sync_buffers=False)
    return DistributedDataParallelKwargs(broadcast_buffers=False)


def resolve_deepspeed_config_file(root: str) -> None:
    """A relative ACCELERATE_DEEPSPEED_CONFIG_FILE that does not exist from the current folder is
    taken relative to `root` (the accelerate configs in launch/ name their DeepSpeed file relative
    to the repository root: launch/train.py passes it, so they work from any working directory)."""
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and not os.path.isabs(ds_file) and not os.path.exists(ds_file) and \
            os.path.exists(os.path.join(root, ds_file)):
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = os.path.join(root, ds_file)


def make_accelerator(cfg: RunConfig) -> Accelerator:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    handlers = []
    if world > 1 or deepspeed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
        _default_group_timeout(timeout)
    # Without CUDA, cpu=True is what makes accelerate build a MULTI_CPU (gloo) state from the launcher's
    # torchrun environment; DeepSpeed selects its own CPU accelerator and must not get cpu=True.
    # (A single process needs neither: plain `python` or a 1-process launch just runs on the CPU.)
    cpu = not torch.cuda.is_available() and world > 1 and not deepspeed
    # 'auto': whatever the launcher says (the accelerate config file or --mixed_precision: bf16 in the
    # GPU configs of launch/, 'no' in the CPU ones); 'no' when started without a launcher.
    # Under DeepSpeed the precision is the DeepSpeed file's ("auto" there follows this choice).
    mp = None if cfg.dist.mixed_precision == "auto" else cfg.dist.mixed_precision
    acc = Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=handlers)
    acc.ddp_handler = ddp_kwargs_handler()  # set here: accelerate accepts only its own handler class
    if mp is not None and acc.mixed_precision != mp:
        raise ConfigError(f"config field 'dist.mixed_precision': {mp!r}, but the launcher's DeepSpeed config "
                          f"({os.environ.get('ACCELERATE_DEEPSPEED_CONFIG_FILE')}) fixes {acc.mixed_precision!r}; set "
                          f"dist.mixed_precision to 'auto', or use a DeepSpeed file whose bf16/fp16 'enabled' "
                          f"is \"auto\"")
    return acc


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make dist.timeout_s the timeout of process groups created later without one.

    DeepSpeed runs its collectives on groups it creates itself (e.g. a clone of the world group for
    ZeRO's reductions) with torch.distributed.new_group(ranks), which takes torch's default timeout
    (30 minutes) instead of the one the default group was given: a rank blocked on a stopped (not
    dead) peer would wait that long. new_group reads the default from these module globals at call
    time, so setting them before DeepSpeed initialises covers every group it creates."""
    import torch.distributed.distributed_c10d as c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, timeout)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """The ZeRO stage under DeepSpeed, None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.zero_stage)


def configure_deepspeed_batch(accelerator: Accelerator, micro: int, accum: int) -> None:
    """DeepSpeed checks micro x accum x world == train_batch_size; we never prepare a DataLoader,
    so the numbers come from the config's batch plan (OptimConfig.batch_plan). A DeepSpeed config
    file may leave them 'auto' (as the ones in launch/ do); a number there that disagrees with the
    plan is refused rather than silently overridden."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * accelerator.num_processes}
    for key, value in want.items():
        have = ds.get(key, "auto")
        # accelerate writes gradient_accumulation_steps=1 into a file that does not name it
        if have not in ("auto", value) and not (key == "gradient_accumulation_steps" and have == 1):
            raise ConfigError(
                f"DeepSpeed config {key}={have} but the run's batch plan needs {value} (micro_batch {micro} x "
                f"grad_accum {accum} x world size {accelerator.num_processes} = global batch "
                f"{micro * accum * accelerator.num_processes}); set it to \"auto\" in the DeepSpeed config "
                f"file and choose the numbers with optim.global_batch / optim.micro_batch / optim.grad_accum")
        ds[key] = value
    # No clipping in the method (SPEC): accelerate would otherwise fill an 'auto' gradient_clipping with 1.0.
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 0.0
    plugin.gradient_accumulation_steps = accum
    accelerator.gradient_accumulation_steps = accum  # else accelerate warns of a mismatch at every prepare


# ---------------------------------------------------------------------- ZeRO-3 parameter access
def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its data is a placeholder outside the forward pass or `gathered`)."""
    return hasattr(p, "ds_id")


def held_elements(model: torch.nn.Module) -> tuple[int, int, int]:
    """(parameter elements this rank stores, elements of the whole model, partitioned tensors):
    under ZeRO-3 a partitioned parameter stores only its own slice (ds_tensor)."""
    held = total = parts = 0
    for p in model.parameters():
        if is_partitioned(p):
            held += p.ds_tensor.numel() if p.ds_tensor is not None else 0
            total += p.ds_numel
            parts += 1
        else:
            held += p.numel()
            total += p.numel()
    return held, total, parts


@contextmanager
def gathered(params: Iterable[torch.Tensor]):
    """Make ZeRO-3-partitioned `params` whole on every rank for the body; a no-op for ordinary
    tensors. Read-only use: the parameters are re-partitioned (not broadcast) on exit, so the body
    must not modify them in place (replacing a module's Parameter by a new one is fine: every rank
    computes the same new value, and the next engine partitions it). Collective: every rank must
    enter with the same parameters."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def plain_construction(accelerator: Accelerator):
    """Build models with ordinary (unpartitioned) parameters, on one rank alone if need be.

    Under a ZeRO-3 DeepSpeed config, accelerate registers it with transformers, and
    `from_pretrained` then builds the backbone inside deepspeed.zero.Init: partitioned from the
    start (what a backbone too big for one GPU needs) but a collective, which one rank alone would
    wait on forever. Inside this context transformers does not see the DeepSpeed config."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or int(plugin.zero_stage) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextmanager
def merged_eval(model):
    """model.merged_eval() with the weights it reads gathered while the merge is computed.

    Merging reads every adapted projection's frozen weight, its current factors and the shared
    magnitudes. Under ZeRO-3 they are gathered for the duration of the merge only: the merged weights
    are ordinary tensors the layers keep, so the evaluation forwards that follow need only what the
    engine's hooks fetch (peak: the adapted projections' weights, 2 of a block's 12 d x d matrices)."""
    stack = ExitStack()
    params = [p for layer in model.layers for p in layer.parameters(recurse=False)]
    params += list(model.trainable_parameters())  # the shared magnitudes live outside the layers
    with gathered(params):
        stack.enter_context(model.merged_eval())
    with stack:
        yield


def sum_across_ranks(accelerator: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (evaluation counters, the step loss)."""
    if accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()


def broadcast_object(accelerator: Accelerator, obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (e.g. the checkpoint rank 0 chose)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    box = [obj if accelerator.process_index == src else None]
    broadcast_object_list(box, from_process=src)
    return box[0]


def lock_run_folder(accelerator: Accelerator, run_dir: str) -> tuple:
    """(RunLock on global rank 0 / None elsewhere, notes). Only rank 0 takes the lock (multi-node
    runs share output_dir); every rank learns the outcome, so all stop alike (RunLockError) when
    another trainer holds the folder or it cannot be written."""
    lock, answer = None, ("ok", [])
    if accelerator.is_main_process:
        lock = RunLock(run_dir)
        try:
            answer = ("ok", lock.acquire())
        except RunLockError as e:
            answer = ("error", str(e))
        except OSError as e:
            answer = ("error", f"config field 'output_dir': cannot write the run folder {run_dir!r} "
                               f"({e.strerror or e}); choose a writable folder")
    answer = broadcast_object(accelerator, answer)
    if answer[0] == "error":
        raise RunLockError(answer[1])
    return lock, answer[1]


# ---------------------------------------------------------------------- a dead peer, a dead launcher
STORE_FAILURES = 3  # consecutive failed heartbeats (interval apart) before the store counts as gone


def hard_exit(code: int) -> None:
    """Exit now (os._exit: no teardown that could wait on a dead peer), releasing the run lock first."""
    try:
        release_all()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def under_launcher() -> bool:
    """Started by torchrun / accelerate launch (their environment), not from a shell by hand."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


class ParentWatch:
    """Stops this process when its launcher dies (a SIGKILL of the launcher, or of its process
    group: torchrun starts workers in their own sessions, so they would otherwise train on as
    orphans). A daemon thread polls os.getppid() every `interval` seconds: once the parent is gone
    the process has been re-parented (to init or a subreaper) and the pid changes. Polling rather
    than prctl(PR_SET_PDEATHSIG): that fires when the parent THREAD that forked exits, which a
    launcher's helper thread may do while the launcher lives on."""

    def __init__(self, rank: int, world: int, interval: float = 1.0):
        self.rank, self.world, self.interval = rank, world, interval
        self.parent = os.getppid()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ParentWatch":
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="sdlora-parent", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if os.getppid() != self.parent:
                print(f"error: rank {self.rank} of {self.world} stops: its launcher (parent process "
                      f"{self.parent}) is gone. Resume with --resume auto.", file=sys.stderr, flush=True)
                hard_exit(EXIT_STOPPED)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval)
            self._thread = None


class PeerMonitor:
    """Names the rank that died, and stops this one within dist.timeout_s of a peer going silent.

    A collective on a dead peer fails on the survivors (gloo: at once when the peer's sockets close,
    otherwise after dist.timeout_s; NCCL: its watchdog aborts after the timeout), but the error does
    not say which rank is gone. Every rank bumps a counter in the launcher's rendezvous store
    (torchrun's TCPStore, hosted by the node-0 agent) from a daemon thread, which keeps running while
    the main thread is blocked in a collective:
    - on a failed collective (`abort`), the survivors read every counter twice, 3 x `interval` apart:
      a counter that did not move belongs to a dead rank (if the store itself is unreachable, the
      main node, rank 0's, is gone);
    - as a watchdog, each rank also watches its successor on a ring (O(1) store traffic per rank): a
      successor silent for `timeout` seconds stops this rank with that message, whatever the
      backend and wherever the main thread is waiting. A rank that finished says so first (done key);
    - the store itself going away (STORE_FAILURES heartbeats in a row fail: the main node's launcher
      is gone) stops the rank too, naming the store's address, instead of ending the watch quietly."""

    def __init__(self, rank: int, world: int, interval: float = 1.0, timeout: Optional[float] = None):
        self.rank, self.world, self.interval, self.timeout = rank, world, interval, timeout
        self.store = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        self.address = f"{host}:{port}"
        if world > 1 and host and port:
            try:
                import torch.distributed as dist
                self.store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                           timeout=datetime.timedelta(seconds=10))
            except Exception:  # no store to talk to: failures are reported without a rank
                self.store = None

    def _key(self, r: int, what: str = "heartbeat") -> str:
        return f"sdlora/{what}/{r}"

    def start(self) -> "PeerMonitor":
        if self.store is not None and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="sdlora-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        watched = (self.rank + 1) % self.world
        last, since = None, time.monotonic()
        failures = 0
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self._key(self.rank), 1)
                failures = 0
                if self.timeout is None:
                    continue
                seen, now = self.store.add(self._key(watched), 0), time.monotonic()
                if seen != last:
                    last, since = seen, now
                elif now - since >= self.timeout and not self.store.check([self._key(watched, "done")]):
                    self._report(f"rank(s) [{watched}] stopped (no heartbeat for {now - since:.0f} s, the "
                                 f"collective timeout dist.timeout_s)", "")
                    hard_exit(EXIT_STOPPED)
            except Exception as e:  # the store is hosted by the main node's launcher (torchrun agent)
                failures += 1
                if self._stop.is_set():
                    return
                if failures >= STORE_FAILURES:  # not one transient error: the launcher is gone
                    first = str(e).splitlines()[0] if str(e) else ""
                    self._report(f"the launcher's rendezvous store at {self.address} is unreachable "
                                 f"({type(e).__name__}: {first}): the main node's launcher is gone", "",
                                 "Resume with --resume auto once the job is relaunched.")
                    hard_exit(EXIT_STOPPED)

    def stop(self) -> None:
        """Normal end of this rank: tell the watchers, stop beating."""
        if self.store is not None:
            try:
                self.store.set(self._key(self.rank, "done"), "1")
            except Exception:
                pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval)
            self._thread = None

    def dead_ranks(self) -> Optional[list]:
        """Ranks whose heartbeat stopped; None when the store cannot be read (main node down)."""
        if self.store is None:
            return None
        try:
            first = [self.store.add(self._key(r), 0) for r in range(self.world)]
            time.sleep(3 * self.interval)
            second = [self.store.add(self._key(r), 0) for r in range(self.world)]
        except Exception:
            return None
        return [r for r in range(self.world) if r != self.rank and first[r] == second[r]]

    def _report(self, cause: str, detail: str, hint: str = "") -> None:
        print(f"error: rank {self.rank} of {self.world} stops: {cause}{detail}.{(' ' + hint) if hint else ''}",
              file=sys.stderr, flush=True)

    def abort(self, exc: BaseException, checkpoint_hint: str = "") -> None:
        """Report a failure of this rank's run (naming dead peers) and exit at once with EXIT_STOPPED (3).

        os._exit, not sys.exit: a normal interpreter exit would run atexit/destructor code that may
        itself wait on the dead peer (process-group teardown, DataLoader workers).

        Bad data (BadDataError: this rank's share of the samples) is the user's to fix, not a crash:
        one line naming the shard and key, `error (rank N): ...`, and EXIT_USER (2; launch/run.py then
        ends quietly with 2); the checkpoints are untouched, so --resume auto continues once the
        data is fixed. A failed kernel self-check (KernelSelfCheckError: the Triton path disagrees
        with the reference on this device) is reported the same way, with its fix (adapter.impl)
        and without the resume hint."""
        kind = training_user_error(exc)
        if kind is not None:
            without_traceback(exc)  # frees the interrupted loop's progress bar: it clears its line
            try:
                print(rank_error_line(self.rank, exc, checkpoint_hint if kind == "data" else ""),
                      file=sys.stderr, flush=True)
            finally:
                hard_exit(EXIT_USER)
        try:
            dead = self.dead_ranks()
            if dead:
                cause = f"rank(s) {dead} stopped (no heartbeat for {3 * self.interval:.0f} s)"
            elif dead is None and self.store is not None:
                cause = "the launcher's rendezvous store is unreachable: the main node (rank 0) is down"
            elif dead == []:
                cause = "every peer is alive: the error is this rank's own"
            else:
                cause = "peer status unknown (no rendezvous store)"
            print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), file=sys.stderr)
            first = str(exc).splitlines()[0].rstrip(". ") if str(exc) else ""
            self._report(cause, f" ({type(exc).__name__}: {first})", checkpoint_hint)
        finally:
            hard_exit(EXIT_STOPPED)

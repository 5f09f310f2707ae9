"""What every script shares, none of it DPT: one-line user errors and the rules
settings are checked by, command lines built from dataclasses, safe writes and
damaged files named with their fix, one writer per run folder, processes and
their random state, checkpoints, the compiled (and DDP, and CUDA-graph) training
step, and how fast a piece of work runs on a device.
"""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time
import zlib
from functools import lru_cache, partial

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# User errors, settings checked before any work,
# and command lines built from dataclasses


class UserError(Exception):
    """A mistake the user can fix: printed as one line on stderr, exit code 2."""


def first_line(error, limit=200):
    """What a library error says, in one line: torch's load_state_dict puts its
    heading first and the first missing or unexpected key second."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else "")[:limit]


def exit_unwinding(number, frame):
    """A signal handler that raises SystemExit, so that finally blocks run, as after Ctrl-C."""
    sys.exit(128 + number)


def run_main(main):
    """Run a script's main(); a UserError ends it with one line and exit code 2.
    Under torchrun, the process group ends with the script. SIGTERM (kill, a
    scheduler's time limit) ends it as Ctrl-C does, so no half-written file stays."""
    default = signal.signal(signal.SIGTERM, exit_unwinding)
    try:
        main()
        if dist.is_initialized():  # end together: a rank leaving the gloo group while another still
            dist.barrier()         # works aborted at exit ("terminate called", once in CI, 1 in 10 under load)
    except UserError as error:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):  # end a progress bar's line before ours
            bar.close()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, default)
        if dist.is_initialized():
            dist.destroy_process_group()


# A rule is (test of a value, what a valid value is). Each script keeps the rules
# of its own config in RULES; dpt.py checks its stages with the same rules, naming
# the flags the user typed there (--ssl-steps where fixmatch.py has --steps).
# A constructor's words, where given, say what the range means for the setting.
def one_of(*options):
    def is_option(value):
        return value in options
    return is_option, "one of " + ", ".join(options)


def at_least(low, words=None):
    def is_at_least(value):
        return low <= value < math.inf  # NaN fails every comparison
    return is_at_least, words or f"at least {low}, finite"


def between(low, high, words=None):
    def is_between(value):
        return low <= value <= high
    return is_between, words or f"from {low:,} to {high:,}"


def is_seed(value):
    return 0 <= value < 2 ** 31  # numpy's RandomState takes 32 bits


SEED = is_seed, "from 0 to 2^31 - 1"
# Every count has a ceiling far above any recipe (the paper's: 2^20 classifier steps,
# 307M diffusion images, batches of 1,024), so that a typo such as 1e20 is refused
# at once instead of after hours of the stages before the one it reaches.
MOST_STEPS = 2 ** 30
MOST_IMAGES = 10 ** 12
MOST_BATCH = 2 ** 20


def is_positive(value):
    return 0 < value < math.inf


def is_fraction(value):
    return 0 <= value < 1


def is_file_or_empty(path):
    return not path or os.path.isfile(path)


POSITIVE = is_positive, "a positive number"
FINITE = math.isfinite, "a finite number"
FRACTION = is_fraction, "at least 0 and below 1"
PROBABILITY = between(0, 1, "between 0 and 1")
FILE_OR_EMPTY = is_file_or_empty, "an existing file, or empty"


def flag(name, flags=None):
    """The command-line flag of a config field: --name, or the name dpt.py gives it."""
    return "--" + (flags or {}).get(name, name).replace("_", "-")


def check_fields(config, rules, flags=None):
    """Refuse the first field of config that breaks its rule, in one line naming its flag."""
    for name, (valid, words) in rules.items():
        value = getattr(config, name)
        if not valid(value):
            raise UserError(f"{flag(name, flags)} {value!r}: must be {words}")


def check_divisible(config, world, flags=None):
    """A batch of all processes together splits evenly across torchrun's processes."""
    if config.batch % world:
        raise UserError(f"{flag('batch', flags)} {config.batch}: must be divisible by the {world} processes")


def field_comments(config_class):
    """{field: the comment after it on its line} in the source of a @dataclass
    (of its bases too); none for a class made at run time (make_dataclass)."""
    comments = {}
    for cls in reversed(config_class.__mro__[:-1]):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            name, _, rest = line.strip().partition(":")
            if "#" in rest and name.isidentifier():
                comments[name] = rest.split("#", 1)[1].strip()
    return comments


def parse_config(config_class, description, argv=None):
    """Build a command line from a @dataclass: each field is a --flag with its
    default (a field without a default is a positional argument), and the
    comment after the field (or its metadata's "help") is its help text."""
    comments = field_comments(config_class)
    comments.update({field.name: field.metadata["help"] for field in dataclasses.fields(config_class)
                     if "help" in field.metadata})
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = dataclasses.fields(config_class)
    unset = "the preset's, else the stage script's" if "preset" in {field.name for field in fields} else "unset"
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        help_text = comments.get(field.name, "")
        if "(unset" not in help_text:  # a comment that says what unset means says it best
            help_text += f" (default: {unset if field.default is None else field.default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: "5%" is text
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(field.type, field.type)
        if field.default is dataclasses.MISSING:
            parser.add_argument(field.name, type=kind, help=comments.get(field.name))
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)

    def refuse(message):  # argparse's own errors (a typo, "abc" for a number) in one line too
        raise UserError(f"{message} (see --help)")
    parser.error = refuse
    return config_class(**vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------
# Run folders (safe writes, one writer),
# processes, random state, checkpoints


def save_atomic(obj, path, writer=None):
    """writer(obj, file) (torch.save by default) into a temporary name, then
    rename: a run killed at any moment leaves either the old file or the new
    one, never half of one. A full disk is one line, with nothing left behind."""
    temporary = f"{path}.tmp{os.getpid()}"  # matches TEMPORARY
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(temporary, "wb") as file:  # a Python file, so that a full disk raises OSError
            (writer or torch.save)(obj, file)
        os.replace(temporary, path)
    except BaseException as error:  # Ctrl-C included: no temporary file survives
        if os.path.exists(temporary):
            os.remove(temporary)
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__  # torch.save's zip writer meets ENOSPC, then fails in its own clean-up
        full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or isinstance(error, OSError)):
            raise  # a bug (one raised while handling an unrelated OSError included), not the disk's fault
        advice = "free some space" if full else "check that you may write there"
        raise UserError(f"cannot write {path} ({cause.strerror or cause}); {advice} or choose another --out, "
                        "then run the same command again to continue") from None


AGAIN = "remove it and run the same command again: it is made again from the files before it"


def read_json(path, advice=AGAIN):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({type(error).__name__}); {advice}") from None


def json_writer(obj, file):
    """save_atomic's writer of obj as JSON indented by two spaces."""
    file.write(json.dumps(obj, indent=2).encode())


def write_json(obj, path):
    save_atomic(obj, path, writer=json_writer)


def text_writer(text, file):
    """save_atomic's writer of a str, in UTF-8."""
    file.write(text.encode())


def write_text(text, path):
    save_atomic(text, path, writer=text_writer)


def read_artifact(path, redo=None, mmap=False):
    """A file a stage wrote. A damaged one is refused with the cheapest true fix:
    --redo `redo` where it holds what the run was made from (the split: the data),
    else to remove it, since a missing file is made again from the ones before it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise UserError(f"{path} is damaged ({type(error).__name__}); "
                        + (f"rerun with --redo {redo}" if redo else AGAIN)) from None


def file_identity(path):
    """What a file holds, in words that change when its bytes do: its size and
    CRC-32 ("" without a path). An input a stage read is recorded by this, so that
    a file replaced under the same name is not taken for the one the stage read."""
    if not path:
        return ""
    stat = os.stat(path)
    return f"{stat.st_size:,} bytes, crc32 {file_crc(os.path.realpath(path), stat.st_size, stat.st_mtime_ns):08x}"


@lru_cache(maxsize=64)
def file_crc(path, size, mtime_ns):  # size and time in the key: a file rewritten since is read again
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(2 ** 24):
            crc = zlib.crc32(block, crc)
    return crc


def files_under(path):
    """`path` if it is a file, the files under it if it is a folder, else none."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(parent, name) for parent, _, names in os.walk(path) for name in sorted(names)]


def once(path, make, load=None, every_rank=True, timed=None):
    """What every stage does: when `path` is missing, make() does the work (on
    every process, or on rank 0 alone) and writes it there; then every process
    waits for the others and loads it. timed = (run, stage) adds the work's wall
    time to the stage's in timings.json (a resumed stage adds up its parts)."""
    if not os.path.exists(path) and (every_rank or dist_rank() == 0):
        start = time.perf_counter()
        make()
        if timed:
            add_time(*timed, time.perf_counter() - start)
    barrier()
    return load(path) if load else None


def add_time(run, stage, seconds):
    """Add seconds to the stage's wall time in RUN/timings.json (rank 0)."""
    if dist_rank() == 0:
        timings = read_json(os.path.join(run, "timings.json")) or {}
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 1)
        write_json(timings, os.path.join(run, "timings.json"))


TEMPORARY = re.compile(r"\.tmp\d+$")  # save_atomic's temporary names


def remove_temporaries(folder):
    """The half-written files of a process killed by SIGKILL inside save_atomic,
    removed by the folder's next writer when it takes the lock (claim_folder)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            if TEMPORARY.search(name):
                os.remove(os.path.join(parent, name))


HELD_LOCKS = []  # open lock files: the kernel releases each when its process ends, SIGKILL included


def claim_folder(folder, rank=0, world=1, wait=False):
    """Make this run the only writer of `folder` (a second run into it stops with
    one line, or with wait=True waits for the first to let go); rank 0 holds the
    lock for every rank of a torchrun job. Returns the lock (None on other ranks)."""
    refusal = file = None
    if rank == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            file = open(os.path.join(folder, "run.lock"), "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                file.seek(0)
                print(f"waiting for {file.read().strip() or 'another process'} to finish {folder}", file=sys.stderr)
                fcntl.flock(file, fcntl.LOCK_EX)
            file.truncate(0)
            file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            file.flush()
            HELD_LOCKS.append(file)
            remove_temporaries(folder)  # what a writer killed by SIGKILL left half-written: no one else writes
        except BlockingIOError:
            file.seek(0)
            refusal = (f"{folder} is in use by {file.read().strip() or 'another process'}; wait for it to end, "
                       "or choose another --out")
            file.close()
        except OSError as error:
            refusal = f"cannot write {folder} ({error.strerror or error}); choose another --out"
    if world > 1:
        message = [refusal]
        dist.broadcast_object_list(message, src=0)  # every rank stops, not rank 0 alone
        refusal = message[0]
    if refusal:
        raise UserError(refusal)
    return file


@contextlib.contextmanager
def folder_claimed(folder, rank=0, world=1, wait=False):
    """claim_folder for the length of a with-block, let go however the block ends:
    a library user who calls dpt.main again after an error finds the folder free."""
    lock = claim_folder(folder, rank, world, wait)
    try:
        yield
    finally:
        if lock is not None:
            HELD_LOCKS.remove(lock)
            lock.close()


# How long a process waits for the others at a collective before it gives up.
# Rank 0 works alone for minutes at a time on ImageNet (joining the encoded chunks
# into encoded.pt, fitting the probes on 1.28M features, the oracle, the report)
# while the others wait at a barrier: NCCL's default of 10 minutes would end the run.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def distributed_setup():
    """(rank, world size, device); torchrun sets RANK and WORLD_SIZE."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: time cuDNN's algorithms once (EDM)
    else:
        device = torch.device("cpu")
    return rank, world, device


def dist_rank():
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    """Wait for every process (nothing to wait for without torchrun)."""
    if dist.is_initialized():
        dist.barrier()


def gather_shares(share, total, world):
    """All `total` rows on every process, where process r holds the share of rows
    r, r + world, r + 2 world, ... (shares differ in size by at most one): padded
    to one size, all-gathered and interleaved back into row order."""
    padded = share.new_zeros((math.ceil(total / world), *share.shape[1:]))
    padded[:len(share)] = share
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    return torch.stack(shares, 1).flatten(0, 1)[:total]


def gather_to_first(share, total, world, device, chunk=1024):
    """All `total` rows, in row order, on the host of process 0 (None elsewhere),
    where process r holds the rows r, r + world, ... (as gather_shares): gathered
    through the device `chunk` rows at a time, so that neither the device nor any
    other process ever holds all of them (the imagenet preset's 128,000 decoded
    samples are 25 GB)."""
    rows = math.ceil(total / world)
    whole = share.new_empty((rows, world, *share.shape[1:])) if dist.get_rank() == 0 else None
    for start in range(0, rows, chunk):
        part = share.new_zeros((min(chunk, rows - start), *share.shape[1:]), device=device)
        mine = share[start:start + chunk]
        part[:len(mine)] = mine.to(device)
        parts = [torch.empty_like(part) for _ in range(world)] if whole is not None else None
        dist.gather(part, parts, dst=0)
        if whole is not None:
            whole[start:start + len(part)] = torch.stack(parts, 1).cpu()
    return None if whole is None else whole.flatten(0, 1)[:total]


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(world):
    """Every rank's generators (gathered to all), so that each resumes its own random stream."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def load_checkpoint(path, config, free_to_change):
    """A checkpoint of this configuration, or a one-line refusal: never
    silently train over something else. free_to_change: config fields that
    may differ without changing where the run ends."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"checkpoint {path} is unreadable ({type(error).__name__}); delete it to start over") from None
    saved = checkpoint.get("config", {}) if isinstance(checkpoint, dict) else {}
    changed = sorted(k for k, v in dataclasses.asdict(config).items() if k not in free_to_change and saved.get(k) != v)
    if changed:
        raise UserError(f"checkpoint {path} was made with other settings ({', '.join(changed)}); "
                        "use another --out or delete it to start over")
    return checkpoint


def resume(path, config, free_to_change, world, rank, model, ema_model, optimizer):
    """Load the weights, EMA weights, optimizer and this rank's random state of
    a checkpoint of this configuration; return the checkpoint (None if there is
    none) for the stage's own counters."""
    if not os.path.exists(path):
        return None
    checkpoint = load_checkpoint(path, config, free_to_change)
    if len(checkpoint["rng"]) != world:
        raise UserError(f"checkpoint {path} was written by {len(checkpoint['rng'])} processes; resume it with as many")
    model.load_state_dict(checkpoint["model"])
    ema_model.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_state(checkpoint["rng"][rank])
    return checkpoint


DOWNLOAD_TIMEOUT = 60  # seconds a download may wait for the network before it fails


@contextlib.contextmanager
def download_timeout(seconds=DOWNLOAD_TIMEOUT):
    """Downloads inside fail after `seconds` without an answer, where an offline
    machine that drops packets would hang them (urllib waits forever by default)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def memory_bytes():
    """This machine's memory (its physical pages)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_name(device):
    """What a benchmark ran on, for its printout and results.json."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def on_cuda_unless_set(flag, device):
    """compile and bf16 as set, else on with CUDA only: on 2 CPU cores neither
    pays for the tiny networks (RESULTS.md, "Speed")."""
    return device.type == "cuda" if flag is None else flag


def for_training(model, loss, world, device, compile, cuda_graphs=False):
    """(forward, step_loss): what the training step calls. step_loss(*batch) is
    loss(forward, *batch). With one process and compile, the model and its loss
    are one compiled graph (the loss's softmax, masks and weighting fuse into the
    network's last kernels instead of running as a dozen small ones), replayed as
    CUDA graphs where cuda_graphs asks: the host then launches the forward and
    the backward once each instead of a few hundred kernels. Several processes:
    the compiled model under DDP (outermost, as nanoGPT wraps it, so that a step
    of several micro-batches can set its require_backward_grad_sync) and the loss
    eager, as DDP's graph splitting expects.

    Each stage compiles afresh and static: the stages share their loss's code
    object, and dynamo, which caches by code object, would take each new stage's
    network for a recompile of the last, mark its shapes dynamic (weaker kernels)
    and count every stage against one recompile limit."""
    if compile:
        torch.compiler.reset()
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            torch.compile(model, dynamic=False) if compile else model,
            device_ids=[device] if device.type == "cuda" else None)
        return forward, partial(loss, forward)
    if not compile:
        return model, partial(loss, model)
    step_loss = torch.compile(partial(loss, model), fullgraph=True, dynamic=False,
                              mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return model, step_loss

    def replayed(*batch):
        torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs are read: this replay may reuse them
        return step_loss(*batch)
    return model, replayed


def zero_grad(optimizer):
    """Before a step's backward: every gradient allocated once, then zeroed in
    place, never set to None. A backward that finds .grad None adopts its output
    as .grad; under CUDA graphs that output lives in the graphs' memory pool, and
    the next replay (the step's next micro-batch) overwrites what the first
    accumulated into (pytorch/pytorch#169545). Kept outside the pool, the
    micro-batches add into it."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is None for p in params):
        for p in params:
            p.grad = torch.zeros_like(p)
    else:
        torch._foreach_zero_([p.grad for p in params])


def check_cuda_graphs(config, world, flags=None):
    """CUDA graphs replay a compiled step on one GPU; anywhere else, refused, not ignored."""
    if config.cuda_graphs and not (torch.cuda.is_available() and world == 1 and config.compile is not False):
        where = ("several processes" if world > 1 else "--no-compile" if config.compile is False else
                 "no CUDA device")
        raise UserError(f"{flag('cuda_graphs', flags)}: CUDA graphs replay a compiled step on one GPU, not with "
                        f"{where}; leave it out")


# -----------------------------------------------------------------------------
# How fast: FLOPs, the share of a GPU's peak, items per second


# Dense bf16 peaks of the GPUs we time on (their data sheets), for the share of
# the peak a benchmark reaches; more specific names first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops(model, *inputs):
    """FLOPs of model(*inputs) as PyTorch counts them: convolutions and matrix
    products, attention's included (its math kernel is made of them; a fused
    CPU kernel would go uncounted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def peak_share(flops_per_second, device):
    """The share of the device's bf16 peak that flops_per_second is; None where
    the peak is unknown (a CPU)."""
    name = device_name(device)
    peak = next((flops for gpu, flops in PEAK_FLOPS.items() if gpu in name), None)
    return peak and flops_per_second / peak


def rate(work, count, device, repeats=5, seconds=3.0):
    """Items/s of work(), which handles `count` items: the best of at least `repeats`
    calls and `seconds` of calls after a warm-up call (compilation and caches), each
    waited for on a GPU; the best, since a shared machine only ever slows a call
    down, and of many, since one slowed call in a few moves the figure (RESULTS.md,
    "--bench on the CPU")."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    work()
    synchronize()
    best, calls, started = math.inf, 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - started < seconds:
        start = time.perf_counter()
        work()
        synchronize()
        best, calls = min(best, time.perf_counter() - start), calls + 1
    return count / best


class StepClock:
    """The speed of a training loop's steps: begin() and end() bracket each step
    after the warm-up. On a CPU each step is timed and the fastest counts, as in
    rate(). On a GPU the time from the first begin() to the last end() counts,
    waited for there only: waiting after each step would empty the queue of steps
    that keeps the GPU busy (--bench evaluates and saves after its last step only)."""

    def __init__(self, device):
        self.on_cuda, self.started, self.steps, self.seconds = torch.device(device).type == "cuda", None, 0, None

    def begin(self):
        if self.on_cuda and self.started is not None:
            return
        if self.on_cuda:
            torch.cuda.synchronize()
        self.started = time.perf_counter()

    def end(self, last):
        self.steps += 1
        if self.on_cuda and not last:
            return
        if self.on_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.started
        self.seconds = elapsed / self.steps if self.on_cuda else min(self.seconds or math.inf, elapsed)

    def per_second(self):
        """Steps a second: 1 / the fastest step on a CPU, steps / their time on a GPU."""
        return 1 / self.seconds

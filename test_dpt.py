"""The test suite: claims about DPT, one per test, on CPU and offline.

    python -m pytest -q -n 2     # two pytest-xdist workers; plain `python -m pytest -q` runs it in one

Datasets and weights are never downloaded: tests write small files in the
exact on-disk formats and run the real loading code on them. One section a file,
in the order of the README's file table (the shared fixtures first): data.py,
fixmatch.py, unet.py, imagenet.py, sample.py, fid.py, then dpt.py with the files
it drives (configuration.py, bench.py, report.py); plumbing.py's tests sit with
the behaviour they serve.
"""

import ast
import base64
import contextlib
import copy
import dataclasses
import errno
import fcntl
import html
import importlib
import io
import json
import math
import multiprocessing
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import configuration
import data
import dpt
import fid
import fixmatch
import imagenet
import plumbing
import report
import sample
import unet

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".ci"))
import reference_outputs as reference  # noqa: E402  (the networks, weights and inputs compared with the original code)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, as on a machine offline."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# Which device a test means. Every test means the CPU, where a run and its
# recomputation agree bit for bit, unless it asks for the `cuda` fixture: on a
# machine with a GPU the rest of the suite hides it, from this process and from
# the scripts it runs. The CUDA tests are skipped where there is no GPU.
CUDA = torch.cuda.is_available()  # asked once, before anything hides the GPU
SCRIPT_ENV = {"CUDA_VISIBLE_DEVICES": ""}  # what the scripts a test runs see, beside os.environ

# Under pytest-xdist each worker takes its share of the cores, and so do the scripts its
# tests run: two workers of two threads each on 2 cores would fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS)
    SCRIPT_ENV["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(scope="session", autouse=True)
def the_cpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture
def cuda(monkeypatch):
    """The GPU, shown to this test and to the scripts it runs."""
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(SCRIPT_ENV, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    return torch.device("cuda")


def script_env(**environment):
    """The environment of a script a test runs: the test's device, a proxy on a
    closed local port that makes any download fail at once instead of reaching
    the network, and `environment` (a variable None is unset)."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", PYTHONPATH=HERE,
               **{**SCRIPT_ENV, **environment})
    return {key: value for key, value in env.items() if value is not None}


def run_script(*args, cwd=HERE, **environment):
    """Run a script as a user would (script_env says with what)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=script_env(**environment), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Run a script's main() in this process as run_script runs the script: the
    same code from the command line on, without the 2-3 s of starting Python and
    torch. For refusals and the runs that finish what a refusal or a kill left (a
    kill needs a process of its own). A warning shows on stderr, as it would."""
    def run(script, *args, **environment):
        for name, value in environment.items():
            monkeypatch.setenv(name, value) if value is not None else monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(sys, "argv", [script, *args])
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", hidden)  # as Python hides them from a script
            try:
                plumbing.run_main(importlib.import_module(os.path.basename(script).removesuffix(".py")).main)
                code = 0
            except SystemExit as exit:
                code = exit.code
        out, err = capsys.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
        return subprocess.CompletedProcess([script, *args], code, out, err)
    return run


def start_script(*args, stderr=subprocess.DEVNULL):
    """A script in the background, as run_script runs it, without FID weights (FID is skipped)."""
    return subprocess.Popen([sys.executable, *args], cwd=HERE, env=script_env(DPT_FID_WEIGHTS="/missing"),
                            stdout=subprocess.DEVNULL, stderr=stderr)


def start_run(*args, stderr=subprocess.DEVNULL):
    """dpt.py in the background, as a user would start it in a terminal."""
    return start_script("dpt.py", *args, stderr=stderr)


def kill_when(process, path, timeout=240):
    """SIGKILL the process and every process it started (torchrun's workers, which
    leave its process group) the moment `path` appears (a checkpoint: mid-stage)."""
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError):  # ended already
            os.kill(pid, signal.SIGKILL)
    process.wait()
    assert path.exists(), f"{path} never appeared"


def process_tree(pid):
    """pid and its descendants, from Linux's /proc."""
    children = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended while we looked
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name) state"
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree = [pid]
    for member in tree:
        tree += children.get(member, [])
    return tree


# Two processes, on a free port (two such tests at once would both take torchrun's default 29500);
# gloo on the CPU, as the test's device is.
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# What several tests read is made once, by the first pytest-xdist worker that asks, in
# one folder the workers share (named by the test run's id): the shapes file below and
# the quick run of dpt.py's section. The last worker to finish removes it.
SHARED = os.path.join(tempfile.gettempdir(), "dpt-tests-" + os.environ.get("PYTEST_XDIST_TESTRUNUID",
                                                                           f"{os.getpid()}-{time.time_ns()}"))


@contextlib.contextmanager
def shared_folder_locked(name="users"):
    """SHARED/name.lock, held: a lock a name, so that a worker making one thing
    does not keep the other waiting for another."""
    os.makedirs(SHARED, exist_ok=True)
    with open(os.path.join(SHARED, name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield lock


def made_once(name, make):
    """SHARED/name, made by make(path) unless a worker made it already."""
    path = os.path.join(SHARED, name)
    with shared_folder_locked(name):
        if not os.path.exists(path + ".made"):  # not made, or a make that failed left a part of it
            shutil.rmtree(path, ignore_errors=True)
            make(path)
            open(path + ".made", "w").close()
    return path


@pytest.fixture(scope="session", autouse=True)
def shared_folder():
    """Counts the workers using SHARED; the last one out removes it."""
    def count(change):
        with shared_folder_locked() as lock:
            lock.seek(0)
            users = int(lock.read() or 0) + change
            lock.truncate(0)
            lock.write(str(users))  # the file is open to append: written at its new end, 0
        return users
    count(+1)
    yield SHARED
    if count(-1) == 0:
        shutil.rmtree(SHARED)


# Scripts run as subprocesses read a small shapes set from a file instead of drawing
# the 22,000 images of `--dataset shapes` again in each (1.6 s on 2 cores).
SHAPES_FILE = os.path.join(SHARED, "shapes.pt")


def write_shapes(path):
    train_x, train_y = data.make_shapes(2000, seed=0)
    test_x, test_y = data.make_shapes(500, seed=1)
    torch.save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
                "classes": list(data.SHAPES), "flips": True}, path)  # as --dataset shapes


@pytest.fixture(scope="session", autouse=True)
def shapes_file(shared_folder):
    return made_once("shapes.pt", write_shapes)


# Every command a file's opening docstring shows is run by a test at a test size:
# the command as written, then flags that make it small (argparse takes a flag's
# last value). test_every_documented_command_is_run_at_a_test_size checks each has
# its test.


def documented_commands():
    """(file, argv) of every command in every file's opening docstring, its
    continuation lines joined and its comment dropped."""
    commands = []
    for file in sorted(name for name in os.listdir(HERE) if name.endswith(".py")):
        lines = (ast.get_docstring(ast.parse(open(os.path.join(HERE, file)).read())) or "").splitlines()
        for index, line in enumerate(lines):
            command = line.strip()
            if not command.startswith(("python ", "torchrun ")) or lines[index - 1].rstrip().endswith("\\"):
                continue
            while command.endswith("\\"):
                index += 1
                command = command[:-1] + " " + lines[index].strip()
            commands.append((file, command.split("#")[0].split()))
    return commands


DOCUMENTED = {" ".join(argv) for _, argv in documented_commands()}
# What a test may add to a documented command: smaller data (a file of the same kind, the
# CIFAR-10 files written in their format into --data-dir), smaller networks, fewer steps,
# images, samples and seeds; files in place of downloads; where it writes. --baseline adds
# the reference models (which the imagenet preset's test checks too), --no-baseline leaves
# them to the runs that check them. Anything else would make it another command.
TEST_SIZE_FLAGS = {"--dataset", "--data-dir", "--out", "--fid-weights", "--weights", "--autoencoder",
                   "--msn-weights", "--autoencoder-size", "--msn-size", "--image-size", "--arch", "--ssl-arch",
                   "--size", "--diffusion-size", "--steps", "--ssl-steps", "--stage3-steps", "--eval-every",
                   "--ssl-eval-every", "--batch", "--ssl-batch", "--uratio", "--ssl-uratio", "--images",
                   "--diffusion-images", "--diffusion-batch", "--warmup", "--diffusion-warmup", "--ema-halflife",
                   "--per-class", "--sample-per-class", "--sample-steps", "--fid-reference", "--seeds",
                   "--batch-size", "--baseline", "--no-baseline"}


def at_test_size(command, *flags):
    """The argv of `command`, one of the files' documented commands, from its
    script (its full path, for any folder) on, with `flags` after its own; a
    torchrun command on 2 processes."""
    assert command in DOCUMENTED, f"not a command of a file's docstring: {command}"
    assert all(flag in TEST_SIZE_FLAGS for flag in flags if flag.startswith("--")), flags
    words = command.split()
    torchrun, (script, *args) = (TORCHRUN, words[3:]) if words[0] == "torchrun" else ([], words[1:])
    return [*torchrun, os.path.join(HERE, script), *args, *flags]


@pytest.fixture
def quick_rates(monkeypatch):
    """plumbing.rate times one call after the warm-up instead of 3 s of calls: a
    benchmark's command at a test size."""
    monkeypatch.setattr(plumbing.rate, "__defaults__", (1, 0.0))


# -----------------------------------------------------------------------------
# The fixtures of the sections below, in one place with the shared ones


@pytest.fixture
def skip_md5(monkeypatch):
    """The md5 sums of the real archives are the one thing small fake files
    cannot match; everything else torchvision checks still runs."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn
    import torchvision.datasets.utils
    exists = lambda path, md5=None: os.path.isfile(path)
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.utils):
        monkeypatch.setattr(module, "check_integrity", exists)


@pytest.fixture(scope="module")
def small_shapes():
    train_x, train_y = data.make_shapes(400, seed=0)
    test_x, test_y = data.make_shapes(100, seed=1)
    return data.Dataset("shapes", train_x, train_y, test_x, test_y, 10)


@pytest.fixture(scope="module")
def shapes16():
    """16 x 16 shapes: a learning test of the small CNN in about a minute of CPU."""
    train_x, train_y = data.make_shapes(4000, seed=0, side=16)
    test_x, test_y = data.make_shapes(1000, seed=1, side=16)
    return data.Dataset("shapes16", train_x, train_y, test_x, test_y, 10)


@pytest.fixture(scope="module")
def imagenet_run(fid_weights):
    """The folder and weights of write_imagenet_like and a run of the imagenet preset on
    them, made once for every worker (read them; copy them to change them)."""
    def run(root):
        root = pathlib.Path(root)
        root.mkdir()
        write_imagenet_like(root)
        result = run_script("dpt.py", *imagenet_command(root, "--out", str(root / "runs"), "--fid-weights",
                                                        fid_weights, "--baseline"))  # the references too
        assert result.returncode == 0, result.stderr[-3000:]
    root = pathlib.Path(made_once("imagenet", run))
    return root, root / "runs" / "folder-1l-s0"


@pytest.fixture
def one_thread():
    """The samplers below run thousands of small tensor ops, where a second
    thread only adds hand-offs, and on a busy machine waits for a core (one
    forward of GaussianClasses: 1 ms on one thread, 150 ms on two with the
    cores taken)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """Random weights in the FID state-dict layout, scaled so that activations
    neither vanish nor explode through the 94 convolutions."""
    torch.manual_seed(0)
    model = fid.FIDInception()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture
def pytorch_fid(monkeypatch, fid_weights):
    """pytorch-fid, made to load our random weights file instead of downloading."""
    inception = pytest.importorskip("pytorch_fid.inception")
    import pytorch_fid.fid_score
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: torch.load(fid_weights))
    return pytorch_fid.fid_score


@pytest.fixture(scope="module")
def gpu_check_dry_run():
    """.ci/gpu's CPU dry run, made once for every worker: what it wrote under $OUT, and
    its exit code and the end of its stderr."""
    def run(out):
        result = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu")], env=script_env(
            DPT_DEVICE="cpu", OUT=out, DPT_FID_WEIGHTS="/missing"), capture_output=True, text=True, timeout=600)
        pathlib.Path(out + ".exit").write_text(f"{result.returncode}\n{result.stderr[-2000:]}")
    out = made_once("gpu-check", run)
    code, stderr = pathlib.Path(out + ".exit").read_text().split("\n", 1)
    return pathlib.Path(out), subprocess.CompletedProcess(["bash", ".ci/gpu"], int(code), "", stderr)


@pytest.fixture(scope="module")
def quick_run(fid_weights):
    """QUICK's run with its baseline, made once for every worker (read it; copy it to change it):
    (what the command printed on stdout, the run folder)."""
    def run(out):
        result = run_script("dpt.py", *QUICK, "--out", out, "--fid-weights", fid_weights)
        assert result.returncode == 0, result.stderr[-3000:]
        pathlib.Path(out + ".stdout").write_text(result.stdout)
    out = made_once("quick-run", run)
    return pathlib.Path(out + ".stdout").read_text(), pathlib.Path(out, "shapes-1l-s0")


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 1 MiB (a tmpfs), and a function that resizes it; skips
    where mount is refused (it needs root)."""
    folder = tmp_path / "disk"
    folder.mkdir()

    def mount(size, *options):
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs",
                               str(folder)], capture_output=True).returncode == 0
    if not mount("1m"):
        pytest.skip("mount refused: a real small filesystem needs root")
    yield folder, lambda size: mount(size, "remount")
    subprocess.run(["umount", str(folder)])


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


# =============================================================================
# data.py: datasets, the labeled split, augmentation, its command line; the imports of every file

# -----------------------------------------------------------------------------
# torchvision datasets, read from files in their exact on-disk formats


def write_cifar(root, name, per_file=20):
    """cifar-10-batches-py or cifar-100-python: pickled dicts of uint8 rows
    (3072 = 3 x 32 x 32, channel-major) and label lists. Returns what was written."""
    rng = np.random.RandomState(0)
    if name == "cifar10":
        folder, files, label_key, meta = ("cifar-10-batches-py",
                                          [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                                          "labels", ("batches.meta", "label_names"))
    else:
        folder, files, label_key, meta = ("cifar-100-python", ["train", "test"], "fine_labels",
                                          ("meta", "fine_label_names"))
    classes = 10 if name == "cifar10" else 100
    os.makedirs(os.path.join(root, folder))
    written = {}
    for file in files:
        rows = rng.randint(0, 256, (per_file, 3072)).astype(np.uint8)
        labels = rng.randint(0, classes, per_file).tolist()
        with open(os.path.join(root, folder, file), "wb") as f:
            pickle.dump({"data": rows, label_key: labels, "coarse_labels": labels}, f, protocol=2)
        written[file] = (rows, labels)
    with open(os.path.join(root, folder, meta[0]), "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_images_and_labels_from_the_pickled_batches(tmp_path, skip_md5, name):
    written = write_cifar(tmp_path, name)
    dataset = data.load_dataset(name, str(tmp_path))
    train_files = [f for f in written if "test" not in f]
    expected = np.concatenate([written[f][0] for f in train_files]).reshape(-1, 3, 32, 32)
    assert dataset.train_x.dtype == torch.uint8 and dataset.train_x.shape == (20 * len(train_files), 3, 32, 32)
    assert torch.equal(dataset.train_x, torch.from_numpy(expected))
    assert dataset.train_y.tolist() == sum((written[f][1] for f in train_files), [])
    test_file = "test_batch" if name == "cifar10" else "test"
    assert torch.equal(dataset.test_x, torch.from_numpy(written[test_file][0].reshape(-1, 3, 32, 32)))
    assert dataset.test_y.dtype == torch.int64 and dataset.num_classes == (10 if name == "cifar10" else 100)
    assert dataset.classes == tuple(f"class{i}" for i in range(dataset.num_classes))  # from the meta file


def test_svhn_loads_the_mat_files_and_maps_label_10_to_digit_0(tmp_path, skip_md5):
    import scipy.io
    rng = np.random.RandomState(0)
    written = {}
    for split, n in (("train", 30), ("test", 10)):
        images = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        digits = rng.randint(1, 11, n)  # SVHN writes the digit 0 as label 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": digits[:, None]})
        written[split] = (images, digits % 10)
    dataset = data.load_dataset("svhn", str(tmp_path))
    assert torch.equal(dataset.train_x, torch.from_numpy(written["train"][0]))
    assert dataset.train_y.tolist() == written["train"][1].tolist()
    assert torch.equal(dataset.test_x, torch.from_numpy(written["test"][0]))


def test_every_download_gives_up_after_a_minute_without_an_answer(tmp_path, monkeypatch):
    """An offline machine that drops packets never answers: urllib would wait forever."""
    import torchvision.datasets.cifar
    waited = []

    def stalled(*args, **kwargs):
        waited.append(socket.getdefaulttimeout())
        raise OSError("timed out")
    for module, name in ((torch.hub, "load_state_dict_from_url"), (torch.hub, "download_url_to_file"),
                         (torchvision.datasets.cifar, "download_and_extract_archive")):
        monkeypatch.setattr(module, name, stalled)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    for download, error in ((fid.load_inception, fid.FIDError), (partial(fid.download_stats, fid.ADM_IMAGENET256),
                            fid.FIDError), (partial(imagenet.load_msn, "tiny"), plumbing.UserError),
                            (partial(data.load_dataset, "cifar10", str(tmp_path / "data")), plumbing.UserError)):
        with pytest.raises(error):
            download()
    assert waited == [plumbing.DOWNLOAD_TIMEOUT] * 4 and socket.getdefaulttimeout() is None


def test_missing_dataset_offline_names_the_folder_and_the_url(tmp_path):
    with pytest.raises(plumbing.UserError) as error:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "cifar-10-python.tar.gz" in message
    assert "\n" not in message


def test_missing_dataset_offline_is_one_line_and_exit_code_2_on_the_command_line(in_process, tmp_path):
    result = in_process("data.py", "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert_one_line_error(result, "cifar-10-batches-py", "could not be downloaded")


def test_unknown_dataset_is_one_line_and_exit_code_2(in_process, tmp_path):
    assert_one_line_error(in_process("data.py", "--dataset", "imagenet7"),
                          "--dataset 'imagenet7': must be one of cifar10")


# -----------------------------------------------------------------------------
# Custom .pt / .npz files


def save_arrays(path, **arrays):
    if str(path).endswith(".npz"):
        np.savez(path, **{k: v.numpy() if torch.is_tensor(v) else v for k, v in arrays.items()})
    else:
        torch.save(arrays, path)
    return str(path)


def test_file_in_channels_first_pt_and_channels_last_npz_gives_the_same_dataset(tmp_path):
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(12) % 3
    from_pt = data.load_dataset(save_arrays(tmp_path / "a.pt", train_x=x, train_y=y, test_x=x[:4], test_y=y[:4]))
    from_npz = data.load_dataset(save_arrays(tmp_path / "a.npz", train_x=x.permute(0, 2, 3, 1), train_y=y))
    assert torch.equal(from_pt.train_x, x) and torch.equal(from_npz.train_x, x)
    assert torch.equal(from_pt.test_x, x[:4]) and from_npz.test_x is None
    assert from_pt.num_classes == from_npz.num_classes == 3 and from_npz.train_y.dtype == torch.int64
    assert from_pt.classes == from_npz.classes == ()
    names = ["cat", "dog", "owl"]  # class names are optional: a list in a .pt, an array of strings in a .npz
    named_pt = data.load_dataset(save_arrays(tmp_path / "b.pt", train_x=x, train_y=y, classes=names))
    named_npz = data.load_dataset(save_arrays(tmp_path / "b.npz", train_x=x, train_y=y, classes=np.array(names)))
    assert named_pt.classes == named_npz.classes == tuple(names) and torch.equal(named_npz.train_x, x)


def test_file_grayscale_becomes_rgb_and_odd_sides_are_zero_padded_to_a_multiple_of_8(tmp_path, capsys):
    x = torch.randint(1, 256, (6, 28, 28), dtype=torch.uint8)  # MNIST-like, N x H x W
    dataset = data.load_dataset(save_arrays(tmp_path / "mnist.npz", train_x=x, train_y=torch.arange(6) % 2))
    assert dataset.train_x.shape == (6, 3, 32, 32)
    assert torch.equal(dataset.train_x[:, 1, 2:30, 2:30], x)  # centred, every channel the same
    assert torch.equal(dataset.train_x[:, 0], dataset.train_x[:, 2])
    assert dataset.train_x[:, :, :2].sum() == 0 and dataset.train_x[:, :, :, 30:].sum() == 0
    assert "padded" in capsys.readouterr().out


BAD_FILES = {
    "no train_y":        (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8)), "needs train_x and train_y"),
    "float images":      (dict(train_x=torch.rand(4, 3, 8, 8), train_y=torch.arange(4)), "(x * 255).round()"),
    "16-bit images":     (dict(train_x=torch.full((4, 3, 8, 8), 40_000, dtype=torch.uint16), train_y=torch.arange(4)),
                          "(x / 257).round()"),
    "int64 images":      (dict(train_x=torch.full((4, 3, 8, 8), 200), train_y=torch.arange(4)), "x.astype('uint8')"),
    "float labels":      (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                               train_y=torch.zeros(4)), "integer class labels"),
    "not square":        (dict(train_x=torch.zeros(4, 3, 8, 6, dtype=torch.uint8),
                               train_y=torch.arange(4)), "square images"),
    "5 channels":        (dict(train_x=torch.zeros(4, 5, 8, 8, dtype=torch.uint8),
                               train_y=torch.arange(4)), "C = 1 or 3"),
    "count mismatch":    (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                               train_y=torch.arange(3)), "4 images but train_y 3"),
    "negative label":    (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                               train_y=torch.tensor([0, 1, -1, 1])), "negative label"),
    "missing class":     (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                               train_y=torch.tensor([0, 2, 2, 0])), "no training images"),
    # A label of 10^12 is refused before anything is counted per class (a set of 10^12 classes: MemoryError).
    "a label of 10^12":  (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                               train_y=torch.tensor([0, 1, 10 ** 12, 1])), "the label 1000000000000 but only 4 images"),
    "test label range":  (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.tensor([0, 1, 0, 1]),
                               test_x=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), test_y=torch.tensor([0, 2])),
                          "test_y holds label 2"),
    "not a dict":        (None, "not a dict"),
    "test_x alone":      (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.arange(4),
                               test_x=torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), "only one of test_x and test_y"),
    "class names":       (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.arange(4),
                               classes=["a", "b"]), "classes names 2 classes but train_y has 4"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_file_is_refused_with_a_one_line_reason(tmp_path, case):
    arrays, reason = BAD_FILES[case]
    path = tmp_path / "bad.pt"
    if arrays is None:
        torch.save(torch.zeros(3), path)
    else:
        save_arrays(path, **arrays)
    with pytest.raises(plumbing.UserError) as error:
        data.load_dataset(str(path))
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_unreadable_file_is_one_line_and_exit_code_2_on_the_command_line(in_process, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    assert_one_line_error(in_process("data.py", "--dataset", str(tmp_path / "junk.pt")), "cannot read")


# -----------------------------------------------------------------------------
# shapes and the labeled split


def test_shapes_are_the_same_for_the_same_seed_and_differ_for_another():
    x1, y1 = data.make_shapes(300, seed=5)
    x2, y2 = data.make_shapes(300, seed=5)
    x3, _ = data.make_shapes(300, seed=6)
    assert x1.dtype == torch.uint8 and x1.shape == (300, 3, 32, 32) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert set(y1.tolist()) == set(range(10))


def test_shapes_draw_each_class_as_its_own_shape():
    # Without noise in the way, the mean silhouette of each class at a fixed
    # pose must differ from every other class's: pixel-wise inside-tests on a grid.
    grid = torch.linspace(-1, 1, 64)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    masks = torch.stack([data.inside_shape(label, u, v) for label in range(len(data.SHAPES))]).float()
    differing = (masks[:, None] != masks[None]).float().mean((2, 3))  # fraction of pixels that differ
    off_diagonal = differing[~torch.eye(len(data.SHAPES), dtype=torch.bool)]
    assert off_diagonal.min() > 0.05  # at least ~200 of 4096 pixels tell any two shapes apart


def test_glyphs_are_reproducible_and_each_class_has_its_own_form():
    x1, y1 = data.make_glyphs(600, seed=0)
    x2, y2 = data.make_glyphs(600, seed=0)
    assert x1.dtype == torch.uint8 and x1.shape == (600, 28, 28) and torch.equal(x1, x2) and torch.equal(y1, y2)
    # Nearest class mean on held-out glyphs: 72% here, chance 10%; glyphs of one
    # shared form (or ink everywhere) would leave it near chance.
    test_x, test_y = data.make_glyphs(300, seed=1)
    means = torch.stack([x1[y1 == c].float().mean(0) for c in range(10)]).flatten(1)
    nearest = torch.cdist(test_x.float().flatten(1), means).argmin(1)
    assert (nearest == test_y).float().mean() > 0.5


def test_the_glyphs_file_loads_like_a_users_grayscale_npz(tmp_path, capsys):
    path = str(tmp_path / "glyphs.npz")
    data.write_glyphs(path, train=200, test=50)
    glyphs = data.load_dataset(path)
    assert glyphs.name == "glyphs" and glyphs.num_classes == 10 and glyphs.train_x.shape == (200, 3, 32, 32)
    assert glyphs.classes == tuple("0123456789")
    x, y = data.make_glyphs(50, seed=1)
    assert torch.equal(glyphs.test_y, y) and torch.equal(glyphs.test_x[:, 0, 2:30, 2:30], x)  # padded, gray as RGB
    assert torch.equal(glyphs.test_x[:, 0], glyphs.test_x[:, 2]) and "padded" in capsys.readouterr().out


def test_dataset_glyphs_is_the_glyphs_file_pixel_for_pixel(tmp_path, monkeypatch):
    # --dataset glyphs draws what --write-glyphs writes (at a hundredth of the size here), so
    # a run on either is one dataset (dpt.py names data by contents) with the same results.
    path = str(tmp_path / "glyphs.npz")
    data.write_glyphs(path, train=200, test=20)
    draw = data.make_glyphs
    monkeypatch.setattr(data, "make_glyphs", lambda n, seed: draw(n // 100, seed))
    built_in, from_file = data.load_dataset("glyphs"), data.load_dataset(path)
    assert built_in.name == from_file.name == "glyphs" and built_in.classes == from_file.classes
    for split in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(built_in, split), getattr(from_file, split)), split
    assert data.KNOWN_DATASET[0]("glyphs")


def test_split_has_exactly_the_asked_labels_per_class_and_is_reproducible():
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    split = data.labeled_split(y, 4, seed=3)
    assert split.dtype == torch.int64 and len(split) == 40 and len(set(split.tolist())) == 40
    assert torch.bincount(y[split], minlength=10).tolist() == [4] * 10
    assert torch.equal(split, data.labeled_split(y, 4, seed=3))
    assert not torch.equal(split, data.labeled_split(y, 4, seed=4))


def test_split_is_the_same_on_every_machine():
    # Recorded once (numpy 2.4, x86-64). numpy's RandomState stream is frozen by
    # its compatibility policy, so these indices must hold for every platform
    # and version; a change would silently give old runs another labeled set.
    y = torch.arange(40) % 4
    assert data.labeled_split(y, 2, seed=0).tolist() == [7, 8, 10, 13, 14, 21, 27, 32]


@pytest.mark.parametrize("labels", [0, -1, 11])
def test_split_refuses_impossible_label_counts(labels):
    y = torch.arange(100) % 10  # 10 images per class
    with pytest.raises(plumbing.UserError, match="give 1 to 10"):
        data.labeled_split(y, labels, seed=0)


# -----------------------------------------------------------------------------
# Augmentation


def random_images(n, side=32, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_weak_view_is_the_image_flipped_or_not_and_shifted_by_at_most_4_pixels():
    torch.manual_seed(0)
    x = random_images(64)
    out = data.weak_augment(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    seen = set()
    for original, view in zip(x, out):
        # Away from the border no reflection is involved: the centre of the view
        # must be exactly the centre of the (flipped) image moved by (dy, dx).
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.equal(view[:, 4:-4, 4:-4],
                                  (original.flip(2) if flip else original)[:, 4 + dy:28 + dy, 4 + dx:28 + dx])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 20 and {flip for flip, _, _ in seen} == {False, True}  # every image draws its own


def test_weak_view_fills_the_border_by_reflection():
    # Each pixel holds its own row and column (x 8), so a view says where each of
    # its pixels came from, the border included.
    rows, cols = torch.meshgrid(torch.arange(32) * 8, torch.arange(32) * 8, indexing="ij")
    image = torch.stack([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)
    torch.manual_seed(0)
    padded = {flip: np.pad((image.flip(2) if flip else image).numpy(), ((0, 0), (4, 4), (4, 4)), mode="reflect")
              for flip in (False, True)}  # numpy's reflect: the edge pixel is not repeated
    shifts = set()
    for view in data.weak_augment(image.expand(64, -1, -1, -1).contiguous()).numpy():
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                   if np.array_equal(view, padded[flip][:, 4 + dy:36 + dy, 4 + dx:36 + dx])]
        assert len(matches) == 1
        shifts.add(matches[0][1:])
    assert len(shifts) > 20  # most views have a border to fill


# RandAugment's pixel ops against PIL on random 8-bit images. PIL rounds toward
# zero and converts to integer gray levels where we keep floats, so the blend
# ops may differ by up to 2 levels; the lookup-table ops must agree exactly.
PIL_OPS = [
    ("equalize", None, lambda im, m: ImageOps.equalize(im), 0),
    ("posterize", 5, lambda im, m: ImageOps.posterize(im, m), 0),
    ("solarize", 100, lambda im, m: ImageOps.solarize(im, m), 0),
    ("autocontrast", None, lambda im, m: ImageOps.autocontrast(im), 1),
    ("brightness", 0.6, lambda im, m: ImageEnhance.Brightness(im).enhance(m), 1),
    ("color", 0.3, lambda im, m: ImageEnhance.Color(im).enhance(m), 2),
    ("contrast", 0.4, lambda im, m: ImageEnhance.Contrast(im).enhance(m), 2),
    ("sharpness", 0.2, lambda im, m: ImageEnhance.Sharpness(im).enhance(m), 2),
]


@pytest.mark.parametrize("name,magnitude,pil_op,tolerance", PIL_OPS, ids=[op[0] for op in PIL_OPS])
def test_randaugment_pixel_op_matches_pil(name, magnitude, pil_op, tolerance):
    generator = torch.Generator().manual_seed(1)
    # Channels of unequal ranges: autocontrast has work to do, and the gray
    # level (0.299 R + 0.587 G + 0.114 B) is far from the plain channel mean.
    offsets = torch.tensor([150, 60, 10]).view(1, 3, 1, 1)
    x = (torch.randint(0, 100, (4, 3, 32, 32), generator=generator) + offsets).to(torch.uint8)
    ours = data.PIXEL_OPS[name](x.float() / 255, torch.tensor(float(magnitude or 0)))
    ours = (ours * 255).round().to(torch.uint8)
    for image, our_image in zip(x, ours):
        reference = (torch.from_numpy(np.array(pil_op(Image.fromarray(image.permute(1, 2, 0).numpy()), magnitude)))
                     .permute(2, 0, 1))
        assert (our_image.int() - reference.int()).abs().max() <= tolerance


def test_affine_warp_rotates_shifts_and_keeps_identity_exactly():
    x = random_images(3).float()
    zeros = torch.zeros(3)
    assert torch.equal(data.affine_warp(x, zeros, zeros, zeros, zeros, zeros), x)
    quarter = data.affine_warp(x, torch.full((3,), 90.0), zeros, zeros, zeros, zeros)
    assert torch.equal(quarter, x.rot90(1, (2, 3))) or torch.equal(quarter, x.rot90(-1, (2, 3)))
    shifted = data.affine_warp(x, zeros, zeros, zeros, torch.full((3,), 0.25), zeros)  # 8 pixels
    left, right = (shifted[..., 8:], shifted[..., :-8])
    assert torch.equal(left, x[..., :-8]) or torch.equal(right, x[..., 8:])
    assert shifted.abs().sum((1, 2)).eq(0).sum() == 3 * 8  # black where nothing came in


def test_cutout_covers_one_gray_square_at_most_half_the_side():
    torch.manual_seed(0)
    out = data.cutout(torch.zeros(500, 3, 32, 32))
    sides = []
    for image in out:
        rows, cols = image[0].nonzero(as_tuple=True)
        if len(rows):  # a side drawn near 0 may cover no pixel centre
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert len(rows) == height * width  # one solid box
            assert torch.allclose(image[:, rows, cols], torch.tensor(127 / 255))
            sides.append(max(height, width).item())
    assert len(sides) > 450 and 14 <= max(sides) <= 16  # nearly every image has one, up to half the side


def test_strong_view_is_uint8_changes_images_and_differs_per_image():
    torch.manual_seed(0)
    x = data.make_shapes(1, seed=0)[0].expand(256, -1, -1, -1).contiguous()  # one image, 256 times
    out = data.strong_augment(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert len({view.numpy().tobytes() for view in out}) == 256  # every copy got its own ops
    assert (out.float() - x.float()).abs().mean((1, 2, 3)).median() > 10  # and far from the original


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_strong_view_works_for_batches_smaller_than_the_number_of_ops(n):
    torch.manual_seed(n)
    for _ in range(10):  # which ops get no image is drawn anew each time
        assert data.strong_augment(random_images(n)).shape == (n, 3, 32, 32)


def test_a_step_whose_unlabeled_batch_14_divides_augments_in_one_graph_drawing_as_eager_does():
    """The paper's 7 x 64 unlabeled images: RandAugment's slices are the same for
    every step, so nothing is drawn on the host and nothing breaks the graph
    (fullgraph: a break is an error); the eager backend runs the traced ops, so the
    same seed gives the same images."""
    labeled, unlabeled = random_images(4), random_images(28)
    torch.manual_seed(0)
    eager = fixmatch.augmented_batch(labeled, unlabeled)
    torch.manual_seed(0)
    traced = torch.compile(fixmatch.augmented_batch, fullgraph=True, dynamic=False, backend="eager")
    assert torch.equal(traced(labeled, unlabeled), eager)
    torch.manual_seed(0)  # and the host's generator is left as it was: one draw from it shows
    expected = torch.rand(())
    torch.manual_seed(0)
    data.strong_augment(random_images(28).to("meta"))
    assert torch.rand(()) == expected


def test_strong_view_uses_every_randaugment_op(monkeypatch):
    calls = set()
    for name, op in data.PIXEL_OPS.items():
        monkeypatch.setitem(data.PIXEL_OPS, name, lambda x, m, name=name, op=op: (calls.add(name), op(x, m))[1])
    data.strong_augment(random_images(64))  # 4 or more images per op and round
    assert set(calls) == set(data.PIXEL_OPS)


def test_augmentation_mirrors_half_the_images_with_flip_and_none_without(monkeypatch):
    torch.manual_seed(0)
    x = random_images(256)
    flipped = lambda out: (out == x.flip(3)).flatten(1).all(1)
    unmoved = lambda out: (out == x).flatten(1).all(1)
    with_flip, without = data.weak_augment(x, pad=0), data.weak_augment(x, pad=0, flip=False)
    assert (flipped(with_flip) | unmoved(with_flip)).all() and 0.4 < flipped(with_flip).float().mean() < 0.6
    assert unmoved(without).all()
    asked = []  # the strong view is the weak one, then RandAugment and Cutout
    weak = data.weak_augment
    monkeypatch.setattr(data, "weak_augment", lambda x, flip=True: (asked.append(flip), weak(x, flip=flip))[1])
    data.strong_augment(x, flip=False), data.strong_augment(x)
    assert asked == [False, True]


def test_digits_and_glyphs_are_not_flipped_and_photos_and_shapes_are(tmp_path):
    # a mirrored digit can be another digit (FixMatch flips every dataset but SVHN); a file says so itself
    x, y = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6) % 3
    expected = {"glyphs": False, "shapes": True,
                save_arrays(tmp_path / "digits.npz", train_x=x, train_y=y): False,
                save_arrays(tmp_path / "digits.pt", train_x=x, train_y=y): False,
                save_arrays(tmp_path / "photos.npz", train_x=x, train_y=y, flips=True): True,
                save_arrays(tmp_path / "photos.pt", train_x=x, train_y=y, flips=True): True}
    for name, flips in expected.items():  # dpt.py reads it before the images, from the file's one entry
        assert data.load_dataset(name).flips == data.dataset_flips(name) == flips, name
    assert data.dataset_flips("svhn") is False and data.dataset_flips("cifar10") is True
    (tmp_path / "broken.npz").write_bytes(b"not a zip")  # load_dataset refuses it, with the reason
    assert data.dataset_flips(str(tmp_path / "broken.npz")) is False


def test_augmentations_run_on_the_batch_device(cuda):
    x = random_images(512).to(cuda)
    for augment in (data.weak_augment, data.strong_augment):
        out = augment(x)
        assert out.is_cuda and out.dtype == torch.uint8 and out.shape == x.shape


# -----------------------------------------------------------------------------
# EDM's augmentation (the diffusion model's)


def smooth_image(side=32):
    """A test image that is a known function of position, and that function."""
    f = lambda x, y: torch.sin(0.3 * x + 0.1 * y) + torch.cos(0.2 * y)
    ys, xs = torch.meshgrid(torch.arange(side) - (side - 1) / 2, torch.arange(side) - (side - 1) / 2, indexing="ij")
    return f(xs, ys)[None, None], f, xs, ys


def rotation(angle):
    angle = torch.as_tensor(angle)
    return torch.tensor([[angle.cos(), -angle.sin()], [angle.sin(), angle.cos()]])


@pytest.mark.parametrize("name, matrix, shift", [
    ("rotation by 0.5 rad", rotation(0.5), (0.0, 0.0)),
    ("isotropic scaling by 2^0.3", torch.eye(2) * 2 ** -0.3, (0.0, 0.0)),
    ("anisotropic scaling along 30 degrees", rotation(-0.52) @ torch.diag(torch.tensor([0.8, 1.25])) @ rotation(0.52),
     (0.0, 0.0)),
    ("translation by (2.5, -1.5)", torch.eye(2), (2.5, -1.5)),
])
def test_each_geometric_op_matches_its_closed_form_on_a_smooth_image(name, matrix, shift):
    image, f, xs, ys = smooth_image()
    out = data.warp(image, matrix[None], torch.tensor([shift]))
    source = torch.stack([xs - shift[0], ys - shift[1]], -1) @ matrix.T  # output q reads the input at M (q - t)
    error = (out[0, 0] - f(source[..., 0], source[..., 1])).abs()[8:-8, 8:-8]  # away from the reflected border
    assert error.max() < 0.03, name  # the 2 x 2 sub-pixel average blurs a function of amplitude 2 that little


def test_the_identity_and_integer_shifts_keep_every_pixel_even_of_a_checkerboard():
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)) % 2).float().expand(2, 3, 16, 16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for images in (checkerboard, noise):
        same = data.warp(images, torch.eye(2).expand(2, 2, 2), torch.zeros(2, 2))
        assert torch.allclose(same, images, atol=1e-5)
        moved = data.warp(images, torch.eye(2).expand(2, 2, 2), torch.tensor([[3.0, -2.0], [3.0, -2.0]]))
        # output (x, y) reads the input at (x - 3, y + 2): away from the reflected border, a plain shift
        assert torch.allclose(moved[..., 2:-2, 3:], images[..., 4:, :-3], atol=1e-5)


def test_augmentation_at_p_0_is_the_identity_and_labels_are_zero_where_nothing_was_applied():
    torch.manual_seed(0)
    images = torch.randn(300, 3, 16, 16)
    same, labels = data.edm_augment(images, 0.0)
    assert torch.equal(same, images) and not labels.any() and labels.shape == (300, data.AUGMENT_DIM)
    out, labels = data.edm_augment(images, 0.2)
    plain = ~labels.any(1)
    assert torch.equal(out[plain], images[plain]) and (out[~plain] != images[~plain]).flatten(1).any(1).all()
    # x-flips are drawn for every image (EDM: xflip=1e8), the others with p = 0.2 each
    assert labels[:, 0].mean().item() == pytest.approx(0.5, abs=0.1)
    assert (labels[:, 2] != 0).float().mean().item() == pytest.approx(0.2, abs=0.06)


def test_each_augmented_image_is_the_transform_its_labels_describe():
    torch.manual_seed(1)
    images = torch.randn(64, 3, 16, 16)
    out, labels = data.edm_augment(images, 0.5)
    xflip, yflip, scale, cos, sin, aniso_x, aniso_y, tx, ty = labels.T
    flipped = torch.where(xflip.view(-1, 1, 1, 1) > 0, images.flip(3), images)
    flipped = torch.where(yflip.view(-1, 1, 1, 1) > 0, flipped.flip(2), flipped)
    angle = torch.atan2(sin, cos + 1)
    # The anisotropy label (w cos r, w sin r) is also (-w) at r + pi, a stretch along the other
    # axis (EDM's labels share this): an image must be one of the two readings.
    readings = []
    for sign in (1, -1):
        aniso, axis = sign * torch.hypot(aniso_x, aniso_y), torch.atan2(sign * aniso_y, sign * aniso_x)
        matrix = torch.stack([(torch.eye(2) * 2 ** (-0.2 * s)) @ rotation(a) @ rotation(-r)
                              @ torch.diag(torch.stack([2 ** (-0.2 * w), 2 ** (0.2 * w)])) @ rotation(r)
                              for s, a, r, w in zip(scale, angle, axis, aniso)])
        readings.append(data.warp(flipped, matrix, torch.stack([tx, ty], 1) * 0.125 * 16))
    moved = labels[:, 2:].any(1)
    assert moved.sum() > 30 and torch.equal(out[~moved], flipped[~moved])
    for i in moved.nonzero().flatten():
        assert any(torch.allclose(out[i], reading[i], atol=1e-4) for reading in readings), i


def test_the_warps_largest_singular_value_in_closed_form_is_linalgs_in_float64():
    matrices = torch.cat([torch.randn(1000, 2, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None],
                          torch.tensor([[[2.0, 4.0], [1.0, 2.0]]], dtype=torch.float64)])  # identity, singular
    expected = torch.linalg.matrix_norm(matrices, ord=2)
    assert torch.allclose(data.largest_singular_value(matrices), expected, rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# Command line


def test_config_flags_come_from_the_dataclass():
    config = plumbing.parse_config(data.DataConfig, "",
                                   ["--dataset", "shapes", "--seed", "3", "--bench", "--data-dir", "d"])
    assert config == data.DataConfig(dataset="shapes", seed=3, bench=True, data_dir="d")


def test_data_command_prints_class_counts_and_saves_a_preview(tmp_path):
    result = run_script(*at_test_size("python data.py --dataset shapes", "--out", str(tmp_path / "preview.png")))
    assert result.returncode == 0, result.stderr
    assert "train: 20000 images" in result.stdout and "test: 2000 images" in result.stdout
    width, height = Image.open(tmp_path / "preview.png").size
    assert width > height > 0  # 10 columns, 5 rows


def test_data_bench_prints_the_rate_of_each_augmentation(in_process, monkeypatch, quick_rates):
    monkeypatch.setattr(data.benchmark, "__defaults__", ((("cpu", 64), ("cuda", 64)),))  # a test size
    result = in_process(*at_test_size("python data.py --bench"))
    assert result.returncode == 0, result.stderr
    for name in ("weak", "strong"):
        assert re.search(rf"{name} augmentation, 32x32, batch 64, cpu.*: [\d,]+ images/s", result.stdout), result.stdout


# The files a module may import, anywhere in it (inside a function too): plumbing
# at the bottom, fid alone, dpt on top; a circle would make one of them unreadable
# without the other.
ALLOWED_IMPORTS = {"plumbing": set(), "data": {"plumbing"}, "fid": set(), "fixmatch": {"data", "plumbing"},
                   "unet": {"data", "plumbing"}, "sample": {"data", "plumbing", "unet"}, "report": {"plumbing"},
                   "imagenet": {"data", "fixmatch", "plumbing", "unet"},
                   "bench": {"data", "fid", "fixmatch", "imagenet", "plumbing", "sample", "unet"},
                   "configuration": {"data", "fid", "fixmatch", "imagenet", "plumbing", "sample", "unet"},
                   "dpt": {"bench", "configuration", "data", "fid", "fixmatch", "imagenet", "plumbing", "report", "sample",
                           "unet"}}


def test_imports_flow_one_way():
    for name, allowed in ALLOWED_IMPORTS.items():
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert imported & set(ALLOWED_IMPORTS) <= allowed, (name, imported & set(ALLOWED_IMPORTS) - allowed)


# =============================================================================
# fixmatch.py: FixMatch and FreeMatch (stages 1 and 3)


def test_wrn28_2_has_fixmatchs_1_47M_parameters():
    model = fixmatch.make_classifier("wrn28_2", 10, [0.5] * 3, [0.25] * 3)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.47e6, rel=0.01)
    assert model(random_images(2)).shape == (2, 10)


def test_fixmatch_loss_counts_only_confident_unlabeled_images():
    torch.manual_seed(0)
    logits_labeled, labels = torch.randn(4, 10), torch.randint(10, (4,))
    logits_weak, logits_strong = torch.randn(6, 10), torch.randn(6, 10)
    logits_weak[:2, 3] = 10.0  # two images are sure of class 3 (p > 0.99); the rest are not (p < 0.95)
    loss, mask, pseudo = fixmatch.fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong,
                                                lambda_u=2.0, tau=0.95)
    assert mask.tolist() == [True, True, False, False, False, False] and pseudo[:2].tolist() == [3, 3]
    expected = (F.cross_entropy(logits_labeled, labels)
                + 2.0 * F.cross_entropy(logits_strong[:2], pseudo[:2], reduction="sum") / 6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss_tau_1, mask_tau_1, _ = fixmatch.fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong,
                                                       lambda_u=2.0, tau=1.0)
    assert not mask_tau_1.any() and loss_tau_1.item() == pytest.approx(F.cross_entropy(logits_labeled, labels).item())


def test_freematch_threshold_update_matches_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    state = fixmatch.FreeMatchThreshold(3, decay=0.9)
    state.update(probs)
    # global: 0.9 * 1/3 + 0.1 * mean(0.7, 0.5, 0.6, 0.9) ; classes: 0.9 * 1/3 + 0.1 * column means
    global_tau = 0.9 / 3 + 0.1 * 0.675
    class_p = [0.9 / 3 + 0.1 * m for m in (0.475, 0.2375, 0.2875)]
    expected = [global_tau * p / max(class_p) for p in class_p]
    assert state.class_thresholds().tolist() == pytest.approx(expected, rel=1e-6)
    # the fairness loss's histogram of predicted classes: 0, 1, 2, 0
    assert state.label_hist.tolist() == pytest.approx([0.9 / 3 + 0.1 * h for h in (0.5, 0.25, 0.25)], rel=1e-6)
    # In the loss the update comes first, then each image meets its predicted class's threshold.
    fresh = fixmatch.FreeMatchThreshold(3, decay=0.9)
    _, mask, pseudo = fixmatch.fixmatch_loss(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), probs.log(),
                                             torch.zeros(4, 3), lambda_u=1.0, freematch=fresh)
    assert mask.tolist() == [p.max().item() >= expected[p.argmax()] for p in probs]


def test_freematch_fairness_loss_matches_the_paper_on_a_hand_computation():
    # FreeMatch eq. 11: minus the cross-entropy of SumNorm(p~ / h~) and SumNorm(p_bar / h_bar), the batch's
    # over the images the mask keeps, h the histograms of predicted classes; a class no kept image is
    # predicted as counts 0 in the batch's (USB's code), and log takes 1e-12 there.
    state = fixmatch.FreeMatchThreshold(3, decay=0.5)
    state.class_p.copy_(torch.tensor([0.5, 0.3, 0.2]))
    state.label_hist.copy_(torch.tensor([0.6, 0.3, 0.1]))
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    mask = torch.tensor([True, True, False, True])  # the only image of class 2 is not kept
    model = [0.5 / 0.6, 0.3 / 0.3, 0.2 / 0.1]
    batch = [(1.3 / 3) / (2 / 3), (1.4 / 3) / (1 / 3), 0.0]  # kept: mean probabilities over the histogram
    expected = sum(m / sum(model) * math.log(b / sum(batch) + 1e-12) for m, b in zip(model, batch))
    assert fixmatch.fairness_loss(probs.log(), mask, state).item() == pytest.approx(expected, rel=1e-5)
    assert fixmatch.fairness_loss(probs.log(), torch.zeros(4, dtype=torch.bool), state).item() == 0.0
    # In fixmatch_loss it is weighted by --fairness, with the thresholds' statistics of this batch.
    logits_weak, logits_strong = 3 * torch.randn(4, 3), probs.log()
    losses, states = [], [fixmatch.FreeMatchThreshold(3, decay=0.5) for _ in range(2)]
    for fairness, state in zip((0.0, 0.5), states):
        loss, mask, _ = fixmatch.fixmatch_loss(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), logits_weak,
                                               logits_strong, lambda_u=1.0, freematch=state, fairness=fairness)
        losses.append(loss.item())
    assert losses[1] - losses[0] == pytest.approx(0.5 * fixmatch.fairness_loss(logits_strong, mask, states[1]).item(),
                                                  rel=1e-5, abs=1e-6)
    with pytest.raises(plumbing.UserError, match="^--ssl-fairness 0.01: .* add --ssl-threshold freematch"):
        fixmatch.check(fixmatch.FixMatchConfig(threshold="fixmatch", fairness=0.01), flags=configuration.CLASSIFIER_FLAGS)


def test_freematch_started_at_1_lets_no_guess_of_an_untrained_network_through_and_from_1_over_c_all():
    # An untrained network is unsure of every image. From the paper's 1/C (0.1 here) all ten
    # guesses pass and are learned as labels; from the tiny preset's start at 1 only a sure one.
    torch.manual_seed(0)
    unsure = 0.3 * torch.randn(10, 10)
    sure = torch.zeros(1, 10)
    sure[0, 4] = 20.0
    masks = {}
    for start in (0.0, 1.0):
        _, masks[start], pseudo = fixmatch.fixmatch_loss(
            torch.zeros(1, 10), torch.zeros(1, dtype=torch.long), torch.cat([unsure, sure]), torch.zeros(11, 10),
            lambda_u=1.0, freematch=fixmatch.FreeMatchThreshold(10, decay=0.999, start=start))
        assert pseudo[-1].item() == 4
    assert masks[0.0].all() and masks[1.0].tolist() == [False] * 10 + [True]
    assert configuration.PRESETS["tiny"]["ssl_freematch_start"] == 1.0


def test_freematch_masks_the_images_below_their_class_threshold_and_only_those():
    state = fixmatch.FreeMatchThreshold(2, decay=0.0)  # decay 0: the thresholds of this batch
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    # global: mean confidence (0.95 + 0.6 + 0.7 + 0.55) / 4 = 0.7; class p = (0.575, 0.425)
    # class thresholds: 0.7 * (1, 0.425 / 0.575) = (0.7, 0.5174)
    logits_strong = torch.randn(4, 2)
    loss, mask, pseudo = fixmatch.fixmatch_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), probs.log(),
                                                logits_strong, lambda_u=1.0, freematch=state)
    assert mask.tolist() == [True, False, True, True] and pseudo.tolist() == [0, 0, 1, 1]
    counted = F.cross_entropy(logits_strong, pseudo, reduction="none") * mask
    assert loss.item() == pytest.approx(math.log(2) + counted.mean().item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:for (global_tau|class_p). copying:UserWarning")  # meta values are never real
def test_freematch_state_loaded_from_a_cpu_checkpoint_moves_to_the_training_device():
    # The meta device stands in for CUDA: a checkpoint loads on the CPU, training runs elsewhere.
    saved = fixmatch.FreeMatchThreshold(10, 0.999)
    saved.update(torch.full((4, 10), 0.1))
    threshold = fixmatch.FreeMatchThreshold(10, 0.999).to("meta")
    threshold.load_state_dict(saved.state_dict())
    assert {value.device.type for value in threshold.state_dict().values()} == {"meta"}
    threshold.update(torch.full((4, 10), 0.1, device="meta"))  # mixing devices here raised before
    assert threshold.class_thresholds().device.type == "meta"


def test_freematch_averages_its_statistics_over_processes(monkeypatch):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    alone = fixmatch.FreeMatchThreshold(3, decay=0.5)
    alone.update(probs)
    # Two processes that saw the same batch: all_reduce sums them; the mean must not change.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.mul_(2))
    shared = fixmatch.FreeMatchThreshold(3, decay=0.5)
    shared.update(probs)
    assert torch.allclose(shared.class_thresholds(), alone.class_thresholds())
    assert torch.allclose(shared.global_tau, alone.global_tau)
    assert torch.allclose(shared.label_hist, alone.label_hist)


def tiny_config(tmp_path, **changes):
    settings = dict(dataset="shapes", labels=2, arch="small", steps=6, batch=8, uratio=2, ema=0.9,
                    eval_every=3, ckpt_every=3, out=str(tmp_path), compile=False)
    settings.update(changes)
    return fixmatch.FixMatchConfig(**settings)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, small_shapes, monkeypatch,
                                                                          request, device):
    if device == "cuda":
        request.getfixturevalue("cuda")  # the GPU shown to this test (bf16 on, as a CUDA run has it)
    split = data.labeled_split(small_shapes.train_y, 2, seed=0)
    whole, _ = fixmatch.train(tiny_config(tmp_path / "whole", threshold="freematch", freematch_ema=0.5),
                              small_shapes, split, progress=False)

    saves = []
    real_save = plumbing.save_atomic

    def save_then_die(obj, path):  # the process is killed right after its first checkpoint (step 3)
        real_save(obj, path)
        saves.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(plumbing, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fixmatch.train(tiny_config(tmp_path / "killed", threshold="freematch", freematch_ema=0.5),
                       small_shapes, split, progress=False)
    monkeypatch.setattr(plumbing, "save_atomic", real_save)
    at_kill = torch.load(saves[0], weights_only=False)
    assert at_kill["step"] == 3
    resumed, _ = fixmatch.train(tiny_config(tmp_path / "killed", threshold="freematch", freematch_ema=0.5),
                                small_shapes, split, progress=False)
    thresholds = [torch.load(tmp_path / run / "ckpt.pt", weights_only=False)["freematch"]
                  for run in ("whole", "killed")]
    if device == "cpu":  # bit for bit
        for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
        assert all(torch.equal(thresholds[0][k], thresholds[1][k]) for k in thresholds[0])  # FreeMatch's state too
        return
    # CUDA's atomic adds sum in any order, so the two runs part by rounding: far less than
    # the last three steps moved the weights (other batches from step 4 on would part them by as much).
    distance = lambda a, b: math.sqrt(sum((a[k].cpu().double() - b[k].cpu().double()).square().sum().item()
                                          for k in a if a[k].is_floating_point()))
    whole, resumed = whole.state_dict(), resumed.state_dict()
    assert distance(whole, resumed) < 0.05 * distance(whole, at_kill["ema"])
    assert distance(thresholds[0], thresholds[1]) < 0.05 * distance(thresholds[0], at_kill["freematch"])


def test_weight_decay_reaches_convolution_and_linear_weights_but_not_bn_or_biases():
    model = fixmatch.make_classifier("wrn28_2", 10, [0.5] * 3, [0.25] * 3)
    optimizer = fixmatch.make_optimizer(model, fixmatch.FixMatchConfig())
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay_of) == len(list(model.parameters()))
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            decayed = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name == "weight"
            assert decay_of[id(param)] == (5e-4 if decayed else 0.0), (type(module).__name__, name)


def recorded_saves(monkeypatch):
    """Every object save_atomic writes, as it was at that moment."""
    saves, real_save = [], plumbing.save_atomic
    monkeypatch.setattr(plumbing, "save_atomic", lambda obj, path, **kw: (saves.append(copy.deepcopy(obj)),
                                                                          real_save(obj, path, **kw)))
    return saves


def test_fixmatch_steps_follow_the_cosine_schedule_and_the_ema_keeps_bn_statistics(tmp_path, small_shapes,
                                                                                   monkeypatch):
    saves = recorded_saves(monkeypatch)
    config = tiny_config(tmp_path, steps=2, ckpt_every=1, eval_every=2, ema=0.9)
    fixmatch.train(config, small_shapes, data.labeled_split(small_shapes.train_y, 2, seed=0), progress=False)
    first, second = saves
    assert (first["step"], second["step"]) == (1, 2)
    for name, value in second["ema"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):  # copied, not averaged
            assert torch.equal(value, second["model"][name]) and not torch.equal(value, first["ema"][name]), name
        elif not name.startswith("normalize."):
            assert not torch.equal(second["model"][name], first["ema"][name]), name
            assert torch.allclose(value, 0.9 * first["ema"][name] + 0.1 * second["model"][name], atol=1e-6), name
    # lr_k = lr cos(7 pi k / 16 K) (Sohn et al. 2020): the second step (k = 1 of K = 2) ran at
    assert second["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi / 32))


def test_precise_bn_measures_the_ema_models_statistics_on_clean_training_images(tmp_path, small_shapes):
    config = tiny_config(tmp_path, steps=4, precise_bn=64, lr_cosine=0.5)
    model, _ = fixmatch.train(config, small_shapes, data.labeled_split(small_shapes.train_y, 2, seed=0),
                              progress=False)
    # The first BN's statistics are the mean and (unbiased) variance of the first convolution's
    # outputs over the 64 images of the fixed draw, not the trained model's running averages.
    pick = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:64]
    with torch.no_grad():
        features = model.features[0](model.normalize(small_shapes.train_x[pick]))
    norm = model.features[1]
    assert torch.allclose(norm.running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, features.transpose(0, 1).flatten(1).var(1), rtol=1e-4)
    assert norm.momentum == 0.1 and not model.training  # as it was, and ready to evaluate


def test_the_learning_rate_decays_to_zero_with_lr_cosine_one_half(tmp_path, small_shapes, monkeypatch):
    saves = recorded_saves(monkeypatch)
    config = tiny_config(tmp_path, steps=4, ckpt_every=1, eval_every=4, lr_cosine=0.5)
    fixmatch.train(config, small_shapes, data.labeled_split(small_shapes.train_y, 2, seed=0), progress=False)
    lrs = [save["optimizer"]["param_groups"][0]["lr"] for save in saves]  # steps k = 0 .. 3 of K = 4
    assert lrs == pytest.approx([0.03 * math.cos(math.pi * k / 8) for k in range(4)])


def test_without_the_unlabeled_loss_no_unlabeled_image_is_drawn_or_augmented(tmp_path, small_shapes, monkeypatch):
    augmented = []
    real_strong = data.strong_augment
    monkeypatch.setattr(data, "strong_augment", lambda x, flip: (augmented.append(len(x)), real_strong(x))[1])
    config = tiny_config(tmp_path, steps=3, lambda_u=0.0)
    _, metrics = fixmatch.train(config, small_shapes, data.labeled_split(small_shapes.train_y, 2, seed=0),
                                progress=False)
    assert sum(augmented) == 0 and 0 <= metrics["accuracy"] <= 1
    fixmatch.train(tiny_config(tmp_path / "fixmatch", steps=1), small_shapes,
                   data.labeled_split(small_shapes.train_y, 2, seed=0), progress=False)
    assert augmented[3:] == [8 * 2]  # FixMatch draws uratio unlabeled images per labeled one


def test_the_classifier_flips_where_the_dataset_allows_unless_told(tmp_path, small_shapes, monkeypatch):
    asked = []
    weak = data.weak_augment
    monkeypatch.setattr(data, "weak_augment", lambda x, flip=True: (asked.append(flip), weak(x, flip=flip))[1])
    split = data.labeled_split(small_shapes.train_y, 2, seed=0)
    for dataset_flips, told, expected in ((True, None, True), (False, None, False), (False, True, True)):
        asked.clear()
        fixmatch.train(tiny_config(tmp_path / f"{dataset_flips}{told}", steps=2, flip=told),
                       dataclasses.replace(small_shapes, flips=dataset_flips), split, progress=False)
        assert asked == [expected] * 6  # a step: labeled weak, unlabeled weak, unlabeled strong (weak inside)


def test_a_checkpoint_of_other_settings_or_a_corrupt_one_is_refused(tmp_path, small_shapes):
    split = data.labeled_split(small_shapes.train_y, 2, seed=0)
    fixmatch.train(tiny_config(tmp_path, steps=3), small_shapes, split, progress=False)
    with pytest.raises(plumbing.UserError, match="other settings \\(lr\\)"):
        fixmatch.train(tiny_config(tmp_path, steps=3, lr=0.1), small_shapes, split, progress=False)
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(plumbing.UserError, match="unreadable"):
        fixmatch.train(tiny_config(tmp_path, steps=3), small_shapes, split, progress=False)


def test_predict_gives_a_label_and_confidence_for_every_training_image(small_shapes):
    model = fixmatch.make_classifier("small", 10, [0.5] * 3, [0.25] * 3)
    result = fixmatch.pseudo_labels(fixmatch.predict(model, small_shapes.train_x), small_shapes.train_y)
    assert result["labels"].dtype == torch.int64 and result["labels"].shape == (400,)
    assert (result["confidence"].dtype == torch.float32
            and ((result["confidence"] > 0) & (result["confidence"] <= 1)).all())
    assert 0 <= result["accuracy"] <= 1


def test_stage_3_batches_hold_the_asked_share_of_real_images():
    torch.manual_seed(0)
    picks = fixmatch.sample_labeled(40, real_count=10, total=110, real_fraction=0.25, device="cpu")
    assert (picks < 10).sum() == 10 and ((picks >= 10) & (picks < 110)).sum() == 30
    uniform = fixmatch.sample_labeled(10_000, real_count=10, total=110, real_fraction=-1, device="cpu")
    assert (uniform < 10).float().mean() == pytest.approx(10 / 110, abs=0.01)


def test_stage_3_learns_the_labels_of_the_generated_images(tmp_path, shapes16):
    """Stage 3 on one real label per class plus 600 "generated" images: real
    training images, once with their true labels and once with every label moved
    to the next class. The classifier must follow the generated labels: right
    labels put it far above wrong ones, whose test accuracy falls towards 0
    (97% against 1% here)."""
    train_x, train_y = shapes16.train_x, shapes16.train_y
    split = data.labeled_split(train_y, 1, seed=0)
    accuracy = {}
    for name, labels in (("right", train_y[:600]), ("wrong", (train_y[:600] + 1) % 10)):
        config = fixmatch.FixMatchConfig(dataset="shapes", labels=1, arch="small", steps=150, batch=32, uratio=1,
                                         lr=0.05, ema=0.9, lambda_u=0.0, real_fraction=-1, eval_every=150,
                                         ckpt_every=150, out=str(tmp_path / name), compile=False)
        accuracy[name] = fixmatch.train(config, shapes16, split, generated=(train_x[:600], labels),
                                        progress=False)[1]["accuracy"]
    assert accuracy["right"] >= accuracy["wrong"] + 0.3, accuracy
    assert accuracy["wrong"] < 0.3, accuracy  # it learned the moved labels, not the one real label per class


def test_two_processes_under_torchrun_train_write_one_set_of_files_and_resume_each_its_own_stream(tmp_path):
    args = ["--dataset", SHAPES_FILE, "--labels", "2", "--arch", "small", "--steps", "40", "--batch", "8", "--uratio",
            "2", "--eval-every", "40", "--ckpt-every", "2", "--threshold", "freematch"]
    result = run_script(*TORCHRUN, "fixmatch.py", *args, "--out", str(tmp_path / "whole"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "whole")) == ["ckpt.pt", "classifier.pt", "pseudo_labels.pt", "run.lock"]
    checkpoint = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    assert checkpoint["step"] == 40 and len(checkpoint["rng"]) == 2  # every rank's generators, for resuming
    assert torch.load(tmp_path / "whole" / "pseudo_labels.pt")["labels"].shape == (2_000,)
    # Every process killed once a checkpoint is written, then resumed: each rank must draw on from its own stream.
    killed = tmp_path / "resumed" / "ckpt.pt"
    kill_when(start_script(*TORCHRUN, "fixmatch.py", *args, "--out", str(killed.parent)), killed)
    step = torch.load(killed, weights_only=False)["step"]
    result = run_script(*TORCHRUN, "fixmatch.py", *args, "--out", str(killed.parent))
    assert result.returncode == 0 and f"at step {step} of 40" in result.stderr and step < 40, result.stderr[-2000:]
    whole, resumed = (torch.load(tmp_path / run / "classifier.pt", weights_only=False)["model"]
                      for run in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fixmatchs_commands_train_on_shapes_and_on_cifar_10s_files_and_bench_wrn(in_process, tmp_path, skip_md5):
    write_cifar(tmp_path, "cifar10")
    test_size = ["--steps", "3", "--batch", "4", "--uratio", "1", "--eval-every", "3"]
    runs = {"shapes": at_test_size("python fixmatch.py --dataset shapes --labels 4 --arch small --steps 700 --batch 32 "
                                   "--uratio 3 --ema 0.99 --lr 0.05", "--dataset", SHAPES_FILE, *test_size),
            "cifar10": at_test_size("python fixmatch.py --dataset cifar10 --labels 4 --threshold freematch",
                                    "--data-dir", str(tmp_path), "--arch", "small", *test_size)}
    for name, argv in runs.items():
        result = in_process(*argv, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "pseudo labels of" in result.stdout and "test accuracy" in result.stdout
        saved = torch.load(tmp_path / name / "classifier.pt", weights_only=False)
        assert saved["config"]["labels"] == 4 and saved["config"]["steps"] == 3
    assert saved["config"]["threshold"] == "freematch"  # cifar10's
    result = in_process(*at_test_size("python fixmatch.py --bench", "--arch", "small", "--batch", "2", "--uratio", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"small, batch 2 \+ 2 x 2: [\d.]+ steps/s after", result.stdout), result.stdout


def test_fixmatch_beats_training_on_the_labeled_images_alone_with_1_label_per_class(tmp_path, shapes16):
    """The claim of stage 1, in about a minute of CPU: 16 x 16 shapes, one
    labeled image per class, the small CNN. Over seeds 0-2 labeled-only training
    reached 60-67% and FixMatch 85-87% after 800 steps (margins of 19-25 points),
    so a margin of 10 points leaves room for other threads and platforms."""
    split = data.labeled_split(shapes16.train_y, 1, seed=0)
    accuracy = {}
    for lambda_u in (0.0, 1.0):
        config = fixmatch.FixMatchConfig(dataset="shapes", labels=1, arch="small", steps=800, batch=32, uratio=3,
                                         lr=0.05, ema=0.99, lambda_u=lambda_u, eval_every=800, ckpt_every=800,
                                         out=str(tmp_path / str(lambda_u)), compile=False)
        accuracy[lambda_u] = fixmatch.train(config, shapes16, split, progress=False)[1]["accuracy"]
    assert accuracy[1.0] >= accuracy[0.0] + 0.10, accuracy


def test_fixmatch_refuses_generated_images_that_do_not_fit_the_dataset(in_process, tmp_path, small_shapes):
    bad = tmp_path / "samples.pt"
    torch.save({"images": random_images(4, side=16), "labels": torch.arange(4)}, bad)
    with pytest.raises(plumbing.UserError, match="do not fit"):
        fixmatch.load_generated(str(bad), small_shapes)
    torch.save({"images": random_images(4), "labels": torch.arange(4) + 8}, bad)
    with pytest.raises(plumbing.UserError, match="labels must be int64 in 0..9"):
        fixmatch.load_generated(str(bad), small_shapes)
    result = in_process("fixmatch.py", "--dataset", SHAPES_FILE, "--pseudo-images", str(tmp_path / "missing.pt"),
                        "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "cannot read generated images")


def test_merged_statistics_of_parts_equal_the_statistics_of_the_whole(fid_weights):
    model = fid.load_inception(fid_weights)
    images = random_images(12)
    whole = fid.statistics(model, [images[:5], images[5:]], keep_logits=True)  # the same batches: the same features
    merged = fid.merge_statistics([fid.statistics(model, [part], keep_logits=True)
                                   for part in (images[:5], images[5:])])
    assert merged["count"] == 12 and torch.equal(merged["logits"], whole["logits"])
    np.testing.assert_allclose(merged["mu"], whole["mu"], rtol=1e-12, atol=1e-12)  # float64 sums, merged exactly
    np.testing.assert_allclose(merged["sigma"], whole["sigma"], rtol=1e-9, atol=1e-12)


# =============================================================================
# unet.py: stage 2's networks, EDM preconditioning, loss and training


def shapes_16(n, seed=0):
    """n shapes images at 16x16 (a quarter of the pixels: CPU tests four times faster)."""
    x, y = data.make_shapes(n, seed=seed)
    return F.avg_pool2d(x.float(), 2).round().to(torch.uint8), y


def diffusion_config(out, **changes):
    settings = dict(dataset="shapes", out=str(out), size="tiny", images=24, batch=4, lr=1e-3, warmup=8,
                    ema_halflife=8, ckpt_every=12, compile=False, augment=0.0)
    settings.update(changes)
    return unet.DiffusionConfig(**settings)


def randomized(model, seed=0):
    """Every parameter drawn at random: the near-zero initial last layers no
    longer hide how the output depends on the input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


# -----------------------------------------------------------------------------
# EDM preconditioning


class Recorder(torch.nn.Module):
    """A stand-in network that records its inputs and returns a constant F."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, c_noise, class_labels, augment_labels=None):
        self.x, self.c_noise, self.class_labels = x, c_noise, class_labels
        return torch.full_like(x, self.value)


def test_preconditioning_coefficients_are_edm_table_1():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    sd = 0.5
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (sigma ** 2 + sd ** 2).sqrt(), sigma.log() / 4
    ones = torch.ones(6, 3, 8, 8)
    labels = torch.arange(6)
    # D(x) = c_skip x + c_out F: with F = 0 and x = 1 it is c_skip, with F = 1 and x = 0 it is c_out.
    zero_net, one_net = Recorder(0.0), Recorder(1.0)
    d_skip = unet.EDMPrecond(zero_net, 10, 8, 3)(ones, sigma.float(), labels)
    d_out = unet.EDMPrecond(one_net, 10, 8, 3)(torch.zeros_like(ones), sigma.float(), labels)
    rel = 1e-6  # computed in float32
    assert d_skip.dtype == torch.float32
    torch.testing.assert_close(d_skip[:, 0, 0, 0].double(), c_skip, rtol=rel, atol=0)
    torch.testing.assert_close(d_out[:, 0, 0, 0].double(), c_out, rtol=rel, atol=0)
    torch.testing.assert_close(zero_net.x[:, 0, 0, 0].double(), c_in, rtol=rel, atol=0)
    torch.testing.assert_close(zero_net.c_noise.double(), c_noise, rtol=rel, atol=1e-7)
    assert torch.equal(zero_net.class_labels, labels)


def test_the_denoiser_returns_its_input_as_sigma_goes_to_0():
    torch.manual_seed(0)
    model = randomized(unet.make_diffusion("unet", "tiny", 10, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    gaps = [(model(x, sigma, torch.tensor([1, 10])) - x).abs().max().item() for sigma in (1e-1, 1e-3, 1e-5)]
    # c_skip -> 1 and c_out ~ sigma -> 0: the gap shrinks with sigma, whatever F outputs.
    assert gaps[0] > 10 * gaps[1] > 100 * gaps[2] and gaps[2] < 1e-3


def test_the_edm_loss_is_lambda_weighted_squared_error_at_log_normal_sigmas():
    seen = {}

    def zero_denoiser(x, sigma, labels, augment_labels=None):  # records what the loss feeds it; the images are all 1
        seen["sigma"], seen["noise"] = sigma.double(), (x - 1).flatten().double()
        return torch.zeros_like(x)

    torch.manual_seed(0)
    images = torch.ones(100_000, 1, 1, 1)
    drawn = unet.edm_noise(images, torch.zeros(100_000, dtype=torch.long), 10, unet.DiffusionConfig(label_dropout=0))
    loss = unet.edm_loss(zero_denoiser, images, *drawn)
    sigma = seen["sigma"]
    # ln sigma ~ N(-1.2, 1.2^2) and n ~ N(0, sigma^2): 100k draws pin mean and spread to about 0.3%.
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.015)
    assert sigma.log().std().item() == pytest.approx(1.2, rel=0.01)
    assert (seen["noise"] / sigma).std().item() == pytest.approx(1.0, rel=0.01)
    # D = 0 and y = 1: the loss is the mean of lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2.
    assert loss.item() == pytest.approx(((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).mean().item(), rel=1e-5)


def test_label_dropout_replaces_the_asked_share_of_labels_by_the_null_class():
    torch.manual_seed(0)
    _, _, labels = unet.edm_noise(torch.zeros(20_000, 1, 1, 1), torch.full((20_000,), 3), 10,
                                  unet.DiffusionConfig(label_dropout=0.2))
    assert set(labels.tolist()) == {3, 10}
    assert (labels == 10).float().mean().item() == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("augment", [0.0, 0.5])
def test_diffusion_training_mirrors_images_only_with_flip(tmp_path, monkeypatch, augment):
    seen, told, noise, pipeline = [], [], unet.edm_noise, data.edm_augment
    monkeypatch.setattr(unet, "edm_noise", lambda x, *args: (seen.append(x.clone()), noise(x, *args))[1])

    def told_augment(*args, **kwargs):  # EDM's pipeline changes more than the flip: read what it says it did
        images, labels = pipeline(*args, **kwargs)
        told.append(labels[:, 0] > 0)
        return images, labels
    monkeypatch.setattr(data, "edm_augment", told_augment)
    images, labels = shapes_16(1)
    images, labels = images.expand(64, -1, -1, -1), labels.expand(64)  # one asymmetric image
    image = images[:1].float() / 127.5 - 1
    for flip in (True, False):
        seen.clear(), told.clear()
        unet.train(diffusion_config(tmp_path / str(flip), images=128, batch=64, augment=augment, flip=flip),
                   images, labels, 10, progress=False)
        mirrored = (torch.cat(told) if augment else
                    torch.cat([(x - image.flip(3)).abs().flatten(1).amax(1) < 1e-6 for x in seen]))
        assert len(mirrored) == 128 and mirrored.any() == flip


def test_training_drops_labels_to_the_null_class_the_sampler_uses_and_tells_the_augmentation(tmp_path, monkeypatch):
    seen, told, forward = [], [], unet.EDMPrecond.forward
    monkeypatch.setattr(unet.EDMPrecond, "forward", lambda self, x, sigma, labels, augment_labels=None: (
        seen.append((labels, self.num_classes)), told.append(augment_labels),
        forward(self, x, sigma, labels, augment_labels))[2])
    images, labels = shapes_16(64)
    unet.train(diffusion_config(tmp_path, images=128, batch=64, label_dropout=0.5, augment=0.5), images, labels, 10,
               progress=False)
    dropped = torch.cat([labels == null for labels, null in seen])
    assert all(null == 10 for _, null in seen) and dropped.float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert all(labels.shape == (64, data.AUGMENT_DIM) and labels[:, 2:].any() for labels in told)
    # guidance's unconditional half asks the same null class, and sampling tells no augmentation
    seen.clear()
    told.clear()
    sample.generate(unet.make_diffusion("unet", "tiny", 10, 16), 1, steps=2, guidance=2.0, progress=False)
    assert all((labels[len(labels) // 2:] == null).all() for labels, null in seen) and told == [None] * len(told)


# -----------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("arch", ["unet", "uvit"])
@pytest.mark.parametrize("resolution", [16, 24, 32])
def test_the_networks_keep_the_image_shape_at_several_resolutions(arch, resolution):
    model = unet.make_diffusion(arch, "tiny", 10, resolution)
    x = torch.randn(2, 3, resolution, resolution)
    out = model(x, torch.tensor([0.5, 2.0]), torch.tensor([3, 10]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert model(x, 0.5, torch.tensor([3, 10])).shape == x.shape  # one sigma for the whole batch
    assert (model.num_classes, model.resolution, model.channels, model.sigma_data) == (10, resolution, 3, 0.5)


@pytest.mark.parametrize("arch", ["unet", "uvit"])
def test_the_null_class_ignores_the_label_and_a_real_class_does_not(arch):
    torch.manual_seed(0)
    model = randomized(unet.make_diffusion(arch, "tiny", 10, 16)).eval()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0])
    null = torch.tensor([10, 10])
    before_null, before_3 = model(x, sigma, null), model(x, sigma, torch.tensor([3, 3]))
    with torch.no_grad():  # every real class's embedding changes, the null class's stays
        model.net.label_embedding.weight[:10] += torch.randn(10, model.net.label_embedding.weight.shape[1])
    assert torch.equal(model(x, sigma, null), before_null)
    assert (model(x, sigma, torch.tensor([3, 3])) - before_3).abs().max() > 1e-3
    assert (before_3 - before_null).abs().max() > 1e-3


# Equality with the original code. The small networks of each family, with fixed
# weights and fixed inputs, are .ci/reference_outputs.py's (`reference`); their outputs
# were computed once, in float64, by EDM's training/networks.py (SongUNet, DDPM++
# options), U-ViT's libs/uvit.py, LDM's KL autoencoder (U-ViT's and DPT's
# libs/autoencoder.py) and MSN's src/deit.py with the same weights mapped into
# their layout: .ci/reference_outputs.py EDM UVIT MSN (clones) prints REFERENCE_OUTPUTS.

REFERENCE_OUTPUTS = {  # printed by .ci/reference_outputs.py (EDM and U-ViT at their clones of 2026-11-30)
    "unet-eval": [17.415508454778205, -19.6745503714822, 2.276125428845822, -5.443533456541033, 2.6539757954418626,
                  -4.49645304887358, 4.461924368321794, -0.33121078563674944, 1.2286986227651433],
    "unet-train": [20.17843970922674, -17.932489920624608, -4.673891802639421, -1.4728962653313138,
                   0.39969249383390415, -3.521558386829698, 2.0950390294418755, -0.7681033959828105,
                   1.2727070116213646],
    "uvit-eval": [-7.137509372975131, -2.860419431742624, -0.8903408238377647, 0.7536479127268639,
                  -1.7979751689637464, -1.2530532197439492, -0.08769335339741985, 0.4271277759828378,
                  0.1891831702056658],
    "uvit-train": [-7.137509372975131, -2.860419431742624, -0.8903408238377647, 0.7536479127268639,
                   -1.7979751689637464, -1.2530532197439492, -0.08769335339741985, 0.4271277759828378,
                   0.1891831702056658],
    "autoencoder-encode": [-0.8324728565073938, -0.12167486943756961, -0.06046145682224735, 12.40338736132178,
                           -18.202490380000896, -5.761132694029073, -4.598303315351368, -153.6348199013583,
                           11.416545537125804],
    "autoencoder-decode": [-164.3755335421099, -155.07871528851493, 33.32343667882886, 47.199764640522545,
                           -1.294911375446858, 74.2361223145927, 4.363458262842228, -14.582451886725483,
                           1.912077933511043],
    "msn": [2.059010841031344, -2.4678376289981268, 1.731320318524125, -3.0037923728408487, 1.4698530947771502,
            -3.796268508900557, 1.505529786725651, -3.987199825189995, 16.525540686343525],
}
# layout_checksum of networks whose names and shapes the original code checked against its own
# (libs/autoencoder.py loaded ours strictly; MSN's deit_large_p7 and deit_base_p4 at 224 matched ours)
CHECKPOINT_LAYOUTS = {"autoencoder sd": 1521825151, "msn vitl7": 2467259783, "msn vitb4": 2184295607}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", ["unet", "uvit"])
def test_the_networks_compute_what_edms_songunet_and_u_vits_uvit_compute(arch, mode, monkeypatch):
    network = reference.fixed_network(arch).train(mode == "train")
    monkeypatch.setattr(torch.nn.functional, "dropout", reference.FixedDropout())  # the original code's masks
    x, c_noise, labels, augment = reference.fixed_inputs(arch)
    with torch.no_grad():
        output = network(x, c_noise, labels, augment)
    expected = REFERENCE_OUTPUTS[f"{arch}-{mode}"]
    assert reference.fingerprint(output) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_the_autoencoder_computes_what_ldms_autoencoder_kl_computes_and_has_the_checkpoints_layout():
    network = reference.fixed_network("autoencoder")
    images, latents = reference.fixed_autoencoder_inputs()
    with torch.no_grad():
        outputs = {"encode": torch.cat(network.encode(images)), "decode": network.decode(latents)}
    for name, output in outputs.items():
        expected = REFERENCE_OUTPUTS[f"autoencoder-{name}"]
        assert reference.fingerprint(output) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    with torch.device("meta"):  # names and shapes only
        stable_diffusion = imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES["sd"])
    assert reference.layout_checksum(stable_diffusion) == CHECKPOINT_LAYOUTS["autoencoder sd"]
    assert sum(p.numel() for p in stable_diffusion.parameters()) == 83_653_863


def test_the_msn_vit_computes_msns_feature_and_has_the_layout_of_its_checkpoints():
    network = reference.fixed_network("msn")
    with torch.no_grad():
        feature = network(reference.fixed_autoencoder_inputs()[0])
    assert reference.fingerprint(feature) == pytest.approx(REFERENCE_OUTPUTS["msn"], rel=1e-10, abs=1e-12)
    for size in ("vitl7", "vitb4"):
        with torch.device("meta"):
            released = imagenet.MSNViT(224, **imagenet.MSN_SIZES[size])
        assert reference.layout_checksum(released) == CHECKPOINT_LAYOUTS[f"msn {size}"]


def test_the_released_msn_and_autoencoder_checkpoints_load_from_files_in_their_layout(tmp_path, monkeypatch):
    msn = imagenet.MSNViT(16, **imagenet.MSN_SIZES["tiny"])
    released = {"target_encoder": {"module." + name: value for name, value in msn.state_dict().items()},
                "epoch": 200}  # MSN's file: every key under module., with its head and last LayerNorm
    width = imagenet.MSN_SIZES["tiny"]["width"]
    released["target_encoder"].update({"module.norm.weight": torch.ones(width), "module.norm.bias": torch.zeros(width),
                                       "module.fc.0.weight": torch.zeros(8, width)})
    torch.save(released, tmp_path / "vit_tiny.pth.tar")
    loaded = imagenet.load_msn("tiny", 16, str(tmp_path / "vit_tiny.pth.tar"))
    assert all(torch.equal(a, b) for a, b in zip(msn.state_dict().values(), loaded.state_dict().values()))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    autoencoder = imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES["tiny"])
    torch.save(autoencoder.state_dict(), tmp_path / "autoencoder_kl.pth")  # U-ViT's and DPT's file
    torch.save({"state_dict": {"model.diffusion_model.out.weight": torch.zeros(1),  # a Stable Diffusion checkpoint
                               **{"first_stage_model." + k: v for k, v in autoencoder.state_dict().items()}}},
               tmp_path / "sd.ckpt")
    for name in ("autoencoder_kl.pth", "sd.ckpt"):
        loaded = imagenet.load_autoencoder(str(tmp_path / name), size="tiny")
        assert all(torch.equal(a, b) for a, b in zip(autoencoder.state_dict().values(), loaded.state_dict().values()))

    with pytest.raises(plumbing.UserError, match="is not MSN's tiny checkpoint"):
        imagenet.load_msn("tiny", 16, str(tmp_path / "sd.ckpt"))
    with pytest.raises(plumbing.UserError, match="is not Stable Diffusion's autoencoder"):
        imagenet.load_autoencoder(str(tmp_path / "vit_tiny.pth.tar"), size="tiny")
    with pytest.raises(plumbing.UserError, match="drive.google.com"):
        imagenet.load_autoencoder(str(tmp_path / "missing.pth"))

    def offline(url, **kwargs):
        raise OSError("no network here")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(plumbing.UserError, match=re.escape("download https://dl.fbaipublicfiles.com/msn/vitl7_200ep")):
        imagenet.load_msn("vitl7")


def newton(objective, weights, steps=30):
    """Newton's method with the exact Hessian: the reference optimum of a small
    strictly convex problem, to machine precision."""
    for _ in range(steps):
        flat = weights.flatten().requires_grad_(True)
        gradient = torch.autograd.grad(objective(flat.view_as(weights)), flat)[0]
        hessian = torch.autograd.functional.hessian(lambda w: objective(w.view_as(weights)), flat.detach())
        weights = (flat - torch.linalg.solve(hessian, gradient)).detach().view_as(weights)
    return weights


def test_the_probe_reaches_the_optimum_of_its_objective():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 12, generator=generator, dtype=torch.float64) + 3  # an offset the centring removes
    labels = torch.randint(5, (60,), generator=generator)
    lambd = 0.0025 * 100 / len(features)  # MSN's strength, stronger: Newton converges from zero
    weights = imagenet.fit_probe(features, labels, 5, lambd)
    inputs = imagenet.probe_inputs(features)
    objective = lambda w: imagenet.probe_objective(w, inputs, labels, lambd)
    optimum = newton(objective, torch.zeros(5, 12, dtype=torch.float64))
    assert torch.allclose(weights, optimum, rtol=0, atol=1e-7 * optimum.abs().max())
    assert torch.allclose(inputs.mean(1), torch.zeros(60, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(inputs.norm(dim=1), torch.ones(60, dtype=torch.float64))
    predicted, confidence = imagenet.probe_predict(weights, features)
    assert torch.equal(predicted, (inputs @ optimum.T).argmax(1)) and (confidence > 1 / 5).all()


def test_the_cifar_unet_has_edms_ddpmpp_parameter_count():
    # NVlabs/edm training/networks.py SongUNet with the ddpmpp options of train.py
    # (model_channels 128, channel_mult [2, 2, 2], label_dim 10, augment_dim 0)
    # has 55,734,147 parameters; our class embedding of 11 rows has as many as
    # its Linear(10, 128) with bias.
    model = unet.make_diffusion("unet", "cifar", 10, 32)
    assert sum(p.numel() for p in model.parameters()) == 55_734_147


def test_the_cifar_uvit_is_u_vit_s_2_plus_its_time_mlp():
    model = unet.make_diffusion("uvit", "cifar", 10, 32)
    time_mlp = sum(p.numel() for p in model.net.time_embed.parameters())
    # U-ViT-S/2 (Bao et al. 2023, Table 1): 13 blocks of width 512, 8 heads, 44M parameters.
    assert sum(p.numel() for p in model.parameters()) - time_mlp == pytest.approx(44e6, rel=0.01)


@pytest.mark.parametrize("size, parameters", [("large", 287e6), ("huge", 501e6)])
def test_the_latent_uvits_are_u_vit_l_2_and_h_2_plus_their_time_mlp(size, parameters):
    with torch.device("meta"):  # shapes only
        model = unet.make_diffusion("uvit", size, 1000, 32, channels=4)
    time_mlp = sum(p.numel() for p in model.net.time_embed.parameters())
    # U-ViT-L/2 and U-ViT-H/2 on 4 x 32 x 32 latents (Bao et al. 2023, Table 1): 287M and 501M parameters
    assert sum(p.numel() for p in model.parameters()) - time_mlp == pytest.approx(parameters, rel=0.01)


@pytest.mark.parametrize("arch", ["unet", "uvit"])
@pytest.mark.parametrize("size", ["fast", "cifar"])
def test_the_gpu_sizes_denoise_one_image_on_cpu(arch, size):
    model = unet.make_diffusion(arch, size, 10, 32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([2.0]), torch.tensor([3]))
    assert out.shape == (1, 3, 32, 32) and out.isfinite().all()


def test_a_patch_of_2_keeps_the_image_size_and_quarters_the_work():
    # patch=2 folds each 2x2 square into channels: every level runs at half the side.
    shape = dict(unet.SIZES["unet"]["tiny"], patch=1)
    full = unet.EDMPrecond(unet.UNet(3, 10, **shape), 10, 32, 3)
    folded = unet.EDMPrecond(unet.UNet(3, 10, **dict(shape, patch=2)), 10, 32, 3)
    assert folded(torch.randn(2, 3, 32, 32), 1.0, torch.tensor([0, 10])).shape == (2, 3, 32, 32)
    assert unet.flops_per_image(folded) < 0.3 * unet.flops_per_image(full)


def test_unknown_sizes_and_unfit_resolutions_are_refused_in_one_line():
    for changes, resolution, words in [(dict(arch="resnet"), 32, "--arch 'resnet'"),
                                       (dict(size="gigantic"), 32, "--size 'gigantic'"),
                                       (dict(size="tiny"), 28, "multiple of 8, not 28"),
                                       (dict(arch="uvit", size="tiny"), 31, "multiple of 2, not 31"),
                                       (dict(size="large"), 32, "the unet comes in tiny, fast, cifar")]:
        with pytest.raises(plumbing.UserError, match=words) as error:
            unet.check(unet.DiffusionConfig(**changes), resolution=resolution)
        assert "\n" not in str(error.value)
    unet.check(unet.DiffusionConfig(size="tiny"), resolution=32)  # 32 = 4 x 8 fits


def test_the_cifar_unet_told_of_augmentation_has_edms_parameter_count():
    # EDM's ddpmpp with augment_dim 9 adds map_augment, Linear(9, 128) without bias: 55,734,147 + 1,152.
    model = unet.make_diffusion("unet", "cifar", 10, 32, augment_dim=data.AUGMENT_DIM)
    assert sum(p.numel() for p in model.parameters()) == 55_735_299
    # and it is told: the same noisy image with other augment labels gives another output
    model = randomized(unet.make_diffusion("unet", "tiny", 10, 16, augment_dim=data.AUGMENT_DIM))
    x, sigma, label = torch.randn(1, 3, 16, 16), torch.tensor([1.0]), torch.tensor([2])
    plain = model(x, sigma, label, torch.zeros(1, data.AUGMENT_DIM))
    assert torch.equal(plain, model(x, sigma, label))  # zero labels are no labels (sampling)
    assert not torch.allclose(plain, model(x, sigma, label, torch.ones(1, data.AUGMENT_DIM)))


# -----------------------------------------------------------------------------
# Training


def fixed_noise_loss(model, images, labels, seed=0):
    """The EDM loss of a model on fixed images, noise levels and noise."""
    generator = torch.Generator().manual_seed(seed)
    y = images.float() / 127.5 - 1
    sigma = (torch.randn(len(y), 1, 1, 1, generator=generator) * 1.2 - 1.2).exp()
    noise = torch.randn(y.shape, generator=generator) * sigma
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    with torch.no_grad():
        return (weight * (model.eval()(y + noise, sigma.flatten(), labels) - y) ** 2).mean().item()


def test_training_lowers_the_loss_on_unseen_shapes(tmp_path):
    images, labels = shapes_16(256)
    unseen, unseen_labels = shapes_16(128, seed=1)
    torch.manual_seed(0)  # train() starts from the same weights: it seeds with config.seed
    initial = unet.make_diffusion("unet", "tiny", 10, 16)
    config = diffusion_config(tmp_path, images=40 * 8, batch=8, lr=2e-3, warmup=40, ema_halflife=24)
    trained, metrics = unet.train(config, images, labels, 10, progress=False)
    before, after = fixed_noise_loss(initial, unseen, unseen_labels), fixed_noise_loss(trained, unseen, unseen_labels)
    # Each loss averages 128 unseen images at as many noise levels. Measured with
    # three seeds after 30 steps: 1.32 -> 0.76 to 0.85; 40 steps give more margin.
    assert after < 0.75 * before


# -----------------------------------------------------------------------------
# The GPU path on a CPU: torch.compile and bf16 autocast run the same code there


def train_briefly(kind, arch, tmp_path, freematch=False, **speed):
    """Three training steps of a stage's real loop on 16x16 shapes; (EMA model, metrics, model's last weights
    and FreeMatch's state)."""
    images, labels = shapes_16(64)
    if kind == "classifier":
        dataset = data.Dataset("shapes16", images, labels, images[:16], labels[:16], 10)
        threshold = dict(threshold="freematch", freematch_ema=0.5) if freematch else {}
        config = tiny_config(tmp_path, arch=arch, steps=3, ckpt_every=3, eval_every=3, **threshold, **speed)
        ema, metrics = fixmatch.train(config, dataset, data.labeled_split(labels, 2, seed=0), progress=False)
    else:  # the noise levels, labels and learning rate (warm-up) change at every step
        config = diffusion_config(tmp_path, arch=arch, images=24, batch=8, ckpt_every=24, **speed)
        ema, metrics = unet.train(config, images, labels, 10, progress=False)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    return ema, metrics, {**checkpoint["model"], **{f"freematch.{name}": value for name, value in
                                                    (checkpoint.get("freematch") or {}).items()}}


NETWORKS = [("classifier", "small"), ("classifier", "wrn28_2"), ("diffusion", "unet"), ("diffusion", "uvit")]


@pytest.mark.parametrize("kind, arch", NETWORKS, ids=[arch for _, arch in NETWORKS])
def test_compile_traces_each_training_network_whole_once_and_matches_eager(kind, arch, tmp_path, monkeypatch):
    # fullgraph: a graph break is an error; error_on_recompile: so is a second
    # compilation over steps where the batch, labels, noise levels and lr change.
    # aot_eager traces forward and backward as inductor would, without generating code.
    real_compile, compiled_models = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled_models.append(model) or real_compile(
        model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        # FreeMatch: its thresholds are updated in place inside the compiled step; with CUDA, CUDA graphs:
        # the same compiled step, called through the wrapper that marks each step's start
        _, _, compiled = train_briefly(kind, arch, tmp_path / "compiled", freematch=True, compile=True,
                                       cuda_graphs=CUDA, bf16=False)
    assert len(compiled_models) == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    _, _, eager = train_briefly(kind, arch, tmp_path / "eager", freematch=True, compile=False, bf16=False)
    for name in eager:
        assert torch.allclose(compiled[name].float(), eager[name].float(), atol=1e-5, rtol=1e-4), name


def test_every_stage_of_one_process_compiles_its_own_static_graph_with_no_recompile(tmp_path, monkeypatch):
    """Stage 1, the baseline, stage 3 and the oracle share their loss's code; stage 2
    and the two references share theirs. Traced into a backend that keeps each graph
    (nothing generated: fast), each stage's graph must have the stage's own static
    shapes (no symbolic size, which dynamo marks after a guard fails on a shape) and
    no stage may count as a recompile of another (an error here)."""
    real_compile, traced = torch.compile, []

    def keep(graph, example_inputs):
        traced.append([tuple(x.shape) for x in example_inputs if torch.is_tensor(x)])
        assert not any(isinstance(size, torch.SymInt) for x in example_inputs if torch.is_tensor(x)
                       for size in x.shape), example_inputs
        assert not any(isinstance(x, torch.SymInt) for x in example_inputs)
        return graph.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **{**options, "backend": keep,
                                                                                    "mode": None}))
    monkeypatch.setenv("DPT_FID_WEIGHTS", "/missing")
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--baseline", "--compile", "--out", str(tmp_path),
                                      "--ssl-steps", "4", "--stage3-steps", "4", "--diffusion-images", "64"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        dpt.main()
    assert len(traced) == 7  # stage 1, stage 2, stage 3, the baseline, the few-label and every-label models, oracle


def test_compile_with_inductor_generates_cpu_code_that_trains_as_eager_does(tmp_path, monkeypatch):
    # One network only: inductor's first compilation of the U-Net takes 86 s on 2 cores. A cache
    # of its own: inductor's shared one does not key on ONEDNN_MAX_CPU_ISA, and kernels cached
    # under another ISA setting gave NaN weights (and once aborted) when the suite ran both ways.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kind, arch = NETWORKS[0]
    torch._dynamo.reset()
    _, _, compiled = train_briefly(kind, arch, tmp_path / "compiled", compile=True, bf16=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    _, _, eager = train_briefly(kind, arch, tmp_path / "eager", compile=False, bf16=False)
    for name in eager:  # fused kernels sum in another order: float32 round-off, not exact equality
        assert torch.allclose(compiled[name].float(), eager[name].float(), atol=1e-4, rtol=1e-3), name


@pytest.mark.parametrize("kind, arch", NETWORKS, ids=[arch for _, arch in NETWORKS])
def test_bf16_autocast_trains_every_network_on_cpu_close_to_float32(kind, arch, tmp_path):
    ema, metrics, weights = train_briefly(kind, arch, tmp_path / "bf16", compile=False, bf16=True)
    _, metrics32, weights32 = train_briefly(kind, arch, tmp_path / "fp32", compile=False, bf16=False)
    for name, value in weights.items():  # the weights stay float32 (autocast casts copies) and finite
        assert value.dtype == weights32[name].dtype and value.isfinite().all(), name
    floats = [name for name, value in weights.items() if value.is_floating_point()]
    distance = sum((weights[name] - weights32[name]).norm() ** 2 for name in floats).sqrt()
    assert 0 < distance <= 0.01 * sum(weights32[name].norm() ** 2 for name in floats).sqrt()  # bf16 ran, within 1%
    if kind == "diffusion":  # the mean EDM loss of three steps, within 2% of float32's
        assert metrics["loss"] == pytest.approx(metrics32["loss"], rel=0.02)
    else:  # the test accuracy of the EMA model after three steps
        assert abs(metrics["accuracy"] - metrics32["accuracy"]) <= 0.125


@pytest.mark.parametrize("part", ["encode", "decode", "msn"])
def test_the_frozen_imagenet_networks_compile_whole_and_run_in_bf16_close_to_float32(part):
    torch.manual_seed(0)  # PyTorch's initialization: activations of a realistic scale for bf16
    autoencoder = imagenet.AutoencoderKL(**reference.REFERENCE_NETWORKS["autoencoder"]).eval()
    msn = imagenet.MSNViT(**reference.REFERENCE_NETWORKS["msn"]).eval()
    images, latents = (tensor.float() for tensor in reference.fixed_autoencoder_inputs())
    function, inputs = {"encode": (lambda x: autoencoder.encode(x)[0], images), "decode": (autoencoder.decode, latents),
                        "msn": (msn, images)}[part]
    torch._dynamo.reset()
    with torch.no_grad():
        eager = function(inputs)
        compiled = torch.compile(function, backend="aot_eager", fullgraph=True)(inputs)  # a graph break fails
        with torch.autocast("cpu", torch.bfloat16):
            half = function(inputs)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-4)
    relative = ((half.float() - eager).norm() / eager.norm()).item()
    assert 0 < relative < 0.02, relative  # bf16 ran, within 2%


class HostDeviceTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any op that moves data between the host and the device: a value
    read back (.item(), a tensor in an `if`) or a host tensor copied over. Either
    makes the host wait for the GPU to finish all it has queued."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {leaf.device.type for leaf in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(leaf, torch.Tensor)}
        if kwargs.get("device") is not None:
            devices.add(torch.device(kwargs["device"]).type)
        crossing = (func is torch.ops.aten._local_scalar_dense.default and devices != {"cpu"} or
                    func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and len(devices) > 1)
        assert not crossing, f"{func} moves data between {devices}"
        return func(*args, **kwargs)


class HostDataToDevice(torch.overrides.TorchFunctionMode):
    """Fails on torch.tensor(host data, device=...) and torch.as_tensor of host
    data, whose copy the dispatch mode above does not see."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        assert not (func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor) and
                    device is not None and torch.device(device).type != "cpu"), \
            f"{func.__name__} copies host data to {device}"
        return func(*args, **kwargs)


def no_host_device_traffic(device):
    """On the meta device, the two modes above; on a GPU, also PyTorch's own
    check, which raises at any synchronizing call."""
    stack = contextlib.ExitStack()
    stack.enter_context(HostDeviceTraffic())
    stack.enter_context(HostDataToDevice())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        stack.callback(torch.cuda.set_sync_debug_mode, "default")
    return stack


@pytest.mark.parametrize("device", ["meta", "cuda"])
@pytest.mark.parametrize("threshold", ["fixmatch", "freematch"])
def test_a_classifier_training_step_queues_all_its_work_on_the_device_and_reads_nothing_back(threshold, device,
                                                                                             request):
    # The meta device stands in for a GPU: every function the training loop's step calls, on
    # meta tensors, under modes that fail where data crosses to or from the host.
    device = request.getfixturevalue("cuda") if device == "cuda" else torch.device(device)
    train_x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).to(device)
    labeled_y = torch.randint(0, 10, (16,)).to(device)
    model = fixmatch.make_classifier("wrn28_2", 10, torch.zeros(3), torch.ones(3)).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    config = fixmatch.FixMatchConfig()
    # Fused SGD has no meta kernel: there the same update, unfused (the fused one takes its lr as a host float too).
    optimizer = (fixmatch.make_optimizer(model, config) if device.type == "cuda" else
                 torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4))
    freematch = fixmatch.FreeMatchThreshold(10, 0.999).to(device) if threshold == "freematch" else None
    _, step_loss = plumbing.for_training(model, fixmatch.fixmatch_step_loss, 1, device, compile=False)

    def step(real_fraction):
        labeled_pick = fixmatch.sample_labeled(4, 12, 16, real_fraction, device)
        unlabeled_pick = torch.randint(len(train_x), (12,), device=device)
        inputs = fixmatch.augmented_batch(train_x[labeled_pick], train_x[unlabeled_pick])
        fairness = 0.01 if freematch else 0.0  # FreeMatch's fairness loss too
        loss, mask, pseudo = step_loss(inputs, labeled_y[labeled_pick], 12, 1.0, 0.95, freematch, fairness)
        fixmatch.update_weights(loss, model, ema_model, optimizer, 0.999)
        return inputs, mask, pseudo
    if device.type == "cuda":
        step(-1)  # libraries' first calls (cuDNN's algorithm search) may wait once
    with no_host_device_traffic(device):
        for real_fraction in (-1, 0.5):  # stage 1's uniform draw and stage 3's share of real images
            inputs, mask, pseudo = step(real_fraction)
    assert inputs.shape == (4 + 2 * 12, 3, 32, 32) and mask.shape == pseudo.shape == (12,)


@pytest.mark.parametrize("device", ["meta", "cuda"])
@pytest.mark.parametrize("arch", ["unet", "uvit"])
def test_a_diffusion_training_step_queues_all_its_work_on_the_device_and_reads_nothing_back(arch, device, request):
    # As the classifier's test: the pixel path's step (EDM's augmentation, noise, loss, backward, the
    # gradients' clean-up, Adam (unfused on meta, as above), EMA).
    device = request.getfixturevalue("cuda") if device == "cuda" else torch.device(device)
    model = unet.make_diffusion(arch, "tiny", 10, 16, augment_dim=data.AUGMENT_DIM).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    images, labels = torch.zeros(8, 3, 16, 16, device=device), torch.zeros(8, dtype=torch.long, device=device)
    _, step_loss = plumbing.for_training(model, unet.edm_loss, 1, device, compile=False)

    def step():
        x, augment_labels = data.edm_augment(images, 0.5)
        noisy, sigma, conditions = unet.edm_noise(x, labels, 10, unet.DiffusionConfig())
        step_loss(x, noisy, sigma, conditions, augment_labels).backward()
        for param in model.parameters():
            torch.nan_to_num_(param.grad, nan=0, posinf=1e5, neginf=-1e5)
        optimizer.step()
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 0.001)
        return x, augment_labels
    if device.type == "cuda":
        step()  # libraries' first calls (cuDNN's algorithm search) may wait once
    with no_host_device_traffic(device):
        x, augment_labels = step()
    assert x.shape == images.shape and augment_labels.shape == (8, data.AUGMENT_DIM)


@pytest.mark.parametrize("kind, arch", [NETWORKS[0], NETWORKS[2]], ids=["classifier", "unet"])
def test_on_the_gpu_steps_replayed_as_cuda_graphs_train_as_eager_steps_do(kind, arch, cuda, tmp_path):
    """The U-Net's step in two micro-batches: the second backward adds into gradients
    that the first left, which must not live in the graphs' memory pool."""
    micro = {"micro_batch": 4} if kind == "diffusion" else {}
    _, _, replayed = train_briefly(kind, arch, tmp_path / "graphs", freematch=True, compile=True, cuda_graphs=True,
                                   bf16=False, **micro)
    _, _, eager = train_briefly(kind, arch, tmp_path / "eager", freematch=True, compile=False, bf16=False, **micro)
    floats = [name for name, value in eager.items() if value.is_floating_point()]
    distance = sum((replayed[name].float() - eager[name].float()).norm() ** 2 for name in floats).sqrt()
    assert distance <= 1e-3 * sum(eager[name].float().norm() ** 2 for name in floats).sqrt()  # fp32 round-off


def test_under_bf16_autocast_losses_pseudo_labels_preconditioning_and_the_ode_stay_float(monkeypatch):
    with torch.autocast("cpu", torch.bfloat16):
        logits = torch.randn(6, 10).bfloat16()
        loss, mask, pseudo = fixmatch.fixmatch_loss(logits[:2], torch.tensor([1, 2]), logits[2:4], logits[4:],
                                                    lambda_u=1.0, tau=0.0)
        assert loss.dtype == torch.float32  # softmax and cross-entropy in float32 on bf16 logits
        model = randomized(unet.make_diffusion("unet", "tiny", 10, 16))
        inner = []
        model.net.register_forward_hook(lambda module, args, out: inner.append(out.dtype))
        denoised = model(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 20.0]), torch.tensor([1, 10]))
        assert inner == [torch.bfloat16] and denoised.dtype == torch.float32  # the network in bf16, c_skip x in fp32
        ode = sample.guided(model, 2.0)(torch.randn(2, 3, 16, 16, dtype=torch.float64), 3.0, torch.tensor([1, 2]))
        assert ode.dtype == torch.float64  # the sampler's state


@pytest.mark.parametrize("augment", [0.0, 0.5])
def test_a_killed_diffusion_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, monkeypatch, augment):
    images, labels = shapes_16(64)
    whole, _ = unet.train(diffusion_config(tmp_path / "whole", augment=augment), images, labels, 10, progress=False)

    saves, real_save = [], plumbing.save_atomic

    def save_then_die(obj, path):  # the process is killed right after its first checkpoint
        real_save(obj, path)
        saves.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(plumbing, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        unet.train(diffusion_config(tmp_path / "killed", augment=augment), images, labels, 10, progress=False)
    monkeypatch.setattr(plumbing, "save_atomic", real_save)
    assert torch.load(saves[0], weights_only=True)["images_seen"] == 12
    resumed, _ = unet.train(diffusion_config(tmp_path / "killed", augment=augment), images, labels, 10,
                            progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    last_whole, last_resumed = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True)
                                for run in ("whole", "killed"))
    for name, a in last_whole["model"].items():
        assert torch.equal(a, last_resumed["model"][name]), name


def test_a_diffusion_checkpoint_resumes_under_another_labels_file_name_but_never_on_other_labels(tmp_path):
    images, labels = data.make_shapes(16, seed=0)[0].expand(-1, 3, -1, -1), torch.arange(16) % 10
    first, _ = unet.train(diffusion_config(tmp_path, labels_file="a/pseudo_labels.pt"), images, labels, 10,
                          progress=False)
    moved, _ = unet.train(diffusion_config(tmp_path, labels_file="b/pseudo_labels.pt"), images, labels, 10,
                          progress=False)  # the run folder moved: the same labels, found where the checkpoint is
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), moved.state_dict().values()))
    with pytest.raises(plumbing.UserError, match="other labels"):
        unet.train(diffusion_config(tmp_path, labels_file="a/pseudo_labels.pt"), images, (labels + 1) % 10, 10,
                   progress=False)


def test_diffusion_steps_warm_up_linearly_and_the_ema_has_the_asked_half_life(tmp_path, monkeypatch):
    saves = recorded_saves(monkeypatch)
    images, labels = shapes_16(32)
    config = diffusion_config(tmp_path, images=16, batch=8, warmup=32, ema_halflife=16, ema_rampup=0.0,
                              ckpt_every=8)
    unet.train(config, images, labels, 10, progress=False)
    first, second = saves
    assert (first["images_seen"], second["images_seen"]) == (8, 16)
    beta = 0.5 ** (8 / 16)  # a batch of 8 is half a half-life
    for name, value in second["ema"].items():
        if value.is_floating_point() and not torch.equal(second["model"][name], first["ema"][name]):
            assert torch.allclose(value, beta * first["ema"][name] + (1 - beta) * second["model"][name],
                                  atol=1e-6), name
    assert sum(not torch.equal(second["model"][k], first["ema"][k]) for k in second["ema"]) > 10  # it trained
    # EDM's warm-up: lr min(images seen / warmup, 1); the second step began at 8 images of 32
    assert second["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 8 / 32)


def test_previews_come_every_preview_every_images_and_do_not_change_training(tmp_path):
    images, labels = shapes_16(64)
    calls = []

    def preview(model, images_seen):  # draws random numbers, as a sampler does
        calls.append((images_seen, model.training))
        torch.randn(100)

    plain, _ = unet.train(diffusion_config(tmp_path / "a"), images, labels, 10, progress=False)
    watched, _ = unet.train(diffusion_config(tmp_path / "b"), images, labels, 10, progress=False,
                            preview=preview, preview_every=8)
    assert calls == [(8, False), (16, False), (24, False)]  # the EMA model, in eval mode
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_diffusion_checkpoint_of_other_settings_or_a_corrupt_one_is_refused(tmp_path):
    images, labels = shapes_16(16)
    unet.train(diffusion_config(tmp_path, images=4), images, labels, 10, progress=False)
    with pytest.raises(plumbing.UserError, match="other settings \\(lr\\)"):
        unet.train(diffusion_config(tmp_path, images=4, lr=0.1), images, labels, 10, progress=False)
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(plumbing.UserError, match="unreadable"):
        unet.train(diffusion_config(tmp_path, images=4), images, labels, 10, progress=False)


# -----------------------------------------------------------------------------
# Files and the command line


BAD_LABELS = {
    "wrong length": (torch.zeros(19, dtype=torch.long), "shape \\(20,\\)"),
    "float labels": (torch.zeros(20), "must be int64"),
    "out of range": (torch.arange(20) % 11, "0..9"),
    "not a dict": (None, "holds no 'labels'"),
    "not torch": (b"text", "cannot read labels"),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_a_labels_file_that_does_not_fit_the_dataset_is_refused(tmp_path, case):
    labels, words = BAD_LABELS[case]
    if isinstance(labels, bytes):
        (tmp_path / "labels.pt").write_bytes(labels)
    else:
        torch.save(torch.zeros(3) if labels is None else {"labels": labels}, tmp_path / "labels.pt")
    dataset = data.Dataset("tiny", torch.zeros(20, 3, 8, 8, dtype=torch.uint8), torch.arange(20) % 10, None, None, 10)
    with pytest.raises(plumbing.UserError, match=words) as error:
        unet.training_labels(unet.DiffusionConfig(labels_file=str(tmp_path / "labels.pt")), dataset)
    assert "\n" not in str(error.value)


def test_keep_confident_keeps_the_surest_share_of_each_class_and_makes_the_rest_the_null_class():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (101,), generator=generator)
    labels[labels == 3] = 2  # class 3 is never predicted: it stays absent, not an error
    labels[0] = 3
    confidence = torch.rand(101, generator=generator)
    kept = unet.keep_confident(labels, confidence, 0.3, null_class=4)
    for label in range(4):  # against a sort of each class, one at a time
        members = (labels == label).nonzero().squeeze(1).tolist()
        surest = sorted(members, key=lambda i: -confidence[i])[:max(1, round(0.3 * len(members)))]
        assert sorted((kept == label).nonzero().squeeze(1).tolist()) == sorted(surest)
    assert ((kept == labels) | (kept == 4)).all()
    assert unet.keep_confident(labels, confidence, 1.0, null_class=4) is labels


def test_a_labels_file_read_with_confident_below_1_keeps_the_surest_labels_and_needs_their_confidence(
        in_process, tmp_path):
    dataset = data.Dataset("tiny", torch.zeros(20, 3, 8, 8, dtype=torch.uint8), torch.arange(20) % 10, None, None, 10)
    labels, confidence = torch.arange(20) % 10, torch.linspace(0, 1, 20)
    torch.save({"labels": labels, "confidence": confidence}, tmp_path / "labels.pt")
    config = unet.DiffusionConfig(labels_file=str(tmp_path / "labels.pt"), confident=0.5)
    kept = unet.training_labels(config, dataset)
    assert torch.equal(kept, torch.where(torch.arange(20) >= 10, labels, 10))  # the later of each pair is surer
    torch.save({"labels": labels}, tmp_path / "labels.pt")
    assert torch.equal(unet.training_labels(dataclasses.replace(config, confident=1.0), dataset), labels)
    torch.save({"labels": torch.arange(2000) % 10}, tmp_path / "labels.pt")  # one a shape, no confidence
    result = in_process("unet.py", "--dataset", SHAPES_FILE, "--labels-file", str(tmp_path / "labels.pt"),
                        "--confident", "0.5", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "no 'confidence'", "--confident 1")
    result = in_process("unet.py", "--dataset", SHAPES_FILE, "--confident", "0.5", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--confident 0.5", "--labels-file")  # true labels have no confidence
    assert not (tmp_path / "out").exists()


def test_a_labels_file_of_the_wrong_length_is_one_line_and_exit_code_2_on_the_command_line(in_process, tmp_path):
    torch.save({"labels": torch.zeros(5, dtype=torch.long)}, tmp_path / "pseudo_labels.pt")
    result = in_process("unet.py", "--dataset", SHAPES_FILE, "--labels-file", str(tmp_path / "pseudo_labels.pt"),
                        "--out", str(tmp_path))
    assert_one_line_error(result, "shape (2000,)")


# -----------------------------------------------------------------------------
# Memory: what lets the imagenet preset's step fit one 80 GB GPU


def recorded_gradients(monkeypatch):
    """Every gradient Adam is given, as a list of steps, each a list of tensors, and
    where each gradient lives (a list of steps, each a list of addresses)."""
    steps, addresses, adam_step = [], [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        addresses.append([p.grad.data_ptr() for group in self.param_groups for p in group["params"]])
        return adam_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return steps, addresses


@pytest.mark.parametrize("arch", ["unet", "uvit"])
def test_accumulated_micro_batches_give_the_whole_batchs_gradient_and_the_same_run(tmp_path, monkeypatch, arch):
    images, labels = shapes_16(32)
    (gradients, addresses), sizes = recorded_gradients(monkeypatch), []
    forward = unet.EDMPrecond.forward
    monkeypatch.setattr(unet.EDMPrecond, "forward", lambda self, x, *args: sizes.append(len(x)) or
                        forward(self, x, *args))
    runs = {}
    for micro in (0, 2):  # the whole batch of 8 in one forward pass, and 4 passes of 2
        config = diffusion_config(tmp_path / str(micro), arch=arch, images=16, batch=8, micro_batch=micro,
                                  label_dropout=0.3)
        runs[micro] = unet.train(config, images, labels, 10, progress=False)
    assert sizes == [8, 8] + [2] * 8
    assert len(gradients) == 4
    # Each run's gradients live where its first step put them: allocated once and zeroed in place, never
    # adopted from a backward's output, which under CUDA graphs the next replay would overwrite.
    assert addresses[0] == addresses[1] and addresses[2] == addresses[3]
    for whole, accumulated in zip(gradients[:2], gradients[2:]):  # each step's gradient, summed in another order
        for a, b in zip(whole, accumulated):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert runs[2][1]["loss"] == pytest.approx(runs[0][1]["loss"], rel=1e-5)
    for a, b in zip(runs[0][0].state_dict().values(), runs[2][0].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def bytes_kept_for_backward(model, batch, *shape):
    """What autograd keeps of a forward pass of `batch` for backward (every saved
    tensor's storage once, the weights aside), on the meta device: shapes alone, no
    arithmetic. In float32, which keeps at least as much as the presets' bf16 does
    (counted on the CPU: DDPM++ 126 against 117 MiB an image, checkpointed U-ViT-L/2 23 against 22)."""
    weights, seen = {p.untyped_storage()._cdata for p in model.parameters()}, {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            seen[storage._cdata] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), torch.device("meta"):
        model(torch.zeros(batch, *shape), *([torch.ones(batch), torch.zeros(batch, dtype=torch.long)] *
                                            isinstance(model, unet.EDMPrecond)))
    return sum(seen.values())


@pytest.mark.parametrize("preset", ["fast", "cifar", "imagenet"])
def test_each_gpu_presets_training_step_keeps_under_40_gib_for_backward_on_one_gpu(preset):
    """Half of an 80 GB card for what backward needs, the other half for weights, gradients,
    optimizer states, one checkpointed block's recomputation and the allocator's slack."""
    config = configuration.DPTConfig(preset=preset, dataset="imagenet" if preset == "imagenet" else "cifar10")
    configuration.resolve(config)
    diffusion = configuration.diffusion_settings(config)[0]
    latent = preset == "imagenet"
    side, channels, classes = (config.image_size // 8, imagenet.LATENT_CHANNELS, 1000) if latent else (32, 3, 10)
    with torch.device("meta"):
        model = unet.make_diffusion(diffusion.arch, diffusion.size, classes, side, channels).train()
    one, two = (bytes_kept_for_backward(model, batch, channels, side, side) for batch in (1, 2))
    assert one + (two - one) * ((diffusion.micro_batch or diffusion.batch) - 1) < 40 * 2 ** 30, (two - one) / 2 ** 20
    if not latent:  # the classifier's step: its labeled batch and two views of 7 unlabeled images per labeled one
        stage1 = configuration.classifier_settings(config, "stage1")[0]
        with torch.device("meta"):
            classifier = fixmatch.make_classifier(stage1.arch, 10, [0.5] * 3, [0.25] * 3).train()
        one, two = (bytes_kept_for_backward(classifier, batch, 3, 32, 32) for batch in (1, 2))
        assert one + (two - one) * (stage1.batch * (1 + 2 * stage1.uratio) - 1) < 40 * 2 ** 30


def test_a_micro_batch_that_does_not_divide_a_processs_share_is_refused(tmp_path):
    unet.check(diffusion_config(tmp_path, batch=8, micro_batch=16), world=1)  # larger than the share: the share
    with pytest.raises(plumbing.UserError, match="--micro-batch 3: must divide each of the 2 processes' 4 images"):
        unet.check(diffusion_config(tmp_path, batch=8, micro_batch=3), world=2)


def test_a_checkpointed_u_vit_computes_and_trains_as_the_plain_one_keeping_only_each_blocks_input(monkeypatch):
    torch.manual_seed(0)
    shape = dict(unet.SIZES["uvit"]["tiny"], dropout=0.0)
    plain, checkpointed = (unet.UViT(8, 4, 10, **shape, checkpoint=flag) for flag in (False, True))
    checkpointed.load_state_dict(plain.state_dict())
    x, c_noise, labels = torch.randn(3, 4, 8, 8), torch.randn(3), torch.tensor([1, 2, 10])
    calls = []
    block_forward = unet.UViTBlock.forward
    monkeypatch.setattr(unet.UViTBlock, "forward", lambda self, *args: calls.append(self) or
                        block_forward(self, *args))
    outputs = []
    for network in (plain, checkpointed):
        calls.clear()
        out = network(x, c_noise, labels)
        (out ** 2).sum().backward()
        outputs.append((out, [p.grad for p in network.parameters()], len(calls)))
    (out, grads, plain_calls), (out_c, grads_c, checkpointed_calls) = outputs
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert checkpointed_calls == 2 * plain_calls == 2 * 5  # every block ran again in backward
    with torch.no_grad():  # sampling keeps nothing for backward: no recomputation to arrange
        calls.clear()
        checkpointed(x, c_noise, labels)
        assert len(calls) == 5
    assert all(unet.SIZES["uvit"][size]["checkpoint"] for size in ("large", "huge"))  # as U-ViT trains ImageNet


def test_decoding_in_chunks_gives_the_images_of_one_batch_and_never_decodes_more_at_once(monkeypatch):
    torch.manual_seed(0)
    autoencoder = imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES["tiny"]).eval().requires_grad_(False)
    randomized(autoencoder)
    latents = torch.randn(5, imagenet.LATENT_CHANNELS, 4, 4)
    whole = autoencoder.decode(latents / unet.SIGMA_DATA)
    seen, decode = [], autoencoder.decode
    monkeypatch.setattr(autoencoder, "decode", lambda z: seen.append(len(z)) or decode(z))
    chunked = imagenet.decode_latents(autoencoder, latents, batch=2)
    assert seen == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_samples_become_uint8_in_float32_even_when_the_decoder_answers_in_bf16():
    model = unet.make_diffusion("unet", "tiny", 2, 8).eval()
    # values whose bf16 x * 127.5 + 128 rounds to the next whole number before truncation
    values = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).bfloat16()
    decode = lambda latents: values.expand(len(latents), -1, -1, -1)
    images, _ = sample.generate(model, 2, steps=2, decode=decode, progress=False)
    expected = (values.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    in_bf16 = (values * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert (in_bf16 != expected).float().mean() > 0.2  # the mistake this guards against
    assert torch.equal(images, expected.expand(4, -1, -1, -1))


def test_a_latents_flip_is_its_mirror_images_latent_drawn_half_the_time(tmp_path, monkeypatch):
    latents, mirrored = torch.full((64, 4, 8, 8), 0.25).half(), torch.full((64, 4, 8, 8), -0.25).half()
    seen, forward = [], unet.EDMPrecond.forward
    monkeypatch.setattr(unet.EDMPrecond, "forward", lambda self, x, sigma, *args: seen.append(x.mean((1, 2, 3))) or
                        forward(self, x, sigma, *args))
    config = diffusion_config(tmp_path, arch="uvit", images=256, batch=64, p_mean=-12.0, p_std=0.1)
    unet.train(config, latents, torch.zeros(64, dtype=torch.long), 10, progress=False, mirrored=mirrored)
    means = torch.cat(seen)  # sigma ~ 6e-6: the noisy input is the latent drawn
    assert set(means.round(decimals=2).tolist()) == {0.25, -0.25}
    assert (means < 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert latents.eq(0.25).all()  # a flip replaced rows of the batch, never of the latents


def test_two_processes_under_torchrun_train_the_diffusion_model_and_write_one_set_of_files_that_they_sample(
        tmp_path):
    result = run_script(*TORCHRUN, "unet.py", "--dataset", SHAPES_FILE,
                        "--size", "tiny", "--images", "16", "--batch", "8", "--ckpt-every", "8",
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "diffusion.pt", "run.lock"]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["images_seen"] == 16 and len(checkpoint["rng"]) == 2  # every rank's generators, for resuming
    # sample.py under torchrun: each process samples a share, and the file holds every image of one process's run
    shutil.copy(tmp_path / "diffusion.pt", tmp_path / "CKPT")
    result = run_script(*at_test_size("torchrun --nproc_per_node 8 sample.py CKPT --per-class 1000", "--per-class", "3",
                                      "--steps", "2", "--out", str(tmp_path / "samples")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    images = torch.load(tmp_path / "samples" / "samples.pt")["images"]
    expected = sample.generate(unet.load_diffusion(str(tmp_path / "CKPT")), 3, steps=2, progress=False)[0]
    assert images.shape == (30, 3, 32, 32) and (images.int() - expected.int()).abs().max() <= 1


def test_the_command_writes_a_diffusion_pt_that_load_diffusion_and_sample_py_read(tmp_path, in_process, monkeypatch,
                                                                                   quick_rates):
    test_size = ["--dataset", SHAPES_FILE, "--images", "8", "--batch", "4", "--warmup", "8", "--ema-halflife", "8"]
    result = run_script(*at_test_size("python unet.py --dataset shapes --size tiny --images 48000 --batch 32 --lr 2e-3 "
                                      "--warmup 1000 --ema-halflife 4000 --p-mean 0 --label-dropout 0.1 --augment 0",
                                      *test_size, "--out", str(tmp_path)))
    assert result.returncode == 0, result.stderr[-2000:]
    saved = torch.load(tmp_path / "diffusion.pt", weights_only=True)
    assert (saved["config"]["size"] == "tiny" and saved["config"]["label_dropout"] == 0.1
            and (saved["num_classes"], saved["resolution"], saved["channels"]) == (10, 32, 3))
    for path in ("diffusion.pt", "ckpt.pt"):  # the final EMA weights, from either file
        model = unet.load_diffusion(str(tmp_path / path))
        assert isinstance(model, unet.EDMPrecond) and not model.training
        for name, value in model.state_dict().items():
            assert torch.equal(value, saved["model"][name]), name
    # and sample.py samples from it, as a user would run the two commands: at runs/..., and guided
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cifar10-1l-s0" / "stage2").mkdir(parents=True)
    shutil.copy(tmp_path / "diffusion.pt", tmp_path / "runs" / "cifar10-1l-s0" / "stage2" / "diffusion.pt")
    shutil.copy(tmp_path / "diffusion.pt", tmp_path / "CKPT")
    test_size = ["--per-class", "2", "--steps", "2", "--out", "samples"]
    for argv, expected in (
            (at_test_size("python sample.py runs/cifar10-1l-s0/stage2/diffusion.pt --per-class 1000 --out "
                          "runs/cifar10-1l-s0", *test_size), dict(solver="heun", guidance=1.0)),
            (at_test_size("python sample.py CKPT --per-class 1000 --solver dpmpp --steps 15 --guidance 1.4",
                          *test_size), dict(solver="dpmpp", guidance=1.4))):
        result = in_process(*argv)
        assert result.returncode == 0, result.stderr[-2000:]
        samples = torch.load(tmp_path / "samples" / "samples.pt")
        assert samples["images"].shape == (20, 3, 32, 32) and samples["labels"].tolist() == sorted(list(range(10)) * 2)
        assert {name: samples["config"][name] for name in expected} == expected
        drawn = sample.generate(unet.load_diffusion("CKPT"), 2, steps=2, progress=False, **expected)[0]
        assert torch.equal(samples["images"], drawn)  # with the solver and guidance it says
        assert (tmp_path / "samples" / "samples.png").exists()
        shutil.rmtree(tmp_path / "samples")
    result = in_process(*at_test_size("python sample.py CKPT --bench", "--batch", "10"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"heun, 35 evaluations, batch 10, guidance 1.0: [\d.]+ images/s", result.stdout), result.stdout


def test_unets_commands_train_on_cifar_10s_files_with_pseudo_labels_and_bench_every_size(in_process, tmp_path,
                                                                                           skip_md5, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    labels = torch.arange(100) % 10
    torch.save({"labels": labels, "confidence": torch.rand(100)}, tmp_path / "pseudo_labels.pt")
    monkeypatch.chdir(tmp_path)
    result = in_process(*at_test_size("python unet.py --dataset cifar10 --labels-file pseudo_labels.pt", "--data-dir",
                                      str(tmp_path), "--size", "tiny", "--images", "8", "--batch", "4"))
    assert result.returncode == 0, result.stderr[-2000:]
    saved = torch.load(tmp_path / "runs" / "diffusion" / "diffusion.pt", weights_only=True)
    assert saved["config"]["labels_file"] == "pseudo_labels.pt" and saved["config"]["augment"] == 0.12  # EDM's
    checkpoint = torch.load(tmp_path / "runs" / "diffusion" / "ckpt.pt", weights_only=True)
    assert checkpoint["labels_crc"] == zlib.crc32(labels.numpy().tobytes())  # it trained on the file's labels
    monkeypatch.setattr(unet, "PIXEL_SIZES", ("tiny",))  # of tiny, fast and cifar: a test size
    result = in_process(*at_test_size("python unet.py --bench --arch uvit"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.findall(r"uvit (\w+): [\d.]+M parameters, [\d.]+ GFLOP/image forward, batch 4: [\d,.]+ images/s",
                      result.stdout) == ["tiny"], result.stdout


def test_sample_py_guides_a_saved_model_by_the_asked_weight(tmp_path, monkeypatch):
    model = randomized(unet.make_diffusion("unet", "tiny", 3, 8)).eval()  # labels matter in a random network
    unet.save_diffusion(model, unet.DiffusionConfig(size="tiny", label_dropout=0.1), {}, str(tmp_path / "diffusion.pt"))
    monkeypatch.setattr(sys, "argv", ["sample.py", str(tmp_path / "diffusion.pt"), "--per-class", "2", "--steps", "4",
                                      "--solver", "heun", "--guidance", "3", "--out", str(tmp_path / "samples")])
    sample.main()
    plumbing.HELD_LOCKS.pop().close()
    images = torch.load(tmp_path / "samples" / "samples.pt")["images"]
    guided, unguided = (sample.generate(model, 2, steps=4, guidance=w, progress=False)[0] for w in (3.0, 1.0))
    assert torch.equal(images, guided) and not torch.equal(guided, unguided)


def test_load_diffusion_refuses_a_file_that_is_not_a_diffusion_model(tmp_path):
    torch.save({"model": {}, "config": {"arch": "wrn28_2"}}, tmp_path / "classifier.pt")
    for path in (tmp_path / "classifier.pt", tmp_path / "missing.pt"):
        with pytest.raises(plumbing.UserError, match="cannot read a diffusion model") as error:
            unet.load_diffusion(str(path))
        assert "\n" not in str(error.value)


# =============================================================================
# imagenet.py: folders in ImageNet's layout, and the imagenet preset end to end

# -----------------------------------------------------------------------------
# ImageNet's layout: image folders, ADM's centre crop, the resumable encoding pass


def write_image_folder(root, classes=("n01", "n02", "n00"), per_class=3, size=(40, 30)):
    """JPEGs in ImageNet's layout: root/train/CLASS/*.JPEG; image i of class c is
    a flat colour (c, i) so that every file is known by its pixels."""
    from PIL import Image
    for c, name in enumerate(classes):
        os.makedirs(root / "train" / name)
        for i in range(per_class):
            Image.new("RGB", size, (80 * c, 60 * i, 128)).save(root / "train" / name / f"{name}_{i}.JPEG")
        (root / "train" / name / "notes.txt").write_text("not an image")


def test_an_image_folder_lists_its_images_with_classes_sorted_by_name(tmp_path):
    write_image_folder(tmp_path)
    paths, labels, classes = imagenet.image_folder(str(tmp_path), "train")
    assert classes == ("n00", "n01", "n02") and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert all(path.endswith(".JPEG") and f"/{classes[label]}/" in path for path, label in zip(paths, labels))
    with pytest.raises(plumbing.UserError, match="ImageNet's layout"):
        imagenet.image_folder(str(tmp_path), "val")


def test_adms_centre_crop_halves_with_a_box_filter_then_crops_the_centre():
    from PIL import Image
    image = lambda columns: Image.fromarray(np.tile(columns.astype(np.uint8), (400, 1))).convert("RGB")
    crop = imagenet.adm_center_crop(image(np.arange(1000) // 4), 100)  # column x holds x // 4
    assert crop.shape == (3, 100, 100) and crop.dtype == torch.uint8  # 1000x400 -> 500x200 -> 250x100, at 75
    assert torch.equal(crop[0], torch.arange(75, 175, dtype=torch.uint8).expand(100, 100))
    # Stripes 0, 120, 240, ...: a box of 4 columns from 4m holds a whole period and one more stripe,
    # (360 + 120 (m % 3)) / 4; one bicubic resize by 4 would blur them towards 120.
    stripes = imagenet.adm_center_crop(image(np.arange(1000) % 3 * 120), 100)
    assert stripes[0, 0].tolist() == [90 + 30 * ((75 + k) % 3) for k in range(100)]
    small = imagenet.adm_center_crop(Image.new("RGB", (50, 40), (9, 99, 199)), 64)  # upscaled, never halved
    assert small.shape == (3, 64, 64) and small[:, 32, 32].tolist() == [9, 99, 199]


def logged_reader(tmp_path):
    """(paths, read, read_files) of 15 JPEGs in ImageNet's layout: read(path) is
    the 8x8 ADM crop, and read_files lists every file read, in order."""
    from PIL import Image
    write_image_folder(tmp_path / "images", per_class=5)
    paths, _, _ = imagenet.image_folder(str(tmp_path / "images"), "train")
    read_files = []

    def read(path):
        read_files.append(path)
        return imagenet.adm_center_crop(Image.open(path), 8)
    return paths, read, read_files


def test_the_encoding_pass_resumes_at_its_first_missing_chunk_with_the_same_result(tmp_path, monkeypatch):
    paths, read, read_files = logged_reader(tmp_path)
    encode = lambda images: {"mean": images.float().mean((1, 2, 3)), "corner": images[:, :, 0, 0]}
    whole = imagenet.encode_files(paths, read, encode, str(tmp_path / "whole"), chunk=6, batch=4, progress=False)
    assert whole["mean"].shape == (15,) and whole["corner"].shape == (15, 3)

    real_save, saved = plumbing.save_atomic, []

    def save_then_die(obj, path, **kwargs):
        real_save(obj, path, **kwargs)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed after its second chunk
    monkeypatch.setattr(plumbing, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        imagenet.encode_files(paths, read, encode, str(tmp_path / "killed"), chunk=6, batch=4, progress=False)
    monkeypatch.setattr(plumbing, "save_atomic", real_save)
    read_files.clear()
    resumed = imagenet.encode_files(paths, read, encode, str(tmp_path / "killed"), chunk=6, batch=4, progress=False)
    assert read_files == paths[12:]  # only the last chunk's files were read again
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_a_chunk_whose_files_changed_is_encoded_again_and_the_rest_kept(tmp_path, monkeypatch):
    paths, read, read_files = logged_reader(tmp_path)
    encode = lambda images: {"mean": images.float().mean((1, 2, 3))}
    root = str(tmp_path / "images")
    records = imagenet.file_records(paths, root)
    imagenet.encode_files(paths, read, encode, str(tmp_path / "chunks"), chunk=6, progress=False, records=records)
    Image.new("RGB", (40, 30), (250, 0, 0)).save(paths[7])  # an image of the second chunk rewritten
    os.utime(paths[7], ns=(1, 1))
    records = imagenet.file_records(paths, root)
    assert imagenet.folder_changes(records, records) == ""
    read_files.clear()
    again = imagenet.encode_files(paths, read, encode, str(tmp_path / "chunks"), chunk=6, progress=False,
                              records=records)
    assert read_files == paths[6:12]  # that chunk alone
    clean = imagenet.encode_files(paths, read, encode, str(tmp_path / "clean"), chunk=6, progress=False)
    assert torch.equal(again["mean"], clean["mean"]) and again["files"] == records


def test_a_file_that_fails_in_the_pass_keeps_what_its_chunk_encoded_before_it(tmp_path):
    paths, read, read_files = logged_reader(tmp_path)
    encode = lambda images: {"mean": images.float().mean((1, 2, 3))}
    records = imagenet.file_records(paths, str(tmp_path / "images"))
    whole = imagenet.encode_files(paths, read, encode, str(tmp_path / "whole"), chunk=6, batch=2, progress=False)

    def fails_once(path):  # the ninth file cannot be read until it is replaced
        if path == paths[8] and paths[8] not in read_files:
            read_files.append(path)
            raise OSError("image file is truncated")
        return read(path)
    read_files.clear()
    with pytest.raises(plumbing.UserError, match=f"{paths[8]} cannot be read .OSError: image file is truncated"):
        imagenet.encode_files(paths, fails_once, encode, str(tmp_path / "failed"), chunk=6, batch=2, progress=False,
                          records=records)
    read_files.clear()
    resumed = imagenet.encode_files(paths, read, encode, str(tmp_path / "failed"), chunk=6, batch=2, progress=False,
                                records=records)
    assert read_files == paths[8:]  # the first chunk and the second's first two files were kept
    assert torch.equal(resumed["mean"], whole["mean"]) and not list((tmp_path / "failed").glob("*.part.pt"))


def test_folder_changes_name_what_was_added_removed_moved_and_changed():
    before = [("train/a/1.JPEG", 10, 1), ("train/a/2.JPEG", 20, 2), ("train/b/3.JPEG", 30, 3), ("val/a/4.JPEG", 40, 4)]
    after = [("train/a/1.JPEG", 11, 1), ("train/b/2.JPEG", 20, 2), ("train/b/5.JPEG", 50, 5)]
    assert imagenet.folder_changes(before, after) == (
        "1 added (train/b/5.JPEG); 2 removed (train/b/3.JPEG, val/a/4.JPEG); "
        "1 moved (train/a/2.JPEG to train/b/2.JPEG); 1 changed (train/a/1.JPEG)")


def test_the_encoding_pass_shares_its_chunks_among_processes_and_rank_0_returns_them_all(tmp_path):
    paths, read, read_files = logged_reader(tmp_path)
    encode = lambda images: {"mean": images.float().mean((1, 2, 3))}
    whole = imagenet.encode_files(paths, read, encode, str(tmp_path / "whole"), chunk=4, progress=False)
    read_files.clear()
    # Rank 1 of 2 first (without torch.distributed there is no barrier to wait at): chunks 1 and 3.
    assert imagenet.encode_files(paths, read, encode, str(tmp_path / "shared"), chunk=4, progress=False,
                             rank=1, world=2) is None
    assert read_files == paths[4:8] + paths[12:]
    shared = imagenet.encode_files(paths, read, encode, str(tmp_path / "shared"), chunk=4, progress=False,
                               rank=0, world=2)
    assert read_files[7:] == paths[:4] + paths[8:12]  # rank 0: chunks 0 and 2, then all of them returned
    assert torch.equal(shared["mean"], whole["mean"])


# -----------------------------------------------------------------------------
# The imagenet preset end to end on a CPU: a folder of JPEGs in ImageNet's layout,
# and the same families of networks at their test sizes (--autoencoder-size,
# --msn-size, --diffusion-size tiny), from weight files in the released layouts.

def write_imagenet_like(root):
    """3 classes of 6 training and 2 val JPEGs (80x72: cropped, not halved), each
    class its own colour under noise; Stable Diffusion's autoencoder and MSN's ViT
    at their test sizes, random weights in the released files' layouts."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c, name in enumerate(("n0a", "n0b", "n0c")):
            os.makedirs(root / "folder" / split / name)
            for i in range(count):
                pixels = np.full((72, 80, 3), 20.0)
                pixels[..., c] = 200
                pixels = (pixels + rng.integers(0, 50, pixels.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "folder" / split / name / f"{name}_{i}.JPEG")
    torch.manual_seed(0)
    torch.save(imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES["tiny"]).state_dict(), root / "autoencoder_kl.pth")
    msn = imagenet.MSNViT(56, **imagenet.MSN_SIZES["tiny"])
    weights = {"module." + name: value for name, value in msn.state_dict().items()}
    weights.update({"module.norm.weight": torch.ones(64), "module.norm.bias": torch.zeros(64),
                    "module.fc.weight": torch.zeros(8, 64)})  # in the release, dropped by the loader
    torch.save({"target_encoder": weights}, root / "msn_tiny.pth.tar")


def imagenet_command(root, *extra):
    """dpt.py's and imagenet.py's command at a test size, on write_imagenet_like's files; then `extra`."""
    return [*at_test_size("python dpt.py --dataset imagenet --preset imagenet --autoencoder autoencoder_kl.pth",
                          "--dataset", str(root / "folder"), "--autoencoder", str(root / "autoencoder_kl.pth"),
                          "--autoencoder-size", "tiny", "--msn-size", "tiny", "--msn-weights",
                          str(root / "msn_tiny.pth.tar"), "--image-size", "64", "--diffusion-size", "tiny",
                          "--diffusion-images", "64", "--diffusion-batch", "8", "--diffusion-warmup", "8",
                          "--sample-per-class", "2", "--sample-steps", "2")[1:], *extra]


def test_the_imagenet_preset_runs_end_to_end_on_a_folder_of_jpegs(imagenet_run):
    root, run = imagenet_run
    config = configuration.DPTConfig(**{**json.loads((run / "config.json").read_text()), "dataset": str(root / "folder")})
    autoencoder = imagenet.load_autoencoder(str(root / "autoencoder_kl.pth"), "tiny")
    msn = imagenet.load_msn("tiny", 56, str(root / "msn_tiny.pth.tar"))
    dataset = imagenet.load_folder(str(root / "folder"))
    # Encoding: every file once, as the networks see its ADM crop; the mirror its own latent.
    encoded = torch.load(run / "encoded.pt")
    crops = torch.stack([imagenet.read_image(config, file) for file in dataset.train_files])
    x = crops.float() / 127.5 - 1
    for name, images in (("latents", x), ("flipped", x.flip(3))):
        expected = autoencoder.encode(images)[0] * imagenet.LATENT_SCALE * unet.SIGMA_DATA
        assert encoded["train"][name].dtype == torch.float16 and encoded["train"][name].shape == (18, 4, 8, 8)
        torch.testing.assert_close(encoded["train"][name].float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(encoded["train"]["features"], imagenet.msn_features(msn, crops))
    assert encoded["test"]["features"].shape == (6, 64) and set(encoded["test"]) == {"features", "files"}
    assert not (run / "encoded").exists()  # the chunks, once joined
    # Stage 1: the probe on the 3 labeled images' features; the pseudo labels are its argmax.
    split = torch.load(run / "split.pt")["indices"]
    stage1 = torch.load(run / "stage1" / "probe.pt")
    assert stage1["metrics"]["images"] == 3 and dataset.train_y[split].tolist() == [0, 1, 2]
    assert torch.equal(torch.load(run / "pseudo_labels.pt")["labels"],
                       imagenet.probe_predict(stage1["weights"], encoded["train"]["features"])[0])
    # Stage 2 on latents; the samples decoded to images, their features MSN's of those images.
    diffusion = torch.load(run / "stage2" / "diffusion.pt", weights_only=False)
    assert (diffusion["channels"], diffusion["resolution"], diffusion["config"]["arch"]) == (4, 8, "uvit")
    decode = lambda latents: imagenet.decode_latents(autoencoder, latents)  # what the autoencoder alone makes of them
    torch.testing.assert_close(decode(encoded["train"]["latents"][:4]),
                               autoencoder.decode(autoencoder.encode(x[:4])[0] * imagenet.LATENT_SCALE), atol=2e-3,
                               rtol=0)
    samples = torch.load(run / "samples.pt")
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (6, 3, 64, 64)
    again, _ = sample.generate(unet.load_diffusion(run / "stage2" / "diffusion.pt"), 2, "dpmpp", 2, guidance=1.4,
                               decode=decode, progress=False)
    assert torch.equal(again, samples["images"])  # the diffusion model's samples, decoded
    torch.testing.assert_close(samples["features"], imagenet.msn_features(msn, samples["images"]))
    # Stage 3: the labeled images' features and the 6 generated ones.
    assert torch.load(run / "stage3" / "probe.pt")["metrics"]["images"] == 3 + 6
    results = json.loads((run / "results.json").read_text())
    for name in ("stage1_accuracy", "stage3_accuracy", "pseudo_label_accuracy", "sample_accuracy",
                 "oracle_sample_accuracy", "oracle_accuracy", "fid"):
        assert results[name] is not None, name
    assert results["preset"] == "imagenet" and results["classes"] == ["n0a", "n0b", "n0c"]
    assert json.loads((run / "fid.json").read_text())["reference_images"] == 18  # the folder's training images
    # The references train on the same latents (few labels: the 3 labeled ones), their samples decoded and seen by
    # MSN; the oracle's features are MSN's, which its probe reads. No classifier baseline: stage 1 is that.
    assert results["baseline_accuracy"] is None and not (run / "baseline").exists()
    oracle = torch.load(run / "oracle.pt")["weights"]
    for name, file in (("few_labels", "few_labels/samples.pt"), ("every_label", "every_label/samples.pt")):
        generated, judged = torch.load(run / file), results["generation"][name]
        torch.testing.assert_close(generated["features"], imagenet.msn_features(msn, generated["images"]))
        right = imagenet.probe_predict(oracle, generated["features"])[0] == generated["labels"]
        assert judged["oracle_share"] == pytest.approx(right.float().mean().item()), name
        expected = fid.feature_metrics(encoded["test"]["features"].float(), generated["features"].float())
        assert {k: judged[k] for k in expected} == pytest.approx(expected) and judged["fid"] is not None, name
    few = torch.load(run / "few_labels" / "diffusion.pt", weights_only=False)
    assert (few["channels"], few["resolution"], few["config"]["arch"]) == (4, 8, "uvit")
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 * 3 and "n0c" in page


def test_the_imagenet_preset_killed_in_every_stage_resumes_to_an_uninterrupted_runs_results(in_process, imagenet_run,
                                                                                             tmp_path):
    root, reference = imagenet_run
    command = imagenet_command(root, "--out", str(tmp_path))
    run = tmp_path / "folder-1l-s0"
    encoding = start_run(*command, stderr=subprocess.PIPE)  # killed as the encoding pass's bar appears
    seen = b""
    while b"encoding:" not in seen and encoding.poll() is None:
        seen += os.read(encoding.stderr.fileno(), 4096)
    encoding.send_signal(signal.SIGKILL)
    encoding.wait()
    assert b"encoding:" in seen and not (run / "encoded.pt").exists()
    for name in ["encoded.pt", "stage1/probe.pt", "stage2/ckpt.pt", "samples.pt", "stage3/probe.pt"]:
        kill_when(start_run(*command), run / name)  # killed the moment each stage's first file appears
    assert not (run / "results.json").exists()
    result = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("encoded.pt", "pseudo_labels.pt", "samples.pt", "stage1/probe.pt", "stage3/probe.pt", "oracle.pt"):
        ours, theirs = torch.load(run / name), torch.load(reference / name)
        flat = lambda tree: {k: v for k, v in tree.items()} if isinstance(tree, dict) else tree
        for key, value in flat(theirs).items():
            if torch.is_tensor(value):
                assert torch.equal(ours[key], value), (name, key)
            elif isinstance(value, dict):
                assert all(torch.equal(ours[key][k], v) for k, v in value.items() if torch.is_tensor(v)), (name, key)
    ours, theirs = (torch.load(folder / "stage2" / "diffusion.pt")["model"] for folder in (run, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


class MeanColourInception(torch.nn.Module):
    """A stand-in for Inception where which images FID measures is the claim, not
    their features: 2048 features and 1008 logits, each a fixed mix of an image's
    three mean colours."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(3, 2048 + 1008)

    def forward(self, images):
        out = self.mix(images.float().mean((2, 3)))
        return out[:, :2048], out[:, 2048:]


def test_imagenet_fid_takes_50_samples_a_class_against_reference_statistics_and_adms_by_default(
        tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    inception = MeanColourInception()
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: inception)
    images = torch.randint(0, 256, (2 * 51, 3, 16, 16), dtype=torch.uint8)  # 51 a class: 50 of each count
    samples = {"images": images, "labels": torch.arange(2).repeat_interleave(51)}
    reference = fid.statistics(inception, torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8).split(8))
    fid.save_stats(reference, str(tmp_path / "reference.npz"))
    dataset = data.Dataset("folder", None, torch.zeros(2, dtype=torch.long), None, None, 2)
    config = configuration.DPTConfig(dataset=str(tmp_path), preset="imagenet",
                                     fid_stats=str(tmp_path / "reference.npz"))
    score = dpt.stage_fid(config, str(tmp_path), dataset, {"dpt": (samples, str(tmp_path / "fid.json"))},
                          torch.device("cpu"), 0, 1)["dpt"]
    first_50 = images.unflatten(0, (2, 51))[:, :50].flatten(0, 1)
    generated = fid.statistics(inception, first_50.split(50))
    assert score["generated_images"] == 100 and score["reference_images"] is None
    assert score["fid"] == pytest.approx(fid.frechet_distance(generated["mu"], generated["sigma"], reference["mu"],
                                                              reference["sigma"]), rel=1e-6)
    # --dataset imagenet without --fid-stats: ADM's statistics, downloaded once; offline, a notice naming them.
    def offline(url, path, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    config = configuration.DPTConfig(dataset="imagenet", preset="imagenet")
    assert dpt.stage_fid(config, str(tmp_path / "run"), dataset, {"dpt": (samples, str(tmp_path / "run" / "fid.json"))},
                         torch.device("cpu"), 0, 1) == {"dpt": None}
    notice = capsys.readouterr().err
    assert "FID skipped" in notice and fid.ADM_IMAGENET256 in notice
    assert str(tmp_path / "hub" / "checkpoints" / "VIRTUAL_imagenet256_labeled.npz") in notice


def test_the_imagenet_preset_under_torchrun_encodes_and_fits_as_one_process_does(imagenet_run, tmp_path):
    root, reference = imagenet_run
    result = run_script(*TORCHRUN, "dpt.py",
                        *imagenet_command(root, "--out", str(tmp_path)), DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("stage 3: with generated images") == 1  # one rank reports
    run = tmp_path / "folder-1l-s0"
    ours, theirs = torch.load(run / "encoded.pt"), torch.load(reference / "encoded.pt")
    assert ours["train"].pop("files") == theirs["train"].pop("files")
    assert all(torch.equal(ours["train"][k], theirs["train"][k]) for k in theirs["train"])
    pseudo = [torch.load(folder / "pseudo_labels.pt")["labels"] for folder in (run, reference)]
    assert torch.equal(*pseudo)
    samples = torch.load(run / "samples.pt")
    assert samples["images"].shape == (6, 3, 64, 64) and samples["features"].shape == (6, 64)
    msn = imagenet.load_msn("tiny", 56, str(root / "msn_tiny.pth.tar"))  # each rank saw its share: back in order
    torch.testing.assert_close(samples["features"], imagenet.msn_features(msn, samples["images"]))


@pytest.mark.parametrize("case", ["a folder with the tiny preset", "shapes with the imagenet preset",
                                  "no autoencoder", "a crop MSN cannot patch", "a side MSN was not released for",
                                  "a label subset of another folder",
                                  "no train folder",
                                  "a val class the training images lack", "an imagenet flag on shapes",
                                  "redo encode on shapes"])
def test_the_imagenet_preset_refuses_bad_input_in_one_line_before_any_work(tmp_path, case, monkeypatch, capsys):
    write_imagenet_like(tmp_path)
    os.makedirs(tmp_path / "empty" / "val")
    os.makedirs(tmp_path / "folder" / "val" / "n0z")
    Image.new("RGB", (64, 64)).save(tmp_path / "folder" / "val" / "n0z" / "x.JPEG")
    good = imagenet_command(tmp_path)
    without = lambda flag: [arg for i, arg in enumerate(good) if flag not in (arg, good[i - 1])]
    argv, words = {
        "a folder with the tiny preset": (["--dataset", str(tmp_path / "folder"), "--preset", "tiny"],
                                          "needs --preset imagenet"),
        "shapes with the imagenet preset": (["--dataset", "shapes", "--preset", "imagenet"], "ImageNet's layout"),
        "no autoencoder": (without("--autoencoder"), "--autoencoder PATH"),
        "a crop MSN cannot patch": (good + ["--image-size", "48"], "--image-size 48"),
        "a side MSN was not released for": (good + ["--msn-size", "vitl7"], "--image-size 64"),
        "a label subset of another folder": (good + ["--label-subset", str(tmp_path / "subset.txt")], "n0q_1.JPEG"),
        "no train folder": (good + ["--dataset", str(tmp_path / "empty")], "no train/ folder"),
        "a val class the training images lack": (good, "n0z"),
        "an imagenet flag on shapes": (["--dataset", "shapes", "--preset", "tiny", "--image-size", "128"],
                                       "--image-size is for"),
        "redo encode on shapes": (["--dataset", "shapes", "--preset", "tiny", "--redo", "encode"],
                                  "--redo encode is for")}[case]
    (tmp_path / "subset.txt").write_text("n0q_1.JPEG\n")
    if case != "a val class the training images lack":
        shutil.rmtree(tmp_path / "folder" / "val" / "n0z")
    monkeypatch.setattr(sys, "argv", ["dpt.py", *argv, "--out", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as exit:
        plumbing.run_main(dpt.main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing written


# DPT's official ImageNet 256x256 code for U-ViT-L/2 (ML-GSAI/DPT's accelerate_*_large.py configs, on
# U-ViT's train_ldm.py): SD latents, batch 1024 for 300k steps, AdamW lr 2e-4 after 5k warm-up steps,
# EMA 0.9999 a step, label dropout 0.15; 50 evaluations of DPM-Solver at scale 0.4 (ours 1 + 0.4), 128
# images a class; MSN ViT-L/7 for one label a class and ViT-B/4 for two (no config for more), the
# probe's lambda 0.0025 / N; latents of 256x256 crops, MSN's features of their 224x224 centres.
PAPER_IMAGENET = {
    "diffusion": dict(arch="uvit", size="large", batch=1024, images=300_000 * 1024, lr=2e-4,
                      warmup=5_000 * 1024, label_dropout=0.15, augment=0.0),
    "sample": dict(per_class=128, steps=50, guidance=1.4),
    "dpt": dict(image_size=256, autoencoder_size="sd", probe_lambda=0.0025)}


def test_the_imagenet_preset_gives_each_stage_the_official_u_vit_l2_recipe(monkeypatch):
    for labels, msn in ((1, "vitl7"), (2, "vitb4"), (5, "vitb4")):
        config = configuration.DPTConfig(dataset="imagenet", preset="imagenet", labels=labels)
        configuration.resolve(config)
        assert config.msn_size == msn
    diffusion, sampling = configuration.diffusion_settings(config)[0], configuration.sample_settings(config)[0]
    for settings, recipe in ((diffusion, "diffusion"), (sampling, "sample"), (config, "dpt")):
        assert {k: getattr(settings, k) for k in PAPER_IMAGENET[recipe]} == PAPER_IMAGENET[recipe], recipe
    assert 0.5 ** (diffusion.batch / diffusion.ema_halflife) == pytest.approx(0.9999, abs=1e-9)  # a step's EMA
    large = unet.SIZES["uvit"]["large"]
    assert (large["width"], large["depth"], large["heads"], large["patch"]) == (1024, 20, 16, 2)
    assert imagenet.msn_crop(256) == 224  # MSN's Resize(256), CenterCrop(224)
    # SD's latent scale: the posterior's mean times 0.18215 (then EDM's sigma_data 0.5)
    stub = torch.nn.Linear(1, 1)
    stub.encode = lambda x: (x[:, :1, ::8, ::8] + 2, None)  # a mean that a wrong scale would show
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    latents, mirrored = imagenet.encode_latents(stub, images)
    x = images.float() / 127.5 - 1
    torch.testing.assert_close(latents.float(), ((x[:, :1, ::8, ::8] + 2) * 0.18215 * 0.5).half().float())
    torch.testing.assert_close(mirrored.float(), ((x.flip(3)[:, :1, ::8, ::8] + 2) * 0.18215 * 0.5).half().float())
    # the probe's penalty: lambda / N, N the images it is fit on (cyanure's mean loss + lambda/2 |W|^2)
    penalties = []
    monkeypatch.setattr(imagenet, "fit_probe", lambda features, labels, classes, lambd: penalties.append(lambd) or
                        torch.zeros(classes, features.shape[1] + 1, dtype=torch.float64))
    for count in (10, 40):
        imagenet.train_probe(torch.randn(count, 6), torch.arange(count) % 2, 2, config.probe_lambda)
    assert penalties == [pytest.approx(0.0025 / 10), pytest.approx(0.0025 / 40)]


@pytest.mark.parametrize("damaged", ["encoded.pt", "stage1/probe.pt", "oracle.pt"])
def test_a_damaged_imagenet_artifact_is_one_line_whose_advice_followed_literally_finishes_the_run(in_process,
        imagenet_run, tmp_path, damaged):
    root, reference = imagenet_run
    run = tmp_path / "folder-1l-s0"
    shutil.copytree(reference, run)
    (run / damaged).write_bytes(b"half a file")
    command = imagenet_command(root, "--out", str(tmp_path))
    refused = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(refused, damaged)
    if damaged == "encoded.pt":  # it records the files it encoded: made again by its stage, with all after it
        command += ["--redo", re.search(r"--redo (\w+)", refused.stderr).group(1)]
    else:  # a probe is fit again alone
        assert "remove it and run the same command again" in refused.stderr
        (run / damaged).unlink()
    finished = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (run / "results.json").exists() and ("encoding" in finished.stderr) == (damaged == "encoded.pt")


@pytest.mark.parametrize("change", ["a training image moved to another class", "a val image removed"])
def test_a_folder_changed_under_its_encodings_is_refused_and_the_advised_redo_encodes_it_again(in_process,
        imagenet_run, tmp_path, change):
    root, reference = imagenet_run
    shutil.copytree(root / "folder", tmp_path / "folder")
    shutil.copytree(reference, tmp_path / "out" / "folder-1l-s0")
    command = imagenet_command(root, "--out", str(tmp_path / "out"), "--dataset", str(tmp_path / "folder"))
    folder = tmp_path / "folder"
    if change == "a val image removed":
        os.remove(folder / "val" / "n0b" / "n0b_1.JPEG")
        words = "1 removed (val/n0b/n0b_1.JPEG)"
    else:
        shutil.move(folder / "train" / "n0a" / "n0a_3.JPEG", folder / "train" / "n0c" / "n0a_3.JPEG")
        words = "1 moved (train/n0a/n0a_3.JPEG to train/n0c/n0a_3.JPEG)"
    refused = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(refused, words, "--redo encode")
    finished = in_process("dpt.py", *command, "--redo", "encode", DPT_FID_WEIGHTS="/missing")
    assert finished.returncode == 0, finished.stderr[-3000:]
    run = tmp_path / "out" / "folder-1l-s0"
    encoded = torch.load(run / "encoded.pt", weights_only=True)
    dataset = imagenet.load_folder(str(folder))
    assert encoded["train"]["files"] == imagenet.file_records(dataset.train_files, str(folder))
    assert len(encoded["test"]["features"]) == len(dataset.test_files)
    assert (run / "results.json").exists()


def test_unreadable_images_are_named_in_one_line_before_any_encoding(in_process, tmp_path):
    write_imagenet_like(tmp_path)
    train = tmp_path / "folder" / "train"
    (train / "n0a" / "empty.JPEG").write_bytes(b"")
    (train / "n0b" / "notes.JPEG").write_text("not an image")
    os.symlink(tmp_path / "gone.JPEG", train / "n0c" / "gone.JPEG")
    result = in_process("dpt.py", *imagenet_command(tmp_path, "--out", str(tmp_path / "out")),
                        DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(result, "3 of 27 images cannot be opened", "empty.JPEG", "notes.JPEG", "gone.JPEG",
                          "--skip-bad-images")
    assert not (tmp_path / "out").exists()
    result = in_process("dpt.py", *imagenet_command(tmp_path, "--out", str(tmp_path / "out"), "--skip-bad-images"),
                        DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"unreadable images left out \(--skip-bad-images\)\s+3\n", result.stdout), result.stdout
    run = tmp_path / "out" / "folder-1l-s0"
    assert json.loads((run / "results.json").read_text())["skipped_images"] == 3
    assert len(torch.load(run / "encoded.pt", weights_only=True)["train"]["files"]) == 18  # the readable ones


def test_an_image_that_fails_only_when_decoded_is_named_in_one_line(in_process, tmp_path):
    write_imagenet_like(tmp_path)
    image = tmp_path / "folder" / "train" / "n0b" / "n0b_2.JPEG"
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) * 2 // 3])  # its header and two thirds of its pixels: it opens
    result = in_process("dpt.py", *imagenet_command(tmp_path, "--out", str(tmp_path / "out")),
                        DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == result.stderr.splitlines()[-1:], result.stderr  # after the progress bar, one line
    assert errors[0].startswith(f"error: {image} cannot be read") and "truncated" in errors[0]


def test_classes_are_the_folders_that_hold_images_at_any_depth_and_never_hidden_ones(tmp_path, capsys):
    write_image_folder(tmp_path, per_class=2)
    train = tmp_path / "train"
    os.makedirs(train / ".ipynb_checkpoints")
    Image.new("RGB", (8, 8)).save(train / ".ipynb_checkpoints" / "x.JPEG")
    Image.new("RGB", (8, 8)).save(train / "n01" / "._x.JPEG")  # macOS's metadata beside a file
    os.makedirs(train / "n02" / "more")
    Image.new("RGB", (8, 8)).save(train / "n02" / "more" / "deeper.png")
    dataset = imagenet.load_folder(str(tmp_path))
    assert dataset.classes == ("n00", "n01", "n02") and torch.bincount(dataset.train_y).tolist() == [2, 2, 3]
    assert str(train / "n02" / "more" / "deeper.png") in dataset.train_files
    assert "has no val/ folder: no accuracy can be measured" in capsys.readouterr().err
    os.makedirs(train / "n03")
    (train / "n03" / "only.txt").write_text("a note")
    with pytest.raises(plumbing.UserError, match=r"train/n03 holds no image \(.jpeg, .jpg, .png, .webp"):
        imagenet.load_folder(str(tmp_path))


@pytest.mark.parametrize("link", ["a loop to the split", "a class linked into another", "an image in two classes"])
def test_a_folder_holds_each_image_once_and_a_link_that_repeats_one_is_refused_naming_it(tmp_path, link):
    """os.walk follows a link back up without noticing: 12 images read as 492 once."""
    write_image_folder(tmp_path, per_class=2)
    train = tmp_path / "train"
    os.makedirs(tmp_path / "elsewhere" / "more")  # a link out of the folder is followed: one more image
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "more" / "far.png")
    os.symlink(tmp_path / "elsewhere" / "more", train / "n01" / "more")
    dataset = imagenet.load_folder(str(tmp_path))
    assert torch.bincount(dataset.train_y).tolist() == [2, 3, 2]
    linked, target = {"a loop to the split": (train / "n00" / "loop", ".."),
                      "a class linked into another": (train / "n02" / "n00", train / "n00"),
                      "an image in two classes": (train / "n02" / "twice.png", train / "n00" / "n00_0.JPEG")}[link]
    os.symlink(target, linked)
    with pytest.raises(plumbing.UserError) as refusal:
        imagenet.load_folder(str(tmp_path))
    assert "(a link)" in str(refusal.value) and "\n" not in str(refusal.value)
    assert str(linked) in str(refusal.value) or str(target) in str(refusal.value), refusal.value


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
        crop = imagenet.adm_center_crop(image, 16)
    expected = torch.from_numpy(np.round(levels / 257).astype(np.uint8))
    assert all(torch.equal(channel, expected) for channel in crop)


INPUT_REFUSALS = {  # a finished imagenet-preset run, then its command with a file replaced or these flags
    "the autoencoder replaced under its name": ("autoencoder", [], "other settings (autoencoder); add --redo encode"),
    "MSN's weights replaced under their name": ("msn", [], "other settings (msn_weights); add --redo encode"),
    "--redo sample, the autoencoder MSN's file": ("autoencoder", ["--redo", "sample"], "--redo encode"),
    "--redo encode, MSN's weights the autoencoder's file": ("msn", ["--redo", "encode"], "is not MSN's tiny"),
    "--redo stage1, a training image removed": ("folder", ["--redo", "stage1"], "1 removed (train/n0a/n0a_3.JPEG)"),
}


@pytest.mark.parametrize("case", INPUT_REFUSALS)
def test_the_imagenet_presets_input_files_are_known_by_contents_and_a_refusal_removes_nothing(
        imagenet_run, tmp_path, case, monkeypatch):
    """Each network file is a setting of the encoding by what it holds (another file
    of the same name encodes otherwise), and the networks a redo will load are
    loaded before it removes anything."""
    root, reference = imagenet_run
    replaced, flags, words = INPUT_REFUSALS[case]
    run = tmp_path / "folder-1l-s0"
    shutil.copytree(reference, run)
    files = {"autoencoder": tmp_path / "autoencoder_kl.pth", "msn": tmp_path / "msn.pth.tar",
             "folder": tmp_path / "folder"}
    shutil.copy(root / "autoencoder_kl.pth", files["autoencoder"])
    shutil.copy(root / "msn_tiny.pth.tar", files["msn"])
    shutil.copytree(root / "folder", files["folder"])
    command = imagenet_command(root, "--out", str(tmp_path), *flags, "--autoencoder", str(files["autoencoder"]),
                               "--msn-weights", str(files["msn"]), "--dataset", str(files["folder"]))
    if case.endswith("under its name") or case.endswith("under their name"):
        torch.manual_seed(1)  # other weights of the same network, written where the first were
        if replaced == "autoencoder":
            torch.save(imagenet.AutoencoderKL(**imagenet.AUTOENCODER_SIZES["tiny"]).state_dict(), files["autoencoder"])
        else:
            weights = torch.load(files["msn"], weights_only=True)
            weights["target_encoder"] = {name: torch.randn_like(value)
                                         for name, value in weights["target_encoder"].items()}
            torch.save(weights, files["msn"])
    elif replaced == "folder":
        os.remove(files["folder"] / "train" / "n0a" / "n0a_3.JPEG")
    else:  # the other network's file
        shutil.copy(root / ("msn_tiny.pth.tar" if replaced == "autoencoder" else "autoencoder_kl.pth"),
                    files[replaced])
    monkeypatch.setenv("DPT_FID_WEIGHTS", "/missing")
    monkeypatch.setattr(sys, "argv", ["dpt.py", *command])
    before = folder_state(run)
    with pytest.raises(plumbing.UserError, match=re.escape(words)):
        dpt.main()
    assert folder_state(run) == before


def test_a_label_subset_edited_after_a_run_is_refused_and_its_redo_is_a_fresh_run(in_process, imagenet_run, tmp_path):
    """The subset file is a setting of the split by what it holds, not by its path."""
    root, reference = imagenet_run
    subset = tmp_path / "1imgs_class.txt"
    subset.write_text("n0a_0.JPEG\nn0b_0.JPEG\nn0c_0.JPEG\n")
    shutil.copytree(reference, tmp_path / "redone" / "folder-1l-s0")
    command = imagenet_command(root, "--label-subset", str(subset))
    first = in_process("dpt.py", *command, "--out", str(tmp_path / "redone"), "--redo", "stage1",
                       DPT_FID_WEIGHTS="/missing")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "redone" / "folder-1l-s0"
    before = folder_state(run)
    subset.write_text("n0a_4.JPEG\nn0b_2.JPEG\nn0c_5.JPEG\n")  # edited: the same path, other images
    refused = in_process("dpt.py", *command, "--out", str(tmp_path / "redone"), DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(refused, "other settings (label_subset)", "--redo stage1")
    assert folder_state(run) == before
    redone = in_process("dpt.py", *command, "--out", str(tmp_path / "redone"), "--redo", "stage1",
                        DPT_FID_WEIGHTS="/missing")
    fresh = in_process("dpt.py", *command, "--out", str(tmp_path / "fresh"), DPT_FID_WEIGHTS="/missing")
    assert redone.returncode == 0 and fresh.returncode == 0, redone.stderr[-2000:] + fresh.stderr[-2000:]
    names = lambda folder: sorted(os.path.basename(imagenet.load_folder(str(root / "folder")).train_files[i])
                                  for i in torch.load(folder / "split.pt", weights_only=True)["indices"])
    assert names(run) == names(tmp_path / "fresh" / "folder-1l-s0") == ["n0a_4.JPEG", "n0b_2.JPEG", "n0c_5.JPEG"]
    results = [json.loads((folder / "results.json").read_text()) for folder in (run, tmp_path / "fresh" /
                                                                                "folder-1l-s0")]
    for key in ("stage1_accuracy", "pseudo_label_accuracy", "stage3_accuracy", "sample_accuracy", "generation"):
        assert results[0][key] == results[1][key], key


def test_a_label_subset_file_names_the_labeled_images_as_msns_do(tmp_path):
    write_imagenet_like(tmp_path)
    dataset = imagenet.load_folder(str(tmp_path / "folder"))
    subset = tmp_path / "1imgs_class.txt"
    subset.write_text("n0c_4.JPEG\nn0a_2.JPEG\nn0b_0.JPEG\n")  # MSN's layout: a file name a line
    config = configuration.DPTConfig(dataset=str(tmp_path / "folder"), preset="imagenet", label_subset=str(subset))
    index = dpt.labeled_split(config, dataset)
    assert [os.path.basename(dataset.train_files[i]) for i in index] == ["n0a_2.JPEG", "n0b_0.JPEG", "n0c_4.JPEG"]
    for text, words in (("n0a_2.JPEG\nn0b_0.JPEG\nn0z_1.JPEG\n", "n0z_1.JPEG"),  # not in this folder
                        ("n0a_2.JPEG\nn0a_3.JPEG\nn0b_0.JPEG\nn0c_4.JPEG\n", "not --labels 1")):  # two of n0a
        subset.write_text(text)
        with pytest.raises(plumbing.UserError, match=words):
            dpt.labeled_split(config, dataset)


def test_a_label_subset_matches_class_and_file_and_refuses_repeats_and_names_several_classes_hold(tmp_path):
    for c in ("n0a", "n0b"):  # every class names its files 0.JPEG, 1.JPEG
        os.makedirs(tmp_path / "folder" / "train" / c)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "train" / c / f"{i}.JPEG")
    dataset = imagenet.load_folder(str(tmp_path / "folder"))
    subset = tmp_path / "subset.txt"
    config = configuration.DPTConfig(dataset=str(tmp_path / "folder"), preset="imagenet", label_subset=str(subset))
    subset.write_text("n0b/0.JPEG\nn0a/1.JPEG\n")
    assert [dataset.train_files[i][-10:] for i in dpt.labeled_split(config, dataset)] == ["n0a/1.JPEG", "n0b/0.JPEG"]
    for text, words in (("0.JPEG\nn0b/1.JPEG\n", "names 0.JPEG, a file name that 2 classes hold; write its lines as "
                                                 "CLASS/FILE"),
                        ("n0a/1.JPEG\nn0a/1.JPEG\nn0b/0.JPEG\n", "names n0a/1.JPEG more than once"),
                        ("n0a/9.JPEG\nn0b/0.JPEG\n", "1 of its images are not among the training images (e.g. n0a/9"),
                        ("n0a/0.JPEG\nn0a/1.JPEG\n", "names 0 to 2 images a class, not --labels 1")):
        subset.write_text(text)
        with pytest.raises(plumbing.UserError, match=re.escape(words)):
            dpt.labeled_split(config, dataset)


def test_the_imagenet_bench_times_each_stage_and_projects_the_preset():
    result = run_script(*at_test_size("python dpt.py --bench --preset imagenet", "--autoencoder-size", "tiny",
                                      "--msn-size", "tiny", "--image-size", "64", "--diffusion-size", "tiny"),
                        OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    for words in ("encoding tiny + tiny at 64", "U-ViT tiny training, batch 2", "decoding tiny to 64",
                  "sampling with decoding, 50 DPM-Solver++ steps", "imagenet preset here"):
        assert words in result.stdout, (words, result.stdout)


# =============================================================================
# sample.py: noise levels, samplers and guidance, on denoisers known in closed form


# -----------------------------------------------------------------------------
# Data with exact denoisers


def gaussian_denoiser(mean, std):
    """D(x; sigma) = E[x_0 | x] for x_0 ~ N(mean, std^2) in every pixel and x = x_0 + sigma n."""
    return lambda x, sigma, labels: mean + std ** 2 / (std ** 2 + sigma ** 2) * (x - mean)


def exact_flow(x_T, mean, std, sigma_max=80.0):
    """The probability-flow ODE of that Gaussian, dx/dsigma = sigma (x - mean) / (std^2 + sigma^2),
    keeps (x - mean) / sqrt(std^2 + sigma^2) constant, so at sigma = 0 it has taken x_T to this."""
    return mean + std / math.sqrt(std ** 2 + sigma_max ** 2) * (x_T - mean)


class GaussianClasses(torch.nn.Module):
    """A stand-in for unet.EDMPrecond: class c has every pixel drawn from
    N(means[c], stds[c]^2) and makes up prior[c] of the data. D(x; sigma, c) is
    that Gaussian's denoiser; the null label's D is the unconditional one,
    the same denoisers weighted by the posterior p(c | x) of x = x_0 + sigma n.
    Every forward's labels are kept in `calls`."""

    def __init__(self, means=(-0.7, 0.3), stds=(0.3, 0.15), prior=(0.3, 0.7), resolution=4):
        super().__init__()
        self.means, self.stds, self.prior = (torch.tensor(v, dtype=torch.float64) for v in (means, stds, prior))
        self.num_classes, self.channels, self.resolution, self.sigma_data = len(means), 3, resolution, 0.5
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # places the model on a device, as a network's weights do
        self.label_dropout = 0.1  # its null class is known, so it can be guided
        self.calls = []

    def forward(self, x, sigma, class_labels):
        self.calls.append(class_labels.clone())
        pixels = x.double().flatten(1)[:, None, :]                                # [N, 1, d]
        means, variance = self.means[None, :, None], (self.stds ** 2 + sigma.double()[:, None] ** 2)[..., None]
        per_class = means + self.stds[None, :, None] ** 2 / variance * (pixels - means)  # [N, C, d]
        log_likelihood = (-(pixels - means) ** 2 / (2 * variance) - variance.log() / 2).sum(-1)    # [N, C]
        log_posterior = self.prior.log() + log_likelihood
        own_class = torch.nn.functional.one_hot(class_labels.clamp(max=self.num_classes - 1), self.num_classes)
        weights = torch.where((class_labels == self.num_classes)[:, None], log_posterior.softmax(1), own_class)
        return (weights[..., None] * per_class).sum(1).view_as(x).to(x.dtype)


def run(sampler, denoise, labels, steps, seed=0, resolution=4):
    """(x at sigma = 0, x_T) of a sampler started from RGB noise, one image per label."""
    noise = torch.randn(len(labels), 3, resolution, resolution, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    sigmas = sample.noise_levels(steps).tolist()
    return getattr(sample, sampler)(denoise, sigmas[0] * noise, labels, sigmas), sigmas[0] * noise


# -----------------------------------------------------------------------------
# Noise levels and samplers


def test_noise_levels_fall_from_80_to_0_002_evenly_in_sigma_to_the_1_over_7_then_reach_0():
    sigmas = sample.noise_levels(18)
    assert len(sigmas) == 19 and sigmas.dtype == torch.float64
    assert sigmas[0] == pytest.approx(80) and sigmas[17] == pytest.approx(0.002) and sigmas[18] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    steps = (sigmas[:-1] ** (1 / 7)).diff()  # rho = 7 (Karras et al. 2022, eq. 5)
    assert torch.allclose(steps, steps[0].expand(17), rtol=1e-9)


# Each sampler's answer for a Gaussian is mean + g (x_T - mean) with one number g,
# so its relative error is the same for every pixel of every sample: measured
# here against the exact flow (float64 throughout, so rounding is ~1e-15).
def relative_error(sampler, steps, mean=0.3, std=0.5):
    x, x_T = run(sampler, gaussian_denoiser(mean, std), torch.zeros(4), steps)
    exact = exact_flow(x_T, mean, std)
    return ((x - exact).abs().max() / (exact - mean).abs().max()).item()


@pytest.mark.parametrize("sampler, steps", [("heun", 100), ("dpmpp", 100), ("euler", 2000)])
def test_every_sampler_maps_each_noise_to_the_exact_probability_flow_solution_of_a_gaussian(sampler, steps):
    # Measured errors: heun and dpmpp 1.5e-3 at 100 steps, euler 1.5e-3 at 2000
    # (Heun with 18 steps is 5.5% off on this Gaussian, Euler with 100 steps 2.8%).
    assert relative_error(sampler, steps) < 3e-3


@pytest.mark.parametrize("sampler, order", [("heun", 2), ("dpmpp", 2), ("euler", 1)])
def test_heun_and_dpmpp_are_second_order_and_euler_first_order(sampler, order):
    # Doubling the steps divides the error by 2^order; measured 2.08 (heun),
    # 2.13 (dpmpp), 0.99 (euler) from 40 to 80 steps. A first-order step inside
    # a second-order method (a wrong correction or extrapolation) drops it to ~1.
    measured = math.log2(relative_error(sampler, 40) / relative_error(sampler, 80))
    assert abs(measured - order) < 0.3


# Per class: 200 images x 48 pixels = 9,600 values, so the sample variance is
# off by sqrt(2 / 9,600) = 1.4% (one standard deviation) and the mean by
# std / sqrt(9,600) = 0.01 std; the tolerances are 4 standard deviations plus
# the discretisation error of the steps used: at most 2.0e-3 of each image's
# distance to the mean for these two stds (measured), 0.5% in the variance.
@pytest.mark.parametrize("sampler, steps", [("heun", 100), ("dpmpp", 100), ("euler", 2000)])
def test_conditional_sampling_draws_each_class_from_its_own_gaussian(sampler, steps, one_thread):
    model = GaussianClasses()
    labels = torch.arange(2).repeat_interleave(200)
    x, x_T = run(sampler, sample.guided(model, 1.0), labels, steps)
    for c in range(2):
        mean, std = model.means[c].item(), model.stds[c].item()
        exact = exact_flow(x_T[labels == c], mean, std)  # every image follows its own class's flow
        assert (x[labels == c] - exact).abs().max() < 3e-3 * (exact - mean).abs().max()
        # The sampler starts from N(0, 80^2) where the data blurred to sigma = 80 is
        # N(mean, std^2 + 80^2): the exact flow then ends at mean (1 - std / sqrt(std^2 + 80^2)).
        expected_mean = mean * (1 - std / math.sqrt(std ** 2 + 80 ** 2))
        assert abs(x[labels == c].mean().item() - expected_mean) < 4 * 0.01 * std
        assert x[labels == c].var().item() / std ** 2 == pytest.approx(1, abs=4 * 0.014 + 0.005)


def test_unconditional_sampling_with_guidance_0_draws_the_mixture_in_its_proportions(one_thread):
    # The means and prior give the mixture mean 0, the mean of the starting
    # noise, so the classes' shares are not biased by the start. 4000 images:
    # the share of class 1 (0.7) has standard deviation sqrt(0.21 / 4000) = 0.0072;
    # tolerance 4 of them. Within a class, at least 1100 images x 48 pixels:
    # the variance is off by sqrt(2 / 52,800) = 0.62% (one standard deviation),
    # the mean by 0.0044 std; tolerances 4 of them, plus 0.5% from 100 Heun steps.
    model = GaussianClasses()
    labels = torch.zeros(4000, dtype=torch.long)  # ignored: guidance 0 keeps only the null label's D
    x, _ = run("heun", sample.guided(model, 0.0), labels, 100)
    nearest = (x.flatten(1).mean(1) > -0.2).long()  # image means of the classes: -0.7 and 0.3, each +- 0.05
    assert nearest.float().mean().item() == pytest.approx(0.7, abs=4 * 0.0072)
    for c in range(2):
        mean, std = model.means[c].item(), model.stds[c].item()
        assert abs(x[nearest == c].mean().item() - mean) < 4 * 0.0044 * std
        assert x[nearest == c].var().item() / std ** 2 == pytest.approx(1, abs=4 * 0.0062 + 0.005)


# -----------------------------------------------------------------------------
# Classifier-free guidance


def test_guidance_1_is_the_conditional_model_alone_with_one_forward_per_evaluation():
    model = GaussianClasses()
    labels = torch.tensor([0, 1, 1])
    x, _ = run("heun", sample.guided(model, 1.0), labels, 18)
    assert len(model.calls) == 35  # 18 Heun steps, the last without correction
    assert all(torch.equal(call, labels) for call in model.calls)  # never the null label
    expected, _ = run("heun", lambda x, sigma, labels: model(x, torch.full((len(x),), sigma), labels), labels, 18)
    assert torch.allclose(x, expected, atol=1e-5)  # the model runs in float32 behind guided()


def test_guidance_other_than_1_runs_the_conditional_and_null_halves_in_one_forward_of_twice_the_batch():
    model = GaussianClasses()
    labels = torch.tensor([0, 1, 1])
    run("dpmpp", sample.guided(model, 3.0), labels, 12)
    assert len(model.calls) == 12
    assert all(torch.equal(call, torch.tensor([0, 1, 1, 2, 2, 2])) for call in model.calls)
    x, sigma = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.full((3,), 1.5)
    guided = sample.guided(model, 3.0)(x, 1.5, labels)
    conditional = model(x.float(), sigma, labels).double()
    unconditional = model(x.float(), sigma, torch.full((3,), 2)).double()
    assert torch.allclose(guided, unconditional + 3 * (conditional - unconditional))


# -----------------------------------------------------------------------------
# generate, grids and the command line


def test_generate_gives_k_uint8_images_per_class_in_class_order_with_int64_labels():
    images, labels = sample.generate(GaussianClasses(), 3, "euler", 4, batch=4, progress=False)
    assert images.shape == (6, 3, 4, 4) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len({image.numpy().tobytes() for image in images}) == 6  # every image from its own noise
    means = images.float().mean((1, 2, 3))
    assert (means[:3] < 128).all() and (means[3:] > 128).all()  # class 0 is darker (-0.7) than class 1 (0.3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_sampling_stays_within_a_few_levels_of_float32(request, device):
    device = request.getfixturevalue("cuda") if device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = unet.make_diffusion("unet", "tiny", 3, 16)
    with torch.no_grad():  # EDM's near-zero last layers moved off zero: an output that depends on its input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(device).eval()
    images = {bf16: sample.generate(model, 4, steps=10, device=device, bf16=bf16, progress=False)[0]
              for bf16 in (False, True)}
    difference = (images[True].float() - images[False].float()).abs()
    assert images[False].float().std() > 30  # images with something in them to compare
    assert 0 < difference.mean() < 1.5 and difference.max() <= 24, (difference.mean(), difference.max())


def test_generate_images_depend_on_the_seed_but_not_on_the_batch_size():
    model = GaussianClasses()
    one, _ = sample.generate(model, 5, "heun", 5, seed=1, batch=10, progress=False)
    other, _ = sample.generate(model, 5, "heun", 5, seed=1, batch=3, progress=False)
    reseeded, _ = sample.generate(model, 5, "heun", 5, seed=2, batch=10, progress=False)
    assert torch.equal(one, other) and not torch.equal(one, reseeded)


@pytest.mark.parametrize("world", [2, 3])  # 10 images: shares of 5 and 5, or of 4, 3 and 3
def test_generate_under_several_processes_gives_every_process_all_images_in_order(monkeypatch, world):
    model = GaussianClasses()
    alone, _ = sample.generate(model, 5, "euler", 3, progress=False)
    shares = {}

    def all_gather(outputs, tensor):  # the ranks run one after the other, the last first; rank 0 sees all shares
        shares[len(outputs) - 1 - len(shares)] = tensor.clone()
        for rank, output in shares.items():
            outputs[rank].copy_(output)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    for rank in reversed(range(world)):
        gathered, labels = sample.generate(model, 5, "euler", 3, rank=rank, world=world, progress=False)
    assert torch.equal(gathered, alone) and labels.tolist() == [0] * 5 + [1] * 5


def test_preview_grid_has_one_row_per_class_and_leaves_the_model_in_training_mode(tmp_path):
    model = GaussianClasses().train()
    sample.preview_grid(model, str(tmp_path / "grid.png"), per_class=3, steps=4)
    assert model.training
    # 4-pixel images are upscaled 16 times; 2 pixels of padding around each
    assert Image.open(tmp_path / "grid.png").size == (3 * 66 + 2, 2 * 66 + 2)


def test_sample_command_saves_k_images_per_class_and_a_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(sample.unet, "load_diffusion", lambda path, device: GaussianClasses())
    monkeypatch.setattr(sys, "argv", ["sample.py", "diffusion.pt", "--per-class", "3", "--solver", "dpmpp",
                                      "--steps", "5", "--guidance", "1.5", "--out", str(tmp_path)])
    sample.main()
    samples = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert samples["images"].shape == (6, 3, 4, 4) and samples["images"].dtype == torch.uint8
    assert samples["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert samples["config"]["solver"] == "dpmpp" and samples["config"]["guidance"] == 1.5
    assert Image.open(tmp_path / "samples.png").size == (3 * 66 + 2, 2 * 66 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock", "samples.png", "samples.pt"]


def test_guidance_is_refused_for_a_diffusion_model_that_never_learned_its_null_class(in_process, tmp_path):
    # dpt.py, before any work: label dropout 0 (the fast and cifar presets) with guidance 3 (tiny's)
    assert_one_line_error(in_process("dpt.py", *QUICK, "--diffusion-label-dropout", "0", "--out", str(tmp_path)),
                          "--sample-guidance 3.0", "--diffusion-label-dropout")
    assert not list(tmp_path.iterdir())
    # sample.py, from the checkpoint's own config
    torch.manual_seed(0)
    model = unet.make_diffusion("unet", "tiny", 10, 32)
    for dropout in (0.0, 0.1):
        unet.save_diffusion(model, unet.DiffusionConfig(size="tiny", label_dropout=dropout), {},
                            str(tmp_path / f"dropout{dropout}.pt"))
    result = in_process("sample.py", str(tmp_path / "dropout0.0.pt"), "--guidance", "2", "--per-class", "1",
                        "--steps", "2", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--guidance 2.0", "without label dropout")
    assert not (tmp_path / "out").exists()
    result = run_script("sample.py", str(tmp_path / "dropout0.1.pt"), "--guidance", "2", "--per-class", "1",
                        "--steps", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("flags, words", [
    (["--per-class", "0"], "--per-class 0"),
    (["--solver", "ddim"], "--solver 'ddim': must be one of heun, euler, dpmpp"),
    (["--steps", "1"], "--steps 1"),
    (["--guidance", "-1"], "--guidance -1.0"),
    (["--batch", "0"], "--batch 0"),
])
def test_sample_refuses_settings_that_cannot_sample(flags, words):
    config = plumbing.parse_config(sample.SampleConfig, "", ["diffusion.pt", *flags])
    with pytest.raises(plumbing.UserError, match=words):
        sample.check(config)


@pytest.mark.parametrize("flags, words", [
    (["--solver", "ddim"], "--solver 'ddim'"),
    ([], "cannot read a diffusion model"),  # the checkpoint does not exist: unet.load_diffusion says so
])
def test_sample_command_refuses_bad_input_with_one_line_and_exit_code_2(in_process, tmp_path, flags, words):
    assert_one_line_error(in_process("sample.py", str(tmp_path / "diffusion.pt"), *flags,
                                     "--out", str(tmp_path / "out")), words)
    assert not (tmp_path / "out").exists()  # bad input writes nothing


# =============================================================================
# fid.py: FID and Inception Score, against pytorch-fid on the same (random) weights


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


def test_fid_weights_load_strictly_into_both_and_pool3_features_agree(pytorch_fid, fid_weights):
    ours = fid.load_inception(fid_weights)  # strict load, then batch norms folded
    theirs = pytorch_fid.InceptionV3([3]).eval()  # strict load into torchvision's Inception3
    x = random_images(6)
    with torch.no_grad():
        our_features, _ = ours(x)
        their_features = theirs(x.float() / 255)[0].flatten(1)
    assert their_features.abs().mean() > 0.1  # the random weights give informative features
    relative = (our_features - their_features).abs().max() / their_features.abs().max()
    assert relative <= 1e-4


def test_fid_of_two_folders_matches_pytorch_fid(pytorch_fid, fid_weights, tmp_path, capsys, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bright = torch.randint(100, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    dark = torch.randint(0, 156, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    folders = [write_pngs(tmp_path / "folder_a", bright), write_pngs(tmp_path / "folder_b", dark)]
    theirs = pytorch_fid.calculate_fid_given_paths(folders, batch_size=6, device="cpu", dims=2048, num_workers=0)
    monkeypatch.chdir(tmp_path)
    fid.main(at_test_size("python fid.py folder_a folder_b --is", "--weights", fid_weights)[1:])
    out = capsys.readouterr().out
    ours = float(out.split("FID")[1])
    assert theirs > 1 and abs(ours - theirs) <= 1e-3 * theirs
    assert 1 <= float(out.split("IS")[1].split()[0]) <= 6  # at most the number of images (a test of its own below)


def test_frechet_distance_matches_pytorch_fid_on_random_gaussians(pytorch_fid):
    rng = np.random.RandomState(0)
    dims = 64
    a, b = rng.randn(dims, dims), rng.randn(dims, dims)
    mu1, mu2, sigma1, sigma2 = (rng.randn(dims), rng.randn(dims),
                                a @ a.T + 0.1 * np.eye(dims), b @ b.T + 0.1 * np.eye(dims))
    theirs = pytorch_fid.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(fid.frechet_distance(mu1, sigma1, mu2, sigma2) - theirs) <= 1e-6 * theirs


def test_frechet_distance_has_the_closed_form_for_commuting_covariances():
    # For diagonal covariances, Tr (S1 S2)^(1/2) = sum sqrt(a_i b_i): the
    # distance is ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.RandomState(1)
    a, b, mu1, mu2 = rng.rand(50) + 0.1, rng.rand(50) + 0.1, rng.randn(50), rng.randn(50)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-10)


def test_streaming_statistics_equal_mean_and_covariance_of_all_features_at_once():
    class Projection(torch.nn.Module):  # a stand-in for Inception: 2048 random features
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3 * 8 * 8, 2048, generator=torch.Generator().manual_seed(0)))

        def forward(self, batch):
            return batch.float().flatten(1) @ self.weight / 100, None

    project = Projection().requires_grad_(False)
    images = random_images(50, side=8)
    stats = fid.statistics(project, images.split(7))  # uneven batches
    features = torch.cat([project(batch)[0] for batch in images.split(7)]).double().numpy()
    np.testing.assert_allclose(stats["mu"], features.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["sigma"], np.cov(features, rowvar=False), rtol=1e-8, atol=1e-10)


def test_fid_of_a_set_with_itself_is_zero(fid_weights):
    stats = fid.statistics(fid.load_inception(fid_weights), random_images(8).split(4))
    # 8 images give a covariance of rank 7: the square roots of its ~2040 zero
    # eigenvalues, each a round-off of order 1e-16 of the largest, add up to
    # about 1e-4 of the trace. With more images than 2048 this term vanishes.
    assert (abs(fid.frechet_distance(stats["mu"], stats["sigma"], stats["mu"], stats["sigma"]))
            < 1e-3 * np.trace(stats["sigma"]))


def test_inception_score_is_the_number_of_classes_used_evenly_and_1_for_one_class():
    confident = 50 * torch.eye(1008)[torch.arange(200) % 20]  # 20 classes, each image sure of its own
    mean, std = fid.inception_score(confident, splits=1)
    assert mean == pytest.approx(20, rel=1e-6) and std == 0
    assert fid.inception_score(confident[:, :1].expand(-1, 1008).contiguous())[0] == pytest.approx(1.0)


def test_inception_score_of_images_in_class_order_is_that_of_the_same_images_shuffled():
    in_class_order = 50 * torch.eye(1008)[torch.arange(1000) // 100]  # as samples.pt: 100 of class 0, then class 1...
    shuffled = in_class_order[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    mean = fid.inception_score(in_class_order)[0]
    # A split of 100 confident images scores exp(entropy of its class counts): about
    # 9.5 for 10 classes drawn evenly at random; 1 for a split of one class.
    assert 9.0 < mean <= 10 and mean == pytest.approx(fid.inception_score(shuffled)[0], abs=0.3)


def test_fid_features_stay_float32_inside_a_callers_bf16_autocast(fid_weights):
    model = fid.load_inception(fid_weights)
    images = random_images(4).split(2)
    with torch.autocast("cpu", torch.bfloat16):
        inside = fid.statistics(model, images)
    outside = fid.statistics(model, images)
    assert np.array_equal(inside["mu"], outside["mu"]) and np.array_equal(inside["sigma"], outside["sigma"])


def test_fid_turns_tf32_off_and_leaves_the_precision_settings_as_it_found_them():
    # torch 2.14's inductor aborts the process in a compiled CPU convolution once
    # cuda.matmul.fp32_precision is left at "ieee" (the legacy allow_tf32 flags' restore did that).
    settings = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = [setting.fp32_precision for setting in settings]
    with fid.full_fp32():
        assert [setting.fp32_precision for setting in settings] == ["ieee", "ieee"]
    assert [setting.fp32_precision for setting in settings] == before


def test_fid_command_saves_stats_and_reads_them_back_with_samples_pt(fid_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"images": random_images(3), "labels": torch.arange(3)}, "images.pt")
    fid.main(at_test_size("python fid.py images.pt --save-stats images.npz", "--weights", fid_weights)[1:])
    with np.load("images.npz") as archive:
        assert archive["mu"].shape == (2048,) and archive["sigma"].shape == (2048, 2048)
    os.mkdir("runs")
    os.rename("images.npz", "runs/cifar10_train.npz")
    os.rename("images.pt", "samples.pt")
    fid.main(at_test_size("python fid.py samples.pt runs/cifar10_train.npz", "--weights", fid_weights)[1:])
    assert abs(float(capsys.readouterr().out.split("FID")[1])) < 1e-3


def test_fid_bench_times_ours_beside_pytorch_fid(capsys):
    fid.main(at_test_size("python fid.py --bench", "--batch-size", "2")[1:])
    out = capsys.readouterr().out
    for name in ("pytorch-fid", "ours"):
        assert re.search(rf"{name}: +[\d.]+ images/s \(32x32 inputs, batch 2", out), out
    assert "speed-up: " in out


@pytest.mark.parametrize("case, words", [("one image", "at least 2 images"), ("float images", "must hold uint8"),
                                         ("not images", "is neither a folder of images")])
def test_fid_refuses_bad_inputs(tmp_path, fid_weights, case, words):
    path = tmp_path / "x.pt"
    if case == "one image":
        torch.save(random_images(1), path)
    elif case == "float images":
        torch.save(torch.rand(4, 3, 32, 32), path)
    else:
        path = tmp_path / "x.txt"
        path.write_text("hello")
    with pytest.raises(fid.FIDError, match=words):
        fid.main([str(path), str(path), "--weights", fid_weights])


def test_fid_without_weights_offline_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(fid.FIDError) as error:
        fid.load_inception()
    assert fid.WEIGHTS_URL in str(error.value) and str(tmp_path / "hub" / "checkpoints") in str(error.value)


def test_dpt_without_fid_weights_offline_skips_fid_with_a_notice_naming_its_own_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    samples = {"images": random_images(2), "labels": torch.arange(2)}
    dataset = data.Dataset("shapes", None, torch.zeros(2, dtype=torch.long), None, None, 2)
    config = configuration.DPTConfig(dataset="shapes", preset="tiny")
    assert dpt.stage_fid(config, str(tmp_path), dataset, {"dpt": (samples, str(tmp_path / "fid.json"))},
                         torch.device("cpu"), 0, 1) == {"dpt": None}
    notice = capsys.readouterr().err
    assert notice.startswith("FID skipped: ") and "pass --fid-weights PATH" in notice and fid.WEIGHTS_URL in notice


def test_fid_command_without_weights_offline_is_one_line_and_exit_code_2(tmp_path):
    torch.save(random_images(4), tmp_path / "a.pt")
    result = run_script("fid.py", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"),
                        TORCH_HOME=str(tmp_path / "home"), **{fid.WEIGHTS_ENV: None})
    assert_one_line_error(result, fid.WEIGHTS_URL)


# =============================================================================
# dpt.py: the three stages in one resumable command, with configuration.py, bench.py
# and report.py, which it drives


# A preset cut down to seconds: every stage runs, none learns much.
SECONDS = ["--ssl-steps", "12", "--stage3-steps", "12", "--ssl-eval-every", "4", "--diffusion-images", "128",
           "--diffusion-batch", "32", "--sample-per-class", "3", "--sample-steps", "3", "--fid-reference", "24"]
QUICK = at_test_size("python dpt.py --dataset shapes --preset tiny", "--dataset", SHAPES_FILE, *SECONDS)[1:]


def test_every_setting_belongs_to_one_stage_or_is_free_to_change():
    names = {field.name for field in dataclasses.fields(configuration.DPTConfig)}
    assert set(configuration.FIELD_STAGE) | configuration.FREE_TO_CHANGE == names and not set(configuration.FIELD_STAGE) & configuration.FREE_TO_CHANGE


def test_presets_name_only_what_they_change_and_every_setting_is_filled():
    defaults = {ours: getattr(stage_config, name) for stage_config, fields in configuration.STAGE_SCRIPTS
                for name, ours in fields.items()}  # compile and bf16: None, with CUDA only
    for name, preset in configuration.PRESETS.items():
        assert all(defaults.get(field, "no stage default") != value for field, value in preset.items()), name
        config = configuration.DPTConfig(preset=name, dataset="imagenet" if name == "imagenet" else "cifar10")
        configuration.resolve(config)
        assert None not in dataclasses.asdict(config).values(), name
        assert {field: getattr(config, field) for field in preset} == preset, name
    # A stage script's flag is dpt.py's under the stage's prefix (--ssl-lr is fixmatch.py's --lr).
    for fields in (configuration.CLASSIFIER_FLAGS, configuration.DIFFUSION_FLAGS, configuration.SAMPLE_FLAGS):
        assert all(ours.endswith(name) for name, ours in fields.items() if name != "ckpt_every"), fields


@pytest.mark.parametrize("script", [configuration.DPTConfig, fixmatch.FixMatchConfig, unet.DiffusionConfig, sample.SampleConfig,
                                    data.DataConfig])
def test_every_scripts_help_prints_every_flag(script, capsys):
    with pytest.raises(SystemExit) as exit:
        plumbing.parse_config(script, "", ["--help"])
    assert exit.value.code == 0  # a help text with "5%" once crashed argparse's formatting
    shown = capsys.readouterr().out
    assert all("--" + field.name.replace("_", "-") in shown for field in dataclasses.fields(script)
               if field.default is not dataclasses.MISSING)


SCRIPT_CONFIGS = {"dpt.py": None, "fixmatch.py": fixmatch.FixMatchConfig, "unet.py": unet.DiffusionConfig,
                  "sample.py": sample.SampleConfig, "data.py": data.DataConfig}


@pytest.mark.parametrize("file, argv", documented_commands(), ids=lambda value: " ".join(value)
                         if isinstance(value, list) else value)
def test_every_files_documented_command_names_flags_its_script_takes_with_values_it_accepts(file, argv, tmp_path):
    """Each command a file's docstring shows parses, and passes its script's
    checks of every setting (the work itself is the tests' below, at test sizes)."""
    world = int(argv[2]) if argv[0] == "torchrun" else 1  # torchrun --nproc_per_node N SCRIPT ...
    script, args = (argv[3], argv[4:]) if argv[0] == "torchrun" else (argv[1], argv[2:])
    if script == "-m":
        assert args[0] == "pytest" and file == "test_dpt.py"
        return
    if script == "fid.py":  # argparse of its own: every flag shown is one it defines
        source = open(os.path.join(HERE, "fid.py")).read()
        assert all(f'"{flag}"' in source for flag in args if flag.startswith("--")), args
        return
    if script == "dpt.py":
        config = plumbing.parse_config(configuration.DPTConfig, "", args)
        if config.autoencoder:  # a file the command names: here, one that exists
            config.autoencoder = A_FILE
        configuration.resolve(config)
        configuration.check(config, world)
        return
    config = plumbing.parse_config(SCRIPT_CONFIGS[script], "", args)
    if script in ("fixmatch.py", "unet.py"):
        {"fixmatch.py": fixmatch.check, "unet.py": unet.check}[script](config, world)
    elif script == "sample.py":
        sample.check(config)


def test_every_documented_command_is_run_at_a_test_size():
    """By a test of this file through at_test_size, or by .ci/gpu (whose dry run
    is a test here) or .ci/run (CI's: the suite itself)."""
    tested = {node.args[0].value for node in ast.walk(ast.parse(open(__file__).read()))
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "at_test_size"
              and isinstance(node.args[0], ast.Constant)}
    scripts = "".join(open(os.path.join(HERE, ".ci", name)).read() for name in ("gpu", "run"))
    assert {command for command in DOCUMENTED if command not in tested and command not in scripts} == set()


def test_stage_2_checkpoints_every_5_percent_of_its_images_unless_told_how_often(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(plumbing, "save_atomic", lambda obj, path, writer=None: saved.append(obj["images_seen"]))
    images, labels = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.arange(64) % 2
    for every, expected in ((0, [2 * step for step in range(1, 21)]), (10, [10, 20, 30, 40])):
        saved.clear()
        unet.train(diffusion_config(tmp_path, images=40, batch=2, ckpt_every=every, augment=0.0), images, labels, 2,
                   progress=False)
        assert saved == expected, every


def test_a_run_folder_made_before_a_flag_was_renamed_is_refused_not_misread(tmp_path):
    run = tmp_path / "shapes-1l-s0"
    run.mkdir()
    config = configuration.DPTConfig(dataset="shapes", out=str(tmp_path), preset="tiny")
    configuration.resolve(config)
    old = {("arch" if name == "ssl_arch" else name): value for name, value in dataclasses.asdict(config).items()
           if name not in configuration.FREE_TO_CHANGE}
    (run / "config.json").write_text(json.dumps(old))
    dataset = write_split(run)
    with pytest.raises(plumbing.UserError, match="another version of dpt.py .*arch, ssl_arch.*another --out"):
        dpt.check_run_folder(config, str(run), dataset)
    assert (run / "split.pt").exists()  # nothing was removed


def write_split(run):
    """A split.pt of a small dataset, which is returned."""
    dataset = data.Dataset("shapes", torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10) % 2, None, None, 2)
    torch.save({"indices": torch.arange(2), "contents": dpt.contents_crc(dataset), "size": 10}, run / "split.pt")
    return dataset


@pytest.mark.parametrize("dataset, told, flip", [("glyphs", [], False), ("shapes", [], True),
                                                 ("glyphs", ["--flip"], True)])
def test_each_stage_flips_as_the_dataset_allows_unless_told(dataset, told, flip, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(dpt, "run_dpt", lambda config, *args: ran.append(config))
    monkeypatch.setattr(sys, "argv", ["dpt.py", "--dataset", dataset, "--preset", "tiny", "--out", str(tmp_path),
                                      *told])
    plumbing.run_main(dpt.main)
    config = ran[0]
    assert config.flip == flip
    for stage in ("stage1", "stage3", "baseline"):
        assert configuration.classifier_settings(config, stage)[0].flip == flip
    assert configuration.diffusion_settings(config)[0].flip == flip


@pytest.mark.parametrize("name, then, stage", [
    ("diffusion_confident", 1.0, "stage2"),  # that version trained stage 2 on every label
    ("ssl_freematch_start", 0.0, "stage1"),  # that version started FreeMatch at the paper's 1/C
    ("flip", True, "stage1")])  # that version flipped every dataset's images, digits too
def test_a_run_folder_made_before_a_setting_was_added_reads_as_made_with_what_that_version_did(
        tmp_path, name, then, stage):
    run = tmp_path / "shapes-1l-s0"
    run.mkdir()
    config = configuration.DPTConfig(dataset="shapes", out=str(tmp_path), preset="tiny", flip=False)  # each differs from then
    configuration.resolve(config)
    old = {key: value for key, value in dataclasses.asdict(config).items()
           if key not in configuration.FREE_TO_CHANGE and key != name}
    (run / "config.json").write_text(json.dumps(old))
    dataset = write_split(run)
    (run / stage).write_text("kept")
    with pytest.raises(plumbing.UserError, match=rf"other settings \({name}\); add --redo {stage}"):
        dpt.check_run_folder(config, str(run), dataset)
    assert (run / stage).read_text() == "kept"
    dpt.check_run_folder(dataclasses.replace(config, **{name: then}), str(run), dataset)  # what it did: goes on
    assert (run / stage).read_text() == "kept"
    assert json.loads((run / "config.json").read_text())[name] == then
    dpt.check_run_folder(dataclasses.replace(config, redo=stage), str(run), dataset)
    assert not (run / stage).exists()
    assert (run / "split.pt").exists() == (stage != "stage1")  # --redo stage1 draws the split again


# DPT's official CIFAR-10 code: FreeMatch in TorchSSL (WRN-28-2, 2^20 steps, batch 64 + 7 x 64,
# SGD Nesterov 0.03 with momentum 0.9 and weight decay 5e-4, EMA 0.999), then EDM's
# ddpmpp (Karras et al. 2022, Table 7: 200 Mimg, batch 512, Adam 1e-3 warmed up over
# 10 Mimg, EMA half-life 0.5 Mimg, dropout 0.13, P_mean -1.2, P_std 1.2; its
# augmentation at p = 0.12 and no label dropout), sampled by Heun with 18 steps
# (35 evaluations), 1,000 images per class.
PAPER_CIFAR10 = {
    "classifier": dict(arch="wrn28_2", steps=2 ** 20, batch=64, uratio=7, lr=0.03, momentum=0.9, weight_decay=5e-4,
                       ema=0.999, threshold="freematch", lambda_u=1.0),
    "diffusion": dict(arch="unet", size="cifar", images=200_000_000, batch=512, lr=1e-3, warmup=10_000_000,
                      ema_halflife=500_000, ema_rampup=0.05, p_mean=-1.2, p_std=1.2, augment=0.12,
                      label_dropout=0.0),
    "sample": dict(solver="heun", steps=18, per_class=1000, guidance=1.0),
}


def test_the_cifar_preset_gives_each_stage_the_papers_recipe():
    config = configuration.DPTConfig(preset="cifar")
    configuration.resolve(config)
    stage1, _ = configuration.classifier_settings(config, "stage1")
    stage3, _ = configuration.classifier_settings(config, "stage3")
    diffusion, _ = configuration.diffusion_settings(config)
    sampling, _ = configuration.sample_settings(config)
    for settings, recipe in [(stage1, "classifier"), (stage3, "classifier"), (diffusion, "diffusion"),
                             (sampling, "sample")]:
        assert {k: getattr(settings, k) for k in PAPER_CIFAR10[recipe]} == PAPER_CIFAR10[recipe], recipe
    assert unet.SIZES["unet"]["cifar"]["dropout"] == 0.13
    model = fixmatch.make_classifier(stage1.arch, 10, [0.5] * 3, [0.25] * 3)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.001}


def test_bench_prints_every_stage_beside_eager_fp32_and_the_presets_projected_time(gpu_check_dry_run):
    out, _ = gpu_check_dry_run  # whose bench part ran `dpt.py --bench --diffusion-size tiny`: WRN-28-2, the tiny U-Net
    log = (out / "bench.log").read_text()
    assert re.search(r"^bench: exit 0 ", (out / "summary.txt").read_text(), re.M), log[-3000:]
    lines = log.splitlines()
    rows = {name: line for name in ("augmentation", "FixMatch wrn28_2", "U-Net tiny training",
                                    "Heun, 35 evaluations", "FID features") for line in lines if name in line}
    assert len(rows) == 5, log
    for name, line in rows.items():  # rate, eager fp32 rate, ratio (on a CPU both are eager fp32), warm-up
        rate, eager, ratio, warmup = re.search(r"([\d,.]+)\s+([\d,.]+)\s+([\d.]+)x\s+\S+\s+(-|[\d.]+ s)\s",
                                               line).groups()
        assert float(rate.replace(",", "")) > 0 and rate == eager and ratio == "1.00", line
        trains = name in ("FixMatch wrn28_2", "U-Net tiny training")
        assert (warmup != "-" and float(warmup[:-2]) > 0) if trains else warmup == "-", line
    for preset in ("fast", "cifar"):
        line = next(line for line in lines if line.startswith(f"{preset} preset here:"))
        total, *stages = (float(hours.replace(",", "")) for hours in re.findall(r"([\d,.]+) h", line))
        # Each of the five figures is rounded to 0.1 h: the total and the sum of the four parts may part by 0.25 h.
        assert len(stages) == 4 and total == pytest.approx(sum(stages), abs=0.25 + 1e-6), line


@pytest.mark.parametrize("device, steps_per_second, waits", [("cpu", 1 / 1.0, 0),
                                                             ("cuda", 3 / (2 + 10 + 1 + 10 + 4), 2)])
def test_a_step_clock_takes_the_fastest_step_on_a_cpu_and_the_whole_span_on_a_gpu(device, steps_per_second, waits,
                                                                                  monkeypatch):
    now, waited = [0.0], []  # a clock that moves only when told: steps of 2, 1 and 4 s, 10 s apart
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: waited.append(now[0]))
    clock = plumbing.StepClock(device)
    for index, seconds in enumerate((2, 1, 4)):
        clock.begin()
        now[0] += seconds
        clock.end(last=index == 2)
        now[0] += 10  # an evaluation or a checkpoint between steps
    assert clock.per_second() == pytest.approx(steps_per_second)
    assert len(waited) == waits  # on a GPU before the first step and after the last only


@pytest.mark.parametrize("kind", ["classifier", "diffusion"])
def test_a_training_rate_times_its_steps_and_not_the_checkpoint_written_after_them(kind, monkeypatch):
    """Each write costs 1,000 s of a clock that otherwise runs true: a rate that timed
    one would be some thousandths of a step or an image a second."""
    real_clock, written = time.perf_counter, []
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + 1000 * len(written))
    real_save = plumbing.save_atomic
    monkeypatch.setattr(plumbing, "save_atomic", lambda obj, path, writer=None: (written.append(path),
                                                                                 real_save(obj, path, writer))[1])
    if kind == "classifier":  # 3 steps timed after the 5 of warm-up
        rate, _ = fixmatch.training_rate(fixmatch.FixMatchConfig(arch="small", batch=4, uratio=1), steps=8)
    else:  # 2 steps of 2 images timed after the 2 of warm-up
        rate, _ = unet.training_rate(unet.DiffusionConfig(arch="unet", size="tiny", batch=2), steps=4)
    assert written and rate > 0.1, (written, rate)


def test_the_gpu_check_dry_runs_every_part_on_the_cpu(gpu_check_dry_run):
    """.ci/gpu is what a lent GPU runs, minutes of device time; its CPU dry run keeps
    it from rotting while no GPU is lent: every part ends well, the smoke run was
    killed in stage 2 and resumed to its report, and the profiler printed its table."""
    out, result = gpu_check_dry_run
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    for part in ("environment", "cuda_tests", "bench", "smoke", "profile"):
        assert re.search(rf"^{part}: exit 0 after \d+ s \(limit \d+ s\)$", summary, re.M), summary
    smoke = (out / "smoke.log").read_text()
    assert "=== killed in stage 2 (its checkpoint there: " in smoke and "resuming" in smoke
    assert (out / "smoke-runs" / "shapes-1l-s0" / "report.html").exists()
    assert "Self CPU" in (out / "profile.log").read_text()


def test_the_share_of_the_peak_is_taken_against_the_named_gpus_own_peak(monkeypatch):
    for name, peak in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12)):
        monkeypatch.setattr(plumbing, "device_name", lambda device: name)
        assert plumbing.peak_share(peak / 4, "cuda") == pytest.approx(0.25), name
    monkeypatch.setattr(plumbing, "device_name", lambda device: "cpu, 2 threads")
    assert plumbing.peak_share(1e12, "cpu") is None


def test_without_cuda_or_preset_the_tiny_preset_runs_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = configuration.DPTConfig(ssl_steps=7)
    configuration.resolve(config)
    assert config.preset == "tiny" and "tiny preset" in capsys.readouterr().err
    assert config.ssl_steps == 7 and config.ssl_arch == configuration.PRESETS["tiny"]["ssl_arch"]  # a flag beats the preset


def test_the_first_command_runs_on_cifar_10s_files_and_its_redo_samples_again_and_remakes_what_follows(
        in_process, tmp_path, skip_md5):
    write_cifar(tmp_path, "cifar10")
    test_size = ["--data-dir", str(tmp_path), *SECONDS, "--no-baseline", "--out", str(tmp_path / "runs")]
    result = in_process(*at_test_size("python dpt.py --labels 1", *test_size), DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running the tiny preset" in result.stderr  # this machine's: no CUDA
    run = tmp_path / "runs" / "cifar10-1l-s0"
    first = json.loads((run / "results.json").read_text())
    assert first["dataset"] == "cifar10" and first["preset"] == "tiny" and first["fid"] is None  # FID: its tests
    made = {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")}
    result = in_process(*at_test_size("python dpt.py --labels 1 --redo sample --sample-per-class 2000", *test_size,
                                      "--sample-per-class", "4"), DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.bincount(torch.load(run / "samples.pt")["labels"]).tolist() == [4] * 10
    again = {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")}
    remade = {path.relative_to(run).parts[0] for path in made if again[path] != made[path]}
    assert remade == {"samples.pt", "stage3"}, remade  # the split, stage 1 and stage 2 are kept
    assert json.loads((run / "results.json").read_text())["stage3_accuracy"] == pytest.approx(
        fixmatch.load_classifier(run / "stage3" / "classifier.pt")[1]["accuracy"])


def test_on_the_gpu_the_whole_pipeline_compiled_in_bf16_reaches_report_html(cuda, tmp_path, fid_weights):
    result = run_script("dpt.py", *QUICK, "--baseline", "--compile", "--bf16", "--out", str(tmp_path),
                        "--fid-weights", fid_weights)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "shapes-1l-s0"
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["compile"] and results["config"]["bf16"]
    assert results["device"] == torch.cuda.get_device_name()
    for key in ("stage1_accuracy", "stage3_accuracy", "fid", "sample_accuracy", "oracle_sample_accuracy"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    samples = torch.load(run / "samples.pt", weights_only=True)
    assert samples["images"].shape == (30, 3, 32, 32) and samples["images"].float().std() > 10
    assert_summary_shows((run / "report.html").read_text(), results)


def test_the_pipeline_leaves_every_artifact_with_its_documented_shape(quick_run):
    _, run = quick_run
    split = torch.load(run / "split.pt")
    assert split["indices"].dtype == torch.int64 and len(split["indices"]) == 10 and split["size"] == 2_000
    pseudo = torch.load(run / "pseudo_labels.pt")
    assert pseudo["labels"].dtype == torch.int64 and pseudo["labels"].shape == (2_000,)
    assert pseudo["confidence"].dtype == torch.float32 and 0 <= pseudo["accuracy"] <= 1
    samples = torch.load(run / "samples.pt")
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (30, 3, 32, 32)
    assert samples["labels"].dtype == torch.int64 and torch.bincount(samples["labels"]).tolist() == [3] * 10
    for name in ("stage1/classifier.pt", "stage3/classifier.pt", "baseline/classifier.pt", "stage2/diffusion.pt",
                 "samples.png", "fid.json", "config.json"):
        assert (run / name).exists(), name
    model, metrics = fixmatch.load_classifier(run / "stage3" / "classifier.pt")
    assert model(samples["images"][:2]).shape == (2, 10) and 0 <= metrics["accuracy"] <= 1
    assert not list(run.rglob("*.tmp*"))  # every write was renamed into place


def test_results_json_holds_every_metric_and_the_summary_shows_stage_3_next_to_stage_1(quick_run):
    stdout, run = quick_run
    results = json.loads((run / "results.json").read_text())
    # Every number equals what the file it comes from holds, recomputed where it can be.
    shapes = data.load_dataset(SHAPES_FILE)
    for stage in ("stage1", "stage3", "baseline"):
        model, metrics = fixmatch.load_classifier(run / stage / "classifier.pt")
        assert results[f"{stage}_accuracy"] == metrics["accuracy"]
        assert metrics["accuracy"] == pytest.approx(fixmatch.accuracy(model, shapes.test_x, shapes.test_y))
    pseudo = torch.load(run / "pseudo_labels.pt")
    assert results["pseudo_label_accuracy"] == pytest.approx((pseudo["labels"] == shapes.train_y).float().mean().item())
    assert results["stage3_gain"] == pytest.approx(results["stage3_accuracy"] - results["stage1_accuracy"])
    fid_json = json.loads((run / "fid.json").read_text())
    assert (results["fid"], results["inception_score"]) == (fid_json["fid"], fid_json["inception_score"])
    assert results["wall_time_s"] == json.loads((run / "timings.json").read_text())
    given = {flag[2:].replace("-", "_"): value for flag, value in zip(QUICK[::2], QUICK[1::2])}
    given.update(out=str(run.parent), baseline="True", fid_weights=results["config"]["fid_weights"])  # quick_run's
    resolved = configuration.DPTConfig(preset="tiny")
    configuration.resolve(resolved)
    for name, value in results["config"].items():  # the flags given, the preset's values for the rest
        assert str(value) == given[name] if name in given else value == getattr(resolved, name), name
    judge = fixmatch.load_classifier(run / "stage1" / "classifier.pt")[0]  # the stage-1 classifier, not stage 3's
    samples = torch.load(run / "samples.pt")
    right = fixmatch.predict(judge, samples["images"])[0] == samples["labels"]
    assert results["sample_accuracy"] == pytest.approx(right.float().mean().item())
    assert results["sample_accuracy_per_class"] == pytest.approx([right[c * 3:c * 3 + 3].float().mean().item()
                                                                  for c in range(10)])
    assert {"split", "stage1", "stage2", "sample", "stage3", "baseline", "few_labels", "reference_samples",
            "fid"} <= set(results["wall_time_s"])
    # The generator's half: each diffusion model's samples as the oracle sees them, recomputed here.
    oracle = fixmatch.load_classifier(results["oracle"])[0]
    test_features = fixmatch.embed(oracle, shapes.test_x)
    assert list(results["generation"]) == ["few_labels", "dpt", "every_label"]
    for name, file in (("few_labels", "few_labels/samples.pt"), ("dpt", "samples.pt"),
                       ("every_label", "every_label/samples.pt")):
        generated, judged = torch.load(run / file), results["generation"][name]
        right = fixmatch.predict(oracle, generated["images"])[0] == generated["labels"]
        assert judged["oracle_share"] == pytest.approx(right.float().mean().item()), name
        assert judged["oracle_share_per_class"] == pytest.approx([right[c * 3:c * 3 + 3].float().mean().item()
                                                                  for c in range(10)]), name
        expected = fid.feature_metrics(test_features, fixmatch.embed(oracle, generated["images"]))
        assert {k: judged[k] for k in expected} == pytest.approx(expected), name
        fid_file = json.loads((run / file.replace("samples.pt", "fid.json")).read_text())
        assert (judged["fid"], judged["inception_score"]) == (fid_file["fid"], fid_file["inception_score"]), name
    assert results["generation"]["dpt"]["oracle_share"] == results["oracle_sample_accuracy"]
    assert results["versions"]["torch"] == torch.__version__ and results["classes"] == list(data.SHAPES)
    lines = stdout.splitlines()
    stage1_line = next(i for i, line in enumerate(lines) if "stage 1: semi-supervised" in line)
    assert "generated images of the intended class, stage-1 judge" in lines[stage1_line + 2]
    assert f"{100 * results['sample_accuracy']:.2f}%" in lines[stage1_line + 2]
    assert "generated images of the intended class, oracle judge" in lines[stage1_line + 3]
    assert f"{100 * results['oracle_sample_accuracy']:.2f}%" in lines[stage1_line + 3]
    assert "stage 3: with generated images" in lines[stage1_line + 4]
    heading = next(i for i, line in enumerate(lines) if "diffusion models, judged by the oracle" in line)
    for offset, name in enumerate(("few_labels", "dpt", "every_label"), 1):  # a row per model, in this order
        judged = results["generation"][name]
        assert lines[heading + offset].endswith(
            f"{100 * judged['oracle_share']:.2f}% · {judged['feature_fd']:.2f} · {judged['precision']:.2f} · "
            f"{judged['recall']:.2f} · FID {judged['fid']:.2f}"), name


def vertices(page, series):
    """The (x, y) vertices of one line of the report's plots."""
    points = re.search(f'<polyline data-series="{series}" points="([^"]+)"', page).group(1)
    return np.array([[float(v) for v in point.split(",")] for point in points.split()])


def assert_affine(values, coordinates, increasing):
    """Plotted coordinates are one affine map of the values (to the 0.1 pixel they are written with)."""
    if np.ptp(values) == 0:  # equal values, one coordinate
        assert np.ptp(coordinates) < 0.1
        return
    slope, offset = np.polyfit(values, coordinates, 1)
    assert (slope > 0) == increasing and np.abs(slope * values + offset - coordinates).max() < 0.1


def test_a_plot_places_every_point_by_one_affine_map_and_ticks_its_axes():
    series = [("stage 1", [(0, 50.0), (100, 70.0), (250, 65.0)]), ("stage 3", [(0, 60.0), (250, 90.0)])]
    page = report.svg_plot(series, "optimizer step", "test accuracy (%)")
    drawn = np.concatenate([vertices(page, "stage 1"), vertices(page, "stage 3")])
    values = np.array([point for _, line in series for point in line])
    assert_affine(values[:, 0], drawn[:, 0], increasing=True)
    assert_affine(values[:, 1], drawn[:, 1], increasing=False)  # SVG's y grows downwards
    labels = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" text-anchor="(middle|end)">([^<]+)</text>', page)
    x_ticks = {float(text.replace("k", "e3")): float(x) for x, _, anchor, text in labels if anchor == "middle"
               and text[0].isdigit()}
    y_ticks = {float(text): float(y) - 4 for _, y, anchor, text in labels if anchor == "end"}
    assert {0, 100, 200} <= set(x_ticks) and {50, 60, 70, 80, 90} <= set(y_ticks)
    assert_affine(np.array([*values[:, 0], *x_ticks]), np.array([*drawn[:, 0], *x_ticks.values()]), True)
    assert_affine(np.array([*values[:, 1], *y_ticks]), np.array([*drawn[:, 1], *y_ticks.values()]), False)
    assert "optimizer step" in page and "test accuracy (%)" in page
    flat = vertices(report.svg_plot([("loss", [(5, 1.0), (9, 1.0)])], "images seen", "loss"), "loss")
    assert flat[:, 1].tolist() == [122.5, 122.5]  # equal values: across the middle of the plot


def assert_summary_shows(page, results):
    table = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]+)</td></tr>", page))
    number = lambda what: float(re.match(r"[-+\d.]+", table[what]).group())
    for what, value in [("labeled images only (--baseline)", results["baseline_accuracy"]),
                        ("stage 1: semi-supervised", results["stage1_accuracy"]),
                        ("pseudo labels of the training images", results["pseudo_label_accuracy"]),
                        ("generated images of the intended class, stage-1 judge", results["sample_accuracy"]),
                        ("generated images of the intended class, oracle judge", results["oracle_sample_accuracy"]),
                        ("oracle (every true label): test accuracy", results["oracle_accuracy"]),
                        ("stage 1: moved over its last 3 evaluations", results["stage1_last_moves"]),
                        ("stage 3: moved over its last 3 evaluations", results["stage3_last_moves"]),
                        ("stage 3: with generated images", results["stage3_accuracy"]),
                        ("gain of stage 3 over stage 1", results["stage3_gain"]),
                        ("gain of stage 3 over the labeled images only",
                         results["stage3_accuracy"] - results["baseline_accuracy"])]:
        assert number(what) == pytest.approx(100 * value, abs=0.006), what
    assert number("FID of the samples") == pytest.approx(results["fid"], abs=0.006)


def test_the_reports_png_rows_are_pngs_that_pil_reads_back_pixel_for_pixel_in_grey_and_in_rgb():
    for channels in (1, 3):  # 7 x 5 images, four side by side: a row 20 wide, 7 high
        images = torch.randint(0, 256, (4, channels, 7, 5), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(channels))
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(report.png_row(images)))))
        assert np.array_equal(decoded.reshape(7, 20, channels), torch.cat(list(images), 2).permute(1, 2, 0).numpy())


def test_report_html_shows_the_run_that_results_json_and_the_run_folder_hold(quick_run, tmp_path):
    _, run = quick_run
    page = (run / "report.html").read_text()
    results = json.loads((run / "results.json").read_text())
    assert len(page.encode()) < 1_000_000
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)|url\(", page)  # nothing outside the file
    # The summary table: every number is results.json's (also with numbers that all differ).
    assert_summary_shows(page, results)
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    distinct = dict(results, baseline_accuracy=0.25, stage1_accuracy=0.5, pseudo_label_accuracy=0.6,
                    sample_accuracy=0.55, oracle_sample_accuracy=0.45, oracle_accuracy=0.95, stage1_last_moves=0.015,
                    stage3_last_moves=0.005, stage3_accuracy=0.75, stage3_gain=0.25, fid=12.34)
    (copy / "results.json").write_text(json.dumps(distinct))
    assert_summary_shows(report.build_report(str(copy)), distinct)
    # Accuracy against step: every evaluation of the three classifiers on one pair of axes.
    steps, accuracies, xs, ys = [], [], [], []
    for series, stage in (("stage 1", "stage1"), ("stage 3", "stage3"), ("baseline", "baseline")):
        history = np.array(fixmatch.load_classifier(run / stage / "classifier.pt")[1]["history"])
        drawn = vertices(page, series)
        assert len(drawn) == len(history) == 3, series
        steps, accuracies = steps + list(history[:, 0]), accuracies + list(history[:, 1])
        xs, ys = xs + list(drawn[:, 0]), ys + list(drawn[:, 1])
    assert_affine(np.array(steps), np.array(xs), increasing=True)
    assert_affine(np.array(accuracies), np.array(ys), increasing=False)  # SVG's y grows downwards
    loss = np.array(torch.load(run / "stage2" / "diffusion.pt")["metrics"]["history"])
    assert len(vertices(page, "loss")) == len(loss) > 0
    # The grid: for each class, named, a row per diffusion model (the labeled images alone, DPT, every label)
    # of its own generated images of the class, with the oracle's share beside each (the stage-1 judge's: DPT's).
    rows = re.findall(r'<tr class="(first|next)">(?:<th rowspan="3">([^<]+)</th>)?<td class="model">([^<]+)</td>'
                      r'<td><img alt="[^"]*" src="data:image/png;base64,([^"]+)"></td>'
                      r'<td class="judge">(.*?)</td><td class="judge">(.*?)</td></tr>', page)
    assert [name for _, name, _, _, _, _ in rows[::3]] == list(data.SHAPES) and len(rows) == 30
    assert [called for _, _, called, _, _, _ in rows] == ["labeled images alone", "DPT (pseudo labels)",
                                                          "every label"] * 10
    files = {"few_labels": "few_labels/samples.pt", "dpt": "samples.pt", "every_label": "every_label/samples.pt"}
    for row, (_, _, _, png, believed, true) in enumerate(rows):
        c, name = row // 3, list(files)[row % 3]
        samples = torch.load(run / files[name])
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))  # PIL reads our PNG
        assert np.array_equal(image, torch.cat(list(samples["images"][samples["labels"] == c]), dim=2)
                              .permute(1, 2, 0).numpy())
        share = results["generation"][name]["oracle_share_per_class"][c]
        assert f"width:{100 * share:.1f}%" in true and true.endswith(f"{100 * share:.0f}%")
        if name == "dpt":
            share = results["sample_accuracy_per_class"][c]
            assert f"width:{100 * share:.1f}%" in believed and believed.endswith(f"{100 * share:.0f}%")
        else:
            assert believed == "-"
    # Wall time: one bar per stage, as long as its share of the longest.
    bars = dict(re.findall(r'<rect data-stage="([^"]+)" x="80" y="[\d.]+" width="([\d.]+)"', page))
    longest = max(results["wall_time_s"].values())
    assert {stage: float(width) for stage, width in bars.items()} == pytest.approx(
        {stage: 380 * seconds / longest for stage, seconds in results["wall_time_s"].items()}, abs=0.06)
    assert "<details>" in page and html.escape(json.dumps(results["config"]["dataset"]), quote=False) in page


def test_report_and_terminal_open_with_the_verdict_of_the_run(quick_run):
    stdout, run = quick_run
    results = json.loads((run / "results.json").read_text())
    assert f'<p class="verdict">{html.escape(report.verdict(results))}</p>' in (run / "report.html").read_text()
    assert report.verdict(results) in stdout.splitlines()


def verdict_of(baseline, stage1, stage3):
    return report.verdict({"baseline_accuracy": baseline, "stage1_accuracy": stage1, "stage3_accuracy": stage3,
                           "stage3_gain": None if stage1 is None else stage3 - stage1})


def test_the_verdict_compares_stage_3_with_both_and_says_when_stage_1_fell_below_the_labeled_images():
    worked = verdict_of(0.40, 0.45, 0.50)
    assert worked.startswith("DPT worked") and "5.00 points above stage 1" in worked
    assert "10.00 points above the labeled images alone" in worked
    # Issue 31's seed 1: stage 1 below the labeled images alone, stage 3 above stage 1 but below them.
    failed_stage1 = verdict_of(0.3275, 0.2815, 0.3180)
    assert failed_stage1.startswith("Stage 1 fell 4.60 points below the labeled images alone")
    assert "no success" in failed_stage1 and "0.95 points below the labeled images alone" in failed_stage1
    assert "DPT worked" not in failed_stage1
    lost = verdict_of(0.40, 0.50, 0.48)
    assert lost.startswith("Stage 3 is 2.00 points below stage 1") and "does not show DPT's gain" in lost
    assert "8.00 points above the labeled images alone" in lost
    assert verdict_of(None, 0.45, 0.50) == "DPT worked: stage 3 is 5.00 points above stage 1."
    assert verdict_of(0.4, None, 0.5).startswith("No test set")


def generation_verdict(few, dpt_, every, distances=(30.0, 20.0, 10.0)):
    """The verdict's second sentence for these class shares (and Fréchet distances) of the three models."""
    model = lambda share, distance: {"oracle_share": share, "feature_fd": distance}
    results = {"baseline_accuracy": 0.4, "stage1_accuracy": 0.5, "stage3_accuracy": 0.55, "stage3_gain": 0.05,
               "generation": {"few_labels": model(few, distances[0]), "dpt": model(dpt_, distances[1]),
                              "every_label": model(every, distances[2])}}
    first, second = report.verdict(results).split(". ", 1)
    assert first.startswith("DPT worked")  # the classifier's half, as before
    return second


def test_the_verdicts_second_sentence_says_whether_dpts_samples_beat_the_few_label_models():
    beat = generation_verdict(0.30, 0.80, 0.95)
    assert beat == ("DPT's samples beat those of the labeled images alone: the oracle puts 80.00% of them in their "
                    "class against 30.00%, at a Fréchet distance in its features of 20.00 against 30.00; with every "
                    "label, 95.00% at 10.00.")
    lost = generation_verdict(0.80, 0.30, 0.95, (20.0, 30.0, 10.0))
    assert lost.startswith("DPT's samples do not beat") and "30.00% of them in their class against 80.00%" in lost
    assert "but lie farther from the test images" in generation_verdict(0.3, 0.8, 0.9, (20.0, 30.0, 10.0))
    assert "but are of their class less often" in generation_verdict(0.8, 0.3, 0.9)
    assert "Fréchet" not in generation_verdict(0.3, 0.8, 0.9, (None, None, None))  # no test set: no distance
    assert ". " not in verdict_of(0.40, 0.45, 0.50)[:-1]  # without the references, one sentence


def stub_runs(folder, baseline, stage1, stage3, generation=None):
    """Run folders whose results.json hold these accuracies (and generation[seed]), one run a seed."""
    runs = []
    for seed, (b, s1, s3) in enumerate(zip(baseline, stage1, stage3)):
        run = folder / f"stub-s{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "seed": seed, "baseline_accuracy": b, "stage1_accuracy": s1, "stage3_accuracy": s3,
            "stage3_gain": s3 - s1, "pseudo_label_accuracy": s1, "sample_accuracy": 0.9,
            "oracle_sample_accuracy": 0.8, "wall_time_s": {"stage1": 60.0},
            **({} if generation is None else {"generation": generation[seed]})}))
        runs.append(str(run))
    return runs


def test_a_sweep_states_each_mean_gain_with_its_paired_95_percent_interval_and_the_runs_above(tmp_path, capsys):
    baseline = [0.40, 0.35, 0.30, 0.45, 0.50]
    stage1 = [b + d for b, d in zip(baseline, [0.10, 0.12, -0.02, 0.11, 0.09])]
    stage3 = [s + d for s, d in zip(stage1, [0.01, 0.02, 0.03, 0.04, 0.05])]
    runs = stub_runs(tmp_path, baseline, stage1, stage3)
    html_path = report.write_sweep(runs, str(tmp_path / "sweep"), "a sweep")
    summary = json.loads((tmp_path / "sweep.json").read_text())
    # By hand: stage 3 over stage 1 has mean 0.03 and sample sd sqrt(0.00025) over 5 seeds; Student's
    # t with 4 degrees of freedom at 0.975 is 2.776445 (a table's value), so the half width is
    # 2.776445 * 0.0158114 / sqrt(5) = 0.0196324.
    gain = summary["gains"]["stage 3 over stage 1"]
    assert gain["mean"] == pytest.approx(0.03) and gain["above"] == 5 and gain["runs"] == 5
    assert (gain["low"], gain["high"]) == pytest.approx((0.03 - 0.0196324, 0.03 + 0.0196324), abs=1e-6)
    over_labeled = summary["gains"]["stage 1 over labeled only"]  # one seed below: 4 of 5 above
    assert over_labeled["above"] == 4 and over_labeled["mean"] == pytest.approx(0.08)
    differences = [0.11, 0.14, 0.01, 0.15, 0.14]  # stage 3 over labeled only, seed by seed
    half = 2.776445 * np.std(differences, ddof=1) / math.sqrt(5)
    assert (summary["gains"]["stage 3 over labeled only"]["low"], summary["gains"]["stage 3 over labeled only"]
            ["high"]) == pytest.approx((np.mean(differences) - half, np.mean(differences) + half), abs=1e-6)
    printed = capsys.readouterr().out
    assert "stage 3 over stage 1: +3.00 points [+1.04, +4.96] (95% CI, paired over seeds), above in 5 of 5 runs" \
        in printed
    page = pathlib.Path(html_path).read_text()
    assert "stage 1 over labeled only: +8.00 points" in page and "above in 4 of 5 runs" in page
    # Seeds are categories: a bar per seed and series, its height proportional to the accuracy.
    for name, values in (("baseline", baseline), ("stage 1", stage1), ("stage 3", stage3)):
        heights = [float(re.search(rf'data-series="{name}" data-seed="{seed}" x="[\d.]+" y="[\d.]+" width="14" '
                                   r'height="([\d.]+)"', page).group(1)) for seed in range(5)]
        assert np.allclose(np.array(heights) / np.array(values), heights[0] / values[0], rtol=1e-3), name
    assert page.count("data-gain=") == 3


def test_one_seed_has_a_mean_gain_but_no_interval(tmp_path):
    summary = report.sweep_summary(stub_runs(tmp_path, [0.4], [0.5], [0.55]))
    assert summary["gains"]["stage 3 over stage 1"] == pytest.approx(
        {"mean": 0.05, "low": None, "high": None, "above": 1, "runs": 1, "points": True})


def test_a_sweep_states_dpt_minus_few_labels_and_every_label_minus_dpt_of_each_figure_paired(tmp_path, capsys):
    shares = [(0.30, 0.70, 0.90), (0.40, 0.60, 0.95), (0.20, 0.80, 0.85)]  # few labels, DPT, every label a seed
    distances = [(40.0, 20.0, 10.0), (35.0, 25.0, 5.0), (50.0, 15.0, 12.0)]
    model = lambda share, distance: {"oracle_share": share, "feature_fd": distance, "precision": share / 2,
                                     "recall": share / 3, "oracle_share_per_class": [share] * 10}
    generation = [{name: model(share, distance) for name, share, distance in zip(("few_labels", "dpt", "every_label"),
                                                                                 seed_shares, seed_distances)}
                  for seed_shares, seed_distances in zip(shares, distances)]
    runs = stub_runs(tmp_path, [0.4] * 3, [0.5] * 3, [0.55] * 3, generation)
    html_path = report.write_sweep(runs, str(tmp_path / "sweep"), "a sweep")
    summary = json.loads((tmp_path / "sweep.json").read_text())
    for figure, values, points in (("class share", shares, True), ("Fréchet distance", distances, False)):
        for better, over, name in ((1, 0, "DPT - few labels"), (2, 1, "every label - DPT")):
            differences = [seed[better] - seed[over] for seed in values]
            half = 4.3026527 * np.std(differences, ddof=1) / math.sqrt(3)  # Student's t, 2 degrees of freedom
            gain = summary["gains"][f"{figure}: {name}"]
            assert (gain["mean"], gain["low"], gain["high"]) == pytest.approx(
                (np.mean(differences), np.mean(differences) - half, np.mean(differences) + half), rel=1e-6)
            assert gain["above"] == sum(d > 0 for d in differences) and gain["points"] == points
    assert summary["mean"]["dpt_oracle_share"] == pytest.approx(0.7)
    assert summary["std"]["few_labels_feature_fd"] == pytest.approx(np.std([40, 35, 50], ddof=1))
    printed = capsys.readouterr().out
    assert "class share: DPT - few labels: +40.00 points [" in printed and "above in 3 of 3 runs" in printed
    assert "Fréchet distance: DPT - few labels: -21.67 [" in printed  # a distance, not in points
    page = pathlib.Path(html_path).read_text()
    assert "The diffusion models, judged by the oracle" in page and "70.00 ± 10.00" in page
    assert "Fréchet distance: DPT - few labels" not in re.findall(r'data-gain="([^"]+)"', page)  # points only


def test_the_tiny_preset_runs_the_labeled_only_baseline_unless_told_not_to():
    tiny, fast, off = configuration.DPTConfig(preset="tiny"), configuration.DPTConfig(preset="fast"), configuration.DPTConfig(preset="tiny",
                                                                                                                              baseline=False)
    for config in (tiny, fast, off):
        configuration.resolve(config)
    assert (tiny.baseline, fast.baseline, off.baseline) == (True, False, False)
    config = plumbing.parse_config(configuration.DPTConfig, "", ["--no-baseline"])
    assert config.baseline is False


def test_a_non_finite_diffusion_loss_is_a_gap_in_the_report_not_an_error(in_process, quick_run, tmp_path):
    copy = tmp_path / quick_run[1].name
    shutil.copytree(quick_run[1], copy)
    diffusion = torch.load(copy / "stage2" / "diffusion.pt")
    history = [(32 * k, 1 / k) for k in range(1, 7)]  # a loss that went NaN, then infinite, then came back
    history[1], history[2] = (64, float("nan")), (96, float("inf"))
    diffusion["metrics"]["history"] = history
    torch.save(diffusion, copy / "stage2" / "diffusion.pt")
    result = in_process("dpt.py", "--report", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    page = (copy / "report.html").read_text()
    lines = re.findall(r'<polyline data-series="loss" points="([^"]+)"', page)
    assert len(lines) == 2 and not re.search(r"nan|inf", " ".join(lines))  # [0] and [3:], around the gap
    assert sum(len(line.split()) for line in lines) == len(history) - 2
    assert "2 non-finite values: gaps in the line" in page


def test_report_flag_redraws_the_page_of_a_finished_run_without_training(in_process, quick_run, tmp_path,
                                                                           monkeypatch):
    _, run = quick_run
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    before = {path: path.stat().st_mtime_ns for path in copy.rglob("*")}
    monkeypatch.chdir(tmp_path)
    result = in_process(*at_test_size("python dpt.py --report runs/shapes-1l-s0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (copy / "report.html").read_text() == (run / "report.html").read_text()
    assert {path: path.stat().st_mtime_ns for path in copy.rglob("*") if path.name != "report.html"} == before
    assert_one_line_error(in_process("dpt.py", "--report", str(tmp_path / "nothing")), "no results.json there")


def test_each_model_trains_on_its_labels_the_three_diffusion_models_sample_one_noise_and_stage_3_the_samples(
        tmp_path, monkeypatch):
    trained_on, diffusion_settings, noise = {}, {}, {}
    real_unet_train, real_fixmatch_train = unet.train, fixmatch.train
    real_generate, real_noise = sample.generate, sample.initial_noise

    def unet_train(settings, images, labels, num_classes, **kwargs):
        name = os.path.basename(settings.out) if "every_label" not in settings.out else "every_label"
        trained_on[name], diffusion_settings[name] = labels, settings
        return real_unet_train(settings, images, labels, num_classes, **kwargs)

    def generate(model, per_class, *args, **kwargs):  # the noise each model's samples (not previews) start from
        drawn = noise.setdefault(model, []) if per_class == 3 else []
        monkeypatch.setattr(sample, "initial_noise", lambda *a: drawn.append(real_noise(*a)) or drawn[-1])
        return real_generate(model, per_class, *args, **kwargs)
    monkeypatch.setattr(sample, "generate", generate)

    def fixmatch_train(settings, dataset, labeled_index, generated=None, **kwargs):
        trained_on[os.path.basename(settings.out)] = generated
        calls.append((settings, labeled_index))
        return real_fixmatch_train(settings, dataset, labeled_index, generated, **kwargs)
    calls = []
    monkeypatch.setattr(unet, "train", unet_train)
    monkeypatch.setattr(fixmatch, "train", fixmatch_train)
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--diffusion-confident", "0.5", "--out", str(tmp_path)])
    monkeypatch.setenv("DPT_FID_WEIGHTS", "/missing")
    plumbing.run_main(dpt.main)
    # A finished run lets go of its folders (the run's and the oracle's): a library user may run again.
    assert not [lock for lock in plumbing.HELD_LOCKS if lock.name.startswith(str(tmp_path))]
    run = tmp_path / "shapes-1l-s0"
    pseudo = torch.load(run / "pseudo_labels.pt")
    assert (pseudo["labels"] != data.load_dataset(SHAPES_FILE).train_y).any()
    # Stage 2 sees the surer half of each class's pseudo labels; the rest as the null class (10).
    assert torch.equal(trained_on["stage2"].cpu(), unet.keep_confident(pseudo["labels"], pseudo["confidence"], 0.5, 10))
    assert 0.4 < (trained_on["stage2"] == 10).float().mean() < 0.6
    # The references, with the tiny preset's --baseline: the labeled images alone with their true label and
    # every other image as the null class; every true label, with seed 0 in OUT/every_label. Stage 2's recipe.
    shapes, split = data.load_dataset(SHAPES_FILE), torch.load(run / "split.pt")["indices"]
    few = trained_on["few_labels"].cpu()
    assert torch.equal(few[split], shapes.train_y[split]) and (few[split] < 10).all()
    assert (few == 10).sum() == 2000 - 10 and torch.equal(trained_on["every_label"].cpu(), shapes.train_y)
    every = diffusion_settings["every_label"]
    assert os.path.dirname(every.out) == str(tmp_path / "every_label") and every.seed == dpt.EVERY_LABEL_SEED
    recipe = lambda settings: {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("out", "seed",
                                                                                                  "labels_file")}
    assert recipe(diffusion_settings["few_labels"]) == recipe(diffusion_settings["stage2"]) == recipe(every)
    # The three sample sets: the same noise, image by image (and so the same sampler, guidance, K and seed).
    first, *others = (torch.cat(drawn) for drawn in noise.values())
    assert len(others) == 2 and first.shape == (30, 3, 32, 32) and all(torch.equal(first, other) for other in others)
    for name in ("samples.pt", "few_labels/samples.pt", "every_label/samples.pt"):
        assert torch.equal(torch.load(run / name)["labels"], torch.arange(10).repeat_interleave(3)), name
    samples = torch.load(run / "samples.pt")
    assert trained_on["stage1"] is None
    assert torch.equal(trained_on["stage3"][0], samples["images"]) and torch.equal(trained_on["stage3"][1],
                                                                                   samples["labels"])
    # The oracle: every training image with its true label, no unlabeled loss, seed 0, in OUT/oracle; trained
    # after DPT's own stages, which therefore cannot have used it.
    oracle, labeled = calls[-1]
    assert [os.path.basename(settings.out) for settings, _ in calls[:-1]] == ["stage1", "stage3", "baseline"]
    assert trained_on["baseline"] is None  # the tiny preset's labeled-only baseline: the labeled images alone
    assert os.path.dirname(oracle.out) == str(tmp_path / "oracle") and oracle.seed == dpt.ORACLE_SEED
    assert torch.equal(labeled, torch.arange(2000)) and oracle.lambda_u == 0 and trained_on[os.path.basename(
        oracle.out)] is None


def test_every_artifact_comes_from_the_ema_weights_never_from_the_ones_the_optimizer_steps(quick_run):
    _, run = quick_run
    differ = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))
    for stage in ("stage1", "stage3"):  # classifier.pt holds the EMA model (its BN statistics included)
        saved, checkpoint = torch.load(run / stage / "classifier.pt")["model"], torch.load(run / stage / "ckpt.pt")
        assert all(torch.equal(saved[k], checkpoint["ema"][k]) for k in saved), stage
        assert differ(saved, checkpoint["model"]), stage  # QUICK's steps leave the two apart
    diffusion, checkpoint = torch.load(run / "stage2" / "diffusion.pt")["model"], torch.load(run / "stage2" / "ckpt.pt")
    assert all(torch.equal(diffusion[k], checkpoint["ema"][k]) for k in diffusion)
    assert differ(diffusion, checkpoint["model"])
    # The pseudo labels and the samples are what the EMA networks make, and the raw ones make others.
    shapes = data.load_dataset(SHAPES_FILE)
    stage1 = torch.load(run / "stage1" / "ckpt.pt")
    judge = fixmatch.load_classifier(run / "stage1" / "classifier.pt")[0]
    pseudo_labels = torch.load(run / "pseudo_labels.pt")
    # Labels and confidences: after QUICK's 12 steps both networks may give every image one label.
    assert all(map(torch.equal, (pseudo_labels["labels"], pseudo_labels["confidence"]),
                   fixmatch.predict(judge, shapes.train_x)))
    judge.load_state_dict(stage1["model"])
    assert not torch.equal(pseudo_labels["confidence"], fixmatch.predict(judge, shapes.train_x)[1])
    samples = torch.load(run / "samples.pt")
    settings = json.loads((run / "results.json").read_text())["config"]
    model = unet.load_diffusion(run / "stage2" / "diffusion.pt")
    redrawn = lambda network: sample.generate(network, settings["sample_per_class"], settings["sample_solver"],
                                              settings["sample_steps"], settings["sample_guidance"],
                                              seed=settings["seed"], progress=False)[0]
    assert torch.equal(redrawn(model), samples["images"])
    model.load_state_dict(checkpoint["model"])
    assert not torch.equal(redrawn(model), samples["images"])


def test_the_oracle_is_trained_on_every_true_label_and_judges_the_samples_class_by_class(quick_run):
    _, run = quick_run
    results = json.loads((run / "results.json").read_text())
    oracle_path = pathlib.Path(results["oracle"])
    assert oracle_path.parent.parent == run.parent / "oracle"
    oracle, metrics = fixmatch.load_classifier(oracle_path)
    shapes = data.load_dataset(SHAPES_FILE)
    assert results["oracle_accuracy"] == metrics["accuracy"] == pytest.approx(
        fixmatch.accuracy(oracle, shapes.test_x, shapes.test_y))
    samples = torch.load(run / "samples.pt")
    right = fixmatch.predict(oracle, samples["images"])[0] == samples["labels"]
    assert results["oracle_sample_accuracy"] == pytest.approx(right.float().mean().item())
    assert results["oracle_sample_accuracy_per_class"] == pytest.approx(
        [right[samples["labels"] == c].float().mean().item() for c in range(10)])


def test_each_oracle_recipe_has_its_own_folder_and_free_settings_share_one(small_shapes):
    config = configuration.DPTConfig(dataset="shapes", preset="tiny", out="runs")
    configuration.resolve(config)
    folder = lambda **changes: dpt.oracle_settings(dataclasses.replace(config, **changes), small_shapes).out
    assert folder() == folder(ssl_eval_every=7, seed=3, stage3_steps=9, diffusion_images=5)  # not the oracle's recipe
    # the oracle has no unlabeled loss: its settings change nothing it trains
    assert folder() == folder(ssl_threshold="fixmatch", ssl_tau=0.7, ssl_freematch_start=0.0, ssl_fairness=0.0)
    assert folder() == folder(ssl_freematch_start=0.5, ssl_fairness=0.01)
    assert len({folder(), folder(ssl_steps=2000), folder(ssl_lr=0.1), folder(ssl_precise_bn=0),
                folder(ssl_uratio=3)}) == 5  # uratio sets the oracle's batch


def test_seeds_runs_one_folder_per_seed_resumes_them_and_summarizes_their_results(quick_run, tmp_path):
    shutil.copytree(quick_run[1], tmp_path / "shapes-1l-s0")  # seed 0 is finished already
    shutil.copytree(quick_run[1].parent / "oracle", tmp_path / "oracle")
    shutil.copytree(quick_run[1].parent / "every_label", tmp_path / "every_label")
    finished = {path: path.stat().st_mtime_ns for path in (tmp_path / "shapes-1l-s0").rglob("*.pt")}
    command = at_test_size("python dpt.py --dataset shapes --labels 1 --seeds 0-4", "--dataset", SHAPES_FILE, *SECONDS,
                           "--seeds", "0-1", "--out", str(tmp_path))
    result = run_script(*command, DPT_FID_WEIGHTS="/missing")  # seed 1 without FID, seed 0 with it
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "shapes-1l-s0").rglob("*.pt")} == finished
    assert "training the every-label diffusion model" not in result.stderr  # seed 1 reuses seed 0's
    assert "training the oracle" not in result.stderr
    summary = json.loads((tmp_path / "shapes-1l-seeds0-1.json").read_text())
    runs = [json.loads((tmp_path / f"shapes-1l-s{seed}" / "results.json").read_text()) for seed in (0, 1)]
    assert [row["seed"] for row in summary["runs"]] == [0, 1] and runs[1]["seed"] == 1
    assert runs[0]["stage1_accuracy"] != runs[1]["stage1_accuracy"]  # two different runs
    for _, field, _ in report.SWEEP_COLUMNS:
        values = ([sum(r["wall_time_s"].values()) / 60 for r in runs] if field == "minutes"
                  else [r[field] for r in runs])
        assert [row[field] for row in summary["runs"]] == pytest.approx(values), field
        assert summary["mean"][field] == pytest.approx(np.mean(values)), field
        assert summary["std"][field] == pytest.approx(np.std(values, ddof=1)), field
    gains = [r["stage3_gain"] for r in runs]
    assert summary["stage3_above_stage1"] == f"{sum(g > 0 for g in gains)} of 2"
    assert "mean ± std" in result.stdout and f"{100 * np.mean(gains):.2f} ± " in result.stdout
    page = (tmp_path / "shapes-1l-seeds0-1.html").read_text()
    assert 'href="shapes-1l-s0/report.html"' in page and 'href="shapes-1l-s1/report.html"' in page
    assert f"{100 * summary['mean']['oracle_sample_accuracy']:.2f}" in page
    # The same command again trains nothing and writes the same summary.
    everything = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.pt")}
    again = run_script(*command, DPT_FID_WEIGHTS="/missing")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.pt")} == everything
    assert json.loads((tmp_path / "shapes-1l-seeds0-1.json").read_text()) == summary


def test_the_every_label_model_is_one_per_dataset_and_stage_2_recipe_whatever_the_run_and_seed(small_shapes):
    config = configuration.DPTConfig(dataset="shapes", preset="tiny", out="runs")
    configuration.resolve(config)
    folder = lambda **changes: dpt.every_label_folder(dataclasses.replace(config, **changes), small_shapes)
    assert folder() == folder(seed=3, labels=4, diffusion_confident=1.0, ssl_steps=7, sample_guidance=2,
                              stage3_steps=9, diffusion_micro_batch=8, compile=True)  # none changes what it trains
    assert len({folder(), folder(diffusion_images=5), folder(diffusion_lr=0.1), folder(flip=not config.flip),
                folder(diffusion_label_dropout=0.2), folder(bf16=True)}) == 6


def test_redo_removes_the_references_with_the_stage_they_go_with(tmp_path):
    made = ["stage2/diffusion.pt", "few_labels/diffusion.pt", "few_labels/samples.pt", "few_labels/fid.json",
            "every_label/samples.pt", "every_label/fid.json", "samples.pt", "fid.json"]
    for name in made:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("made")
    timings = {"stage2": 1.0, "few_labels": 2.0, "sample": 3.0, "reference_samples": 4.0, "fid": 5.0}
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    kept = lambda: sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    dpt.remove_stages(str(tmp_path), ["fid"])
    assert kept() == sorted(set(made) - {"few_labels/fid.json", "every_label/fid.json", "fid.json"} | {"timings.json"})
    dpt.remove_stages(str(tmp_path), ["sample", "stage3", "fid"])  # new samples: the references' too
    assert kept() == ["few_labels/diffusion.pt", "stage2/diffusion.pt", "timings.json"]
    assert json.loads((tmp_path / "timings.json").read_text()) == {"stage2": 1.0, "few_labels": 2.0}
    dpt.remove_stages(str(tmp_path), ["stage2", "sample", "stage3", "fid"])  # stage 2's recipe: the few-label model
    assert kept() == ["timings.json"] and json.loads((tmp_path / "timings.json").read_text()) == {}


def test_a_set_against_itself_has_distance_0_and_precision_and_recall_1():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    measured = fid.feature_metrics(features, features.clone())
    assert measured["feature_fd"] == pytest.approx(0, abs=1e-9)
    assert (measured["precision"], measured["recall"]) == (1.0, 1.0)


def test_two_disjoint_clusters_have_precision_and_recall_0_and_the_distance_of_their_means():
    cluster = torch.randn(200, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    measured = fid.feature_metrics(cluster, cluster + 50)
    assert (measured["precision"], measured["recall"]) == (0.0, 0.0)
    assert measured["feature_fd"] == pytest.approx(8 * 50 ** 2, rel=1e-9)  # same covariance: |mean difference|^2


def test_precision_and_recall_count_the_points_inside_the_other_sets_k_nn_balls_by_hand():
    real, generated = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.5], [2.5], [6.0]])
    # k = 1: the real balls are [-1, 1], [0, 2], [1, 5]: 0.5 and 2.5 are inside, 6 is not;
    # the generated balls are radius 2, 2 and 3.5 around 0.5, 2.5, 6: every real point is inside.
    assert fid.precision_recall(real, generated, k=1) == pytest.approx((2 / 3, 1.0))
    assert fid.precision_recall(generated, real, k=1) == pytest.approx((1.0, 2 / 3))  # the roles swap


def test_the_feature_frechet_distance_of_two_gaussians_is_the_closed_form():
    generator = torch.Generator().manual_seed(2)
    mean, scale = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.5, 1.0, 2.0, 3.0])
    real, generated = torch.randn(200_000, 4, generator=generator), torch.randn(200_000, 4, generator=generator)
    # N(0, I) against N(mean, diag(scale^2)): |mean|^2 + sum (1 - scale)^2
    closed_form = (mean ** 2).sum() + ((1 - scale) ** 2).sum()
    measured = fid.feature_metrics(real, generated * scale + mean)["feature_fd"]
    assert measured == pytest.approx(closed_form.item(), rel=0.01)


def test_the_oracles_features_are_its_penultimate_layer_that_its_last_layer_classifies():
    for arch in ("small", "wrn28_2"):
        model = fixmatch.make_classifier(arch, 10, [0.5] * 3, [0.25] * 3).eval()
        images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
        features = fixmatch.embed(model, images)
        assert features.shape == (5, model.fc.in_features)
        with torch.no_grad():
            assert torch.allclose(model.fc(features), model(images), atol=1e-5), arch


@pytest.mark.parametrize("seeds", ["3-1", "x", "1,1", "-2"])
def test_seeds_that_are_not_a_range_or_a_list_are_refused_before_any_work(in_process, tmp_path, seeds):
    assert_one_line_error(in_process("dpt.py", *QUICK, "--seeds", seeds, "--out", str(tmp_path)), "--seeds")
    assert not list(tmp_path.iterdir())


def test_last_moves_is_how_far_the_last_three_evaluations_spread(quick_run):
    assert report.last_moves([(1, 0.5), (2, 0.9), (3, 0.92), (4, 0.91)]) == pytest.approx(0.02)
    assert report.last_moves([(1, 0.5), (2, 0.9)]) is None
    results = json.loads((quick_run[1] / "results.json").read_text())
    for stage in ("stage1", "stage3"):  # QUICK evaluates 3 times: the check runs on a short run
        history = fixmatch.load_classifier(quick_run[1] / stage / "classifier.pt")[1]["history"]
        accuracies = [accuracy for _, accuracy in history]
        assert len(history) == 3 and results[f"{stage}_last_moves"] == max(accuracies) - min(accuracies)


class FirstPixelJudge(torch.nn.Module):
    """A classifier whose answer is known: the class written in an image's first pixel."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.unused = num_classes, torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return F.one_hot(images[:, 0, 0, 0].long(), self.num_classes).float() * 10


def test_the_judge_counts_the_generated_images_it_puts_in_their_intended_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # class 3 has no images
    answers = torch.tensor([0, 0, 0, 0, 1, 1, 1, 3, 0, 1, 3, 3])  # 4, 3 and 0 right of 4
    images = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = answers
    fidelity = report.sample_accuracy(fixmatch.predict(FirstPixelJudge(4), images)[0], labels, num_classes=4)
    assert fidelity["accuracy"] == pytest.approx(7 / 12)
    assert fidelity["per_class"] == [1.0, 0.75, 0.0, None]


def test_rerunning_a_finished_run_redoes_nothing(in_process, quick_run, fid_weights, tmp_path):
    shutil.copytree(quick_run[1].parent, tmp_path / "out")
    run = tmp_path / "out" / quick_run[1].name
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")}
    result = in_process("dpt.py", *QUICK, "--baseline", "--out", str(run.parent), "--fid-weights", fid_weights)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")} == before


def test_a_changed_setting_is_refused_unless_redo_reruns_its_stage(in_process, quick_run, tmp_path):
    run = tmp_path / "shapes-1l-s0"
    shutil.copytree(quick_run[1], run)
    result = in_process("dpt.py", *QUICK, "--sample-guidance", "2", "--out", str(tmp_path), DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(result, "other settings (sample_guidance)", "--redo sample")
    stage2 = (run / "stage2" / "diffusion.pt").stat().st_mtime_ns
    samples = (run / "samples.pt").stat().st_mtime_ns
    result = in_process("dpt.py", *QUICK, "--sample-guidance", "2", "--redo", "sample", "--out", str(tmp_path),
                        DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "stage2" / "diffusion.pt").stat().st_mtime_ns == stage2  # earlier stages are kept
    assert (run / "samples.pt").stat().st_mtime_ns != samples and not (run / "fid.json").exists()
    assert "FID skipped" in result.stderr and json.loads((run / "results.json").read_text())["fid"] is None
    report = (run / "report.html").read_text()  # rewritten: the new guidance, no FID
    assert '"sample_guidance": 2.0' in report and "<th>FID of the samples</th><td>-</td>" in report


def test_a_run_folder_without_its_config_json_is_refused_not_adopted(in_process, quick_run, tmp_path):
    run = tmp_path / "shapes-1l-s0"
    shutil.copytree(quick_run[1], run)
    (run / "config.json").unlink()
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")}
    result = in_process("dpt.py", *QUICK, "--sample-guidance", "2", "--out", str(tmp_path))
    assert_one_line_error(result, "no config.json", "delete the folder")
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")} == before
    assert not (run / "config.json").exists()


def test_redo_stage1_drops_the_old_baseline_from_timings_and_report_and_advice_names_a_valid_redo(in_process, quick_run,
                                                                                                  tmp_path):
    run = tmp_path / "shapes-1l-s0"
    shutil.copytree(quick_run[1], run)
    shutil.copytree(quick_run[1].parent / "oracle", tmp_path / "oracle")
    # The baseline's file, made unreadable: --report's advice must be a --redo that the rules accept.
    (run / "baseline" / "classifier.pt").write_bytes(b"garbage")
    result = in_process("dpt.py", "--report", str(run))
    assert_one_line_error(result, "--redo stage1")
    redo = result.stderr.split("--redo ")[1].split()[0]
    # Redone without the baseline (the tiny preset's is on unless --no-baseline): the old one is gone.
    result = in_process("dpt.py", *QUICK, "--no-baseline", "--redo", redo, "--out", str(tmp_path),
                        DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline" not in json.loads((run / "timings.json").read_text()) and not (run / "baseline").exists()
    page = (run / "report.html").read_text()
    assert 'data-series="baseline"' not in page and 'data-stage="baseline"' not in page
    assert 'data-series="stage 1"' in page


def one_class_judge(results):
    """A classifier that puts every image in one class, one the stage-1 judge of
    `results` does not approve wholly, so that the two judges' figures differ class by class."""
    judge = fixmatch.make_classifier("small", 10, [0.5] * 3, [0.25] * 3).eval()
    chosen = next(c for c, share in enumerate(results["sample_accuracy_per_class"]) if share < 1)
    with torch.no_grad():
        judge.fc.weight.zero_()
        judge.fc.bias.copy_(torch.where(torch.arange(10) == chosen, 10.0, -10.0))
    return judge, chosen


def test_a_run_killed_in_each_training_with_another_oracle_cached_ends_as_the_uninterrupted_run_with_that_judge(
        in_process, quick_run, tmp_path):
    """Killed in stage 1, in stage 2, in the few-label diffusion model and in the
    every-label one, then run to its end: every file as in a run never killed. The
    oracle is trained once per dataset: a run reuses the cached one, whatever it
    holds (here one_class_judge, with a made-up accuracy), and nothing DPT makes
    changes with it; each judge's figures are its own."""
    command = [*QUICK, "--ssl-eval-every", "3", "--out", str(tmp_path)]  # the tiny preset: --baseline, the references
    run, reference = tmp_path / "shapes-1l-s0", quick_run[1]
    results = json.loads((reference / "results.json").read_text())
    cached = tmp_path / "oracle" / pathlib.Path(results["oracle"]).parent.name / "classifier.pt"
    judge, chosen = one_class_judge(results)
    fixmatch.save_classifier(judge, fixmatch.FixMatchConfig(arch="small"), {"accuracy": 0.123, "history": []},
                             str(cached))
    before = cached.stat().st_mtime_ns
    every = tmp_path / "every_label" / next((reference.parent / "every_label").iterdir()).name  # the same recipe
    # A checkpoint every 3 steps (--ssl-eval-every is free to change), so a kill at the
    # first leaves 9 of stage 1's 12 steps to resume; stage 2 saves one every step.
    kill_when(start_run(*command), run / "stage1" / "ckpt.pt")
    assert not (run / "stage1" / "classifier.pt").exists()
    stage1_step = torch.load(run / "stage1" / "ckpt.pt", weights_only=False)["step"]
    with open(tmp_path / "stderr", "w") as stderr:
        kill_when(start_run(*command, stderr=stderr), run / "stage2" / "ckpt.pt")
    assert not (run / "stage2" / "diffusion.pt").exists()
    assert f"resuming {run / 'stage1' / 'ckpt.pt'} at step {stage1_step} of 12" in (tmp_path / "stderr").read_text()
    stage2_images = torch.load(run / "stage2" / "ckpt.pt")["images_seen"]
    with open(tmp_path / "stderr", "w") as stderr:
        kill_when(start_run(*command, stderr=stderr), run / "few_labels" / "ckpt.pt")
    resumed = (tmp_path / "stderr").read_text()
    assert f"resuming {run / 'stage2' / 'ckpt.pt'} at {stage2_images} of 128 images" in resumed
    assert not (run / "few_labels" / "diffusion.pt").exists()
    few_images = torch.load(run / "few_labels" / "ckpt.pt")["images_seen"]
    kill_when(start_run(*command), every / "ckpt.pt")
    assert (run / "few_labels" / "diffusion.pt").exists() and not (every / "diffusion.pt").exists()
    every_images = torch.load(every / "ckpt.pt")["images_seen"]
    assert few_images < 128 and every_images < 128
    result = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {every / 'ckpt.pt'} at {every_images} of 128 images" in result.stderr
    for name in ("pseudo_labels.pt", "samples.pt", "few_labels/samples.pt", "every_label/samples.pt"):
        ours, theirs = torch.load(run / name), torch.load(reference / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs if torch.is_tensor(theirs[k])), name
    for name in ("stage1/classifier.pt", "stage2/diffusion.pt", "stage3/classifier.pt", "few_labels/diffusion.pt"):
        ours, theirs = torch.load(run / name, weights_only=False), torch.load(reference / name, weights_only=False)
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"]), name
    # The cached oracle judged, untouched; the stage-1 judge's figures and the stages' are the uninterrupted run's.
    assert cached.stat().st_mtime_ns == before and "training the oracle" not in result.stderr
    ours, samples = json.loads((run / "results.json").read_text()), torch.load(run / "samples.pt")
    assert ours["oracle_accuracy"] == 0.123 and ours["oracle_sample_accuracy"] == pytest.approx(
        (fixmatch.predict(judge, samples["images"])[0] == samples["labels"]).float().mean().item())
    assert ours["oracle_sample_accuracy_per_class"] == [float(c == chosen) for c in range(10)]
    assert ours["sample_accuracy_per_class"] == results["sample_accuracy_per_class"]
    assert [ours[f"{stage}_accuracy"] for stage in ("stage1", "stage3")] == [
        results[f"{stage}_accuracy"] for stage in ("stage1", "stage3")]


def test_the_same_redo_command_after_a_kill_resumes_the_redone_stage_and_redoes_it_again_once_finished(
        in_process, quick_run, tmp_path):
    run = tmp_path / "shapes-1l-s0"
    shutil.copytree(quick_run[1], run)
    (run / "stage3" / "ckpt.pt").unlink()  # the finished run's last checkpoint: wait for the redo's first
    command = [*QUICK, "--ssl-eval-every", "3", "--out", str(tmp_path), "--redo", "stage3"]
    kill_when(start_run(*command), run / "stage3" / "ckpt.pt")
    assert not (run / "stage3" / "classifier.pt").exists()
    step = torch.load(run / "stage3" / "ckpt.pt", weights_only=False)["step"]
    result = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the --redo stage3" in result.stderr
    assert f"resuming {run / 'stage3' / 'ckpt.pt'} at step {step} of 12" in result.stderr
    ours = torch.load(run / "stage3" / "classifier.pt", weights_only=False)["model"]
    theirs = torch.load(quick_run[1] / "stage3" / "classifier.pt", weights_only=False)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # as if never killed
    again = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")  # finished: the same command redoes it
    assert again.returncode == 0 and "resuming" not in again.stderr, again.stderr[-3000:]
    assert "fixmatch:" in again.stderr  # stage 3 trained again: the only classifier this command trains


def test_one_file_spelled_another_way_is_the_same_run_and_trains_nothing(in_process, quick_run, tmp_path):
    shutil.copytree(quick_run[1].parent, tmp_path / "out")
    folder, name = os.path.split(SHAPES_FILE)
    respelled = os.path.join(folder, "..", os.path.basename(folder), ".", name)
    result = in_process("dpt.py", *QUICK, "--dataset", respelled, "--out", str(tmp_path / "out"),
                        DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" not in result.stderr and "images/s" not in result.stderr  # every stage was done
    configs = [configuration.DPTConfig(dataset=spelling, preset="tiny") for spelling in (SHAPES_FILE, respelled)]
    for config in configs:
        configuration.resolve(config)
    assert configuration.classifier_settings(configs[0], "stage1") == configuration.classifier_settings(configs[1], "stage1")


def test_no_stage_reads_a_setting_of_a_later_stage():
    """Else a --redo of the later stage changes the settings of an earlier stage
    that a kill left unfinished, and its checkpoint refuses to resume."""
    config = configuration.DPTConfig(dataset="shapes", preset="tiny")
    configuration.resolve(config)
    settings = {"stage1": lambda c: configuration.classifier_settings(c, "stage1")[0],
                "stage2": lambda c: configuration.diffusion_settings(c)[0], "sample": lambda c: configuration.sample_settings(c)[0],
                "stage3": lambda c: configuration.classifier_settings(c, "stage3")[0]}
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.125, str: lambda v: v + "x"}
    for name, stage in configuration.FIELD_STAGE.items():
        value = getattr(config, name)
        changed = dataclasses.replace(config, **{name: other[type(value)](value)})
        for earlier, make in settings.items():
            if configuration.STAGES.index(earlier) < configuration.STAGES.index(stage):
                assert make(changed) == make(config), (name, earlier)


def test_a_split_of_other_data_or_an_unreadable_split_is_refused_and_the_advised_redo_starts_over(in_process,
        quick_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quick_run[1].parent, out)
    run = out / "shapes-1l-s0"
    other = tmp_path / "regenerated" / "shapes.pt"  # another file of the same name: the same run folder
    other.parent.mkdir()
    (train_x, train_y), (test_x, test_y) = data.make_shapes(2000, seed=7), data.make_shapes(500, seed=8)
    torch.save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
                "classes": list(data.SHAPES), "flips": True}, other)
    command = [*QUICK, "--dataset", str(other), "--no-baseline", "--out", str(out)]  # no references: not the claim
    refused = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(refused, str(run), "other data", "--redo stage1")
    redone = in_process("dpt.py", *command, "--redo", "stage1", DPT_FID_WEIGHTS="/missing")
    assert redone.returncode == 0, redone.stderr[-3000:]
    indices = torch.load(run / "split.pt")["indices"]
    assert torch.equal(indices, data.labeled_split(train_y, 1, seed=0))
    assert not torch.equal(indices, torch.load(quick_run[1] / "split.pt")["indices"])

    (run / "split.pt").write_bytes(b"half a split")
    unreadable = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(unreadable, "split.pt", "--redo stage1")
    (run / "stage1" / "ckpt.pt").unlink()  # the finished run's: wait for the redo's first
    kill_when(start_run(*command, "--redo", "stage1"), run / "stage1" / "ckpt.pt")  # the split is made by then
    assert torch.equal(torch.load(run / "split.pt")["indices"], indices)  # the rest of the redo is as above


def test_every_network_dpt_loads_goes_to_the_runs_device(quick_run, fid_weights, tmp_path, monkeypatch):
    """The meta device stands in for a GPU: both classifiers, the baseline, the
    oracle, the three diffusion models and Inception must be loaded onto the
    run's device, and handed on to work there. The work itself is stubbed (meta
    tensors hold no values); the samples and their fid.json are removed so that
    the diffusion models and Inception are loaded."""
    out = tmp_path / "out"
    shutil.copytree(quick_run[1].parent, out)
    run = out / "shapes-1l-s0"
    samples = torch.load(run / "samples.pt")
    for folder in (run, run / "few_labels", run / "every_label"):
        (folder / "samples.pt").unlink()
        (folder / "fid.json").unlink()
    meta = torch.device("meta")
    loaded, used = [], []

    def spy(module, name):
        real = getattr(module, name)

        def load(*args, **kwargs):
            result = real(*args, **kwargs)
            model = result[0] if isinstance(result, tuple) else result
            loaded.append((name, {tensor.device for tensor in model.state_dict().values()}))
            return result
        monkeypatch.setattr(module, name, load)
    for module, name in ((fixmatch, "load_classifier"), (unet, "load_diffusion"), (fid, "load_inception")):
        spy(module, name)

    def device_of(model):
        used.append(next(model.parameters()).device)
    monkeypatch.setattr(sample, "generate", lambda model, *a, **k: (device_of(model), samples["images"],
                                                                    samples["labels"])[1:])
    monkeypatch.setattr(dpt, "split_statistics", lambda model, images, keep_logits, rank, world: (
        device_of(model), {"mu": np.zeros(4), "sigma": np.eye(4), "count": len(images),
                           "logits": torch.zeros(len(images), 10)})[1])
    monkeypatch.setattr(fixmatch, "predict", lambda judge, images, batch=1024: (
        device_of(judge), (samples["labels"], torch.ones(len(images))))[1])  # the two judges
    monkeypatch.setattr(fixmatch, "embed", lambda judge, images, batch=1024: (
        device_of(judge), torch.randn(len(images), 4))[1])  # the oracle's features
    monkeypatch.setattr(plumbing, "distributed_setup", lambda: (0, 1, meta))
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--baseline", "--out", str(out), "--fid-weights", fid_weights])
    dpt.main()
    assert sorted(name for name, _ in loaded) == ["load_classifier"] * 4 + ["load_diffusion"] * 3 + ["load_inception"]
    assert all(devices == {meta} for _, devices in loaded), loaded
    # Sampling three times; FID of the training images and of three sample sets; the stage-1 judge and the
    # oracle of DPT's samples, then the oracle's share and features of each set and its features of the test images.
    assert len(used) == 3 + 4 + 2 + 3 + 3 + 1 and set(used) == {meta}


@pytest.mark.parametrize("damaged", ["stage1/classifier.pt", "pseudo_labels.pt", "stage2/diffusion.pt",
                                     "samples.pt", "stage3/classifier.pt", "fid.json", "timings.json"])
def test_a_damaged_artifact_is_one_line_whose_advice_followed_literally_remakes_it_alone(in_process,
        quick_run, tmp_path, damaged):
    """The cheapest true fix: a file that the files before it make again is
    removed and made again alone, the same as before (a redo would rerun every
    later stage too); its wall time aside, every other file stays as it was."""
    out = tmp_path / "out"
    shutil.copytree(quick_run[1].parent, out)
    run = out / "shapes-1l-s0"
    whole = folder_state(run)
    (run / damaged).write_bytes(b"half a file")
    command = [*QUICK, "--out", str(out)]
    refused = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(refused, damaged, "remove it and run the same command again")
    (run / damaged).unlink()
    finished = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert finished.returncode == 0, finished.stderr[-3000:]
    remade = folder_state(run)
    written = {"results.json", "report.html", "timings.json"}  # by every finished command
    if damaged == "fid.json":  # without Inception weights (offline), FID is skipped instead
        assert "FID skipped" in finished.stderr and "fid.json" not in remade
        written.add("fid.json")
    if damaged.endswith("classifier.pt") or damaged.endswith("diffusion.pt"):  # timed afresh: its weights
        written.add(damaged)
        assert_same_tensors(torch.load(run / damaged)["model"], torch.load(quick_run[1] / damaged)["model"])
    assert {name: digest for name, digest in remade.items() if name not in written} == {
        name: digest for name, digest in whole.items() if name not in written}


def assert_same_tensors(found, expected):
    assert found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in expected)


def folder_state(folder):
    """Every file under `folder` and a digest of its bytes, but the lock's (it
    names the last process that held it)."""
    return {str(path.relative_to(folder)): zlib.crc32(path.read_bytes()) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != "run.lock"}


REFUSALS = {  # a finished run changed so, then its command with these flags: one line with these words
    "the data regenerated": ([], "was made from other data", "--redo stage1"),
    "the data regenerated, --redo stage2": (["--redo", "stage2"], "was made from other data", "--redo stage1"),
    "another setting": (["--ssl-steps", "13"], "other settings (ssl_steps)", "--redo stage1"),
    "other FID weights under the same name": ([], "fid.json was computed with other --fid-weights", "--redo fid"),
    "a damaged pseudo_labels.pt, --redo sample": (["--redo", "sample"], "pseudo_labels.pt is damaged",
                                                  "remove it"),
    "a damaged split.pt, --redo stage2": (["--redo", "stage2"], "split.pt is damaged", "--redo stage1"),
    "a damaged config.json": ([], "config.json is damaged", "delete the folder"),
    "a damaged redo.json, --redo stage3": (["--redo", "stage3"], "redo.json is damaged", "remove it"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_command_leaves_every_file_of_the_run_folder_as_it_was(quick_run, fid_weights, tmp_path, case,
                                                                         monkeypatch):
    """It decides before it removes: results.json, the stages a --redo would
    rerun and their wall times are all still there after the refusal."""
    flags, *words = REFUSALS[case]
    run = tmp_path / "shapes-1l-s0"
    shutil.copytree(quick_run[1], run)
    dataset, weights = SHAPES_FILE, str(tmp_path / "inception.pth")
    shutil.copy(fid_weights, weights)  # the run's FID weights, found where they were
    if "regenerated" in case:  # another file of the same name: the same run folder
        dataset = str(tmp_path / "regenerated" / "shapes.pt")
        os.makedirs(os.path.dirname(dataset))
        (train_x, train_y), (test_x, test_y) = data.make_shapes(2000, seed=7), data.make_shapes(500, seed=8)
        torch.save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "flips": True},
                   dataset)
    elif "FID weights" in case:
        torch.manual_seed(1)
        torch.save(fid.FIDInception().state_dict(), weights)
    elif "damaged" in case:
        (run / re.search(r"\w+\.(pt|json)", case).group(0)).write_bytes(b"half a file")
    monkeypatch.setenv("DPT_FID_WEIGHTS", weights)
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--out", str(tmp_path), *flags, "--dataset", dataset])
    before = folder_state(run)
    with pytest.raises(plumbing.UserError) as refusal:
        dpt.main()
    assert all(word in str(refusal.value) for word in words) and "\n" not in str(refusal.value), refusal.value
    assert folder_state(run) == before and "results.json" in before


def test_a_library_user_can_call_dpt_main_again_after_it_refused_a_setting(quick_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(quick_run[1].parent, out)
    monkeypatch.setenv("DPT_FID_WEIGHTS", "/missing")
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--out", str(out), "--stage3-steps", "13"])
    with pytest.raises(plumbing.UserError, match="--redo stage3"):  # refused after the folder was claimed
        dpt.main()
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--out", str(out)])
    dpt.main()  # the folder is free again: no "in use by process <this one>"
    assert not [lock for lock in plumbing.HELD_LOCKS if lock.name.startswith(str(out))]  # and let go again


def test_a_second_run_into_the_folder_of_a_live_one_stops_at_once_naming_it(in_process, tmp_path):
    command = [*QUICK, "--ssl-steps", "3000", "--out", str(tmp_path)]  # the first outlives the second's start
    run = tmp_path / "shapes-1l-s0"
    first = start_run(*command)
    try:
        while first.poll() is None and f"process {first.pid} " not in read_or_empty(run / "run.lock"):
            time.sleep(0.05)
        second = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
        assert_one_line_error(second, str(run), f"process {first.pid} ")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def read_or_empty(path):
    return path.read_text() if path.exists() else ""


def hold_folder(folder, held):
    """Another process that holds the folder as a run does, until it is killed."""
    plumbing.claim_folder(folder)
    held.set()
    time.sleep(120)


@pytest.mark.parametrize("script", ["fixmatch.py", "unet.py", "sample.py"])
def test_a_stage_script_refuses_a_held_out_folder_and_the_lock_dies_with_its_holder(in_process, tmp_path, script):
    processes = multiprocessing.get_context("fork")
    held = processes.Event()
    holder = processes.Process(target=hold_folder, args=(str(tmp_path), held), daemon=True)
    holder.start()
    assert held.wait(60)
    diffusion = str(tmp_path / "diffusion.pt")  # a real stage-2 artifact for sample.py to read
    unet.save_diffusion(unet.make_diffusion("unet", "tiny", 2, 8), unet.DiffusionConfig(size="tiny"), {}, diffusion)
    args = {"fixmatch.py": ["--dataset", SHAPES_FILE], "unet.py": ["--dataset", SHAPES_FILE],
            "sample.py": [diffusion]}[script]
    assert_one_line_error(in_process(script, *args, "--out", str(tmp_path)), f"process {holder.pid} ")
    holder.kill()  # SIGKILL
    holder.join()
    plumbing.claim_folder(str(tmp_path))  # free again: the kernel dropped the lock with its holder
    plumbing.HELD_LOCKS.pop().close()


# One bad value of every DPTConfig field. Booleans take no value, so "--flag=yes" is theirs.
A_FILE = os.path.join(HERE, "dpt.py")
BAD_SETTINGS = {
    "dataset": "imagenet42", "data_dir": A_FILE, "labels": "0", "seed": "-1", "preset": "huge", "out": A_FILE,
    "redo": "stage9", "baseline": None, "fid_weights": "/missing/inception.pth", "bench": None, "compile": None,
    "diffusion_ckpt_every": "-1",
    "cuda_graphs": None, "bf16": None, "flip": None, "report": "/missing/run",
    "ssl_arch": "vgg", "ssl_steps": "0", "stage3_steps": "0", "ssl_batch": "0", "ssl_uratio": "0", "ssl_lr": "0",
    "ssl_ema": "1", "ssl_threshold": "adaptive", "ssl_tau": "1.5", "ssl_freematch_start": "1.5",
    "ssl_fairness": "-1", "stage3_real_fraction": "2", "ssl_eval_every": "0", "diffusion_arch": "resnet",
    "diffusion_size": "gigantic", "diffusion_images": "0", "diffusion_batch": "0", "diffusion_micro_batch": "-1",
    "diffusion_lr": "-1", "diffusion_warmup": "-1", "diffusion_ema_halflife": "-1",
    "diffusion_p_mean": "nan", "diffusion_label_dropout": "1", "diffusion_augment": "1.5", "diffusion_confident": "0",
    "sample_per_class": "0", "sample_solver": "ddim", "sample_steps": "1", "sample_guidance": "-1",
    "fid_reference": "-1", "seeds": "3-1", "ssl_lr_cosine": "0.7", "ssl_precise_bn": "-1",
    "image_size": "60", "autoencoder": "/missing/autoencoder_kl.pth", "autoencoder_size": "xl", "msn_size": "vitz",
    "msn_weights": "/missing/msn.pth.tar", "probe_lambda": "0", "fid_stats": "/missing/reference.npz",
    "label_subset": "/missing/1imgs_class.txt", "skip_bad_images": None}


def test_no_rule_admits_an_infinite_or_nan_number_or_a_seed_numpy_cannot_take():
    for script, config_class in ((fixmatch, fixmatch.FixMatchConfig), (unet, unet.DiffusionConfig),
                                 (sample, sample.SampleConfig), (configuration, configuration.DPTConfig)):
        numbers = {field.name for field in dataclasses.fields(config_class) if field.type in (int, float)}
        for name, (valid, _) in script.RULES.items():
            if name in numbers:
                assert not any(valid(value) for value in (math.inf, -math.inf, math.nan)), (script.__name__, name)
        assert script.RULES["seed"][0](2 ** 31 - 1) and not script.RULES["seed"][0](2 ** 32), script.__name__


def test_bad_settings_cover_every_field_of_the_config():
    assert set(BAD_SETTINGS) == {field.name for field in dataclasses.fields(configuration.DPTConfig)}


@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_every_setting_with_a_bad_value_is_refused_in_one_line_naming_its_flag_before_any_work(
        name, tmp_path, monkeypatch, capsys):
    assert_refused_before_any_work(name, BAD_SETTINGS[name], tmp_path, monkeypatch, capsys)


# Every count above its ceiling (the first, the issue's: a sampler of 1e20 steps was
# accepted and failed only after hours of training).
ABOVE_CEILING = {"sample_steps": "100000000000000000000", "ssl_steps": str(2 ** 30 + 1),
                 "stage3_steps": str(2 ** 30 + 1), "ssl_eval_every": str(2 ** 30 + 1),
                 "ssl_batch": str(2 ** 20 + 1), "ssl_uratio": "1025", "ssl_precise_bn": str(10 ** 12 + 1),
                 "diffusion_images": str(10 ** 12 + 1), "diffusion_batch": str(2 ** 20 + 1),
                 "diffusion_micro_batch": str(2 ** 20 + 1), "diffusion_warmup": str(10 ** 12 + 1),
                 "diffusion_ema_halflife": str(10 ** 12 + 1), "sample_per_class": str(10 ** 12 + 1),
                 "fid_reference": str(10 ** 12 + 1), "labels": str(10 ** 12 + 1)}


@pytest.mark.parametrize("name", ABOVE_CEILING)
def test_every_count_has_a_ceiling_and_above_it_is_refused_before_any_work(name, tmp_path, monkeypatch, capsys):
    assert_refused_before_any_work(name, ABOVE_CEILING[name], tmp_path, monkeypatch, capsys, "must be from ")


# Refused where it is named, not after a run of the seeds before it, or of every stage before FID.
REFUSED_WHERE_NAMED = {
    "a seed numpy cannot take": ("seeds", "0,4294967296", (), "each from 0 to 2^31 - 1"),
    "a seed beyond --seed's range": ("seeds", "0,2147483648", (), "each from 0 to 2^31 - 1"),
    "10^11 seeds": ("seeds", "0-100000000000", (), "at most 1,000 distinct seeds"),
    "--seed beside --seeds": ("seed", "7", ("--seeds", "0-1"), "give one of them"),
    "FID weights that are not": ("fid_weights", A_FILE, (), "is not pytorch-fid's Inception weights"),
}


@pytest.mark.parametrize("case", REFUSED_WHERE_NAMED)
def test_seeds_and_the_fid_weights_are_checked_where_they_are_named(case, tmp_path, monkeypatch, capsys):
    name, value, before, words = REFUSED_WHERE_NAMED[case]
    assert_refused_before_any_work(name, value, tmp_path, monkeypatch, capsys, words, before)


def test_fid_statistics_that_are_not_inceptions_are_refused_before_any_work(tmp_path):
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "text.npz").write_text("mu, sigma")
    for stats, words in (("small.npz", "not of Inception's 2048 features"), ("text.npz", "not an .npz of FID")):
        config = configuration.DPTConfig(dataset=str(tmp_path), preset="imagenet", autoencoder=A_FILE,
                                         fid_stats=str(tmp_path / stats))
        configuration.resolve(config)
        with pytest.raises(plumbing.UserError, match=f"--fid-stats {tmp_path / stats} .*{words}"):
            configuration.check(config, 1)


def test_more_samples_than_the_machine_holds_are_refused_before_stage_1(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--sample-per-class", str(10 ** 9), "--out", str(tmp_path)])
    monkeypatch.setattr(plumbing, "memory_bytes", lambda: 24 * 2 ** 30)
    with pytest.raises(plumbing.UserError, match=r"--sample-per-class 1000000000: 10,000,000,000 images of 32x32 "
                       r"\(28,610 GiB\) do not fit in this machine's 24 GiB"):
        dpt.main()
    assert os.listdir(tmp_path) == []


def assert_refused_before_any_work(name, value, tmp_path, monkeypatch, capsys, words="", before=()):
    flag = "--" + name.replace("_", "-")
    argv = [*before, *([f"{flag}=yes"] if value is None else [flag, value])]
    monkeypatch.chdir(tmp_path)  # where ./data and a default --out would land
    monkeypatch.setattr(sys, "argv", ["dpt.py", "--dataset", "shapes", "--preset", "tiny", "--out", "runs", *argv])
    for module, loader in ((data, "load_dataset"), (imagenet, "load_folder")):
        monkeypatch.setattr(module, loader, lambda *args: pytest.fail("the dataset loaded before the check"))
    with pytest.raises(SystemExit) as exit:
        plumbing.run_main(dpt.main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    assert re.search(f"(error: |argument ){flag}[ /=]", lines[0]), lines[0]  # the flag the user typed, not a stage's
    assert words in lines[0]
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("case", ["labels 0", "too many labels", "unknown dataset", "unreadable file",
                                  "malformed file", "offline", "unknown preset", "unknown redo", "unknown solver",
                                  "one FID reference image", "one generated image"])
def test_bad_input_is_one_line_and_exit_code_2_before_any_work(in_process, tmp_path, case):
    args = {"labels 0": ["--dataset", SHAPES_FILE, "--labels", "0"],
            "too many labels": ["--dataset", SHAPES_FILE, "--labels", "100000"],
            "unknown dataset": ["--dataset", "imagenet42"],
            "unreadable file": ["--dataset", str(tmp_path / "garbage.pt")],
            "malformed file": ["--dataset", str(tmp_path / "floats.npz")],
            "offline": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")],
            "unknown preset": ["--dataset", SHAPES_FILE, "--preset", "huge"],
            "unknown redo": ["--dataset", SHAPES_FILE, "--redo", "stage9"],
            "unknown solver": ["--dataset", SHAPES_FILE, "--sample-solver", "ddim"],
            # FID needs two images for a covariance: refused before training, not after it.
            "one FID reference image": ["--dataset", SHAPES_FILE, "--fid-reference", "1"],
            "one generated image": ["--dataset", str(tmp_path / "one.npz"), "--sample-per-class", "1"]}[case]
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor file")
    np.savez(tmp_path / "floats.npz", train_x=np.zeros((4, 8, 8, 3), np.float32), train_y=np.zeros(4, np.int64))
    np.savez(tmp_path / "one.npz", train_x=np.zeros((4, 32, 32), np.uint8), train_y=np.zeros(4, np.int64))
    result = in_process("dpt.py", "--preset", "tiny", *args, "--out", str(tmp_path / "runs"))
    assert_one_line_error(result, *(["fewer than 2 images"] if "FID" in case or "generated" in case else []))
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_corrupt_checkpoint_is_refused_and_kept(in_process, tmp_path):
    checkpoint = tmp_path / "shapes-1l-s0" / "stage1" / "ckpt.pt"
    checkpoint.parent.parent.mkdir()
    config = plumbing.parse_config(configuration.DPTConfig, "", [*QUICK, "--out", str(tmp_path)])
    configuration.resolve(config)
    # the folder's config.json, as a run writes it
    dpt.check_run_folder(config, str(checkpoint.parent.parent), data.load_dataset(SHAPES_FILE))
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"half a checkpoint")
    result = in_process("dpt.py", *QUICK, "--out", str(tmp_path))
    assert_one_line_error(result, str(checkpoint), "damaged", "remove it")
    assert checkpoint.read_bytes() == b"half a checkpoint"  # never silently trained over


def test_a_full_disk_is_one_line_and_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    """Wherever mount is refused, the tests below skip; this one still checks the path."""
    path = tmp_path / "artifact.pt"
    plumbing.save_atomic({"version": 1}, str(path))

    def full_disk(obj, file):
        file.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(plumbing.UserError, match="No space left on device"):
        plumbing.save_atomic({"version": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path) == {"version": 1} and os.listdir(tmp_path) == ["artifact.pt"]


def test_sigterm_inside_a_write_leaves_no_temporary_file_and_exits_as_killed(tmp_path):
    path = tmp_path / "artifact.pt"
    plumbing.save_atomic({"version": 1}, str(path))
    before = signal.getsignal(signal.SIGTERM)

    def killed_while_writing():
        def write(obj, file):
            file.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler's time limit
        plumbing.save_atomic({"version": 2}, str(path), writer=write)
    with pytest.raises(SystemExit) as exit:
        plumbing.run_main(killed_while_writing)
    assert exit.value.code == 128 + signal.SIGTERM and os.listdir(tmp_path) == ["artifact.pt"]
    assert torch.load(path) == {"version": 1} and signal.getsignal(signal.SIGTERM) is before


def test_a_sigkills_half_written_files_are_removed_by_the_next_run_into_the_folder(quick_run, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(quick_run[1].parent, out)
    run = out / "shapes-1l-s0"
    (run / "stage2" / "ckpt.pt.tmp4242").write_bytes(b"")  # SIGKILL between open() and rename
    (run / "samples.pt.tmp4243").write_bytes(b"half")
    monkeypatch.setenv("DPT_FID_WEIGHTS", "/missing")
    monkeypatch.setattr(sys, "argv", ["dpt.py", *QUICK, "--out", str(out)])
    dpt.main()
    assert not [path for path in run.rglob("*") if plumbing.TEMPORARY.search(path.name)]
    assert (run / "stage2" / "ckpt.pt").exists() and (run / "samples.pt").exists()


def test_only_a_full_disk_is_told_to_free_space_and_a_bug_met_while_writing_stays_a_traceback(tmp_path, monkeypatch):
    path = str(tmp_path / "artifact.pt")

    def bug_after_a_handled_oserror(obj, file):
        try:
            os.stat(tmp_path / "missing")
        except OSError:
            raise TypeError("cannot pickle this object")  # its __context__ is the FileNotFoundError
    monkeypatch.setattr(torch, "save", bug_after_a_handled_oserror)
    with pytest.raises(TypeError, match="cannot pickle"):
        plumbing.save_atomic({}, path)

    def read_only(obj, file):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(plumbing.UserError) as error:
        plumbing.save_atomic({}, path)
    assert "Read-only file system" in str(error.value) and "free some space" not in str(error.value)
    assert os.listdir(tmp_path) == []


def write_big(kind, path):
    """Over 1 MiB written by each writer a run uses."""
    noise = torch.randint(0, 256, (600, 3, 32, 32), dtype=torch.uint8)  # random pixels do not compress
    if kind == "checkpoint":
        plumbing.save_atomic({"weights": noise}, path)
    elif kind == "json":
        plumbing.write_json({"history": noise.flatten()[:400_000].tolist()}, path)
    elif kind == "png":
        sample.save_grid(noise, torch.arange(600) // 6, path)  # 100 rows of 6
    else:
        data.write_glyphs(path, train=2000, test=200)


@pytest.mark.parametrize("kind", ["checkpoint", "json", "png", "npz"])
def test_a_real_full_disk_at_any_write_is_one_line_and_leaves_the_earlier_file_whole(small_disk, kind):
    disk, _ = small_disk
    path = str(disk / f"artifact.{kind}")
    plumbing.save_atomic({"version": 1}, path)
    with pytest.raises(plumbing.UserError, match="No space left on device") as error:
        write_big(kind, path)
    assert "\n" not in str(error.value) and path in str(error.value)
    assert torch.load(path) == {"version": 1} and os.listdir(disk) == [f"artifact.{kind}"]  # no temporary file


def test_a_run_that_fills_a_real_disk_stops_in_one_line_and_resumes_once_space_is_freed(in_process, small_disk):
    disk, resize = small_disk
    assert resize("30m")  # holds stage 2's first 20 MB checkpoint, not a second one beside it
    command = [*QUICK, "--no-baseline", "--out", str(disk)]  # no references: not the claim
    result = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == result.stderr.splitlines()[-1:], result.stderr  # after the progress bars, one line
    assert errors[0].startswith("error: cannot write") and "No space left on device" in errors[0]
    run = disk / "shapes-1l-s0"
    assert not list(disk.rglob("*.tmp*"))
    checkpoint = torch.load(run / "stage2" / "ckpt.pt")  # the previous checkpoint, whole
    assert resize("200m")
    result = in_process("dpt.py", *command, DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run / 'stage2' / 'ckpt.pt'} at {checkpoint['images_seen']} of" in result.stderr
    assert (run / "results.json").exists()


def test_two_processes_under_torchrun_run_every_stage_and_write_one_set_of_artifacts(tmp_path, fid_weights):
    result = run_script(*at_test_size("torchrun --nproc_per_node 4 dpt.py --labels 4 --preset cifar", "--dataset",
                                      SHAPES_FILE, "--ssl-arch", "small", "--ssl-batch", "8", "--ssl-uratio", "2",
                                      "--diffusion-size", "tiny", *SECONDS, "--out", str(tmp_path),
                                      "--fid-weights", fid_weights))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "shapes-4l-s0"
    assert json.loads((run / "config.json").read_text())["ssl_threshold"] == "freematch"  # the cifar preset's
    assert result.stdout.count("stage 3: with generated images") == 1  # one rank reports
    samples = torch.load(run / "samples.pt")
    assert torch.bincount(samples["labels"]).tolist() == [3] * 10
    assert len(torch.load(run / "stage2" / "ckpt.pt", weights_only=False)["rng"]) == 2
    assert json.loads((run / "results.json").read_text())["stage3_accuracy"] >= 0
    # FID and IS split across the two processes equal those of one process on all the images
    inception = fid.load_inception(fid_weights)
    real = fid.statistics(inception, data.load_dataset(SHAPES_FILE).train_x[:24].split(200))
    generated = fid.statistics(inception, samples["images"].split(200), keep_logits=True)
    saved = json.loads((run / "fid.json").read_text())
    assert saved["fid"] == pytest.approx(fid.frechet_distance(generated["mu"], generated["sigma"], real["mu"],
                                                              real["sigma"]), rel=1e-6)
    assert saved["inception_score"] == pytest.approx(fid.inception_score(generated["logits"])[0], rel=1e-6)

"""Small helpers every chapter uses: seeding, device and dtype choice; checked, atomic output files."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def set_seed(seed: int = 0, threads: int | None = 1) -> None:
    """Seed Python, NumPy and torch; pin torch to ``threads`` CPU threads (None leaves it alone).

    One thread makes small models deterministic and, on 2-core machines, faster: with two threads
    step times of a tiny model jump erratically.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if threads is not None:
        torch.set_num_threads(threads)


def progress_enabled(progress: bool = True) -> bool:
    """Whether to show a progress bar: ``progress``, unless ``TQDM_DISABLE`` is set (as ``make test`` and
    ``make execute`` do). Why our own check: tqdm reads that variable only for arguments left unset, and
    every bar here passes ``disable=`` explicitly, so in a notebook a bar would be stored as a widget."""
    return bool(progress) and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


def progress_bar(iterable, desc: str, progress: bool = True, **kwargs):
    """``tqdm.auto`` over ``iterable``, shown only when :func:`progress_enabled`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not progress_enabled(progress), **kwargs)


def launched_processes() -> int:
    """How many processes a distributed launch started (``WORLD_SIZE``, set by ``accelerate launch`` and
    ``torchrun``); 1 for a plain ``python``/``mlunlearn`` run."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def local_rank() -> int | None:
    """This process's index on its machine (``LOCAL_RANK``) under a distributed launch of several
    processes, else ``None``."""
    if launched_processes() < 2:
        return None
    try:
        return int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        return None


def is_main_process() -> bool:
    """True except in the processes of a distributed launch other than the first (``RANK`` > 0): the one
    process that writes the run's files and prints."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def process_device(device: str) -> str:
    """``device`` for this process: under a distributed launch ``cuda`` (no index) becomes
    ``cuda:<LOCAL_RANK>``, so each process loads its model onto its own GPU (not every one onto GPU 0,
    where the Trainer would find a quantized model it cannot move). A launcher that shows each process only
    its own GPU (``CUDA_VISIBLE_DEVICES`` per process: one device visible) keeps ``cuda``. Other devices,
    and an explicit ``cuda:N``, are returned as given."""
    rank = local_rank()
    if device != "cuda" or rank is None or not torch.cuda.is_available():
        return device
    return f"cuda:{rank}" if rank < torch.cuda.device_count() else device


def default_device() -> str:
    """``cuda`` when a GPU is visible (``cuda:<LOCAL_RANK>`` under a distributed launch:
    :func:`process_device`), else ``mps`` on Apple silicon, else ``cpu``."""
    if torch.cuda.is_available():
        return process_device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that support it (A100, L4, H100), fp16 on those that don't (Colab's T4), fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------------
# Where the package is installed from (Colab): named once, in pyproject.toml's [project.urls]
# ----------------------------------------------------------------------------------------------------

SOURCE_URL_LABEL = "Repository"  # the [project.urls] entry pip installs the package from (git+<url>)


def package_source() -> str:
    """The repository the package is installed from: ``[project.urls] Repository`` of ``pyproject.toml``.

    Read from the installed metadata (``Project-URL: Repository, <url>``). Why the fallback to the
    ``pyproject.toml`` beside the package: an editable install made before the entry existed has metadata
    without it until it is reinstalled (``make`` reinstalls when ``pyproject.toml`` changes)."""
    from importlib import metadata

    try:
        urls = metadata.distribution("mlunlearn").metadata.get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip() == SOURCE_URL_LABEL and url.strip():
            return url.strip()
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        url = tomllib.loads(pyproject.read_text()).get("project", {}).get("urls", {}).get(SOURCE_URL_LABEL)
        if url:
            return url
    raise RuntimeError(f"mlunlearn's metadata names no [project.urls] {SOURCE_URL_LABEL}; reinstall the package")


def install_requirement(extras: str = "analysis,gpu") -> str:
    """The pip requirement that installs this package with ``extras`` from its repository, e.g.
    ``mlunlearn[analysis,gpu] @ git+https://github.com/…`` (what every chapter's Colab cell installs)."""
    return f"mlunlearn[{extras}] @ git+{package_source()}" if extras else f"mlunlearn @ git+{package_source()}"


def install_command(extras: str = "analysis,gpu") -> str:
    """The shell command that installs the package on Colab: ``pip install -q "<install_requirement>"``."""
    return f'pip install -q "{install_requirement(extras)}"'


# ----------------------------------------------------------------------------------------------------
# Output files: checked before any work, written atomically
# ----------------------------------------------------------------------------------------------------

class OutputPathError(ValueError):
    """An output location that cannot be written; the message names the problem and the fix."""


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (what a later ``mkdir(parents=True)`` writes in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path, kind: str = "file", what: str | None = None) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a ``kind`` ("file" or "folder").

    Run it before loading a model or training, so no work is lost on a path found bad at the end. A file
    must not be an existing folder; a folder must not be an existing file. The closest existing folder on
    the way (the path's own folder, or the one a ``mkdir(parents=True)`` would start in) must accept a
    new file: that is tried with a small probe file, deleted at once (``os.access`` says yes to root on
    read-only file systems such as ``/proc``). Nothing is created. ``what`` names the option in the
    message (e.g. ``"--output"``). Returns ``path`` as a :class:`~pathlib.Path`.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    path = Path(path).expanduser()
    label = f"{what} {path}" if what else str(path)
    if kind == "file" and path.is_dir():
        raise OutputPathError(f"{label} is a folder, not a file; fix: give a file name, e.g. {path / 'results.json'}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputPathError(f"{label} is a file, not a folder; fix: give a new or existing folder")
    start = path if kind == "folder" and path.is_dir() else _nearest_existing(path.parent)
    if not start.is_dir():
        raise OutputPathError(f"cannot write {label}: {start} is a file, not a folder; "
                              "fix: choose a path whose parents are folders")
    try:
        fd, probe = tempfile.mkstemp(dir=start, prefix=".mlunlearn-probe-")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputPathError(f"cannot write {label}: {start} is not writable (creating a file there "
                              f"fails: {reason}); fix: choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_atomic(path, text: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` so that ``path`` is either its old content or the whole new one.

    The text is encoded first, written to a temporary file in the same folder, flushed and fsync'ed, then
    renamed over ``path`` with :func:`os.replace` (atomic on POSIX and Windows). On any failure the
    temporary file is removed and ``path`` is left untouched. The new file gets the usual permissions
    (``0o666`` minus the umask, or the old file's), not ``mkstemp``'s private ``0o600``. Parent folders
    are created; a symbolic link is written through (its target is replaced, the link kept). Returns
    ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    data = text.encode(encoding) if isinstance(text, str) else bytes(text)  # why first: fail before any file
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(target.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (best effort: not every OS or file system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Devices, seeds and thread counts, and the setup of a workflow job.

Threads: torch's intra-op thread count is, in order, ``$PIPELINE_NUM_THREADS`` (the user's choice), the CPUs
SLURM allocated to the job (``$SLURM_CPUS_PER_TASK``), the job's Snakemake ``{threads}`` (passed by the
workflow as ``python -m pipeline --threads N``, kept in ``$PIPELINE_JOB_THREADS``), else ONE: on the 2-core
machines this project is developed and tested on, two intra-op threads were erratic (2-10x slower).

Every workflow job starts with :func:`setup_job`: one log line with the device, the CUDA device's name and
the thread count; a job that asked its scheduler for a GPU (``--gpu-job``) and finds none stops with a
one-line error inside a SLURM job (it would run for hours on the CPU); elsewhere the line notes it.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from pipeline.errors import ConfigError, PipelineError


THREAD_SOURCES = ("PIPELINE_NUM_THREADS", "SLURM_CPUS_PER_TASK", "PIPELINE_JOB_THREADS")
"""Environment variables giving torch's thread count, first set wins (else 1)."""

SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
"""Set by SLURM in a job it allocated GPUs to."""


def default_threads(environ=None) -> tuple[int, str]:
    """Torch's thread count and where it comes from: the first of :data:`THREAD_SOURCES` set to a positive
    integer in ``environ`` (default ``os.environ``), else ``(1, "default")``."""
    environ = os.environ if environ is None else environ
    for name in THREAD_SOURCES:
        value = environ.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ConfigError("environment", name, f"expected a positive integer, got {value!r}") from None
            if n < 1:
                raise ConfigError("environment", name, f"expected a positive integer, got {value!r}")
            return n, f"${name}"
    return 1, "default"


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count (default: :func:`default_threads`)."""
    if n is None:
        n = default_threads()[0]
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def slurm_gpus_allocated(environ=None) -> bool:
    """Whether SLURM allocated GPUs to the job this process runs in."""
    environ = os.environ if environ is None else environ
    return any(environ.get(v, "").strip() not in ("", "0") for v in SLURM_GPU_VARS)


def check_gpu(gpu_job: bool, cuda: bool, preference: str = "auto", environ=None) -> str | None:
    """Refuse a GPU job without a usable GPU: raise :class:`PipelineError` inside a SLURM job (``$SLURM_JOB_ID``)
    when the job asked for a GPU (``gpu_job``) but torch sees no CUDA device (``cuda`` False: a CPU build of
    torch, or no GPU allocated) and the config does not force ``device: cpu``. Otherwise return a note for the
    log when a GPU is asked for or allocated but unusable (locally the workflow's ``gpu`` resource is only a
    counter), None when all is well."""
    environ = os.environ if environ is None else environ
    if cuda or preference == "cpu" or not (gpu_job or slurm_gpus_allocated(environ)):
        return None
    build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
    allocated = "SLURM allocated a GPU" if slurm_gpus_allocated(environ) else "no GPU allocated"
    if gpu_job and environ.get("SLURM_JOB_ID"):
        raise PipelineError(f"the job asked for a GPU but torch sees no CUDA device ({allocated}; {build}; "
                            f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): install "
                            f"the CUDA build of pytorch (docs/cluster.md) or set execution.gpu_request: none")
    return f"{'asked for' if gpu_job else allocated + ','} a GPU, torch sees none ({build}): running on the CPU"


def describe_device(device: torch.device, threads: int, threads_from: str) -> str:
    """One line: the device, the CUDA device's name and memory, torch's version and thread count."""
    name = ""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f" ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"device {device}{name}, torch {torch.__version__}, threads {threads} ({threads_from})"


def setup_job(threads: int | None = None, gpu_job: bool = False, preference: str = "auto") -> str:
    """The start of a workflow job: record Snakemake's ``threads`` for :func:`configure_threads`, set the
    thread count, check the GPU (:func:`check_gpu`) and return the line describing the device."""
    if threads is not None:
        os.environ["PIPELINE_JOB_THREADS"] = str(threads)
    n, source = default_threads()
    configure_threads(n)
    warning = check_gpu(gpu_job, torch.cuda.is_available(), preference)
    device = choose_device(preference)
    line = describe_device(device, torch.get_num_threads(), source)
    return line if warning is None else f"{line}; {warning}"


def choose_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda`` force one."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda")
    if preference != "auto":
        raise ValueError(f"unknown device preference {preference!r} (auto, cpu, cuda)")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tqdm_disable() -> bool:
    """tqdm's ``disable`` argument: bars only on a TTY, so SLURM logs are not flooded."""
    return not sys.stderr.isatty()

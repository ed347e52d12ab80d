"""A workflow job's setup (pipeline.runtime.setup_job via `python -m pipeline --threads N [--gpu-job]`):
torch threads from the environment, one log line naming the device, and a refusal of a GPU job without a
GPU inside SLURM."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import ConfigError, PipelineError
from pipeline.runtime import check_gpu, default_threads, describe_device

ENV_VARS = ("PIPELINE_NUM_THREADS", "SLURM_CPUS_PER_TASK", "PIPELINE_JOB_THREADS", "SLURM_JOB_ID",
            "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:  # set then removed: undone at the end even when setup_job sets it meanwhile
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)
    yield monkeypatch
    torch.set_num_threads(1)


@pytest.mark.parametrize("env, expected", [
    ({}, (1, "default")),  # a laptop: one thread, as before
    ({"PIPELINE_JOB_THREADS": "3"}, (3, "$PIPELINE_JOB_THREADS")),  # Snakemake's {threads}
    ({"PIPELINE_JOB_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}, (8, "$SLURM_CPUS_PER_TASK")),  # SLURM's CPUs win
    ({"PIPELINE_JOB_THREADS": "3", "SLURM_CPUS_PER_TASK": "8", "PIPELINE_NUM_THREADS": "2"},
     (2, "$PIPELINE_NUM_THREADS")),  # the user's choice wins over all
])
def test_thread_count_comes_from_the_environment_in_order(env, expected):
    assert default_threads(env) == expected


@pytest.mark.parametrize("value", ["0", "eight", "-2"])
def test_a_bad_thread_count_is_a_one_line_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match="SLURM_CPUS_PER_TASK.*positive integer"):
        default_threads({"SLURM_CPUS_PER_TASK": value})


def test_a_gpu_job_without_a_gpu_is_refused_inside_slurm_only():
    slurm = {"SLURM_JOB_ID": "42"}
    with pytest.raises(PipelineError, match="asked for a GPU but torch sees no CUDA device"):
        check_gpu(True, cuda=False, environ=slurm)
    # SLURM gave the job a GPU that torch cannot use (a CPU build of torch): named in the error
    with pytest.raises(PipelineError, match="SLURM allocated a GPU"):
        check_gpu(True, cuda=False, environ={**slurm, "SLURM_GPUS_ON_NODE": "1"})
    # a job that asked for none (calibrate, report) runs on, with a note
    assert "running on the CPU" in check_gpu(False, cuda=False, environ={**slurm, "SLURM_GPUS_ON_NODE": "1"})
    assert check_gpu(True, cuda=True, environ=slurm) is None
    assert check_gpu(True, cuda=False, preference="cpu", environ=slurm) is None  # the config forces the CPU
    assert check_gpu(False, cuda=False, environ=slurm) is None  # a CPU job
    assert "running on the CPU" in check_gpu(True, cuda=False, environ={})  # a laptop: a note, no refusal
    assert check_gpu(False, cuda=False, environ={}) is None


def test_a_job_logs_its_device_and_threads_at_its_start(clean_env, caplog, capsys):
    clean_env.setenv("SLURM_CPUS_PER_TASK", "3")
    with caplog.at_level(logging.INFO, logger="pipeline.job"):
        assert main(["--threads", "2", "config", "check", "config/config.yaml"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.job"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert len(lines) == 1 and lines[0].startswith(f"config: device {device}")
    assert "threads 3 ($SLURM_CPUS_PER_TASK)" in lines[0] and torch.get_num_threads() == 3
    clean_env.delenv("SLURM_CPUS_PER_TASK")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.job"):
        assert main(["--threads", "2", "config", "check", "config/config.yaml"]) == 0
    assert "threads 2 ($PIPELINE_JOB_THREADS)" in caplog.text and torch.get_num_threads() == 2


def test_without_job_options_a_command_keeps_one_thread_and_logs_no_job_line(clean_env, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.job"):
        assert main(["config", "check", "config/config.yaml"]) == 0
    assert not [r for r in caplog.records if r.name == "pipeline.job"]
    assert default_threads() == (1, "default")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_job_without_a_gpu_stops_in_one_line_inside_slurm(clean_env, capsys):
    clean_env.setenv("SLURM_JOB_ID", "42")
    assert main(["--gpu-job", "config", "check", "config/config.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch sees no CUDA device" in err and "gpu_request" in err


def test_the_device_line_names_the_gpu_and_its_memory(monkeypatch):
    class Props:
        name, total_memory = "NVIDIA H100 80GB HBM3", 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    line = describe_device(torch.device("cuda"), 8, "$SLURM_CPUS_PER_TASK")
    assert line.startswith("device cuda (NVIDIA H100 80GB HBM3, 80 GiB), torch ")
    assert line.endswith("threads 8 ($SLURM_CPUS_PER_TASK)")

# Source galaxies and the diffusion prior over them.


rule sources:
    input:
        cfg=CFG_LENSING,
    output:
        "results/sources/sources.fits",
    params:
        py=PY,
    # the first job of the DAG, alone: GalSim rendering in parallel processes (output independent of it)
    threads: workflow.cores
    conda:
        "../../environment.yml"
    log:
        "logs/sources.log",
    benchmark:
        "benchmarks/sources.tsv"
    shell:
        "{params.py} -m pipeline sources --config {input.cfg} --out {output} --workers {threads} > {log} 2>&1"


rule train_prior:
    input:
        cfg=CFG_PRIOR,
        data="results/sources/sources.fits",
    output:
        # only the final export is an output: Snakemake deletes outputs of failed jobs, and the
        # rolling step-N/ checkpoints beside it must survive so the rerun resumes from them
        directory("results/prior/run/final"),
    params:
        py=PY,
        run_dir=parent_dir,
        command=train_prior_command,
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    log:
        "logs/train_prior.log",
    benchmark:
        "benchmarks/train_prior.tsv"
    shell:
        "{params.py} -m pipeline {params.command} > {log} 2>&1"

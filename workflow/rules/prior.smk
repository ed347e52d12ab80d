# Source galaxies and the diffusion prior over them.


rule sources:
    input:
        cfg=CFG_LENSING,
    output:
        "results/sources/sources.fits",
    log:
        "logs/sources.log",
    benchmark:
        "benchmarks/sources.tsv"
    conda:
        "../../environment.yml"
    # the first job of the DAG, alone: GalSim rendering in parallel processes (output independent of it)
    threads: all_cores()
    params:
        # its threads are worker processes: one torch thread
        pipeline=lambda wildcards, threads, resources: pipeline_call(wildcards, 1, resources),
    shell:
        "{params.pipeline} sources --config {input.cfg} --out {output} --workers {threads} > {log} 2>&1"


rule train_prior:
    input:
        cfg=CFG_PRIOR,
        data="results/sources/sources.fits",
    output:
        # only the final export is an output: Snakemake deletes outputs of failed jobs, and the
        # rolling step-N/ checkpoints beside it must survive so the rerun resumes from them
        directory("results/prior/run/final"),
    log:
        "logs/train_prior.log",
    benchmark:
        "benchmarks/train_prior.tsv"
    conda:
        "../../environment.yml"
    # a GPU only to train: installing the shipped checkpoint is a copy
    resources:
        **gpu_resources(not config.get("prior_checkpoint")),
    params:
        pipeline=pipeline_call,
        run_dir=parent_dir,
        command=train_prior_command,
    shell:
        "{params.pipeline} {params.command} > {log} 2>&1"

# Source galaxies and the diffusion prior over them.


rule sources:
    input:
        cfg=CONFIG,
    output:
        "results/sources/sources.fits",
    log:
        "logs/sources.log",
    benchmark:
        "benchmarks/sources.tsv"
    shell:
        "{PY} -m pipeline sources --config {input.cfg} --out {output} > {log} 2>&1"


rule train_prior:
    input:
        cfg=CONFIG,
        data="results/sources/sources.fits",
    output:
        # only the final export is an output: Snakemake deletes outputs of failed jobs, and the
        # rolling step-N/ checkpoints beside it must survive so the rerun resumes from them
        directory("results/prior/run/final"),
    params:
        run_dir="results/prior/run",
    resources:
        gpu=1,
    log:
        "logs/train_prior.log",
    benchmark:
        "benchmarks/train_prior.tsv"
    shell:
        "{PY} -m pipeline train-prior --config {input.cfg} --data {input.data}"
        " --out {params.run_dir} > {log} 2>&1"

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
        directory("results/prior/model"),
    params:
        # rolling checkpoints live outside output: so a failed job keeps them and the rerun resumes
        run_dir="results/prior/checkpoints",
    resources:
        gpu=1,
    log:
        "logs/train_prior.log",
    benchmark:
        "benchmarks/train_prior.tsv"
    shell:
        "{PY} -m pipeline train-prior --config {input.cfg} --data {input.data}"
        " --out {params.run_dir} --export {output} > {log} 2>&1"

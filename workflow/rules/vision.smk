# Secondary target: the vision benchmarks of the RTB paper (`snakemake vision`).


rule vision:
    input:
        "results/vision/table.md",


rule bench_vision:
    input:
        cfg=CONFIG,
    output:
        table="results/vision/table.md",
    params:
        outdir="results/vision",
    resources:
        gpu=1,
    log:
        "logs/bench_vision.log",
    benchmark:
        "benchmarks/bench_vision.tsv"
    shell:
        "{PY} -m pipeline bench vision --config {input.cfg} --out {params.outdir} > {log} 2>&1"

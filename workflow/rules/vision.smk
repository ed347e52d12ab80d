# Secondary target: the vision benchmarks of the RTB paper (`snakemake vision`).


rule vision:
    input:
        "results/vision/table.md",


rule bench_vision:
    input:
        cfg=CFG_ALL,
    output:
        table="results/vision/table.md",
    params:
        py=PY,
        outdir=output_dir,
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    log:
        "logs/bench_vision.log",
    benchmark:
        "benchmarks/bench_vision.tsv"
    shell:
        "{params.py} -m pipeline bench vision --config {input.cfg} --out {params.outdir} > {log} 2>&1"

# Secondary target: the vision benchmarks of the RTB paper (`snakemake vision`).


rule vision:
    input:
        "results/vision/table.md",


rule bench_vision:
    input:
        cfg=CFG_ALL,
    output:
        table="results/vision/table.md",
    log:
        "logs/bench_vision.log",
    benchmark:
        "benchmarks/bench_vision.tsv"
    conda:
        "../../environment.yml"
    resources:
        **gpu_resources(),
    params:
        pipeline=pipeline_call,
        outdir=output_dir,
    shell:
        "{params.pipeline} bench vision --config {input.cfg} --out {params.outdir} > {log} 2>&1"
